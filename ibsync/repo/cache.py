"""A local cache of a remote repository's index and snapshot objects, and its tree packs.

Index and snapshot names are the BLAKE3 of their stored bytes, so a cached copy is verified by
hashing it before use (a damaged or altered cache entry is simply fetched again): the cache is
never trusted blindly. Tree packs are read by range; every blob read from one is authenticated
and checked against its id as it is decoded, and a pack that fails is dropped and fetched again. Which objects exist is always asked of the repository (one listing per kind);
cached objects the listing no longer has are dropped. The cache holds the objects as stored,
still encrypted, in ``<cache dir>/<repository id>/<kind>/<name>``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..format.crypto import storage_name
from ..storage import Kind
from ..userdirs import user_dir

CACHED_KINDS = frozenset({Kind.INDEX, Kind.SNAPSHOTS})


def default_cache_dir() -> Path:
    return user_dir("cache")


def cache_root() -> Path:
    """The cache folder root: $IBSYNC_CACHE_DIR, else the platform's user cache folder."""
    return Path(os.environ.get("IBSYNC_CACHE_DIR") or default_cache_dir()).expanduser()


class ObjectCache:
    def __init__(self, root: Path, repo_id: str) -> None:
        self.root = Path(root).expanduser() / repo_id
        self.hits = 0
        self.misses = 0

    def _path(self, kind: Kind, name: str) -> Path:
        return self.root / kind.value / name

    def get(self, kind: Kind, name: str) -> bytes | None:
        try:
            data = self._path(kind, name).read_bytes()
        except OSError:
            self.misses += 1
            return None
        if storage_name(data) != name:
            self.misses += 1
            return None  # damaged or altered: the caller fetches it again
        self.hits += 1
        return data

    def put(self, kind: Kind, name: str, data: bytes) -> None:
        """Best effort: a cache that cannot be written only costs speed."""
        folder = self.root / kind.value
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".tmp-{secrets.token_hex(6)}"
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)
        except OSError:
            pass

    def read_range(self, kind: Kind, name: str, offset: int, length: int) -> bytes | None:
        """Part of a cached object, not verified here (the caller authenticates what it reads)."""
        try:
            with open(self._path(kind, name), "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError:
            self.misses += 1
            return None
        if len(data) != length:
            self.misses += 1
            return None
        self.hits += 1
        return data

    def drop(self, kind: Kind, name: str) -> None:
        try:
            self._path(kind, name).unlink()
        except OSError:
            pass

    def retain(self, kind: Kind, names: set[str]) -> None:
        """Drop cached objects the repository no longer lists."""
        try:
            entries = list((self.root / kind.value).iterdir())
        except OSError:
            return
        for p in entries:
            if p.name not in names:
                try:
                    p.unlink()
                except OSError:
                    pass
