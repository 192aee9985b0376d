"""A file's content, read at any offset, from a stream that only goes forward.

A snapshot's file is a chain of blobs, each verified and (for an encrypted iOS backup)
decrypted in order: the browsing layer gives it as an iterator of bytes. FUSE and WebDAV ask
for ranges in any order: the kernel's read-ahead sends a sequential ``cp`` out of order on
several threads, sqlite and media players jump backwards, a ZIP or MP4 reader starts at the end.

Chosen: the stream is read forward once, and what it yields is kept in a private, unlinked
temporary file; a range below what was read is answered from that file, a range beyond it
reads the stream on to its end. The alternative, a sequential reader that restarts from the
first blob whenever a read goes backwards, is quadratic for exactly the programs people open
a backup with (a sqlite database, a video), and out-of-order read-ahead makes even ``cp`` go
backwards now and then. Memory stays at one blob per open file; disk use is at most the size
of the files open at the time, released when they are closed (the temporary file is unlinked
from the start, so nothing is left behind if the process is killed).
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import IO, cast


class SpilledContent:
    """Reads at any offset of one file's stream (``open_stream`` is called once, on the first
    read). Safe to share between threads: reads take turns."""

    def __init__(self, open_stream: Callable[[], Iterator[bytes]], size: int) -> None:
        self.size = size
        self._open_stream = open_stream
        self._stream: Iterator[bytes] | None = None
        self._ended = False
        self._error: BaseException | None = None  # what ended the stream early: every later read past it fails
        self._have = 0  # bytes of the stream written to the spill file so far
        self._spill: IO[bytes] | None = None  # the unlinked temporary file, made on the first read
        self._closed = False
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``: fewer only at the end of the file. What stopped
        the stream (a damaged blob) is raised again by every read that needs more of it."""
        if length <= 0 or offset < 0:
            return b""
        with self._lock:
            if self._closed:
                raise ValueError("read of a closed file")
            end = offset + length
            while self._have < end and not self._ended:
                if self._error is not None:
                    raise self._error
                try:
                    if self._stream is None:
                        self._stream = iter(self._open_stream())
                        self._spill = tempfile.TemporaryFile(prefix="ibsync-mount-")
                    chunk = next(self._stream, None)
                except Exception as e:
                    self._error = e
                    self._stream = None
                    raise
                if chunk is None:
                    self._ended = True
                    self._stream = None
                    break
                os.pwrite(cast(IO[bytes], self._spill).fileno(), chunk, self._have)  # made with the stream
                self._have += len(chunk)
            if offset >= self._have:
                return b""
            return os.pread(cast(IO[bytes], self._spill).fileno(), min(end, self._have) - offset, offset)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stream = None  # a generator still open is closed when dropped
            if self._spill is not None:
                self._spill.close()
                self._spill = None


class ContentFile(io.RawIOBase):
    """Something with ``read(offset, length)``, ``size`` and ``close()`` (a ``SpilledContent``,
    a mount's open file) as a read-only, seekable binary file (WebDAV's GET reads one)."""

    def __init__(self, content) -> None:
        self._content = content
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._content.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        data = self._content.read(self._pos, len(buffer))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(self._content.size - self._pos, 0) or 1 << 20
            out = bytearray()
            while True:
                data = self._content.read(self._pos, size)
                if not data:
                    return bytes(out)
                out += data
                self._pos += len(data)
        data = self._content.read(self._pos, size)
        self._pos += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self._content.close()
        super().close()
