"""Content-defined chunking, with chunk sizes chosen by what a file holds.

iOS rewrites its sqlite databases (sms.db, Photos.sqlite, Manifest.db, ...) by scattered 4 KiB
page writes; with large chunks every touched page drags a whole large chunk into the next
snapshot. Photos and videos are never edited in place, and are most of the bytes. So sqlite
files get small chunks and everything else large ones: the daily increment stays near the real
change while the number of chunks (and so the index) scales with the number of files.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import BinaryIO, Iterator

from pyfastcdc.cy import FastCDC

SQLITE_MAGIC = b"SQLite format 3\x00"

# Files up to this size are read whole and cut in memory; larger ones are streamed.
WHOLE_READ_LIMIT = 8 << 20


@dataclass(frozen=True)
class ChunkProfile:
    """pyfastcdc parameters. FastCDC skips min_size bytes before looking for a cut point, so the
    mean chunk is about min_size + avg_size."""

    min_size: int
    avg_size: int
    max_size: int


@dataclass(frozen=True)
class ChunkingPolicy:
    default: ChunkProfile
    sqlite: ChunkProfile
    seed: int  # permutes the gear table; secret in encrypted repositories

    def profile_for(self, head: bytes | memoryview) -> ChunkProfile:
        return self.sqlite if bytes(head[:16]) == SQLITE_MAGIC else self.default

    def to_config(self) -> dict:
        return {"algorithm": "fastcdc2020", "default": asdict(self.default), "sqlite": asdict(self.sqlite)}

    @classmethod
    def from_config(cls, d: dict, seed: int) -> "ChunkingPolicy":
        return cls(ChunkProfile(**d["default"]), ChunkProfile(**d["sqlite"]), seed)


DEFAULT_PROFILES = {
    # mean ~1 MiB, as restic: few chunks for photos, videos and large files
    "default": ChunkProfile(min_size=256 << 10, avg_size=768 << 10, max_size=4 << 20),
    # mean ~16 KiB: a handful of 4 KiB page writes re-store tens of KiB, not megabytes
    "sqlite": ChunkProfile(min_size=4 << 10, avg_size=12 << 10, max_size=64 << 10),
}


def default_policy(seed: int) -> ChunkingPolicy:
    return ChunkingPolicy(DEFAULT_PROFILES["default"], DEFAULT_PROFILES["sqlite"], seed)


class Chunker:
    """Cuts files into chunks; safe to share between threads (each gets its own FastCDC)."""

    def __init__(self, policy: ChunkingPolicy) -> None:
        self.policy = policy
        self._local = threading.local()

    def _cdc(self, profile: ChunkProfile) -> FastCDC:
        cache = getattr(self._local, "cdc", None)
        if cache is None:
            cache = self._local.cdc = {}
        cdc = cache.get(profile)
        if cdc is None:
            cdc = cache[profile] = FastCDC(
                profile.avg_size,
                min_size=profile.min_size,
                max_size=profile.max_size,
                seed=self.policy.seed,
            )
        return cdc

    def split(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Chunks of an in-memory buffer (each view stays valid while ``data`` lives)."""
        if not len(data):
            return  # an empty file has no chunks
        profile = self.policy.profile_for(data)
        if len(data) <= profile.min_size:
            yield memoryview(data)
            return
        for chunk in self._cdc(profile).cut_buf(data):
            yield chunk.data

    def split_file(self, f: BinaryIO, size: int) -> Iterator[memoryview]:
        """Chunks of an open file. With streaming, a view is valid only until the next one is
        asked for, so consumers must finish with each chunk first."""
        if size <= WHOLE_READ_LIMIT:
            yield from self.split(f.read())
            return
        head = f.read(16)
        f.seek(0)
        for chunk in self._cdc(self.policy.profile_for(head)).cut_stream(f):
            yield chunk.data
