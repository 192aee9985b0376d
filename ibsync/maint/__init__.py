"""Keeping a repository healthy: check, stats (and later forget and prune)."""
