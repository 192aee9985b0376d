"""A simulated usbmuxd serving simulated devices, so that pymobiledevice3's own discovery, pairing and
lockdown code (and anything built on it: the ``pymobiledevice3`` CLI, ibsync's CLI) runs unmodified.

:class:`SimUsbmuxd` listens on a UNIX socket in a folder (and, if asked, on TCP 127.0.0.1; never any
other address) and speaks usbmuxd's plist protocol: ``ReadBUID``, ``ListDevices``, ``Listen`` (attach,
detach and pair events), ``ReadPairRecord``/``SavePairRecord``/``DeletePairRecord`` backed by
``<folder>/lockdown/<udid>.plist`` (as ``/var/lib/lockdown`` backs the real one), and ``Connect``: to port
62078 it reaches the device's lockdownd (:mod:`.lockdownd`), to a port lockdownd handed out it reaches the
service (:func:`.services.start_service`), over TLS when lockdownd said ``EnableServiceSSL``.

A device counts as paired when the folder holds a pair record for it at attach time (or when a host pairs
with it, as pymobiledevice3's autopair does): :meth:`SimUsbmuxd.pair` writes one.

In-process use::

    with SimUsbmuxd(tmp / "mux", [device]) as mux:
        monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", mux.address)
        lockdown = await create_using_usbmux(serial=device.udid, pairing_records_cache_folder=tmp / "records")

A subprocess (``pymobiledevice3 ...``, ``python -m ibsync ...``) finds the device through one variable::

    with run_sim_usbmuxd([device], tmp / "mux") as mux:          # paired: no Pair dialog, no home folder record
        subprocess.run([...], env={**os.environ, **mux.env(home=tmp / "home")})

``env()`` sets ``USBMUXD_SOCKET_ADDRESS`` to :attr:`SimUsbmuxd.address`. Use the variable rather than
pymobiledevice3's ``usbmux_address=`` argument: some of its code paths (saving a pair record after
autopair, the CLI's no-autopair provider) open usbmuxd without passing the argument on. ``home=`` also
points ``HOME`` and ``XDG_DATA_HOME`` there, because pymobiledevice3 creates its home folder (and writes
pair records with private keys into it when it pairs) at import time, and otherwise uses the real user's.
Use UDIDs no real device has: pymobiledevice3 also reads ``/var/lib/lockdown/<udid>.plist``.

Threads: one accepts connections, one serves each connection (pymobiledevice3 opens about seven usbmuxd
connections per lockdown client: every request is a new ReadBUID probe plus a fresh connection).
"""

from __future__ import annotations

import contextlib
import enum
import os
import plistlib
import selectors
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from .lockdownd import (
    HANDSHAKE_TIMEOUT,
    LOCKDOWN_PORT,
    SimLockdownd,
    TrustStore,
    make_pair_record,
    recv_exact,
)
from .model import SimDevice
from .runtime import DeviceLog, DeviceRuntime
from .services import start_service

ENV_VAR = "USBMUXD_SOCKET_ADDRESS"
#: ibsync's list of Wi-Fi-direct phones that replaces a Bonjour browse (ibsync.capture.wifi)
WIFI_ENV_VAR = "IBSYNC_WIFI_DEVICES"
SOCKET_NAME = "usbmuxd"
RECORDS_DIR = "lockdown"
#: sockaddr_un holds 108 bytes with the NUL; longer folders get their socket in a short temporary folder.
_MAX_UNIX_PATH = 100
# Every packet: u32 length (header included), u32 version, u32 message, u32 tag, all little-endian.
_HEADER = struct.Struct("<IIII")
_VERSION_BINARY, _VERSION_PLIST = 0, 1
_MESSAGE_RESULT, _MESSAGE_PLIST = 1, 8
#: Properties of a USB device in ListDevices/Attached (values of an iPhone on a USB 2 port; pymobiledevice3
#: reads only SerialNumber, ConnectionType and DeviceID).
_USB_PRODUCT_ID = 0x12A8
_USB_SPEED = 480_000_000
_LISTENER_SEND_TIMEOUT = 5.0


class Result(enum.IntEnum):
    OK = 0
    BADCOMMAND = 1
    BADDEV = 2  # also what a missing pair record gets: usbmuxd sends -ENOENT, and ENOENT is 2
    CONNREFUSED = 3
    NOSUCHSERVICE = 4
    BADVERSION = 6


class Reach(enum.Enum):
    """Whether a device that is listed answers. A phone can be listed and still out of reach: asleep
    on Wi-Fi, a Network entry usbmuxd keeps after the phone left, a lockdownd that hangs."""

    OK = "ok"
    REFUSED = "refused"  # Connect to any of its ports is refused (usbmuxd Result 3, CONNREFUSED)
    SILENT = "silent"  # Connect succeeds, then nothing ever answers (the host must time out)


def swallow(sock: socket.socket, stop: threading.Event, gone: Callable[[], bool] = lambda: False) -> None:
    """A device that never answers: read and drop what the host sends until it closes the
    connection, ``stop`` is set or ``gone()`` says the device left."""
    sock.settimeout(0.1)
    while not stop.is_set() and not gone():
        try:
            if not sock.recv(4096):
                return
        except TimeoutError:
            continue
        except OSError:
            return


class PairRecords:
    """usbmuxd's record folder: ``<udid>.plist`` per paired device and ``SystemConfiguration.plist``
    holding the host's SystemBUID."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, udid: str) -> Path:
        if not udid or "/" in udid or udid.startswith("."):
            raise ValueError(f"not a UDID: {udid!r}")
        return self.folder / f"{udid}.plist"

    def buid(self) -> str:
        """The host's SystemBUID, made on first use and kept (as real usbmuxd keeps it)."""
        path = self.folder / "SystemConfiguration.plist"
        with self._lock:
            if path.exists():
                return plistlib.loads(path.read_bytes())["SystemBUID"]
            buid = str(uuid.uuid4()).upper()
            path.write_bytes(plistlib.dumps({"SystemBUID": buid}))
            return buid

    def read(self, udid: str) -> bytes | None:
        try:
            return self._path(udid).read_bytes()
        except FileNotFoundError:
            return None

    def load(self, udid: str) -> dict[str, Any] | None:
        data = self.read(udid)
        return None if data is None else plistlib.loads(data)

    def save(self, udid: str, data: bytes) -> None:
        plistlib.loads(data)  # refuse what is not a plist before it replaces a good record
        path = self._path(udid)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o600)  # it holds the host's private key
        tmp.replace(path)

    def delete(self, udid: str) -> bool:
        try:
            self._path(udid).unlink()
            return True
        except FileNotFoundError:
            return False


@dataclass
class Attachment:
    """One simulated device plugged in: its usbmuxd id, lockdownd and running services."""

    device_id: int
    device: SimDevice
    connection_type: str
    lockdownd: SimLockdownd
    runtime: DeviceRuntime
    #: Held while a service connection is handed to the runtime, and while the device is unplugged: the
    #: host does not wait for the device to pick its connection up, so a hand-off can still be under way
    #: when a test detaches the device or closes the mux.
    handoff: threading.Lock = field(default_factory=threading.Lock, repr=False)
    gone: bool = False
    #: Whether the device answers once connected to (:class:`Reach`); tests may change it at any time.
    reach: Reach = Reach.OK

    def unplug(self, timeout: float = 5.0) -> None:
        """End the device's lockdownd and service connections and wait for their threads."""
        with self.handoff:
            self.gone = True
        self.lockdownd.shutdown_connections()
        self.runtime.shutdown(timeout)

    @property
    def udid(self) -> str:
        return self.device.udid

    @property
    def log(self) -> DeviceLog:
        return self.runtime.log

    def enter_passcode(self) -> None:
        """The user types the passcode the device asks for (see :class:`~.model.PasscodePrompt`)."""
        self.runtime.enter_passcode()

    def accept_trust(self) -> None:
        """The user taps "Trust" in the "Trust this computer?" dialog (TrustStore.confirm)."""
        self.lockdownd.trust_store.accept()

    def deny_trust(self) -> None:
        """The user taps "Don't Trust"."""
        self.lockdownd.trust_store.deny()

    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = {
            "ConnectionType": self.connection_type,
            "DeviceID": self.device_id,
            "SerialNumber": self.udid,
        }
        if self.connection_type == "USB":
            props.update(
                ConnectionSpeed=_USB_SPEED,
                LocationID=self.device_id << 16,
                ProductID=_USB_PRODUCT_ID,
                USBSerialNumber=self.udid.replace("-", ""),
            )
        # A "Network" device's NetworkAddress/EscapedFullServiceName are left out: nothing here reads them.
        return props

    def attached_event(self) -> dict[str, Any]:
        return {"MessageType": "Attached", "DeviceID": self.device_id, "Properties": self.properties()}


class _Listener:
    """A connection that sent Listen: it gets events (tag 0) from whichever thread attaches/detaches."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self.alive = True

    def send(self, event: dict[str, Any]) -> None:
        with self._lock:
            if not self.alive:
                return
            try:
                _send_packet(self.sock, 0, event)
            except OSError:  # gone, or stopped reading (send timeout): a half-sent event spoils the stream
                self.alive = False
                _shutdown(self.sock)


class SimUsbmuxd:
    """A usbmuxd for simulated devices. Context manager (starts on enter, stops on exit)."""

    def __init__(
        self, folder: Path | str, devices: Iterable[SimDevice] = (), *, tcp: bool = False, connection_type: str = "USB"
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records = PairRecords(self.folder / RECORDS_DIR)
        #: Crashes of usbmuxd/lockdownd threads, as tracebacks (service crashes go to each device's log).
        self.errors: list[str] = []
        self._tcp = tcp
        self._lock = threading.RLock()
        self._attached: dict[int, Attachment] = {}
        self._trust: dict[str, TrustStore] = {}  # udid -> the phone's trusted hosts (shared by its paths, kept)
        self._wifi: dict[str, Any] = {}  # udid -> SimWifi: phones on the LAN (Wi-Fi direct, no usbmuxd)
        self._listeners: list[_Listener] = []
        self._clients: set[socket.socket] = set()  # connections still speaking usbmuxd
        self._threads: list[threading.Thread] = []
        self._next_id = 1
        self._servers: list[socket.socket] = []
        self._closing = threading.Event()
        self._tmpdir: str | None = None
        self._socket_path: Path | None = None
        self._tcp_port: int | None = None
        for device in devices:
            self.attach(device, connection_type)

    # ---- addresses ------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The value for ``USBMUXD_SOCKET_ADDRESS``: the UNIX socket's path. pymobiledevice3 takes a value
        with ``:`` for ``host:port`` (IPv4) and anything else for a UNIX path (no ``UNIX:`` prefix), so
        the path never contains ``:``."""
        if self._socket_path is None:
            raise RuntimeError("SimUsbmuxd is not started")
        return str(self._socket_path)

    @property
    def tcp_address(self) -> str:
        """``127.0.0.1:<port>``, the other form ``USBMUXD_SOCKET_ADDRESS`` takes (``tcp=True`` only)."""
        if self._tcp_port is None:
            raise RuntimeError("SimUsbmuxd listens on TCP only when made with tcp=True (and started)")
        return f"127.0.0.1:{self._tcp_port}"

    def env(self, home: Path | str | None = None, *, tcp: bool = False) -> dict[str, str]:
        """Environment entries that point a subprocess at this usbmuxd (and, with ``home``, keep
        pymobiledevice3's home folder out of the real user's)."""
        # Wi-Fi direct: the phones on the simulated LAN instead of a Bonjour browse (always set, so a
        # test never sends multicast even when it asks ibsync for Wi-Fi devices)
        out = {
            ENV_VAR: self.tcp_address if tcp else self.address,
            WIFI_ENV_VAR: ",".join(w.env_entry() for w in self.wifi),
        }
        if home is not None:
            home = Path(home)
            (home / ".local" / "share").mkdir(parents=True, exist_ok=True)
            out.update(HOME=str(home), XDG_DATA_HOME=str(home / ".local" / "share"))
        return out

    # ---- devices --------------------------------------------------------------------------------------------

    def trust_store(self, udid: str) -> TrustStore:
        """The phone's trusted hosts and trust dialog, shared by every path it is reached by (USB,
        Network, Wi-Fi direct) and kept across re-plugs. Set ``.confirm`` to make pairing wait for
        the test's ``accept()``."""
        with self._lock:
            return self._trust.setdefault(udid, TrustStore())

    def _lockdownd(self, device: SimDevice) -> SimLockdownd:
        lockdownd = SimLockdownd(device, self.trust_store(device.udid))
        record = self.records.load(device.udid)
        if record is not None and "HostID" in record and "HostCertificate" in record:
            lockdownd.trust(record)  # the host whose record the folder holds
        return lockdownd

    def attach(self, device: SimDevice, connection_type: str = "USB", *, reach: Reach = Reach.OK) -> Attachment:
        """Plug a device in (listeners get ``Attached``). It trusts the hosts it trusted before, and the
        host whose record the folder holds for it. The same phone may be attached once per
        connection type (USB and Network at once: two usbmuxd entries, one phone); each entry has
        its own connections and log, the trust is the phone's."""
        with self._lock:
            if any(a.udid == device.udid and a.connection_type == connection_type for a in self._attached.values()):
                raise ValueError(f"{device.udid} is already attached over {connection_type}")
            attachment = Attachment(
                self._next_id, device, connection_type, self._lockdownd(device), DeviceRuntime(device), reach=reach
            )
            self._next_id += 1
            self._attached[attachment.device_id] = attachment
            self._broadcast(attachment.attached_event())
        return attachment

    def detach(self, udid: str, connection_type: str | None = None) -> Attachment:
        """Unplug a device (``connection_type``: only that entry; default: every entry of the phone):
        listeners get ``Detached``, its lockdownd and service connections end. Returns the
        (first) attachment unplugged."""
        with self._lock:
            gone = [
                a for a in self._attached.values() if a.udid == udid and connection_type in (None, a.connection_type)
            ]
            if not gone:
                raise KeyError(f"no attached device {udid}" + (f" over {connection_type}" if connection_type else ""))
            for a in gone:
                del self._attached[a.device_id]
                self._broadcast({"MessageType": "Detached", "DeviceID": a.device_id})
        for a in gone:
            a.unplug()
        return gone[0]

    def attachment(self, udid: str, connection_type: str | None = None) -> Attachment:
        """The device's usbmuxd entry (``connection_type``: that one; default: the first attached)."""
        with self._lock:
            for a in self._attached.values():
                if a.udid == udid and connection_type in (None, a.connection_type):
                    return a
        raise KeyError(f"no attached device {udid}")

    # ---- Wi-Fi direct ---------------------------------------------------------------------------------------

    def join_wifi(self, device: SimDevice, *, reach: Reach = Reach.OK):
        """Put the phone on the simulated LAN: its lockdownd on a TCP port of 127.0.0.1 (a
        :class:`~.wifi.SimWifi`), trusting what the phone trusts over USB. :meth:`env` then lists it
        in ``IBSYNC_WIFI_DEVICES``. Independent of usbmuxd: the phone may be attached as well, or not."""
        from .wifi import SimWifi

        with self._lock:
            if device.udid in self._wifi:
                raise ValueError(f"{device.udid} is already on Wi-Fi")
            wifi = SimWifi(device, self._lockdownd(device), reach=reach).start()
            self._wifi[device.udid] = wifi
        return wifi

    def leave_wifi(self, udid: str):
        """The phone leaves the LAN (out of range): its Wi-Fi connections end."""
        with self._lock:
            wifi = self._wifi.pop(udid)
        wifi.close()
        return wifi

    @property
    def wifi(self) -> list:
        with self._lock:
            return list(self._wifi.values())

    @property
    def attachments(self) -> list[Attachment]:
        with self._lock:
            return list(self._attached.values())

    def pair(self, udid: str, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """Pair the host with an attached device without the Pair dialogue: the device trusts the record
        and the folder holds it (so ReadPairRecord finds it). ``record`` (from
        :func:`~.lockdownd.make_pair_record`, e.g. cached per test session) saves making one."""
        attachment = self.attachment(udid)
        if record is None:
            record = make_pair_record(attachment.device, system_buid=self.records.buid())
        self.records.save(udid, plistlib.dumps(record))
        attachment.lockdownd.trust(record)  # the phone's trust store: every path to it trusts the record
        return record

    def all_errors(self) -> list[str]:
        """usbmuxd/lockdownd crashes plus every attached device's service crashes: expect none."""
        return (
            self.errors
            + [e for a in self.attachments for e in a.log.errors]
            + [e for w in self.wifi for e in w.all_errors()]
        )

    # ---- running --------------------------------------------------------------------------------------------

    def start(self) -> Self:
        path = self.folder / SOCKET_NAME
        if len(os.fsencode(path)) > _MAX_UNIX_PATH or ":" in str(path):
            # A long pytest folder overflows sockaddr_un, and pymobiledevice3 would read a ":" as host:port.
            self._tmpdir = tempfile.mkdtemp(prefix="simmux-")
            path = Path(self._tmpdir) / SOCKET_NAME
        path.unlink(missing_ok=True)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(str(path))
        unix.listen(64)
        self._servers.append(unix)
        self._socket_path = path
        if self._tcp:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(("127.0.0.1", 0))  # loopback only, by design
            tcp.listen(64)
            self._servers.append(tcp)
            self._tcp_port = tcp.getsockname()[1]
        self._spawn(self._accept_loop, "simusbmuxd-accept")
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, end every connection and device thread, and wait for them."""
        with self._lock:  # with the accept loop's check under the same lock, no connection slips through
            if self._closing.is_set():
                return
            self._closing.set()
            clients, attachments = list(self._clients), list(self._attached.values())
            wifi, self._wifi = list(self._wifi.values()), {}
        for sock in clients:
            _shutdown(sock)
        stuck: list[str] = []
        for w in wifi:
            self.errors += w.all_errors()  # kept for all_errors() after the phone left the LAN
            try:
                w.close(timeout)
            except RuntimeError as e:
                stuck.append(str(e))
        for a in attachments:
            try:
                a.unplug(timeout)
            except RuntimeError as e:
                stuck.append(str(e))
        for thread in list(self._threads):
            thread.join(timeout)
        stuck += [t.name for t in self._threads if t.is_alive()]
        for server in self._servers:
            server.close()
        if self._socket_path is not None:
            self._socket_path.unlink(missing_ok=True)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        if stuck:
            raise RuntimeError(f"simulated usbmuxd threads still running: {', '.join(stuck)}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        # A blocked accept() is not woken by close() on Linux: poll with a short timeout instead.
        with selectors.DefaultSelector() as selector:
            for server in self._servers:
                selector.register(server, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _ in selector.select(0.05):
                    try:
                        conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    except OSError:
                        continue
                    if conn.family == socket.AF_INET:
                        # Without it every small reply waits for a delayed ACK: ~115 ms per lockdown session.
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.setblocking(True)
                    with self._lock:
                        if self._closing.is_set():
                            conn.close()
                            continue
                        self._clients.add(conn)
                    self._spawn(self._serve_client, "simusbmuxd-client", conn)

    # ---- one connection -------------------------------------------------------------------------------------

    def _serve_client(self, conn: socket.socket) -> None:
        handed_off = False
        try:
            while not handed_off:
                version, message, tag, body = _recv_packet(conn)
                if version != _VERSION_PLIST or message != _MESSAGE_PLIST:
                    # The old binary protocol (version 0) is not simulated; pymobiledevice3 probes with a
                    # plist ReadBUID and picks plist when the reply's version is 1.
                    conn.sendall(_binary_result(tag, Result.BADVERSION))
                    continue
                request = plistlib.loads(body)
                if not isinstance(request, dict):
                    _send_packet(conn, tag, _result(Result.BADCOMMAND))
                    continue
                kind = request.get("MessageType")
                if kind == "Listen":
                    self._listen(conn, tag)
                    return
                if kind == "Connect":
                    handed_off = self._connect(conn, tag, request)
                    continue
                _send_packet(conn, tag, self._answer(kind, request))
        except (ConnectionError, OSError, plistlib.InvalidFileException):
            pass  # the host went away, or close() ended the connection
        except Exception:  # noqa: BLE001 - a crash of the simulator itself: recorded for the test to fail on
            self.errors.append(f"usbmuxd: {traceback.format_exc()}")
        finally:
            with self._lock:
                self._clients.discard(conn)
            if not handed_off:
                conn.close()

    def _answer(self, kind: str | None, req: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._answer_request(kind, req)
        except ValueError:  # a record ID that is no file name, record data that is no plist
            return _result(Result.BADCOMMAND)

    def _answer_request(self, kind: str | None, req: dict[str, Any]) -> dict[str, Any]:
        match kind:
            case "ReadBUID":
                return {"BUID": self.records.buid()}
            case "ListDevices":
                return {"DeviceList": [a.attached_event() for a in self.attachments]}
            case "ReadPairRecord":
                data = self.records.read(str(req.get("PairRecordID", "")))
                return _result(Result.BADDEV) if data is None else {"PairRecordData": data}
            case "SavePairRecord":
                udid, data = str(req.get("PairRecordID", "")), req.get("PairRecordData")
                if not isinstance(data, bytes):
                    return _result(Result.BADCOMMAND)
                self.records.save(udid, data)
                with self._lock:
                    ids = [a.device_id for a in self._attached.values() if a.udid == udid]
                    for device_id in ids:
                        self._broadcast({"MessageType": "Paired", "DeviceID": device_id})
                return _result(Result.OK)
            case "DeletePairRecord":
                self.records.delete(str(req.get("PairRecordID", "")))
                return _result(Result.OK)
            case _:
                return _result(Result.BADCOMMAND)

    def _listen(self, conn: socket.socket, tag: int) -> None:
        listener = _Listener(conn)
        _send_packet(conn, tag, _result(Result.OK))
        # Events are sent with self._lock held: a host that stops reading must not block attach()/detach().
        conn.settimeout(_LISTENER_SEND_TIMEOUT)
        with self._lock:
            # Real usbmuxd replays the devices already present right after the Result; under the lock so
            # no attach/detach slips between the replay and the registration.
            for a in self._attached.values():
                listener.send(a.attached_event())
            self._listeners.append(listener)
        try:
            while not self._closing.is_set():  # a listening host sends nothing more; EOF: it stopped listening
                try:
                    if not conn.recv(4096):
                        break
                except TimeoutError:
                    continue
        finally:
            with self._lock:
                self._listeners.remove(listener)

    def _broadcast(self, event: dict[str, Any]) -> None:
        with self._lock:
            for listener in self._listeners:
                listener.send(event)
            self._listeners = [listener for listener in self._listeners if listener.alive]

    def _connect(self, conn: socket.socket, tag: int, req: dict[str, Any]) -> bool:
        """Connect: after Result 0 the same socket is a raw pipe to the device port. True when the device
        took the socket over."""
        # The host sends PortNumber in network byte order inside the plist integer (htons(62078) = 32498).
        port = socket.ntohs(int(req.get("PortNumber", 0)) & 0xFFFF)
        with self._lock:
            attachment = self._attached.get(int(req.get("DeviceID", -1)))
        if attachment is None:
            _send_packet(conn, tag, _result(Result.BADDEV))
            return False
        if attachment.reach is Reach.REFUSED:
            _send_packet(conn, tag, _result(Result.CONNREFUSED))
            return False
        if attachment.reach is Reach.SILENT:
            _send_packet(conn, tag, _result(Result.OK))
            swallow(conn, self._closing, lambda: attachment.gone)
            return False
        if port == LOCKDOWN_PORT:
            _send_packet(conn, tag, _result(Result.OK))
            # In this thread, until the host closes it. The socket stays in _clients too, so close() reaches
            # it until lockdownd has taken it over.
            attachment.lockdownd.serve(conn)
            return True
        grant = attachment.lockdownd.claim_port(port)
        if grant is None:
            _send_packet(conn, tag, _result(Result.CONNREFUSED))
            return False
        _send_packet(conn, tag, _result(Result.OK))
        sock: socket.socket = conn
        if grant.context is not None:
            # EnableServiceSSL: TLS from the first byte, the device as server, the same pinned host.
            conn.settimeout(HANDSHAKE_TIMEOUT)
            try:
                sock = grant.context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()  # the host failed the handshake; closing it is all a device does
                return True
            sock.settimeout(None)
        with attachment.handoff:
            if attachment.gone:
                sock.close()
            else:
                start_service(grant.name, sock, attachment.runtime)  # the device's runtime owns it now
        return True


@contextlib.contextmanager
def run_sim_usbmuxd(
    devices: Iterable[SimDevice],
    folder: Path | str,
    *,
    paired: bool = True,
    tcp: bool = False,
    pair_records: Mapping[str, dict[str, Any]] | None = None,
) -> Iterator[SimUsbmuxd]:
    """A running :class:`SimUsbmuxd` for ``devices`` in ``folder``, for tests that drive a CLI in a
    subprocess (pass ``env={**os.environ, **mux.env(home=...)}``).

    ``paired`` pairs each device first (the CLI finds the record through ReadPairRecord; no Pair request,
    nothing written to pymobiledevice3's home folder); ``pair_records`` (udid -> record) reuses records
    made earlier instead of making new ones. On exit, a crash in any device-side thread fails."""
    mux = SimUsbmuxd(folder, devices, tcp=tcp)
    with mux:
        if paired:
            for a in mux.attachments:
                mux.pair(a.udid, (pair_records or {}).get(a.udid))
        yield mux
        errors = mux.all_errors()
    if errors:
        raise RuntimeError("the simulated device side crashed:\n" + "\n".join(errors))


# ---- framing ----------------------------------------------------------------------------------------------------


def _result(number: Result) -> dict[str, Any]:
    return {"MessageType": "Result", "Number": int(number)}


def _recv_packet(sock: socket.socket) -> tuple[int, int, int, bytes]:
    # Unbuffered on purpose: after Connect the same socket carries the device's bytes, so nothing past this
    # packet may be read ahead.
    length, version, message, tag = _HEADER.unpack(recv_exact(sock, _HEADER.size))
    if length < _HEADER.size:
        raise ConnectionResetError(f"malformed usbmuxd packet (length {length})")
    return version, message, tag, recv_exact(sock, length - _HEADER.size)


def _send_packet(sock: socket.socket, tag: int, value: dict[str, Any]) -> None:
    """A plist packet; a reply carries its request's tag, an event tag 0."""
    body = plistlib.dumps(value, fmt=plistlib.FMT_XML)
    sock.sendall(_HEADER.pack(_HEADER.size + len(body), _VERSION_PLIST, _MESSAGE_PLIST, tag) + body)


def _binary_result(tag: int, number: Result) -> bytes:
    return _HEADER.pack(_HEADER.size + 4, _VERSION_BINARY, _MESSAGE_RESULT, tag) + struct.pack("<I", number)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
