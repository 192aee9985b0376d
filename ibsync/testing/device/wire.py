"""The device's end of one service connection: a blocking socket with the framing lockdown services use.

Device-side servers run in their own threads with plain blocking I/O, independent of the host's event
loop (pymobiledevice3's host side is asyncio); one connection is one socket, as over usbmuxd.
"""

from __future__ import annotations

import plistlib
import socket
import struct
import threading
from typing import Any

_U32 = struct.Struct(">I")
#: Reads are buffered: the host's upload stream and AFC packets arrive as many small pieces.
_READ_BUFFER = 256 * 1024


class HostClosed(ConnectionError):
    """The host closed the connection (or it broke): the service's conversation is over."""


class Wire:
    """Framed I/O on the device's end of a connection. Sends may come from several threads (a
    notification relayed while the connection's own thread waits for a request), reads from one."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._rfile = sock.makefile("rb", buffering=_READ_BUFFER)
        self._send_lock = threading.Lock()
        self._closed = False

    # ---- reading ---------------------------------------------------------------------------------------------

    def read_exact(self, n: int) -> bytes:
        try:
            data = self._rfile.read(n) if n else b""
        except (OSError, ValueError) as e:  # ValueError: read on a file closed by abort()
            raise HostClosed(str(e)) from e
        if len(data) != n:
            raise HostClosed("the host closed the connection")
        return data

    def read_u32(self) -> int:
        return _U32.unpack(self.read_exact(4))[0]

    def recv_plist(self) -> Any:
        """A plist framed by a big-endian u32 length (the host may send XML or binary)."""
        return plistlib.loads(self.read_exact(self.read_u32()))

    # ---- writing ---------------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as e:
                raise HostClosed(str(e)) from e

    def send_plist(self, value: Any, fmt: plistlib.PlistFormat = plistlib.FMT_BINARY) -> None:
        """Devices send binary plists (pymobiledevice3 sends XML; both sides accept either)."""
        payload = plistlib.dumps(value, fmt=fmt)
        self.send(_U32.pack(len(payload)) + payload)

    # ---- ending ----------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """End the connection in both directions; safe from another thread (the one reading gets
        :class:`HostClosed` and closes the wire itself)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def abort(self) -> None:
        """Drop the connection at once, as a device that crashes or is unplugged does (from the
        thread that owns the wire)."""
        self.shutdown()
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._rfile.close()
        finally:
            self._sock.close()
