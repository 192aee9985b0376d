"""``com.apple.afc``, device side: the subset of AFC a backup and a restore use.

Wire format (read from pymobiledevice3's ``services/afc.py``): every packet is a 40-byte little-endian
header ``"CFA6LPAA" | u64 entire_length | u64 this_length | u64 packet_num | u64 operation`` and a
body; a reply echoes the request's ``packet_num`` (the host matches replies by it). Replies are
``STATUS`` (u64 error code), ``DATA`` (bytes) or ``FILE_OPEN_RES`` (u64 handle). ``WRITE`` requests set
``this_length`` to 48: the handle is the header's part of the body, the data follows.

What backups use: ``FILE_OPEN``/``FILE_LOCK``/``FILE_CLOSE`` of ``/com.apple.itunes.lock_sync`` (the sync
lock), ``GET_FILE_INFO`` + ``FILE_OPEN``/``READ`` of ``/iTunes_Control/iTunes/*`` and
``/Books/iBooksData2.plist`` (missing is fine); a restore writes ``/iTunesRestore/RestoreApplications.plist``
(``MAKE_DIR``, ``FILE_OPEN "w"``, ``WRITE``). ``READ_DIR`` is there for tests to look around. Any other
operation is answered ``OP_NOT_SUPPORTED``.

Files are the device's ``media`` dict (absolute path -> bytes); directories are the parents of those
files plus any made with ``MAKE_DIR`` during the run.
"""

from __future__ import annotations

import posixpath
import struct
import time
from dataclasses import dataclass

from .runtime import DeviceRuntime
from .wire import Wire

MAGIC = b"CFA6LPAA"
HEADER = struct.Struct("<8sQQQQ")
_U64 = struct.Struct("<Q")

# operations (AfcOpcode)
OP_STATUS, OP_DATA, OP_READ_DIR, OP_MAKE_DIR, OP_GET_FILE_INFO = 0x01, 0x02, 0x03, 0x09, 0x0A
OP_FILE_OPEN, OP_FILE_OPEN_RES, OP_READ, OP_WRITE, OP_FILE_CLOSE, OP_FILE_LOCK = 0x0D, 0x0E, 0x0F, 0x10, 0x14, 0x1B
# status codes (AfcError)
SUCCESS, INVALID_ARG, OBJECT_NOT_FOUND, OBJECT_IS_DIR, PERM_DENIED = 0, 7, 8, 9, 10
OP_NOT_SUPPORTED, OBJECT_EXISTS, OP_WOULD_BLOCK = 15, 16, 19
# fopen modes: r, r+, w, w+, a, a+
MODE_RDONLY, MODE_RW, MODE_WRONLY, MODE_WR, MODE_APPEND, MODE_RDAPPEND = 1, 2, 3, 4, 5, 6
# flock operations as AFC sends them (LOCK_NB is always set)
LOCK_UN = 8


@dataclass
class _OpenFile:
    path: str
    mode: int
    pos: int = 0


def _path(raw: bytes) -> str:
    name = raw.split(b"\0", 1)[0].decode()
    return "/" + posixpath.normpath("/" + name).strip("/") if name.strip("/") else "/"


class AfcServer:
    """One AFC connection. Handles and locks are shared by all of the device's AFC connections (the
    sync lock must keep a second host out)."""

    def __init__(self, wire: Wire, runtime: DeviceRuntime) -> None:
        self.wire = wire
        self.runtime = runtime
        self.media = runtime.device.media
        self.files: dict[int, _OpenFile] = {}
        self.mtime_ns = time.time_ns()
        self._ops = {
            OP_FILE_OPEN: self._open,
            OP_FILE_CLOSE: self._close,
            OP_FILE_LOCK: self._lock,
            OP_GET_FILE_INFO: self._info,
            OP_READ: self._read,
            OP_WRITE: self._write,
            OP_MAKE_DIR: self._make_dir,
            OP_READ_DIR: self._read_dir,
        }

    def serve(self) -> None:
        try:
            while True:
                magic, entire, _this, packet_num, op = HEADER.unpack(self.wire.read_exact(HEADER.size))
                if magic != MAGIC or entire < HEADER.size:
                    raise ValueError(f"not an AFC packet header: {magic!r}")
                body = self.wire.read_exact(entire - HEADER.size)
                handler = self._ops.get(op)
                reply_op, payload = handler(body) if handler else (OP_STATUS, _U64.pack(OP_NOT_SUPPORTED))
                self._reply(packet_num, reply_op, payload)
        finally:
            for handle in list(self.files):
                self._release(handle)

    def _reply(self, packet_num: int, op: int, payload: bytes) -> None:
        entire = HEADER.size + len(payload)
        # data travels after the header part; a status or handle is the header part itself
        this = HEADER.size if op == OP_DATA else entire
        self.wire.send(HEADER.pack(MAGIC, entire, this, packet_num, op) + payload)

    @staticmethod
    def _status(code: int) -> tuple[int, bytes]:
        return OP_STATUS, _U64.pack(code)

    # ---- the filesystem -------------------------------------------------------------------------------------

    def _is_dir(self, path: str) -> bool:
        if path == "/" or path in self.runtime.afc_dirs:
            return True
        prefix = path + "/"
        return any(p.startswith(prefix) for p in self.media)

    # ---- operations ------------------------------------------------------------------------------------------

    def _open(self, body: bytes) -> tuple[int, bytes]:
        mode = _U64.unpack_from(body)[0]
        path = _path(body[8:])
        with self.runtime.afc_lock_guard:
            if self._is_dir(path):
                return self._status(OBJECT_IS_DIR)
            exists = path in self.media
            if mode == MODE_RDONLY and not exists:
                return self._status(OBJECT_NOT_FOUND)
            if not exists and not self._is_dir(posixpath.dirname(path)):
                return self._status(OBJECT_NOT_FOUND)
            if mode in (MODE_WRONLY, MODE_WR) or not exists:
                self.media[path] = b""
            handle = self.runtime.next_afc_handle()
        pos = len(self.media[path]) if mode in (MODE_APPEND, MODE_RDAPPEND) else 0
        self.files[handle] = _OpenFile(path, mode, pos)
        return OP_FILE_OPEN_RES, _U64.pack(handle)

    def _release(self, handle: int) -> None:
        f = self.files.pop(handle, None)
        if f is not None:
            with self.runtime.afc_lock_guard:
                if self.runtime.afc_locks.get(f.path) == handle:
                    del self.runtime.afc_locks[f.path]

    def _close(self, body: bytes) -> tuple[int, bytes]:
        handle = _U64.unpack_from(body)[0]
        if handle not in self.files:
            return self._status(INVALID_ARG)
        self._release(handle)
        return self._status(SUCCESS)

    def _lock(self, body: bytes) -> tuple[int, bytes]:
        handle, operation = struct.unpack_from("<QQ", body)
        f = self.files.get(handle)
        if f is None:
            return self._status(INVALID_ARG)
        with self.runtime.afc_lock_guard:
            owner = self.runtime.afc_locks.get(f.path)
            if operation & LOCK_UN:
                if owner == handle:
                    del self.runtime.afc_locks[f.path]
                return self._status(SUCCESS)
            if owner is not None and owner != handle:
                return self._status(OP_WOULD_BLOCK)
            self.runtime.afc_locks[f.path] = handle
        return self._status(SUCCESS)

    def _info(self, body: bytes) -> tuple[int, bytes]:
        path = _path(body)
        with self.runtime.afc_lock_guard:
            if path in self.media:
                size, kind, links = len(self.media[path]), "S_IFREG", 1
            elif self._is_dir(path):
                size, kind, links = 64, "S_IFDIR", 2
            else:
                return self._status(OBJECT_NOT_FOUND)
        info = {
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_nlink": links,
            "st_ifmt": kind,
            "st_mtime": self.mtime_ns,
            "st_birthtime": self.mtime_ns,
        }
        return OP_DATA, b"".join(f"{k}\0{v}\0".encode() for k, v in info.items())

    def _read(self, body: bytes) -> tuple[int, bytes]:
        handle, size = struct.unpack_from("<QQ", body)
        f = self.files.get(handle)
        if f is None:
            return self._status(INVALID_ARG)
        if f.mode in (MODE_WRONLY, MODE_APPEND):
            return self._status(PERM_DENIED)
        data = self.media.get(f.path, b"")[f.pos : f.pos + size]
        f.pos += len(data)
        return OP_DATA, data

    def _write(self, body: bytes) -> tuple[int, bytes]:
        handle = _U64.unpack_from(body)[0]
        f = self.files.get(handle)
        if f is None:
            return self._status(INVALID_ARG)
        if f.mode == MODE_RDONLY:
            return self._status(PERM_DENIED)
        data = body[8:]
        with self.runtime.afc_lock_guard:
            old = self.media.get(f.path, b"")
            self.media[f.path] = old[: f.pos].ljust(f.pos, b"\0") + data + old[f.pos + len(data) :]
        f.pos += len(data)
        return self._status(SUCCESS)

    def _make_dir(self, body: bytes) -> tuple[int, bytes]:
        path = _path(body)
        with self.runtime.afc_lock_guard:
            if path in self.media:
                return self._status(OBJECT_EXISTS)
            while path != "/":
                self.runtime.afc_dirs.add(path)
                path = posixpath.dirname(path)
        return self._status(SUCCESS)

    def _read_dir(self, body: bytes) -> tuple[int, bytes]:
        path = _path(body)
        with self.runtime.afc_lock_guard:
            if not self._is_dir(path):
                return self._status(OBJECT_NOT_FOUND)
            prefix = "/" if path == "/" else path + "/"
            names = {
                p[len(prefix) :].split("/", 1)[0]
                for p in [*self.media, *self.runtime.afc_dirs]
                if p.startswith(prefix) and p != prefix
            }
        return OP_DATA, b"".join(n.encode() + b"\0" for n in [".", "..", *sorted(names)])


def serve_afc(wire: Wire, runtime: DeviceRuntime) -> None:
    AfcServer(wire, runtime).serve()
