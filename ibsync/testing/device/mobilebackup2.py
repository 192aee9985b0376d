"""``com.apple.mobilebackup2``, device side: the DeviceLink session and the requests the host sends in it.

Session (read from pymobiledevice3 11.45.0's ``Mobilebackup2Service.device_link``; idevicebackup2
accepts DeviceLink versions up to 400)::

    dev  ["DLMessageVersionExchange", 400, 0]
    host ["DLMessageVersionExchange", "DLVersionsOk", 400]
    dev  ["DLMessageDeviceReady"]
    host ["DLMessageProcessMessage", {"MessageName": "Hello", "SupportedProtocolVersions": [2.0, 2.1]}]
    dev  ["DLMessageProcessMessage", {"ErrorCode": 0, "MessageName": "Response", "ProtocolVersion": 2.1}]
    host ["DLMessageProcessMessage", {"MessageName": "Backup" | "Restore" | ..., ...}]
         ... the device drives (backup.py, restore.py) and ends with DLMessageProcessMessage {ErrorCode} ...
    host ["DLMessageDisconnect", "___EmptyParameterString___"]

Simulated requests: Hello, Backup, Restore, ChangePassword. The others (Info, List, Unback, Extract,
EraseDevice, EnableCloudBackup) are answered with an error naming them.
"""

from __future__ import annotations

from collections.abc import Callable

from . import errors
from .backup import BackupOperation
from .devicelink import DeviceLinkEndpoint, ProtocolViolation
from .errors import Refusal
from .restore import RestoreOperation
from .runtime import DeviceRuntime
from .wire import Wire

PROTOCOL_VERSIONS = (2.0, 2.1)

#: A request's handler answers it with a DLMessageProcessMessage, or raises Refusal.
Handler = Callable[[DeviceLinkEndpoint, DeviceRuntime, dict], None]


def _hello(link: DeviceLinkEndpoint, runtime: DeviceRuntime, request: dict) -> None:
    common = [v for v in request.get("SupportedProtocolVersions", []) if v in PROTOCOL_VERSIONS]
    if not common:
        raise Refusal(errors.UNSUPPORTED, f"no common protocol version (device: {list(PROTOCOL_VERSIONS)})")
    link.process_message({"ErrorCode": 0, "MessageName": "Response", "ProtocolVersion": max(common)})


def _backup(link: DeviceLinkEndpoint, runtime: DeviceRuntime, request: dict) -> None:
    BackupOperation(link, runtime, request).run()


def _restore(link: DeviceLinkEndpoint, runtime: DeviceRuntime, request: dict) -> None:
    RestoreOperation(link, runtime, request).run()


def _change_password(link: DeviceLinkEndpoint, runtime: DeviceRuntime, request: dict) -> None:
    """Turn backup encryption on (NewPassword only), off (OldPassword only) or change the password.
    Real devices also ask for the passcode on screen here (iOS 16+); the simulator does not."""
    dev = runtime.device
    old, new = request.get("OldPassword") or "", request.get("NewPassword") or ""
    if dev.encrypted and old != dev.password:
        raise Refusal(errors.WRONG_PASSWORD, "the old backup password is wrong")
    dev.encrypted, dev.password = bool(new), new
    link.process_message({"ErrorCode": 0})


HANDLERS: dict[str, Handler] = {
    "Hello": _hello,
    "Backup": _backup,
    "Restore": _restore,
    "ChangePassword": _change_password,
}


def _unsupported(link: DeviceLinkEndpoint, runtime: DeviceRuntime, request: dict) -> None:
    raise Refusal(errors.UNSUPPORTED, f"{request.get('MessageName')} is not simulated by ibsync's SimDevice")


def serve_mobilebackup2(wire: Wire, runtime: DeviceRuntime) -> None:
    """Run one mobilebackup2 connection until the host disconnects."""
    link = DeviceLinkEndpoint(wire, runtime.log, runtime.device.transfer.frame_size)
    link.handshake()
    while True:
        msg = link.receive()
        if msg[0] == "DLMessageDisconnect":
            return
        if msg[0] != "DLMessageProcessMessage" or len(msg) < 2 or not isinstance(msg[1], dict):
            raise ProtocolViolation(f"expected DLMessageProcessMessage, got {msg!r}")
        request = msg[1]
        link.request_name = str(request.get("MessageName"))
        try:
            HANDLERS.get(link.request_name, _unsupported)(link, runtime, request)
        except Refusal as r:
            link.process_message({"ErrorCode": r.code, "ErrorDescription": r.description})
