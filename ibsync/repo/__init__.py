"""The repository: config, keys, packs, index and snapshots over a Storage."""

from .repository import Repository

__all__ = ["Repository"]
