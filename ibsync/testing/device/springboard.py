"""``com.apple.springboardservices``, device side: ``getIconPNGData`` only.

Request ``{"command": "getIconPNGData", "bundleId": ...}`` -> ``{"pngData": <PNG>}`` (read from
pymobiledevice3's ``get_icon_pngdata``). A backup asks for the icon of each app that has a SINF and
iTunes metadata and stores it in Info.plist as ``PlaceholderIcon``. The icon is a valid 1x1 PNG whose
colour depends on the bundle id. Other commands get an empty dictionary.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

from .runtime import DeviceRuntime
from .wire import Wire


def icon_png(bundle_id: str) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rgba = hashlib.sha256(bundle_id.encode()).digest()[:3] + b"\xff"
    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1, 8-bit RGBA
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" + rgba))
        + chunk(b"IEND", b"")
    )


def serve_springboard(wire: Wire, runtime: DeviceRuntime) -> None:
    while True:
        msg = wire.recv_plist()
        if isinstance(msg, dict) and msg.get("command") == "getIconPNGData":
            wire.send_plist({"pngData": icon_png(str(msg.get("bundleId", "")))})
        else:
            wire.send_plist({})
