"""A simulated iPhone that speaks the real protocols, for tests and benchmarks.

The device side of mobilebackup2 (DeviceLink), AFC, notification_proxy, installation_proxy and
springboardservices, over plain sockets, so that pymobiledevice3's unmodified host code (or ibsync's
own) can back it up and restore it::

    device = SimDevice.from_content(generate_content(seed=1, size_bytes=4 << 20))
    with SimLockdown(device) as lockdown:
        asyncio.run(Mobilebackup2Service(lockdown).backup(full=True, backup_directory=tmp))
    device.write_file("HomeDomain", "Library/Notes/new.txt", b"...")   # then back up again: incremental

One level deeper, ``usbmuxd`` (a usbmuxd on a UNIX socket) with ``lockdownd`` behind it (pairing,
TLS sessions, StartService) lets pymobiledevice3's own discovery and lockdown code, or a separate
process such as the ``ibsync`` CLI, find the device through ``USBMUXD_SOCKET_ADDRESS`` alone::

    with run_sim_usbmuxd([device], tmp) as mux:
        subprocess.run(["ibsync", "devices"], env={**os.environ, **mux.env(home=tmp / "home")})

Modules: ``model`` (what the device holds, how it misbehaves), ``provider`` (pymobiledevice3's
LockdownServiceProvider), ``usbmuxd`` and ``lockdownd`` (the socket level), ``wifi`` (lockdownd
and its services over TCP on 127.0.0.1: Wi-Fi direct), ``services`` (service name + socket -> a running service), one module per
service, ``backup``/``restore`` (the mobilebackup2 requests), ``devicelink`` and ``wire`` (framing),
``metadata`` and ``crypto`` (the files and keys a backup carries), ``errors`` (how requests fail),
``runtime`` (shared state and log), ``hostile`` (a device that sends what it should not).
"""

from .crypto import DeviceKeys, UnlockedBackup, WrongPassword
from .lockdownd import TrustStore
from .model import (
    Battery,
    HostileStep,
    LegacyMessage,
    Misbehaviour,
    PasscodePrompt,
    SimDevice,
    Then,
    TransferSettings,
    file_id,
)
from .provider import SimLockdown
from .runtime import DeviceLog, DeviceRuntime
from .services import SERVICES, start_service
from .usbmuxd import Reach, SimUsbmuxd, run_sim_usbmuxd
from .wifi import SimWifi

__all__ = [
    "Battery",
    "SERVICES",
    "DeviceKeys",
    "DeviceLog",
    "DeviceRuntime",
    "HostileStep",
    "LegacyMessage",
    "Misbehaviour",
    "PasscodePrompt",
    "SimDevice",
    "Reach",
    "SimUsbmuxd",
    "SimWifi",
    "TrustStore",
    "run_sim_usbmuxd",
    "SimLockdown",
    "Then",
    "TransferSettings",
    "UnlockedBackup",
    "WrongPassword",
    "file_id",
    "start_service",
]
