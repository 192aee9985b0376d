"""The simulated device's services by name: the entry point anything that hands the device a connected
socket uses: :class:`~.provider.SimLockdown` (socket pairs), and :class:`~.usbmuxd.SimUsbmuxd`, which
calls :func:`start_service` once a host connects to the port its lockdownd's StartService reply named.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from .afc import serve_afc
from .installation_proxy import serve_installation_proxy
from .mobilebackup2 import serve_mobilebackup2
from .notification_proxy import serve_notification_proxy
from .runtime import DeviceRuntime
from .springboard import serve_springboard
from .wire import Wire

Serve = Callable[[Wire, DeviceRuntime], None]

SERVICES: dict[str, Serve] = {
    "com.apple.mobilebackup2": serve_mobilebackup2,
    "com.apple.afc": serve_afc,
    "com.apple.mobile.notification_proxy": serve_notification_proxy,
    "com.apple.mobile.insecure_notification_proxy": serve_notification_proxy,
    "com.apple.mobile.installation_proxy": serve_installation_proxy,
    "com.apple.springboardservices": serve_springboard,
}

#: Over RemoteXPC (and whenever pymobiledevice3's provider is not a LockdownClient) services are asked
#: for by their ".shim.remote" names; the service behind one is the same.
_SHIM_SUFFIX = ".shim.remote"


def service_name(name: str) -> str:
    """The lockdown name of a service, whichever of its names was asked for."""
    return name.removesuffix(_SHIM_SUFFIX)


def offers(name: str) -> bool:
    return service_name(name) in SERVICES


def start_service(name: str, sock: socket.socket, runtime: DeviceRuntime) -> threading.Thread:
    """Serve ``name`` on the device's end of a connected socket, in a thread of its own (the socket is
    the device's from now on). KeyError for a service the device does not offer."""
    name = service_name(name)
    serve = SERVICES[name]
    return runtime.run_service(name, Wire(sock), serve)
