"""``com.apple.mobile.installation_proxy``, device side: ``Browse`` only.

The host sends ``{"Command": "Browse", "ClientOptions": {"ApplicationType": ..., "ReturnAttributes":
[...]}}``; the device answers with one or more ``{"Status": "BrowsingApplications", "CurrentList": [...],
...}`` and ends with ``{"Status": "Complete"}`` (read from pymobiledevice3's ``browse()``; the counters
in the progress messages follow libimobiledevice's names). A backup browses the user apps for
``CFBundleIdentifier``, ``ApplicationSINF`` and ``iTunesMetadata``, and puts those of apps that have both
into Info.plist.

The apps are the device's ``AppDomain-<bundle id>`` domains; their SINF and iTunes metadata are made up
(deterministic per bundle id).
"""

from __future__ import annotations

import hashlib
import plistlib

from .runtime import DeviceRuntime
from .wire import Wire

BROWSE_PAGE = 50  # apps per BrowsingApplications message


def app_info(bundle_id: str) -> dict:
    """What installation_proxy knows about a user app (the attributes a backup asks for, and a few more)."""
    name = bundle_id.rsplit(".", 1)[-1]
    h = hashlib.sha256(f"simdevice-app:{bundle_id}".encode()).digest()
    return {
        "ApplicationType": "User",
        "CFBundleDisplayName": name.capitalize(),
        "CFBundleIdentifier": bundle_id,
        "CFBundleShortVersionString": "1.0",
        "CFBundleVersion": "1",
        "ApplicationSINF": b"sinf" + h * 4,
        "iTunesMetadata": plistlib.dumps(
            {
                "itemId": int.from_bytes(h[:4], "big"),
                "itemName": name.capitalize(),
                "softwareVersionBundleId": bundle_id,
            }
        ),
    }


def serve_installation_proxy(wire: Wire, runtime: DeviceRuntime) -> None:
    while True:
        msg = wire.recv_plist()
        if not isinstance(msg, dict) or msg.get("Command") != "Browse":
            wire.send_plist({"Error": "UnknownCommand", "Status": "Complete"})
            continue
        options = msg.get("ClientOptions") or {}
        kind = options.get("ApplicationType", "Any")
        apps = [app_info(b) for b in runtime.device.installed_apps()] if kind in ("User", "Any") else []
        wanted = options.get("ReturnAttributes")
        if wanted:
            apps = [{k: v for k, v in app.items() if k in wanted} for app in apps]
        for start in range(0, len(apps), BROWSE_PAGE):
            page = apps[start : start + BROWSE_PAGE]
            wire.send_plist(
                {
                    "Status": "BrowsingApplications",
                    "CurrentList": page,
                    "CurrentIndex": start,
                    "CurrentAmount": len(page),
                    "Total": len(apps),
                }
            )
        wire.send_plist({"Status": "Complete"})
