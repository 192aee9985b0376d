"""Files received from a device, stored as they arrive: chunks go to the write session as soon
as the chunker has cut them, so a file is never written to local disk and at most about two
max-size chunks of it are held in memory (``ChunkStream``).

The storing (cutting, hashing, zstd, AES-GCM) runs on one worker thread while the event loop
thread keeps receiving (socket and TLS): the two halves of a capture then use both cores, and
a large file streams at the speed of the slower half instead of the sum of both. One worker, in
order, so each file's chunks are cut in sequence; received bytes are handed over in pieces of
about 1 MiB (fewer hand-overs), and at most ``MAX_QUEUED`` pieces wait, so memory stays bounded
when the device sends faster than the worker stores.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from ..format.chunker import SQLITE_MAGIC, Chunker
from ..format.pack import BlobType
from ..ingest.archiver import PROBE_MIN
from ..repo.session import WriteSession

HANDOVER = 1 << 20
MAX_QUEUED = 8


class _Chunks:
    """One file's chunking and storing, on the worker thread only."""

    __slots__ = ("_session", "_stream", "content", "size", "_compress", "_first")

    def __init__(self, session: WriteSession, chunker: Chunker) -> None:
        self._session = session
        self._stream = chunker.stream()
        self.content = bytearray()  # raw 32-byte ids, joined: what the virtual folder keeps
        self.size = 0
        self._compress = True
        self._first = True

    def feed(self, data: bytes) -> None:
        for chunk in self._stream.feed(data):
            self._save(chunk)

    def whole(self, chunker: Chunker, data: bytes) -> tuple[int, bytes]:
        """A file received whole: cut as the stream would (``split`` gives the same chunks)."""
        for chunk in chunker.split(data):
            self._save(chunk)
        return self.size, bytes(self.content)

    def finish(self) -> tuple[int, bytes]:
        for chunk in self._stream.finish():
            self._save(chunk)
        return self.size, bytes(self.content)

    def _save(self, chunk: memoryview) -> None:
        blob_id, new, compressed = self._session.save_blob_ex(BlobType.DATA, chunk, compress=self._compress)
        # as the archiver does: a large first chunk that zstd cannot shrink marks the file as
        # incompressible (photo, video, encrypted payload) and its other chunks skip zstd
        if self._first and new and not compressed and len(chunk) >= PROBE_MIN and bytes(chunk[:16]) != SQLITE_MAGIC:
            self._compress = False
        self._first = False
        self.content += blob_id
        self.size += len(chunk)


class IncomingFile:
    """One file being received: ``await write`` its pieces in order, then ``close`` for a future
    of its size and blob ids (raw 32-byte ids joined, as ``VirtualTree.put_file`` takes them).
    A file abandoned midway (the device failed to read it, the connection dropped) simply is not closed: the chunks already stored
    stay in the repository, unreferenced until prune, and deduplicate against the next attempt."""

    __slots__ = ("_store", "_chunks", "_buffer", "_buffered", "_handed_over")

    def __init__(self, store: FileStore) -> None:
        self._store = store
        self._chunks = _Chunks(store.session, store.chunker)
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._handed_over = False

    async def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= HANDOVER:
            await self._store.throttle()
            self._store.submit(self._chunks.feed, self._take())
            self._handed_over = True

    def close(self) -> Future:
        """The file is complete: a future of (size, blob ids). A file smaller than one hand-over
        is stored right here: for the many small files of a phone, a trip to the worker costs
        more than storing them (measured: 741 instead of 451 µs of CPU per file)."""
        if not self._handed_over:
            done: Future = Future()
            if self._buffer:
                self._chunks.feed(self._take())
            done.set_result(self._chunks.finish())
            return done
        if self._buffer:
            self._store.submit(self._chunks.feed, self._take())
        return self._store.submit(self._chunks.finish)

    def _take(self) -> bytes:
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer = []
        self._buffered = 0
        return data


class FileStore:
    """Where received files go: one write session, one chunker, one storing thread."""

    def __init__(self, session: WriteSession, chunker: Chunker) -> None:
        self.session = session
        self.chunker = chunker
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ibsync-capture-store")
        self._queued: deque[Future] = deque()

    def begin(self) -> IncomingFile:
        return IncomingFile(self)

    def submit(self, fn, *args) -> Future:
        fut = self._worker.submit(fn, *args)
        self._queued.append(fut)
        return fut

    async def throttle(self) -> None:
        """Wait while too much received data waits to be stored."""
        while self._queued and self._queued[0].done():
            self._queued.popleft().result()  # a storing error surfaces here
        while len(self._queued) >= MAX_QUEUED:
            await asyncio.wrap_future(self._queued.popleft())

    def store_bytes(self, data: bytes) -> tuple[int, bytes]:
        """A whole file (one the host writes itself, Info.plist, or a small file received
        whole), stored on the calling thread before returning."""
        return _Chunks(self.session, self.chunker).whole(self.chunker, data)

    def close(self) -> None:
        """Wait for the worker (its errors were or will be raised where results are used)."""
        self._worker.shutdown(wait=True)
