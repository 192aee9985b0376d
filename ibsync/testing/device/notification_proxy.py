"""``com.apple.mobile.notification_proxy``, device side.

The host sends u32be-framed plists and gets nothing back for them (read from pymobiledevice3's
``services/notification_proxy.py``): ``{"Command": "PostNotification", "Name": ...}`` posts a Darwin
notification on the device (backups post ``com.apple.itunes-mobdev.syncWillStart`` and friends),
``{"Command": "ObserveNotification", "Name": ...}`` asks the device to relay one; relayed
notifications arrive as ``{"Command": "RelayNotification", "Name": ...}`` whenever they fire (here: when
:class:`~.runtime.DeviceRuntime` relays one, e.g. the passcode prompt). ``{"Command": "Shutdown"}`` is
answered with ``{"Command": "ProxyDeath"}`` and ends the connection, as libimobiledevice expects.
"""

from __future__ import annotations

from .runtime import DeviceRuntime
from .wire import Wire


def serve_notification_proxy(wire: Wire, runtime: DeviceRuntime) -> None:
    hub = runtime.notifications
    conn = hub.attach(wire)
    try:
        while True:
            msg = wire.recv_plist()
            command = msg.get("Command") if isinstance(msg, dict) else None
            if command == "PostNotification":
                runtime.log.host_notifications.append(str(msg.get("Name")))
            elif command == "ObserveNotification":
                hub.observe(conn, str(msg.get("Name")))
            elif command == "Shutdown":
                wire.send_plist({"Command": "ProxyDeath"})
                return
            # anything else (SetNotificationState on iOS 27.2+, ...) is ignored, as a device ignores
            # commands it does not know
    finally:
        hub.detach(conn)
