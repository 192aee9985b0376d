"""The device's side of DeviceLink, the message protocol mobilebackup2 runs on.

Every message is a u32be-framed plist whose root is an array naming the message. The device drives:
it sends requests (``DLMessageUploadFiles``, ``DLMessageDownloadFiles``, ...) and the host answers each
with ``["DLMessageStatusResponse", code, description, value]``; file contents travel as raw frames
on the same stream in between (layout below, read from pymobiledevice3 11.45.0's
``services/device_link.py``, the host side this must interoperate with).

File stream, per file: ``u32 len | name`` (upload: device-side name, then host-side name), then data
frames ``u32 (n+1) | 0x0C | n bytes``, then ``u32 1 | 0x00`` (done) or ``u32 (n+1) | code | message``
(failed: 0x0B when the device could not read it, 0x06 when the host could not); ``u32 0`` ends a batch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .runtime import DeviceLog
from .wire import Wire

EMPTY = "___EmptyParameterString___"  # DeviceLink's placeholder for an empty string argument
CODE_SUCCESS, CODE_ERROR_LOCAL, CODE_ERROR_REMOTE, CODE_FILE_DATA = 0x00, 0x06, 0x0B, 0x0C
#: DeviceLink version the device offers: 400 since iOS 14 beta 4, 300 before.
DL_VERSION_MAJOR, DL_VERSION_MINOR = 400, 0
_U32 = struct.Struct(">I")
_SEND_BUFFER = 1 << 20


class ProtocolViolation(Exception):
    """The host sent something DeviceLink does not allow at this point."""


class HostDisconnected(ConnectionError):
    """The host sent DLMessageDisconnect where the device waited for an answer (it gave up, e.g. on a
    message it could not handle): the conversation is over."""


class DroppedByDevice(ConnectionError):
    """The device dropped the connection on purpose (a misbehaviour): the conversation is over."""


@dataclass(frozen=True)
class Status:
    """The host's DLMessageStatusResponse. Codes travel as uint64; -13 ("Multi status") arrives as
    2**64 - 13 and is given back here as -13."""

    code: int
    description: str
    value: Any

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass(frozen=True)
class Upload:
    """One file of a DLMessageUploadFiles batch."""

    device_name: str  # e.g. "HomeDomain-Library/SMS/sms.db"
    file_name: str  # where the host writes it, relative to its backup root: "<udid>/Snapshot/3d/3d0d..."
    data: bytes
    error: str | None = None  # the device cannot read the file: CODE_ERROR_REMOTE with this text
    drop_midway: bool = False  # the device drops the link halfway through the data


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _frame(code: int, payload: bytes | memoryview = b"") -> bytes:
    return _U32.pack(len(payload) + 1) + bytes((code,)) + bytes(payload)


def _named(text: str) -> bytes:
    raw = text.encode()
    return _U32.pack(len(raw)) + raw


class DeviceLinkEndpoint:
    """DeviceLink as the device speaks it, on one connection."""

    def __init__(self, wire: Wire, log: DeviceLog, frame_size: int) -> None:
        self.wire = wire
        self.log = log
        self.frame_size = frame_size
        self.request_name = ""  # the MessageName being answered (for the log)

    # ---- session -------------------------------------------------------------------------------------------------

    def handshake(self) -> None:
        """Version exchange: the device offers its version, the host says DLVersionsOk, the device is ready."""
        self.send("DLMessageVersionExchange", DL_VERSION_MAJOR, DL_VERSION_MINOR)
        reply = self.receive()
        if reply[:2] != ["DLMessageVersionExchange", "DLVersionsOk"]:
            raise ProtocolViolation(f"expected DLVersionsOk, got {reply!r}")
        self.send("DLMessageDeviceReady")

    def receive(self) -> list:
        msg = self.wire.recv_plist()
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            raise ProtocolViolation(f"not a DeviceLink message: {msg!r}")
        return msg

    def send(self, name: str, *args: Any) -> None:
        self.log.sent.append(name)
        self.wire.send_plist([name, *args])

    def request(self, name: str, *args: Any) -> Status:
        self.send(name, *args)
        return self._status()

    def _status(self) -> Status:
        msg = self.receive()
        if msg[0] == "DLMessageDisconnect":
            raise HostDisconnected("the host disconnected instead of answering")
        if msg[0] != "DLMessageStatusResponse" or len(msg) < 3:
            raise ProtocolViolation(f"expected DLMessageStatusResponse, got {msg!r}")
        description = msg[2] if msg[2] != EMPTY else ""
        return Status(_signed64(int(msg[1])), description, msg[3] if len(msg) > 3 else None)

    def process_message(self, content: Mapping[str, Any]) -> None:
        """The answer to the host's request (Hello, Backup, Restore, ...): ends the host's message loop."""
        # logged before it is sent: the host may act on it (and a test read the log) at once
        self.log.operations.append((self.request_name, int(content.get("ErrorCode", 0))))
        self.send("DLMessageProcessMessage", dict(content))

    # ---- requests --------------------------------------------------------------------------------------------------

    def create_directory(self, path: str) -> Status:
        return self.request("DLMessageCreateDirectory", path)

    def contents_of_directory(self, path: str) -> Status:
        # the one request whose name has no "Message" in it
        return self.request("DLContentsOfDirectory", path)

    def free_disk_space(self) -> Status:
        return self.request("DLMessageGetFreeDiskSpace")

    def purge_disk_space(self, amount: int) -> Status:
        return self.request("DLMessagePurgeDiskSpace", amount, 4)  # 4: the urgency devices send

    def move_items(self, items: Mapping[str, str], progress: float, name: str = "DLMessageMoveItems") -> Status:
        self.log.moved.extend(items.items())
        return self.request(name, dict(items), {}, progress)

    def remove_items(self, paths: list[str], progress: float, name: str = "DLMessageRemoveItems") -> Status:
        self.log.removed.extend(paths)
        return self.request(name, list(paths), {}, progress)

    def upload_files(self, uploads: Iterable[Upload], progress: float) -> Status:
        uploads = list(uploads)
        self.send("DLMessageUploadFiles", {}, progress, sum(len(u.data) for u in uploads))
        out = bytearray()  # small files go out together: one send per ~1 MiB, not three per file

        def flush() -> None:
            if out:
                self.wire.send(bytes(out))
                out.clear()

        for u in uploads:
            self.log.uploaded.append(u.file_name)
            out += _named(u.device_name) + _named(u.file_name)
            if u.error is not None:
                self.log.failed_uploads.append(u.file_name)
                out += _frame(CODE_ERROR_REMOTE, u.error.encode())
                continue
            data = memoryview(u.data)
            cut = len(data) // 2 if u.drop_midway else len(data)
            for off in range(0, cut, self.frame_size):
                out += _frame(CODE_FILE_DATA, data[off : min(off + self.frame_size, cut)])
                if len(out) >= _SEND_BUFFER:
                    flush()
            if u.drop_midway:
                flush()
                self.wire.abort()
                raise DroppedByDevice(f"dropped the connection halfway through {u.file_name}")
            out += _frame(CODE_SUCCESS)
        out += _U32.pack(0)
        flush()
        return self._status()

    def download_files(self, paths: list[str], progress: float) -> tuple[dict[str, bytes | None], Status]:
        """Ask the host for files; ``None`` for each the host could not send (its Multi-status
        answer says why)."""
        self.log.downloaded.append(list(paths))
        self.send("DLMessageDownloadFiles", list(paths), {}, progress)
        got: dict[str, bytes | None] = {}
        while True:
            n = self.wire.read_u32()
            if n == 0:
                break
            path = self.wire.read_exact(n).decode()
            chunks = []
            while True:
                size = self.wire.read_u32()
                if size == 0:
                    raise ProtocolViolation(f"empty frame in the data of {path}")
                code = self.wire.read_exact(1)[0]
                body = self.wire.read_exact(size - 1)
                if code == CODE_FILE_DATA:
                    chunks.append(body)
                    continue
                if code == CODE_SUCCESS:
                    got[path] = b"".join(chunks)
                elif code in (CODE_ERROR_LOCAL, CODE_ERROR_REMOTE):
                    got[path] = None
                else:
                    raise ProtocolViolation(f"unknown file-transfer code {code:#x} for {path}")
                break
        return got, self._status()
