"""The device side of lockdownd (port 62078) for a simulated device reached through :mod:`.usbmuxd`.

One :class:`SimLockdownd` per simulated device: what lockdownd remembers (the hosts it trusts, its values,
the service ports it has handed out) and :meth:`SimLockdownd.serve`, which answers one host connection:
``QueryType``, ``GetValue``/``SetValue``/``RemoveValue``, ``Pair``/``ValidatePair``/``Unpair``,
``StartSession`` (TLS in place on the same socket), ``StartService`` and ``StopSession``.

Messages are plists framed by a big-endian u32 length; every reply echoes ``Request`` (pymobiledevice3
raises LockdownError otherwise) and failures carry ``Error: <name>``, which pymobiledevice3 maps to its
exceptions (``InvalidHostID`` -> "not paired", ``MissingValue``, ``InvalidService``, ...).

The exchanges follow pymobiledevice3 11.45.0's host code (lockdown.py) and the prototype notes in
``/work/shared/reference/usbmuxd-lockdownd.md``. Where the host code does not show what a real lockdownd
does (which values are public before a session, which services skip TLS, the port range, error names for
requests pymobiledevice3 never makes), the choice is marked *inferred*.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import plistlib
import socket
import ssl
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from packaging.version import Version
from pymobiledevice3.ca import generate_pairing_cert_chain
from pymobiledevice3.pair_records import generate_host_id

from .model import SimDevice
from .services import offers, service_name

log = logging.getLogger(__name__)

LOCKDOWN_PORT = 62078
LOCKDOWN_TYPE = "com.apple.mobile.lockdown"
BATTERY_DOMAIN = "com.apple.mobile.battery"
#: Ports StartService hands out (inferred: real devices answer with ephemeral ports like 49xxx-6xxxx).
FIRST_SERVICE_PORT = 49152
#: Services a host reaches without TLS even in a session (inferred: the "insecure" proxy exists for hosts
#: that are not paired); lockdownd answers every other service with EnableServiceSSL.
PLAIN_SERVICES = frozenset({"com.apple.mobile.insecure_notification_proxy"})
#: Keys of the default domain answered without a session (inferred from ``ideviceinfo -s`` on real
#: devices). pymobiledevice3 needs ProductVersion (else it assumes 1.0: ValidatePair and TLSv1 only),
#: UniqueDeviceID, DeviceClass, DevicePublicKey and WiFiAddress (pairing puts it into the record; a missing
#: one makes plistlib fail on None) before it pairs.
PUBLIC_KEYS = frozenset(
    {
        "BuildVersion",
        "DeviceClass",
        "DeviceName",
        "DevicePublicKey",
        "HardwareModel",
        "ProductName",
        "ProductType",
        "ProductVersion",
        "ProtocolVersion",
        "UniqueChipID",
        "UniqueDeviceID",
        "WiFiAddress",
    }
)
HANDSHAKE_TIMEOUT = 10.0
_U32 = struct.Struct(">I")


class LockdownError(Exception):
    """A request lockdownd refuses: the reply carries ``Error: <name>``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


# ---- keys and pair records --------------------------------------------------------------------------------------


@functools.cache
def device_key(udid: str) -> rsa.RSAPrivateKey:
    """The device's identity key (DevicePublicKey is its public half). One per UDID and process: RSA-2048
    generation costs 40-60 ms, and a device keeps its key across plug-ins anyway."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def device_public_key_pem(udid: str) -> bytes:
    """DevicePublicKey as lockdownd gives it: PKCS#1 ``RSA PUBLIC KEY`` PEM (what pymobiledevice3's
    ``generate_pairing_cert_chain`` loads)."""
    return device_key(udid).public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)


def wifi_address(udid: str) -> str:
    """A stable, locally administered MAC address for the device's Wi-Fi."""
    b = bytearray(hashlib.sha1(f"simdevice-wifi:{udid}".encode()).digest()[:6])
    b[0] = (b[0] | 0x02) & 0xFE
    return ":".join(f"{x:02x}" for x in b)


def escrow_bag(udid: str, host_id: str) -> bytes:
    """The escrow bag the device hands a host it pairs with. Real ones are keybag blobs the host only
    forwards (mobilebackup2's StartService sends it back); this one is opaque bytes, stable per host."""
    return b"SIMESCROW" + hashlib.sha256(f"simdevice-escrow:{udid}:{host_id}".encode()).digest()


def make_pair_record(device: SimDevice, *, system_buid: str, host_id: str | None = None) -> dict[str, Any]:
    """A host's pair record for ``device``, as pymobiledevice3 saves it after pairing (HostPrivateKey and
    EscrowBag included). Costs two RSA keys and three certificates (60-140 ms): cache it per test session.

    ``host_id`` defaults to pymobiledevice3's own (uuid3 of the host name), as a real pairing would use."""
    host_cert, host_key, device_cert, root_cert, root_key = generate_pairing_cert_chain(
        device_public_key_pem(device.udid)
    )
    host_id = host_id or generate_host_id()
    return {
        "DeviceCertificate": device_cert,
        "HostCertificate": host_cert,
        "HostID": host_id,
        "RootCertificate": root_cert,
        "RootPrivateKey": root_key,
        "WiFiMACAddress": wifi_address(device.udid),
        "SystemBUID": system_buid,
        "HostPrivateKey": host_key,
        "EscrowBag": escrow_bag(device.udid, host_id),
    }


@dataclass
class PairedHost:
    """A host the device trusts: what its Pair request (or an existing pair record) carried."""

    host_id: str
    host_certificate: bytes
    device_certificate: bytes | None
    escrow_bag: bytes
    _context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_record(cls, udid: str, record: dict[str, Any]) -> PairedHost:
        return cls(
            record["HostID"],
            record["HostCertificate"],
            record.get("DeviceCertificate"),
            record.get("EscrowBag") or escrow_bag(udid, record["HostID"]),
        )

    def server_context(self, device: SimDevice) -> ssl.SSLContext:
        """The device's TLS side for this host (session and services): the device's key, a client
        certificate required and pinned to HostCertificate. Built once (it needs temporary PEM files)."""
        if self._context is None:
            self._context = _server_context(device, self.host_certificate, self.device_certificate)
        return self._context


def _self_signed(key: rsa.RSAPrivateKey) -> bytes:
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _server_context(device: SimDevice, host_certificate: bytes, device_certificate: bytes | None) -> ssl.SSLContext:
    key = device_key(device.udid)
    # Real lockdownd presents the record's DeviceCertificate. A record made in another process holds a
    # certificate for another key (the simulated key lives per process), and pymobiledevice3 never checks
    # the device's certificate (CERT_NONE), so such a record gets a self-signed one instead.
    cert = device_certificate
    if cert is None or x509.load_pem_x509_certificate(cert).public_key() != key.public_key():
        cert = _self_signed(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if Version(device.product_version) < Version("5.0"):
        # pymobiledevice3 offers SSLv3..TLSv1 to iOS < 5; OpenSSL 3 needs SECLEVEL 0 for them.
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("ALL:!aNULL:!eNULL:@SECLEVEL=0")
    # The pair record's certificates all have empty subject and issuer DNs, so OpenSSL takes HostCertificate
    # for self-signed and will not chain it to RootCertificate: pin HostCertificate itself. That still proves
    # the host holds HostPrivateKey; a host with another record fails the handshake.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=host_certificate.decode())
    pem = (
        cert
        + b"\n"
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    fd, path = tempfile.mkstemp(prefix="simlockdownd-", suffix=".pem")  # load_cert_chain reads files only
    try:
        os.write(fd, pem)
        os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    return ctx


class TrustStore:
    """The hosts one phone trusts, and its "Trust this computer?" dialog. One per phone, shared by
    every lockdownd it answers on (USB, Network, Wi-Fi direct): a pairing made over one of them
    holds on the others, as on a real phone, and survives re-plugs.

    With ``confirm`` set, a Pair request shows the dialog instead of trusting at once: lockdownd
    answers ``PairingDialogResponsePending`` (pymobiledevice3 asks again every second) until a
    test calls :meth:`accept` (the next Pair succeeds) or :meth:`deny` (``UserDeniedPairing``)."""

    def __init__(self, confirm: bool = False) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, PairedHost] = {}
        self.confirm = confirm
        self._answer: bool | None = None
        #: Set while the dialog is up (a Pair was asked for and not answered yet)
        self.dialog_shown = threading.Event()

    def add(self, host: PairedHost) -> None:
        with self._lock:
            self._hosts[host.host_id] = host

    def get(self, host_id: str) -> PairedHost | None:
        with self._lock:
            return self._hosts.get(host_id)

    def pop(self, host_id: str) -> PairedHost | None:
        with self._lock:
            return self._hosts.pop(host_id, None)

    def hosts(self) -> dict[str, PairedHost]:
        with self._lock:
            return dict(self._hosts)

    def accept(self) -> None:
        """The user taps "Trust"."""
        with self._lock:
            self._answer = True

    def deny(self) -> None:
        """The user taps "Don't Trust"."""
        with self._lock:
            self._answer = False

    def answer_pair(self) -> bool | None:
        """What the dialog says for a Pair request now: True (trust), False (denied), None (pending).
        An answer is used once: the next Pair asks again."""
        if not self.confirm:
            return True
        with self._lock:
            answer, self._answer = self._answer, None
        if answer is None:
            self.dialog_shown.set()
        else:
            self.dialog_shown.clear()
        return answer


# ---- values -----------------------------------------------------------------------------------------------------


class LockdownValues:
    """What GetValue reads and SetValue/RemoveValue change: the default domain (the SimDevice's
    :meth:`~.model.SimDevice.lockdown_values` plus what pairing needs) and named domains."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self._domains: dict[str | None, dict[str, Any]] = {
            None: {
                **device.lockdown_values(),
                "DevicePublicKey": device_public_key_pem(device.udid),
                "WiFiAddress": wifi_address(device.udid),
                "ProtocolVersion": "2",
            },
            "com.apple.mobile.iTunes": {"MinITunesVersion": "10.0.1"},
        }

    def domain(self, name: str | None) -> dict[str, Any]:
        values = dict(self._domains.get(name or None, {}))
        if name == "com.apple.mobile.backup":
            values.setdefault("WillEncrypt", self.device.encrypted)  # follows the device unless set
        if name == BATTERY_DOMAIN and self.device.battery is not None:
            values.update(self.device.battery.domain())  # read at each request: tests change it live
        return values

    def get(self, domain: str | None, key: str | None, *, in_session: bool) -> Any:
        if not in_session:
            # Before a session only public values of the default domain are readable (inferred names:
            # real lockdownd answers GetProhibited for others as far as is known).
            if domain:
                raise LockdownError("GetProhibited")
            if key is None:
                return {k: v for k, v in self.domain(None).items() if k in PUBLIC_KEYS}
            if key not in PUBLIC_KEYS:
                raise LockdownError("GetProhibited")
        values = self.domain(domain)
        if key is None:
            return values
        if key not in values:
            raise LockdownError("MissingValue")
        return values[key]

    def set(self, domain: str | None, key: str | None, value: Any) -> None:
        target = self._domains.setdefault(domain or None, {})
        if key is None:
            if not isinstance(value, dict):
                raise LockdownError("InvalidRequest")
            target.update(value)
        else:
            target[key] = value

    def remove(self, domain: str | None, key: str | None) -> None:
        target = self._domains.setdefault(domain or None, {})
        if key is None:
            target.clear()
        else:
            target.pop(key, None)


# ---- lockdownd --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceGrant:
    """A service port StartService handed out: the next Connect to it gets the service, over TLS when
    ``context`` is set."""

    name: str
    context: ssl.SSLContext | None


@dataclass
class _Session:
    """One host connection's state."""

    sock: socket.socket
    host: PairedHost | None = None  # set by StartSession
    session_id: str | None = None
    #: How StartService opens a service port on this connection's transport (None: a port usbmuxd's
    #: Connect claims, see claim_port); over TCP, a listening socket of its own.
    open_service: Callable[[ServiceGrant], int] | None = None


class SimLockdownd:
    """lockdownd of one simulated device. Thread-safe: every host connection is served in a thread of its
    own (pymobiledevice3 opens a new lockdownd connection when one breaks, and the CLI may open several)."""

    def __init__(self, device: SimDevice, trust: TrustStore | None = None) -> None:
        self.device = device
        self.values = LockdownValues(device)
        self._lock = threading.Lock()
        self.trust_store = trust if trust is not None else TrustStore()  # HostID -> host, and the dialog
        self._ports: dict[int, ServiceGrant] = {}
        self._next_port = FIRST_SERVICE_PORT
        self._live: set[socket.socket] = set()
        self._closed = False  # set by shutdown_connections: the device is gone
        #: Requests answered, in order, as "Request" or "Request:Error" (for tests).
        self.requests: list[str] = []
        #: Services StartService granted, in order: (name, over TLS).
        self.granted: list[tuple[str, bool]] = []

    # ---- trust ------------------------------------------------------------------------------------------------

    def trust(self, record: dict[str, Any]) -> PairedHost:
        """Remember a host as paired (what accepting the trust dialog does), from its pair record."""
        host = PairedHost.from_record(self.device.udid, record)
        self.trust_store.add(host)
        return host

    def adopt_trust(self, other: SimLockdownd) -> None:
        """Trust every host ``other`` trusts (the same device plugged in again)."""
        for host in other.trust_store.hosts().values():
            self.trust_store.add(host)

    def forget(self, host_id: str) -> bool:
        return self.trust_store.pop(host_id) is not None

    def trusted_hosts(self) -> list[str]:
        return sorted(self.trust_store.hosts())

    # ---- service ports ----------------------------------------------------------------------------------------

    def claim_port(self, port: int) -> ServiceGrant | None:
        """The service a Connect to ``port`` reaches (each grant serves one connection: inferred, and all
        pymobiledevice3 needs), or None: nothing listens there."""
        with self._lock:
            return self._ports.pop(port, None)

    def _grant(self, name: str, context: ssl.SSLContext | None) -> int:
        with self._lock:
            port = self._next_port
            self._next_port = port + 1 if port < 65535 else FIRST_SERVICE_PORT
            self._ports[port] = ServiceGrant(name, context)
            return port

    # ---- connections ------------------------------------------------------------------------------------------

    def serve(self, sock: socket.socket, open_service: Callable[[ServiceGrant], int] | None = None) -> None:
        """Answer one host connection until the host closes it (blocking; closes the socket).
        ``open_service``: how StartService opens a port on this transport (default: one usbmuxd's
        Connect claims)."""
        state = _Session(sock, open_service=open_service)
        self._track(None, sock)
        try:
            while True:
                try:
                    request = _recv_plist(state.sock)
                except (ConnectionError, OSError, plistlib.InvalidFileException):
                    return
                if not isinstance(request, dict):
                    request = {}
                name = request.get("Request", "")
                try:
                    reply = self._answer(state, name, request)
                    self.requests.append(name)
                except LockdownError as e:
                    reply = {"Error": e.name}
                    self.requests.append(f"{name}:{e.name}")
                _send_plist(state.sock, {"Request": name, **reply})
                # After a StartSession reply the host starts TLS in place on the same socket, as the client;
                # everything after (GetValue, StartService, ...) is inside TLS.
                if name == "StartSession" and "Error" not in reply and not self._start_tls(state):
                    return
        finally:
            self._untrack(state.sock)
            try:
                state.sock.close()
            except OSError:
                pass

    def shutdown_connections(self) -> None:
        """End every lockdownd connection (the device was unplugged or the simulator stops); the threads
        serving them return."""
        with self._lock:
            self._closed = True
            live, self._ports = list(self._live), {}
        for s in live:
            _shutdown(s)

    def _track(self, old: socket.socket | None, new: socket.socket) -> None:
        with self._lock:
            if old is not None:
                self._live.discard(old)
            self._live.add(new)
            if self._closed:  # a connection that arrived as the device went away ends at once
                _shutdown(new)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.discard(sock)

    def _start_tls(self, state: _Session) -> bool:
        assert state.host is not None
        raw = state.sock
        raw.settimeout(HANDSHAKE_TIMEOUT)
        try:
            wrapped = state.host.server_context(self.device).wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            # A host whose record lockdownd does not know the certificate of: real devices end the
            # connection too; pymobiledevice3 then drops the record and (with autopair) pairs again.
            log.debug("lockdownd TLS handshake failed: %s", e)
            self._untrack(raw)
            raw.close()
            return False
        wrapped.settimeout(None)
        self._track(raw, wrapped)
        state.sock = wrapped
        return True

    # ---- requests ---------------------------------------------------------------------------------------------

    def _answer(self, state: _Session, name: str, req: dict[str, Any]) -> dict[str, Any]:
        in_session = state.session_id is not None
        domain, key = req.get("Domain") or None, req.get("Key") or None
        match name:
            case "QueryType":
                return {"Type": LOCKDOWN_TYPE}
            case "GetValue":
                out: dict[str, Any] = {"Value": self.values.get(domain, key, in_session=in_session)}
                return {**({"Domain": domain} if domain else {}), **({"Key": key} if key else {}), **out}
            case "SetValue" | "RemoveValue":
                if not in_session:  # inferred error names
                    raise LockdownError("SetProhibited" if name == "SetValue" else "RemoveProhibited")
                if name == "SetValue":
                    self.values.set(domain, key, req.get("Value"))
                else:
                    self.values.remove(domain, key)
                return {**({"Domain": domain} if domain else {}), **({"Key": key} if key else {})}
            case "Pair":
                return self._pair(req)
            case "ValidatePair":  # pymobiledevice3 sends it to iOS < 7 only
                record = req.get("PairRecord") or {}
                if self.trust_store.get(record.get("HostID", "")) is None:
                    raise LockdownError("InvalidHostID")
                return {}
            case "Unpair":
                host_id = (req.get("PairRecord") or {}).get("HostID")
                if not host_id or not self.forget(host_id):
                    raise LockdownError("InvalidHostID")
                return {}
            case "StartSession":
                host = self.trust_store.get(req.get("HostID", ""))
                if host is None:
                    raise LockdownError("InvalidHostID")  # pymobiledevice3: "not paired" (autopair pairs)
                if in_session:
                    raise LockdownError("SessionActive")
                state.host, state.session_id = host, str(uuid.uuid4()).upper()
                return {"SessionID": state.session_id, "EnableSessionSSL": True}
            case "StopSession":
                if not in_session or req.get("SessionID") != state.session_id:
                    raise LockdownError("InvalidSessionID")  # inferred name
                # libimobiledevice turns TLS off after this reply; pymobiledevice3 does not and keeps
                # talking TLS, so the connection stays in TLS here (inferred to be harmless for either).
                state.session_id = None
                return {"Result": "Success"}
            case "StartService":
                return self._start_service(state, req)
            case _:
                raise LockdownError("InvalidRequest")  # inferred name

    def _pair(self, req: dict[str, Any]) -> dict[str, Any]:
        record = req.get("PairRecord") or {}
        if not all(isinstance(record.get(k), (bytes, str)) for k in ("HostID", "HostCertificate")):
            raise LockdownError("InvalidPairRecord")
        # Without TrustStore.confirm the user accepts the trust dialog at once.
        answer = self.trust_store.answer_pair()
        if answer is None:
            raise LockdownError("PairingDialogResponsePending")
        if not answer:
            raise LockdownError("UserDeniedPairing")
        host = self.trust(record)
        return {"EscrowBag": host.escrow_bag}

    def _start_service(self, state: _Session, req: dict[str, Any]) -> dict[str, Any]:
        name = req.get("Service", "")
        plain = service_name(name) in PLAIN_SERVICES
        if state.session_id is None and not plain:
            # Inferred: only the insecure proxy works without a session. pymobiledevice3 answers
            # SessionInactive by reconnecting, validating its pairing and asking once more.
            raise LockdownError("SessionInactive")
        if not offers(name):
            raise LockdownError("InvalidService")
        # The escrow bag (mobilebackup2 sends it) lets services reach a locked device's data; the
        # simulated device is never locked, so it is accepted unchecked.
        context = None
        if not plain and state.host is not None:
            context = state.host.server_context(self.device)
        port = state.open_service(ServiceGrant(name, context)) if state.open_service else self._grant(name, context)
        self.granted.append((name, context is not None))
        return {"Service": name, "Port": port, **({"EnableServiceSSL": True} if context else {})}


# ---- framing ----------------------------------------------------------------------------------------------------
# Deliberately unbuffered: the socket turns into TLS mid-stream, so no byte past a request may be read ahead.


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("the host closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_plist(sock: socket.socket) -> Any:
    return plistlib.loads(recv_exact(sock, _U32.unpack(recv_exact(sock, 4))[0]))


def _send_plist(sock: socket.socket, value: Any) -> None:
    payload = plistlib.dumps(value, fmt=plistlib.FMT_XML)  # lockdownd answers in XML
    sock.sendall(_U32.pack(len(payload)) + payload)
