"""A simulated iPhone that speaks the real protocols, for tests and benchmarks.

The device side of mobilebackup2 (DeviceLink), AFC, notification_proxy, installation_proxy and
springboardservices, over plain sockets, so that pymobiledevice3's unmodified host code (or ibsync's
own) can back it up and restore it::

    device = SimDevice.from_content(generate_content(seed=1, size_bytes=4 << 20))
    with SimLockdown(device) as lockdown:
        asyncio.run(Mobilebackup2Service(lockdown).backup(full=True, backup_directory=tmp))
    device.write_file("HomeDomain", "Library/Notes/new.txt", b"...")   # then back up again: incremental

Modules: ``model`` (what the device holds, how it misbehaves), ``provider`` (pymobiledevice3's
LockdownServiceProvider), ``services`` (service name + socket -> a running service), one module per
service, ``backup``/``restore`` (the mobilebackup2 requests), ``devicelink`` and ``wire`` (framing),
``metadata`` and ``crypto`` (the files and keys a backup carries), ``errors`` (how requests fail),
``runtime`` (shared state and log).
"""

from .crypto import DeviceKeys, UnlockedBackup, WrongPassword
from .model import (
    LegacyMessage,
    Misbehaviour,
    PasscodePrompt,
    SimDevice,
    TransferSettings,
    file_id,
)
from .provider import SimLockdown
from .runtime import DeviceLog, DeviceRuntime
from .services import SERVICES, start_service

__all__ = [
    "SERVICES",
    "DeviceKeys",
    "DeviceLog",
    "DeviceRuntime",
    "LegacyMessage",
    "Misbehaviour",
    "PasscodePrompt",
    "SimDevice",
    "SimLockdown",
    "TransferSettings",
    "UnlockedBackup",
    "WrongPassword",
    "file_id",
    "start_service",
]
