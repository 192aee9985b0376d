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
* Every message is checked before it is acted on: its shape (an array naming it), each
  argument's presence and plist type, UTF-8 names, lengths within bounds (MAX_MESSAGE for a
  message, MAX_NAME for a name; a file-data frame of any length is read in pieces of at most
  READ_SIZE, never whole), and the session's order (a VersionExchange, DeviceReady or
  StatusResponse inside a request). What fails ends the session with :class:`MalformedMessage`
  (one line: "the device sent a malformed X message: ..."); pmd3 raises KeyError, TypeError,
  AssertionError or UnicodeDecodeError there, and buffers whatever length the device names.
* Each wait for the device is bounded by an idle timeout (DEFAULT_IDLE_TIMEOUT, or the caller's;
  :class:`DeviceIdle` after it): a hung device must not hold the repository's lock for ever.
  pmd3 waits without limit.

For a restore (``capture.restore``) the host is built without a store: the device only
downloads, and an upload, should one come, is read off the stream and recorded as failed.
``count_downloads`` reports the bytes and files sent to the progress.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pymobiledevice3.exceptions import ConnectionTerminatedError
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

from ..errors import DeviceError, IbsyncError, UserError
from ..progress import NULL_PROGRESS, Progress
from . import bplist
from .store import HANDOVER, FileStore
from .vtree import VDir, VirtualTree, VTreeError

logger = logging.getLogger("ibsync.capture")

EMPTY = "___EmptyParameterString___"  # DeviceLink's placeholder for an empty string
# Download frames: Apple's DeviceLink BufferSize; larger frames push BackupAgent2 past its
# memory limit on a big Manifest.db (pmd3 #1165, #1857)
DOWNLOAD_FRAME = 32 * 1024
SEND_BUFFER = 256 * 1024  # download frames go out together, a syscall per this many bytes
READ_SIZE = 1 << 20  # what one read from the connection may take, and one piece of a data frame
# Bounds on what the device may make the host buffer. A message is a plist naming a request and
# its arguments; the largest a device sends are RemoveItems/MoveItems lists (about 90 bytes a
# path: 16 MiB holds some 180,000). pymobiledevice3 allows 128 MiB; parsing that much plist
# would hold several times as much in Python objects.
MAX_MESSAGE = 16 << 20
MAX_NAME = 64 << 10  # a file name in the upload stream (iOS paths are at most 1 KiB)
MAX_TAIL = 64 << 10  # the text after a file's final code (its error message)
# The device sends nothing while it shows the passcode prompt (iOS answers ErrorCode 208 after
# about 3 minutes if nobody types it) or while it compares a big Manifest.db: an idle timeout
# well above both. IDLE_TIMEOUT_ENV overrides it (seconds; tests, slow devices).
DEFAULT_IDLE_TIMEOUT = 600.0
IDLE_TIMEOUT_ENV = "IBSYNC_DEVICE_IDLE_TIMEOUT"
# After the idle timer fires, how long to look once more for data that arrived while the event
# loop was busy elsewhere (the timer and the data can become due in the same loop iteration).
IDLE_GRACE = 1.0
_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">IB")  # a file-transfer frame: u32 (len(payload) + 1) | u8 code
_OK = build_plist(["DLMessageStatusResponse", 0, EMPTY, {}])
_DL_FILE_TYPES = {"file": "DLFileTypeRegular", "dir": "DLFileTypeDirectory"}


def _uint64(code: int) -> int:
    return ctypes.c_uint64(code).value  # DeviceLink sends negative codes as two's complement


def _device_error(e: OSError) -> int:
    return _uint64(ERRNO_TO_DEVICE_ERROR.get(e.errno or 0, -1))


def _naive_utc(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC).replace(tzinfo=None)  # plistlib wants naive UTC


class MalformedMessage(DeviceError):
    """The device sent something DeviceLink does not allow: a message of the wrong shape or
    argument types, a name that is not UTF-8, a length over ibsync's bounds, a message out of
    order. The session cannot go on (the stream may be out of step); nothing is committed."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"the device sent a malformed {name} message: {what}")


class DeviceIdle(DeviceError):
    """The device sent nothing for the idle timeout: it hangs, or the link is gone unnoticed."""


def idle_timeout_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """The idle timeout: IDLE_TIMEOUT_ENV (seconds) if set, else DEFAULT_IDLE_TIMEOUT."""
    raw = environ.get(IDLE_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_IDLE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise UserError(f"{IDLE_TIMEOUT_ENV}={raw!r}: give a number of seconds above 0")
    return value


def _kind(value: Any) -> str:
    """A plist value's type as the message says it (for errors)."""
    return {
        str: "a string",
        bytes: "data",
        int: "an integer",
        float: "a real",
        bool: "a boolean",
        list: "an array",
        dict: "a dictionary",
        datetime: "a date",
    }.get(type(value), type(value).__name__)


def _shown(raw: bytes) -> str:
    return repr(raw[:80])[1:] + ("..." if len(raw) > 80 else "")


class _Input:
    """The device's byte stream, buffered here rather than read field by field: a batch of
    small uploaded files is parsed from memory (a dozen awaits per file cost more than
    receiving the file). DeviceLink is request/response, so nothing read ahead belongs to
    anyone else; every read from the connection goes through here, and each waits at most
    ``idle_timeout`` seconds for the device's next bytes.

    The idle timeout is one watchdog timer, not an ``asyncio.timeout`` per read: a backup waits
    for the device once per file (each MoveItems is answered before the next comes), and a
    timer scheduled and cancelled per wait cost about a fifth of the host's CPU per message.
    The watchdog wakes at most twice per timeout period; when a wait has lasted the whole
    period it cancels the waiting task, which turns that into DeviceIdle (after one last look,
    IDLE_GRACE, for data that arrived while the loop was busy)."""

    def __init__(self, conn: ServiceConnection, idle_timeout: float) -> None:
        self._reader = conn.reader
        self._buf = bytearray()
        self._pos = 0
        self.idle_timeout = idle_timeout
        self._waiter: asyncio.Task | None = None  # the task waiting for the device, if one is
        self._wait_started = 0.0
        self._expired = False
        self._watchdog: asyncio.TimerHandle | None = None

    async def _read(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        self._wait_started = loop.time()
        self._waiter = asyncio.current_task()
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.idle_timeout, self._watch)
        try:
            return await self._reader.read(n)
        except asyncio.CancelledError:
            if not self._expired:
                raise
            self._expired = False
            self._waiter.uncancel()  # type: ignore[union-attr]  # our cancel, not the caller's
        except OSError as e:
            raise ConnectionTerminatedError() from e
        finally:
            self._waiter = None
        try:
            # data that arrived while the loop was busy elsewhere is read at once here
            async with asyncio.timeout(IDLE_GRACE):
                return await self._reader.read(n)
        except TimeoutError:
            raise DeviceIdle(
                f"the device sent nothing for {self.idle_timeout:g} s (it may be locked, asleep or hung)"
            ) from None
        except OSError as e:
            raise ConnectionTerminatedError() from e

    def _watch(self) -> None:
        """The watchdog: expire a wait that has lasted ``idle_timeout``, else look again when
        the current (or next) wait could."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiter = self._waiter
        if waiter is not None and now - self._wait_started >= self.idle_timeout:
            self._expired = True
            waiter.cancel()
            self._watchdog = None  # the next wait arms it again
            return
        due = self._wait_started + self.idle_timeout if waiter is not None else now + self.idle_timeout
        self._watchdog = loop.call_at(due, self._watch)

    def close(self) -> None:
        """Stop the watchdog (the session is over)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _fill(self, n: int) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        while len(self._buf) < n:
            data = await self._read(max(READ_SIZE, n - len(self._buf)))
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

    def whole_file(self, max_data: int) -> WholeFile | None:
        """The next file of an upload stream if all of it (names, data frames, final code and
        status text) is already buffered and it is well-formed, plain and small: names within
        MAX_NAME and UTF-8, non-empty frames, data under ``max_data`` bytes, a status text
        within MAX_TAIL. END_OF_BATCH for the batch's terminator. None, consuming nothing, for
        anything else: the caller then reads it the slow way, which waits for missing bytes
        and raises on what is malformed. So a batch of small files is parsed here with no
        await per file, and every check still happens."""
        buf, pos, end = self._buf, self._pos, len(self._buf)
        if end - pos < 4:
            return None
        (n,) = _U32.unpack_from(buf, pos)
        if n == 0:
            self._pos = pos + 4
            return END_OF_BATCH
        if n > MAX_NAME or pos + 8 + n > end:
            return None
        device_raw = buf[pos + 4 : pos + 4 + n]
        pos += 4 + n
        (m,) = _U32.unpack_from(buf, pos)
        if m > MAX_NAME or pos + 4 + m > end:
            return None
        file_raw = buf[pos + 4 : pos + 4 + m]
        pos += 4 + m
        frames: list[tuple[int, int]] = []
        total = 0
        while True:
            if pos + 5 > end:
                return None
            size, code = _HEAD.unpack_from(buf, pos)
            if size == 0 or pos + 4 + size > end:
                return None
            if code != CODE_FILE_DATA:
                break
            total += size - 1
            if total >= max_data:
                return None
            frames.append((pos + 5, pos + 4 + size))
            pos += 4 + size
        if size - 1 > MAX_TAIL:
            return None
        try:
            device_name, file_name = device_raw.decode(), file_raw.decode()
        except UnicodeDecodeError:
            return None
        tail = bytes(buf[pos + 5 : pos + 4 + size])
        if len(frames) == 1:
            a, b = frames[0]
            data = bytes(buf[a:b])
        else:
            with memoryview(buf) as view:
                data = b"".join([view[a:b] for a, b in frames])
        self._pos = pos + 4 + size
        return WholeFile(device_name, file_name, data, code, tail)


@dataclass(frozen=True, slots=True)
class WholeFile:
    """One file of an upload stream, read whole from the buffer."""

    device_name: str
    file_name: str
    data: bytes
    code: int  # CODE_SUCCESS, or why the device could not send it
    tail: bytes  # the status text after the code


END_OF_BATCH = WholeFile("", "", b"", CODE_SUCCESS, b"")


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

    def __init__(
        self,
        conn: ServiceConnection,
        tree: VirtualTree,
        store: FileStore | None,
        *,
        free_space: Callable[[], int],
        progress: Progress = NULL_PROGRESS,
        count_downloads: bool = False,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        """``store``: where uploads go; None (a restore) refuses them. ``count_downloads``:
        advance ``progress`` by what is sent (else by what is received). ``idle_timeout``:
        seconds the device may stay silent while the host waits for it (DeviceIdle after)."""
        self.conn = conn
        self.tree = tree
        self.store = store
        self.free_space = free_space
        self.progress = progress
        self.count_downloads = count_downloads
        self.stats = TransferStats()
        self._in = _Input(conn, idle_timeout)
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
        """The device's next message: a plist array whose first item names it."""
        n = await self._in.u32()
        if n > MAX_MESSAGE:
            raise MalformedMessage(
                "DeviceLink", f"it is {n} bytes long, over ibsync's limit of {MAX_MESSAGE >> 20} MiB for one message"
            )
        raw = await self._in.exactly(n)
        try:
            msg = bplist.loads(raw, parse_plist)
        except Exception as e:  # plistlib raises many kinds on bad input (ValueError, OverflowError, ...)
            raise MalformedMessage("DeviceLink", f"it is not a valid plist ({_shown(raw)})") from e
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            shape = _kind(msg) if not isinstance(msg, list) else "an array that does not start with its name"
            raise MalformedMessage("DeviceLink", f"{shape} instead of an array naming the message")
        return msg

    async def send_process_message(self, message: Mapping[str, Any]) -> None:
        await self.conn.send_plist(["DLMessageProcessMessage", dict(message)])

    async def version_exchange(self) -> None:
        """The device offers its DeviceLink version; accept it as pymobiledevice3 does."""
        offer = await self.receive_message()
        _expect(offer, "DLMessageVersionExchange")
        major = _arg(offer, 1, int, "version")
        await self.conn.send_plist(["DLMessageVersionExchange", "DLVersionsOk", major])
        _expect(await self.receive_message(), "DLMessageDeviceReady")

    async def disconnect(self) -> None:
        await self.conn.send_plist(["DLMessageDisconnect", EMPTY])

    def close(self) -> None:
        """The session is over: stop watching for an idle device."""
        self._in.close()

    async def run(self) -> SessionEnd:
        """Answer the device until it ends the request."""
        while True:
            msg = await self.receive_message()
            name = msg[0]
            self.stats.messages[name] += 1
            if name == "DLMessageProcessMessage":
                return _session_end(msg)
            if name == "DLMessageDisconnect":
                return SessionEnd(None, "the device ended the session with DLMessageDisconnect")
            if name in _OUT_OF_ORDER:
                raise MalformedMessage(name, "it belongs to the start of a session, not to a request in progress")
            handler = self._handlers.get(name)
            if handler is None:
                logger.warning("the device sent %s, which ibsync does not know; answered with an error", name)
                await self._status(-1, f"{name} is not supported by this host")
                continue
            await handler(msg)

    async def _status(self, code: int, description: str = "", value: Any = None) -> None:
        await self.conn.sendall(
            build_plist(
                [
                    "DLMessageStatusResponse",
                    _uint64(code),
                    description or EMPTY,
                    {} if value is None else value,
                ]
            )
        )

    def _note_progress(self, msg: list, at: int) -> None:
        if len(msg) > at and isinstance(msg[at], (int, float)):
            self.stats.device_progress = float(msg[at])

    # ---- uploads: device -> repository -----------------------------------------------------

    async def _upload_files(self, msg: list) -> None:
        self._note_progress(msg, 2)
        inp = self._in
        stats = self.stats
        # Large files are stored on the FileStore's worker thread, small ones here; each goes
        # into the tree once it is stored, in the order received, all before the batch is
        # acknowledged (the device's next message may move them).
        stored: list[tuple[str, str, tuple[int, list[str]] | asyncio.Future]] = []
        small = HANDOVER if self.store is not None else 0
        while True:
            whole = inp.whole_file(small) if small else None
            if whole is END_OF_BATCH:
                break
            if whole is not None:
                self._whole_file(whole, stored)
                continue
            device_name = await self._name("device-side file name")
            if not device_name:
                break  # end of the batch
            file_name = await self._name(f"host-side name of {device_name}")
            incoming = self.store.begin() if self.store is not None else None
            size, code = await inp.head()
            received = 0
            while code == CODE_FILE_DATA:
                # a frame's length is the device's say: read it in bounded pieces, never whole
                left = size - 1
                while left > 0:
                    data = await inp.exactly(min(left, READ_SIZE))
                    left -= len(data)
                    if incoming is not None:
                        await incoming.write(data)
                    received += len(data)
                    self.progress.advance(len(data))
                size, code = await inp.head()
            if size == 0:
                raise MalformedMessage("DLMessageUploadFiles", f"an empty file-transfer frame in {file_name}")
            if size - 1 > MAX_TAIL:
                raise MalformedMessage("DLMessageUploadFiles", f"a {size - 1}-byte status text after {file_name}")
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
            size, content = result if isinstance(result, tuple) else await result
            try:
                self.tree.put_file(file_name, size, content)
            except VTreeError as e:
                stats.failed.append(FailedUpload(device_name, file_name, f"cannot be placed: {e.strerror}"))
                continue
            stats.files_received += 1
            self.progress.advance(files=1)
        await self.conn.sendall(_OK)

    def _whole_file(self, f: WholeFile, stored: list) -> None:
        """A small file found whole in the input buffer: stored at once, with no hand-over."""
        stats = self.stats
        stats.bytes_received += len(f.data)
        self.progress.advance(len(f.data))
        if f.code != CODE_SUCCESS:
            reason = f.tail.decode(errors="replace") or f"code {f.code:#x}"
            stats.failed.append(FailedUpload(f.device_name, f.file_name, reason))
            logger.warning("the device could not send %s: %s", f.device_name, reason)
            return
        # whole_file gives files only when there is a store (max_data 0 otherwise)
        stored.append((f.device_name, f.file_name, self.store.store_bytes(f.data)))  # type: ignore[union-attr]

    async def _name(self, what: str) -> str:
        """A length-prefixed UTF-8 name of the upload stream ('' ends the batch)."""
        n = await self._in.u32()
        if n > MAX_NAME:
            raise MalformedMessage("DLMessageUploadFiles", f"a {what} of {n} bytes")
        raw = await self._in.exactly(n)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise MalformedMessage("DLMessageUploadFiles", f"a {what} that is not UTF-8: {_shown(raw)}") from None

    # ---- downloads: repository -> device ---------------------------------------------------

    async def _download_files(self, msg: list) -> None:
        paths = _str_list(msg, 1, "paths")
        self._note_progress(msg, 3)
        failed: dict[str, dict] = {}
        # Reading from the repository (and flushing this session's packs first, for files written
        # in it) happens on a thread, a send buffer at a time, so the event loop keeps serving
        # the device's other connections; the tree is not touched meanwhile (one request at a time).
        output = self._download_stream(paths, failed)
        while (out := await asyncio.to_thread(next, output, None)) is not None:
            await self.conn.sendall(out)
        if failed:
            await self._status(BULK_OPERATION_ERROR, "Multi status", failed)
        else:
            await self.conn.sendall(_OK)

    def _download_stream(self, paths: list[str], failed: dict[str, dict]) -> Iterator[bytes]:
        """The file-transfer stream of ``paths`` in pieces of about SEND_BUFFER bytes, ending
        with the terminator; ``failed`` gets the paths that could not be sent."""
        out = bytearray()
        stats = self.stats
        for path in paths:
            raw = path.encode()
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
                            yield bytes(out)
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
        yield bytes(out)

    # ---- the folder ------------------------------------------------------------------------

    async def _contents_of_directory(self, msg: list) -> None:
        path = _arg(msg, 1, str, "path")
        try:
            # may load a folder's tree from the repository: on a thread
            listing = await asyncio.to_thread(self.tree.listdir, path)
        except VTreeError as e:
            await self._status(_device_error(e), e.strerror or "")
            return
        out = {}
        for name, node in listing.items():
            if isinstance(node, VDir):
                out[name] = {
                    "DLFileType": "DLFileTypeDirectory",
                    "DLFileSize": 0,
                    "DLFileModificationDate": _naive_utc(node.mtime_ns),
                }
            else:
                kind = _DL_FILE_TYPES.get(node["type"], "DLFileTypeUnknown")
                out[name] = {
                    "DLFileType": kind,
                    "DLFileSize": node.get("size", 0),
                    "DLFileModificationDate": _naive_utc(node["mtime_ns"]),
                }
        await self._status(0, value=out)

    async def _create_directory(self, msg: list) -> None:
        path = _arg(msg, 1, str, "path")
        await self._apply(lambda: self.tree.mkdir(path))

    async def _move_items(self, msg: list) -> None:
        items = _str_dict(msg, 1, "items")
        self._note_progress(msg, 3)

        def move() -> None:
            for src, dst in items.items():
                if not self.tree.move(src, dst):
                    # nothing to move: an upload that failed (kept out on purpose), or the device's
                    # own bookkeeping; the destination keeps what it had
                    logger.debug("move of missing %s skipped", src)

        await self._apply(move)

    async def _remove_items(self, msg: list) -> None:
        paths = _str_list(msg, 1, "paths")
        self._note_progress(msg, 3)

        def remove() -> None:
            for path in paths:
                self.tree.remove(path)  # a missing path is fine, as in libimobiledevice

        await self._apply(remove)

    async def _copy_item(self, msg: list) -> None:
        src, dst = _arg(msg, 1, str, "source"), _arg(msg, 2, str, "destination")
        await self._apply(lambda: self.tree.copy(src, dst))

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


# ---- checking the device's messages --------------------------------------------------------------

# Messages that only open a session; inside a request they mean the device lost its place.
_OUT_OF_ORDER = frozenset({"DLMessageVersionExchange", "DLMessageDeviceReady", "DLMessageStatusResponse"})


def _expect(msg: list, name: str) -> None:
    if msg[0] != name:
        raise MalformedMessage(msg[0], f"{name} was expected at this point of the session")


def _arg(msg: list, i: int, kind: type, what: str) -> Any:
    """Argument ``i`` of ``msg``, which must be of ``kind`` (a bool is not an integer here)."""
    if len(msg) <= i:
        raise MalformedMessage(msg[0], f"its {what} (argument {i}) is missing")
    value = msg[i]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedMessage(msg[0], f"its {what} is {_kind(value)}, not {_kind(kind())}")
    return value


def _str_list(msg: list, i: int, what: str) -> list[str]:
    values = _arg(msg, i, list, what)
    for v in values:
        if not isinstance(v, str):
            raise MalformedMessage(msg[0], f"its {what} hold {_kind(v)}, not only strings")
    return values


def _str_dict(msg: list, i: int, what: str) -> dict[str, str]:
    values = _arg(msg, i, dict, what)
    for k, v in values.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise MalformedMessage(msg[0], f"its {what} map {_kind(k)} to {_kind(v)}, not strings to strings")
    return values


def _session_end(msg: list) -> SessionEnd:
    """The device's final DLMessageProcessMessage: its ErrorCode decides."""
    content = _arg(msg, 1, dict, "content")
    if "ErrorCode" not in content:
        raise MalformedMessage(msg[0], "its content has no ErrorCode")
    code = content["ErrorCode"]
    if not isinstance(code, int) or isinstance(code, bool):
        raise MalformedMessage(msg[0], f"its ErrorCode is {_kind(code)}, not an integer")
    description = content.get("ErrorDescription")
    return SessionEnd(code, description if isinstance(description, str) else "", content.get("Content"))
