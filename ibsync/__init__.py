"""ibsync: back up iPhones and iPads to storage you own, with history, deduplication and encryption."""

__version__ = "0.1.0"
