"""Serving the app: the listening socket bound before anything is printed (so the printed URL
has the real port, and a port in use is one line), the rules for non-loopback addresses
(a password, and TLS with a self-signed certificate when none is given), and a uvicorn
server that leaves signals to its host (``ibsync ui`` or the agent's loop)."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..agent.settings import UiSettings
from ..errors import UserError
from .auth import Auth, is_loopback

CERT_FILE, KEY_FILE = "ui-certificate.pem", "ui-key.pem"


class CannotListen(UserError):
    """The address or port cannot be bound (in use, not this machine's): the agent then runs
    without its web app rather than without backups."""


@dataclass
class Listener:
    sock: socket.socket
    auth: Auth
    certfile: str | None
    keyfile: str | None

    @property
    def login_url(self) -> str:
        return self.auth.login_url()


def listen(
    ui: UiSettings,
    *,
    address: str | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
    where: str = "[agent]",
) -> Listener:
    """Bind the app's socket by the settings (``address``/``port`` override them). Refused
    with a one-line UserError: a non-loopback address without ``ui-password``, a port in use."""
    from ..config import expand_secrets

    address = address or ui.address
    port = ui.port if port is None else port
    password = expand_secrets({"p": ui.password}, f"{where} ui-password")["p"] if ui.password else None
    loopback = is_loopback(address)
    if not loopback and not password:
        raise UserError(
            f"refusing to serve the web app on {address}, which other computers can reach, without a "
            f"password: set ui-password in the [agent] table of the config file (or use 127.0.0.1)"
        )
    certfile, keyfile = _expand(ui.certificate), _expand(ui.key)
    if certfile is None and not loopback:
        from ..userdirs import user_dir

        certfile, keyfile = self_signed_certificate(state_dir or user_dir("state"), address)
    for path, key in ((certfile, "ui-certificate"), (keyfile, "ui-key")):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{where} {key}: {path} does not exist")
    sock = _bind(address, port)
    auth = Auth(address=address, port=sock.getsockname()[1], tls=certfile is not None, password=password)
    return Listener(sock, auth, certfile, keyfile)


def _expand(path: str | None) -> str | None:
    return None if path is None else os.path.expanduser(path)


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.strip("[]"), port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise CannotListen(
            f"cannot serve the web app on {address}:{port}: {e.strerror or e}"
            + (" (another ibsync ui or agent? use --port or ui-port)" if e.errno == 98 else "")
        ) from None
    sock.set_inheritable(True)
    return sock


def make_server(app, listener: Listener, *, log_level: str = "warning"):
    """A uvicorn server for ``app`` on the listener's socket; ``await server.serve([sock])``.
    It installs no signal handlers: whoever runs it stops it (``server.should_exit = True``)."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the host's loop owns SIGINT/SIGTERM (the agent stops cleanly on them)
            yield

    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        ssl_certfile=listener.certfile,
        ssl_keyfile=listener.keyfile,
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    return _Server(config)


def self_signed_certificate(folder: Path, address: str) -> tuple[str, str]:
    """A certificate for this machine in the state folder, made once (kept while it is valid
    for the address), so a browser that accepted it once is not asked again each start."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    names = _names(address)
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
                str(v) for v in san.get_values_for_type(x509.IPAddress)
            }
            if cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=7) and names <= have:
                return str(cert_path), str(key_path)
        except (ValueError, x509.ExtensionNotFound):
            pass  # unreadable or another kind: made again
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ibsync on {socket.gethostname()}")])
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = []
    for name in sorted(names):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def _names(address: str) -> set[str]:
    host = socket.gethostname()
    names = {"localhost", "127.0.0.1", host}
    if "." not in host:
        names.add(f"{host}.local")
    bare = address.strip("[]")
    if bare not in ("0.0.0.0", "::", ""):
        names.add(bare)
    return names


def open_browser(url: str) -> bool:
    """Open the login link in the user's browser, if there is a screen to show it on."""
    import sys
    import webbrowser

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False
