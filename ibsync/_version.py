"""The version of ibsync, on its own so that every layer may read it without importing the
library API that ibsync/__init__.py offers."""

__version__ = "0.1.0"
