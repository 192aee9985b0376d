"""Chunking, chosen by what a file holds.

iOS rewrites its sqlite databases (sms.db, Photos.sqlite, Manifest.db, ...) by writing 4 KiB
pages in place. Such a file is cut into fixed blocks aligned to its pages: a rewritten page
changes exactly one block and never shifts the others, which content-defined chunking of the
same mean size cannot promise, and the blocks compress better than CDC's smaller pieces.
Everything else (photos, videos, plists, caches; never edited in place) goes through
content-defined chunking with large chunks, so the chunk count scales with the number of files.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import BinaryIO

from pyfastcdc.cy import FastCDC

SQLITE_MAGIC = b"SQLite format 3\x00"

# Files up to this size are read whole and cut in memory; larger ones are streamed.
WHOLE_READ_LIMIT = 8 << 20
# A ChunkStream cuts what it holds once it holds this many max-size chunks' worth.
STREAM_WINDOW_CHUNKS = 2


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
    sqlite_block: int  # fixed block size for sqlite databases (a multiple of every page size up to it)
    seed: int  # permutes the CDC gear table; secret in encrypted repositories

    def to_config(self) -> dict:
        return {"algorithm": "fastcdc2020", "default": asdict(self.default), "sqlite_block": self.sqlite_block}

    @classmethod
    def from_config(cls, d: dict, seed: int) -> ChunkingPolicy:
        return cls(ChunkProfile(**d["default"]), int(d["sqlite_block"]), seed)


# mean ~1 MiB, as restic: few chunks for photos, videos and large files
DEFAULT_PROFILE = ChunkProfile(min_size=256 << 10, avg_size=768 << 10, max_size=4 << 20)
# 8 pages of 4 KiB; measured on generated data against 16-64 KiB CDC and 64-128 KiB blocks
# (docs/design.md section 5)
SQLITE_BLOCK = 32 << 10


def default_policy(seed: int) -> ChunkingPolicy:
    return ChunkingPolicy(DEFAULT_PROFILE, SQLITE_BLOCK, seed)


class Chunker:
    """Cuts files into chunks; safe to share between threads (each gets its own FastCDC)."""

    def __init__(self, policy: ChunkingPolicy) -> None:
        self.policy = policy
        self._local = threading.local()

    def _cdc(self) -> FastCDC:
        cdc = getattr(self._local, "cdc", None)
        if cdc is None:
            p = self.policy.default
            cdc = self._local.cdc = FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size, seed=self.policy.seed)
        return cdc

    def split(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Chunks of an in-memory buffer (each view stays valid while ``data`` lives)."""
        view = memoryview(data)
        if not len(view):
            return  # an empty file has no chunks
        if bytes(view[:16]) == SQLITE_MAGIC:
            block = self.policy.sqlite_block
            for start in range(0, len(view), block):
                yield view[start : start + block]
        elif len(view) <= self.policy.default.min_size:
            yield view
        else:
            for chunk in self._cdc().cut_buf(view):
                yield chunk.data

    def split_file(self, f: BinaryIO, size: int) -> Iterator[memoryview]:
        """Chunks of an open file. With streaming, a view is valid only until the next one is
        asked for, so consumers must finish with each chunk first."""
        if size <= WHOLE_READ_LIMIT:
            yield from self.split(f.read())
            return
        head = f.read(16)
        f.seek(0)
        if head == SQLITE_MAGIC:
            block = self.policy.sqlite_block
            while True:
                data = f.read(block)
                if not data:
                    return
                yield memoryview(data)
        else:
            for chunk in self._cdc().cut_stream(f):
                yield chunk.data

    def stream(self) -> ChunkStream:
        """A chunker for bytes that arrive piece by piece (a file received from a device): the
        chunks are exactly those ``split`` gives for the whole content."""
        return ChunkStream(self)


class ChunkStream:
    """Cuts a file fed in pieces of any size, holding at most about two max-size chunks.

    FastCDC decides a cut point from the bytes after the chunk's start only, and never looks
    further than ``max_size``: a chunk that starts with at least ``max_size`` bytes held is cut
    exactly where cutting the whole file would cut it. So the held bytes are cut when they
    reach a window of a few max-size chunks, the chunks that started early enough are given
    out, and the rest waits for more bytes (or ``finish``). Sqlite databases (the first 16
    bytes decide, as in ``split``) go out in fixed blocks as soon as a block is complete.

    Not thread-safe: one stream per file, fed by one thread. Each chunk given out is a view of
    an immutable buffer of its own, valid as long as the caller keeps it.
    """

    def __init__(self, chunker: Chunker) -> None:
        self._chunker = chunker
        self._parts: list[bytes] = []
        self._held = 0
        self._sqlite: bool | None = None  # unknown until 16 bytes have arrived
        policy = chunker.policy
        self._block = policy.sqlite_block
        self._max = policy.default.max_size
        self._window = STREAM_WINDOW_CHUNKS * self._max

    def feed(self, data: bytes) -> Iterable[memoryview]:
        """Take the next piece of the file; returns the chunks complete so far (often none)."""
        if not data:
            return ()
        self._parts.append(data)
        self._held += len(data)
        if self._sqlite is None:
            if self._held < 16:
                return ()
            head = self._parts[0] if len(self._parts[0]) >= 16 else b"".join(self._parts)
            self._sqlite = head[:16] == SQLITE_MAGIC
        if self._sqlite:
            return self._blocks(final=False) if self._held >= self._block else ()
        return self._cut(final=False) if self._held >= self._window else ()

    def finish(self) -> Iterable[memoryview]:
        """The file is complete: the remaining chunks."""
        if not self._held:
            return ()
        if self._sqlite:
            return self._blocks(final=True)
        return self._cut(final=True)

    def _take(self) -> bytes:
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        self._held = 0
        return data

    def _keep(self, rest: memoryview) -> None:
        if len(rest):
            self._parts = [bytes(rest)]
            self._held = len(rest)

    def _blocks(self, final: bool) -> list[memoryview]:
        view = memoryview(self._take())
        end = len(view) if final else len(view) - len(view) % self._block
        out = [view[i : i + self._block] for i in range(0, end, self._block)]
        self._keep(view[end:])
        return out

    def _cut(self, final: bool) -> list[memoryview]:
        view = memoryview(self._take())
        if len(view) <= self._chunker.policy.default.min_size:
            return [view]  # as split(): FastCDC would not cut it either
        out: list[memoryview] = []
        start = 0
        for chunk in self._chunker._cdc().cut_buf(view):
            if not final and len(view) - chunk.offset < self._max:
                break  # this cut could still move with more bytes: wait for them
            out.append(chunk.data)
            start = chunk.offset + chunk.length
        if not final:
            self._keep(view[start:])
        return out
