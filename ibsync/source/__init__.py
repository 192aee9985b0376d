"""Where backups come from: existing backup folders (and, later, live devices)."""
