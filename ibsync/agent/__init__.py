"""Automatic backups: the agent that backs up each device when it is due, its settings, history and status."""
