"""A simulated device on the LAN: lockdownd over TCP, as pymobiledevice3's ``--mobdev2`` and
ibsync's Wi-Fi direct reach a paired phone without usbmuxd.

A real phone listens on TCP 62078 on its Wi-Fi address; a host that found it (Bonjour
``_apple-mobdev2._tcp``) opens lockdown there with its pair record, and each service lockdownd
starts is a new TCP connection to the port the StartService reply names, on the same address
(pymobiledevice3's ``TcpLockdownClient.create_service_connection``). :class:`SimWifi` does the
same on 127.0.0.1 only (never another address): lockdownd on an ephemeral port, and for each
StartService a listening socket on another ephemeral port that serves the one connection the
host makes to it (over TLS when lockdownd said ``EnableServiceSSL``).

Bonjour itself (multicast DNS) is not simulated: tests point ibsync at the port with
``IBSYNC_WIFI_DEVICES`` (:meth:`SimWifi.env_entry`), or hand ibsync's discovery the advert
:meth:`SimWifi.advert` describes (the ``authTag`` a phone publishes for each host it trusts).
"""

from __future__ import annotations

import base64
import selectors
import socket
import ssl
import threading
import traceback
from typing import Any, Self

from .lockdownd import HANDSHAKE_TIMEOUT, ServiceGrant, SimLockdownd, wifi_address
from .model import SimDevice
from .runtime import DeviceLog, DeviceRuntime
from .services import start_service
from .usbmuxd import Reach, swallow

#: How long a service port StartService opened waits for the host's connection (inferred: real
#: lockdownd closes an unused service port after a while; pymobiledevice3 connects at once).
SERVICE_ACCEPT_TIMEOUT = 10.0


class SimWifi:
    """One simulated phone reachable over the LAN on 127.0.0.1. Context manager (start/close)."""

    def __init__(self, device: SimDevice, lockdownd: SimLockdownd, *, reach: Reach = Reach.OK) -> None:
        self.device = device
        self.lockdownd = lockdownd
        self.runtime = DeviceRuntime(device)
        #: OK: lockdownd answers; REFUSED: nothing listens (the connection is refused);
        #: SILENT: connections are accepted and never answered (asleep, or the Wi-Fi dropped)
        self.reach = reach
        self.errors: list[str] = []
        self._server: socket.socket | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()

    # ---- addresses ------------------------------------------------------------------------------------------

    @property
    def udid(self) -> str:
        return self.device.udid

    @property
    def log(self) -> DeviceLog:
        return self.runtime.log

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("SimWifi is not started")
        return self._server.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env_entry(self) -> str:
        """This phone's item of ``IBSYNC_WIFI_DEVICES`` (``udid=127.0.0.1:port``)."""
        return f"{self.udid}={self.address}"

    def advert(self, identifier: str = "0D3A7C1E-5B2F-4E1A-9C2D-7F00D15EA5E5") -> Any:
        """The ``_apple-mobdev2._tcp`` advert this phone would publish, as pymobiledevice3's Bonjour
        browser returns it: instance ``<Wi-Fi MAC>@<address>._apple-mobdev2._tcp.local.``, TXT
        ``identifier`` and one ``authTag`` per trusted host (HMAC of its HostID over the identifier,
        what pymobiledevice3 matches pair records by), address 127.0.0.1, SRV port the lockdownd
        port. ``identifier``: the advert's opaque id (rotates on real phones)."""
        from pymobiledevice3.bonjour import Address, ServiceInstance
        from pymobiledevice3.lockdown import compute_mobdev2_auth_tag

        props = {"identifier": identifier}
        for i, host_id in enumerate(sorted(self.lockdownd.trusted_hosts())):
            key = "authTag" if i == 0 else f"authTag#{i}"
            props[key] = base64.b64encode(compute_mobdev2_auth_tag(host_id, identifier)).decode()
        mac = wifi_address(self.udid)
        return ServiceInstance(
            instance=f"{mac}@fe80::1._apple-mobdev2._tcp.local.",
            host="sim-iphone.local",
            port=self.port,
            addresses=[Address(ip="127.0.0.1", iface="lo")],
            properties=props,
        )

    # ---- running --------------------------------------------------------------------------------------------

    def start(self) -> Self:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))  # loopback only, by design
        server.listen(16)
        self._server = server
        self._spawn(self._accept_loop, "simwifi-accept")
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Leave the network: stop listening, end every connection and service thread."""
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _shutdown(s)
        self.lockdownd.shutdown_connections()
        stuck: list[str] = []
        try:
            self.runtime.shutdown(timeout)
        except RuntimeError as e:
            stuck.append(str(e))
        for t in list(self._threads):
            t.join(timeout)
        stuck += [t.name for t in self._threads if t.is_alive()]
        if self._server is not None:
            self._server.close()
        if stuck:
            raise RuntimeError(f"simulated Wi-Fi threads still running: {', '.join(stuck)}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def all_errors(self) -> list[str]:
        return self.errors + self.runtime.log.errors

    def _spawn(self, target, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closing.is_set():
                return False
            self._socks.add(sock)
            return True

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def _accept_loop(self) -> None:
        assert self._server is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            while not self._closing.is_set():
                if not selector.select(0.05):
                    continue
                try:
                    conn, _ = self._server.accept()
                except OSError:
                    continue
                if self.reach is Reach.REFUSED:
                    # as near to a refused connection as a listening socket gets: reset at once
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.close()
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setblocking(True)
                if not self._track(conn):
                    conn.close()
                    continue
                self._spawn(self._serve, "simwifi-lockdownd", conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.reach is Reach.SILENT:
                swallow(conn, self._closing)
                return
            self.lockdownd.serve(conn, open_service=self._open_service)
        except Exception:  # noqa: BLE001 - a crash of the simulator itself: recorded for the test to fail on
            self.errors.append(f"wifi lockdownd: {traceback.format_exc()}")
        finally:
            self._untrack(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _open_service(self, grant: ServiceGrant) -> int:
        """StartService over TCP: a port of its own on 127.0.0.1, serving the host's one connection."""
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        self._spawn(self._serve_service, f"simwifi-service-{grant.name}", server, grant)
        return port

    def _serve_service(self, server: socket.socket, grant: ServiceGrant) -> None:
        try:
            server.settimeout(0.05)
            waited = 0.0
            while True:
                if self._closing.is_set() or waited >= SERVICE_ACCEPT_TIMEOUT:
                    return
                try:
                    conn, _ = server.accept()
                    break
                except TimeoutError:
                    waited += 0.05
        finally:
            server.close()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(True)
        sock: socket.socket = conn
        if grant.context is not None:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            try:
                sock = grant.context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                return
            sock.settimeout(None)
        with self._lock:
            if self._closing.is_set():
                sock.close()
                return
            try:
                start_service(grant.name, sock, self.runtime)
            except Exception:  # noqa: BLE001
                self.errors.append(f"wifi service {grant.name}: {traceback.format_exc()}")
                sock.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
