"""The host side of DeviceLink, the message loop mobilebackup2 runs on, over a virtual tree.

The device drives: it asks the host to list, create, upload into, download from, move and
remove in the backup folder, each a u32be-framed plist array naming the message, answered with
``["DLMessageStatusResponse", code, description, value]``; file data travels as raw frames on
the same stream (layout in ``/work/shared/reference/mobilebackup2.md`` §2.4, constants from
pymobiledevice3's ``device_link``, which this replaces for backups: its handlers write through
``pathlib`` to a local folder, this one writes into the repository through a
:class:`~.vtree.VirtualTree` and a :class:`~.store.FileStore`).

Per uploaded file the host does: two length-prefixed names, one 5-byte header per data frame,
the chunker, the session, one dict insertion. Paths are split, never resolved; the common
answer ("OK") is serialised once.

Differences from pymobiledevice3 11.45.0's ``DeviceLink``, on purpose:

* ``DLMessageMoveFiles``/``DLMessageRemoveFiles`` (legacy names) are handled like the Items
  messages, ``DLMessagePing`` is ignored, ``DLMessageDisconnect`` ends the loop (as
  libimobiledevice does; pmd3 raises KeyError). Any other unknown message gets an error
  answer instead of a crash.
* An upload the device ends with CODE_ERROR_REMOTE leaves nothing behind (pmd3 leaves a
  0-byte file that the device then moves into the backup, #507): the path keeps its previous
  content or stays absent, and the failure is recorded for the caller.
* MoveItems replaces the destination (libimobiledevice's remove-then-rename) rather than
  ``shutil.move``'s move-into-folder.

For a restore (``capture.restore``) the host is built without a store: the device only
downloads, and an upload, should one come, is read off the stream and recorded as failed.
``count_downloads`` reports the bytes and files sent to the progress.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pymobiledevice3.exceptions import ConnectionTerminatedError, ProtocolError
from pymobiledevice3.service_connection import ServiceConnection, build_plist, parse_plist
from pymobiledevice3.services.device_link import (
    BULK_OPERATION_ERROR,
    CODE_ERROR_LOCAL,
    CODE_FILE_DATA,
    CODE_SUCCESS,
    ERRNO_TO_DEVICE_ERROR,
    FILE_TRANSFER_TERMINATOR,
    PURGE_DISK_SPACE_ERROR,
    PURGE_DISK_SPACE_ERROR_STRING,
)

from ..errors import IbsyncError
from ..progress import NULL_PROGRESS, Progress
from .store import FileStore
from .vtree import VDir, VirtualTree, VTreeError

logger = logging.getLogger("ibsync.capture")

EMPTY = "___EmptyParameterString___"  # DeviceLink's placeholder for an empty string
# Download frames: Apple's DeviceLink BufferSize; larger frames push BackupAgent2 past its
# memory limit on a big Manifest.db (pmd3 #1165, #1857)
DOWNLOAD_FRAME = 32 * 1024
SEND_BUFFER = 256 * 1024  # download frames go out together, a syscall per this many bytes
READ_SIZE = 1 << 20  # what one read from the connection may take
_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">IB")  # a file-transfer frame: u32 (len(payload) + 1) | u8 code
_OK = build_plist(["DLMessageStatusResponse", 0, EMPTY, {}])
_DL_FILE_TYPES = {"file": "DLFileTypeRegular", "dir": "DLFileTypeDirectory"}


def _uint64(code: int) -> int:
    return ctypes.c_uint64(code).value  # DeviceLink sends negative codes as two's complement


def _device_error(e: OSError) -> int:
    return _uint64(ERRNO_TO_DEVICE_ERROR.get(e.errno or 0, -1))


def _naive_utc(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).replace(tzinfo=None)  # plistlib wants naive UTC


class _Input:
    """The device's byte stream, buffered here rather than read field by field: a batch of
    small uploaded files is parsed from memory (a dozen awaits per file cost more than
    receiving the file). DeviceLink is request/response, so nothing read ahead belongs to
    anyone else; every read from the connection goes through here."""

    def __init__(self, conn: ServiceConnection) -> None:
        self._reader = conn.reader
        self._buf = bytearray()
        self._pos = 0

    async def _fill(self, n: int) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        while len(self._buf) < n:
            try:
                data = await self._reader.read(max(READ_SIZE, n - len(self._buf)))
            except OSError as e:
                raise ConnectionTerminatedError() from e
            if not data:
                raise ConnectionTerminatedError()
            self._buf += data

    async def exactly(self, n: int) -> bytes:
        if len(self._buf) - self._pos < n:
            await self._fill(n)
        p = self._pos
        self._pos = p + n
        with memoryview(self._buf) as m:
            return m[p : p + n].tobytes()

    async def u32(self) -> int:
        if len(self._buf) - self._pos < 4:
            await self._fill(4)
        (v,) = _U32.unpack_from(self._buf, self._pos)
        self._pos += 4
        return v

    async def head(self) -> tuple[int, int]:
        """A file-transfer frame's header: (len(payload) + 1, code)."""
        if len(self._buf) - self._pos < 5:
            await self._fill(5)
        size, code = _HEAD.unpack_from(self._buf, self._pos)
        self._pos += 5
        return size, code


@dataclass(frozen=True)
class FailedUpload:
    device_name: str  # e.g. "HomeDomain-Library/SMS/sms.db"
    file_name: str  # the host path it was meant for
    reason: str  # the device's message


@dataclass(frozen=True)
class SessionEnd:
    """How the device ended the request: its final ProcessMessage, or a Disconnect."""

    error_code: int | None  # None: DLMessageDisconnect, no result
    description: str
    content: Any = None


@dataclass
class TransferStats:
    files_received: int = 0
    bytes_received: int = 0
    files_sent: int = 0  # downloads: repository -> device
    bytes_sent: int = 0
    failed: list[FailedUpload] = field(default_factory=list)
    messages: Counter = field(default_factory=Counter)  # DeviceLink messages by name
    device_progress: float = 0.0  # the percentage the device last announced


class DeviceLinkHost:
    """Serves one mobilebackup2 DeviceLink session; call :meth:`run` after the request."""

    def __init__(self, conn: ServiceConnection, tree: VirtualTree, store: FileStore | None, *,
                 free_space: Callable[[], int], progress: Progress = NULL_PROGRESS,
                 count_downloads: bool = False) -> None:
        """``store``: where uploads go; None (a restore) refuses them. ``count_downloads``:
        advance ``progress`` by what is sent (else by what is received)."""
        self.conn = conn
        self.tree = tree
        self.store = store
        self.free_space = free_space
        self.progress = progress
        self.count_downloads = count_downloads
        self.stats = TransferStats()
        self._in = _Input(conn)
        self._handlers: dict[str, Callable[[list], Awaitable[None]]] = {
            "DLMessageUploadFiles": self._upload_files,
            "DLMessageDownloadFiles": self._download_files,
            "DLContentsOfDirectory": self._contents_of_directory,  # no "Message" in this one
            "DLMessageCreateDirectory": self._create_directory,
            "DLMessageMoveItems": self._move_items,
            "DLMessageMoveFiles": self._move_items,
            "DLMessageRemoveItems": self._remove_items,
            "DLMessageRemoveFiles": self._remove_items,
            "DLMessageCopyItem": self._copy_item,
            "DLMessageGetFreeDiskSpace": self._get_free_disk_space,
            "DLMessagePurgeDiskSpace": self._purge_disk_space,
            "DLMessagePing": self._ping,
        }

    # ---- session ---------------------------------------------------------------------------

    async def receive_message(self) -> list:
        n = await self._in.u32()
        if n > self.conn.max_frame_size:
            raise ProtocolError(f"The device sent a {n}-byte message, over the {self.conn.max_frame_size}-byte limit.")
        msg = parse_plist(await self._in.exactly(n))
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            raise ProtocolError(f"not a DeviceLink message: {str(msg)[:200]}")
        return msg

    async def send_process_message(self, message: Mapping[str, Any]) -> None:
        await self.conn.send_plist(["DLMessageProcessMessage", dict(message)])

    async def version_exchange(self) -> None:
        """The device offers its DeviceLink version; accept it as pymobiledevice3 does."""
        offer = await self.receive_message()
        if offer[0] != "DLMessageVersionExchange" or len(offer) < 2:
            raise ProtocolError(f"expected DLMessageVersionExchange, got {offer[0]}")
        await self.conn.send_plist(["DLMessageVersionExchange", "DLVersionsOk", offer[1]])
        ready = await self.receive_message()
        if ready[0] != "DLMessageDeviceReady":
            raise ProtocolError("The device did not report it was ready to start the session.")

    async def disconnect(self) -> None:
        await self.conn.send_plist(["DLMessageDisconnect", EMPTY])

    async def run(self) -> SessionEnd:
        """Answer the device until it ends the request."""
        while True:
            msg = await self.receive_message()
            name = msg[0]
            self.stats.messages[name] += 1
            if name == "DLMessageProcessMessage":
                content = msg[1] if len(msg) > 1 and isinstance(msg[1], dict) else {}
                code = content.get("ErrorCode", -1)
                return SessionEnd(int(code) if isinstance(code, int) else -1,
                                  str(content.get("ErrorDescription") or ""), content.get("Content"))
            if name == "DLMessageDisconnect":
                return SessionEnd(None, "the device ended the session with DLMessageDisconnect")
            handler = self._handlers.get(name)
            if handler is None:
                logger.warning("the device sent %s, which ibsync does not know; answered with an error", name)
                await self._status(-1, f"{name} is not supported by this host")
                continue
            await handler(msg)

    async def _status(self, code: int, description: str = "", value: Any = None) -> None:
        await self.conn.sendall(build_plist([
            "DLMessageStatusResponse", _uint64(code), description or EMPTY, {} if value is None else value,
        ]))

    def _note_progress(self, msg: list, at: int) -> None:
        if len(msg) > at and isinstance(msg[at], (int, float)):
            self.stats.device_progress = float(msg[at])

    # ---- uploads: device -> repository -----------------------------------------------------

    async def _upload_files(self, msg: list) -> None:
        self._note_progress(msg, 2)
        inp = self._in
        stats = self.stats
        # files are stored on the FileStore's worker thread; each goes into the tree once it is,
        # all before the batch is acknowledged (the device's next message may move them)
        stored: list[tuple[str, str, asyncio.Future]] = []
        while True:
            n = await inp.u32()
            if n == 0:
                break  # end of the batch
            device_name = (await inp.exactly(n)).decode()
            file_name = (await inp.exactly(await inp.u32())).decode()
            incoming = self.store.begin() if self.store is not None else None
            size, code = await inp.head()
            received = 0
            while code == CODE_FILE_DATA:
                if size > 1:
                    data = await inp.exactly(size - 1)
                    if incoming is not None:
                        await incoming.write(data)
                    received += len(data)
                    self.progress.advance(len(data))
                size, code = await inp.head()
            if size == 0:
                raise ProtocolError(f"malformed file-transfer frame in the upload of {file_name}")
            tail = await inp.exactly(size - 1) if size > 1 else b""
            stats.bytes_received += received
            if code != CODE_SUCCESS:
                # The device could not read the file (CODE_ERROR_REMOTE) or sent a code nobody
                # knows: keep nothing of it, so the path keeps its previous content or none.
                reason = tail.decode(errors="replace") or f"code {code:#x}"
                stats.failed.append(FailedUpload(device_name, file_name, reason))
                logger.warning("the device could not send %s: %s", device_name, reason)
                continue
            if incoming is None:
                stats.failed.append(FailedUpload(device_name, file_name, "uploads are not accepted in this session"))
                logger.warning("the device uploaded %s during a restore; ignored", device_name)
                continue
            stored.append((device_name, file_name, asyncio.wrap_future(incoming.close())))
        for device_name, file_name, result in stored:
            size, content = await result
            try:
                self.tree.put_file(file_name, size, content)
            except VTreeError as e:
                stats.failed.append(FailedUpload(device_name, file_name, f"cannot be placed: {e.strerror}"))
                continue
            stats.files_received += 1
            self.progress.advance(files=1)
        await self.conn.sendall(_OK)

    # ---- downloads: repository -> device ---------------------------------------------------

    async def _download_files(self, msg: list) -> None:
        self._note_progress(msg, 3)
        failed: dict[str, dict] = {}
        out = bytearray()
        stats = self.stats
        for path in msg[1] if len(msg) > 1 else ():
            raw = str(path).encode()
            out += _U32.pack(len(raw)) + raw
            try:
                entry = self.tree.file(path)
                for piece in self.tree.read(entry):
                    stats.bytes_sent += len(piece)
                    if self.count_downloads:
                        self.progress.advance(len(piece))
                    view = memoryview(piece)
                    for off in range(0, len(view), DOWNLOAD_FRAME):
                        frame = view[off : off + DOWNLOAD_FRAME]
                        out += _HEAD.pack(len(frame) + 1, CODE_FILE_DATA)
                        out += frame
                        if len(out) >= SEND_BUFFER:
                            await self.conn.sendall(bytes(out))
                            out.clear()
                out += _HEAD.pack(1, CODE_SUCCESS)
                stats.files_sent += 1
                if self.count_downloads:
                    self.progress.advance(files=1)
            except (VTreeError, IbsyncError) as e:
                if isinstance(e, VTreeError):
                    err = e
                else:  # a blob missing or damaged in the repository
                    logger.warning("cannot send %s to the device: %s", path, e)
                    err = VTreeError(errno.EIO, path)
                text = (err.strerror or "error").encode()
                out += _HEAD.pack(len(text) + 1, CODE_ERROR_LOCAL) + text
                failed[path] = {"DLFileErrorString": err.strerror, "DLFileErrorCode": _device_error(err)}
        out += FILE_TRANSFER_TERMINATOR
        await self.conn.sendall(bytes(out))
        if failed:
            await self._status(BULK_OPERATION_ERROR, "Multi status", failed)
        else:
            await self.conn.sendall(_OK)

    # ---- the folder ------------------------------------------------------------------------

    async def _contents_of_directory(self, msg: list) -> None:
        try:
            listing = self.tree.listdir(msg[1])
        except VTreeError as e:
            await self._status(_device_error(e), e.strerror or "")
            return
        out = {}
        for name, node in listing.items():
            if isinstance(node, VDir):
                out[name] = {"DLFileType": "DLFileTypeDirectory", "DLFileSize": 0,
                             "DLFileModificationDate": _naive_utc(node.mtime_ns)}
            else:
                kind = _DL_FILE_TYPES.get(node["type"], "DLFileTypeUnknown")
                out[name] = {"DLFileType": kind, "DLFileSize": node.get("size", 0),
                             "DLFileModificationDate": _naive_utc(node["mtime_ns"])}
        await self._status(0, value=out)

    async def _create_directory(self, msg: list) -> None:
        await self._apply(lambda: self.tree.mkdir(msg[1]))

    async def _move_items(self, msg: list) -> None:
        self._note_progress(msg, 3)
        items = msg[1] if len(msg) > 1 and isinstance(msg[1], dict) else {}

        def move() -> None:
            for src, dst in items.items():
                if not self.tree.move(src, dst):
                    # nothing to move: an upload that failed (kept out on purpose), or the device's
                    # own bookkeeping; the destination keeps what it had
                    logger.debug("move of missing %s skipped", src)

        await self._apply(move)

    async def _remove_items(self, msg: list) -> None:
        self._note_progress(msg, 3)

        def remove() -> None:
            for path in msg[1] if len(msg) > 1 else ():
                self.tree.remove(path)  # a missing path is fine, as in libimobiledevice

        await self._apply(remove)

    async def _copy_item(self, msg: list) -> None:
        await self._apply(lambda: self.tree.copy(msg[1], msg[2]))

    async def _apply(self, change: Callable[[], None]) -> None:
        try:
            change()
        except VTreeError as e:
            await self._status(_device_error(e), e.strerror or "")
            return
        await self.conn.sendall(_OK)

    # ---- space and keep-alive --------------------------------------------------------------

    async def _get_free_disk_space(self, msg: list) -> None:
        await self._status(0, value=self.free_space())

    async def _purge_disk_space(self, msg: list) -> None:
        # No purge is possible; answer as Apple's host does when its purge fails and let the
        # device decide (it usually ends with ErrorCode 105)
        amount = msg[1] if len(msg) > 1 else "?"
        logger.warning("the device asked the host to free %s bytes; nothing can be purged", amount)
        await self._status(PURGE_DISK_SPACE_ERROR, PURGE_DISK_SPACE_ERROR_STRING, 0)

    async def _ping(self, msg: list) -> None:
        pass  # a keep-alive; the device expects no answer (inferred, as in the simulator)
