"""Files received from a device, stored as they arrive: chunks go to the write session as soon
as the chunker has cut them, so a file is never written to local disk and at most about two
max-size chunks of it are held in memory (``ChunkStream``)."""

from __future__ import annotations

from ..format.chunker import SQLITE_MAGIC, Chunker
from ..format.pack import BlobType
from ..ingest.archiver import PROBE_MIN
from ..repo.session import WriteSession


class IncomingFile:
    """One file being received: ``write`` its pieces in order, then ``close`` for its size
    and blob ids (hex, as trees hold them). A file abandoned midway (the device failed to read
    it, the connection dropped) simply is not closed: the chunks already stored stay in the
    repository, unreferenced until prune, and deduplicate against the next attempt."""

    __slots__ = ("_session", "_stream", "_content", "_size", "_compress", "_first")

    def __init__(self, session: WriteSession, chunker: Chunker) -> None:
        self._session = session
        self._stream = chunker.stream()
        self._content: list[str] = []
        self._size = 0
        self._compress = True
        self._first = True

    def write(self, data: bytes) -> None:
        for chunk in self._stream.feed(data):
            self._save(chunk)

    def close(self) -> tuple[int, list[str]]:
        for chunk in self._stream.finish():
            self._save(chunk)
        return self._size, self._content

    def _save(self, chunk: memoryview) -> None:
        blob_id, new, compressed = self._session.save_blob_ex(BlobType.DATA, chunk, compress=self._compress)
        # as the archiver does: a large first chunk that zstd cannot shrink marks the file as
        # incompressible (photo, video, encrypted payload) and its other chunks skip zstd
        if (self._first and new and not compressed and len(chunk) >= PROBE_MIN
                and bytes(chunk[:16]) != SQLITE_MAGIC):
            self._compress = False
        self._first = False
        self._content.append(blob_id.hex())
        self._size += len(chunk)


class FileStore:
    """Where received files go: one write session, one chunker."""

    def __init__(self, session: WriteSession, chunker: Chunker) -> None:
        self.session = session
        self.chunker = chunker

    def begin(self) -> IncomingFile:
        return IncomingFile(self.session, self.chunker)

    def store_bytes(self, data: bytes) -> tuple[int, list[str]]:
        """A whole file the host writes itself (Info.plist)."""
        f = self.begin()
        f.write(data)
        return f.close()
