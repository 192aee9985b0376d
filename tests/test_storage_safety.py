"""The storage layer is never led outside the repository, never hangs on what it finds there,
and writes durably (issue 11: defects 2, 7 and 12, durability).

Real symlinks, FIFOs and servers throughout: a symlinked kind or fan-out folder is refused
(nothing outside the root is listed, read, written or deleted), a FIFO in place of an object
errs at once, junk is never listed but reported by ``strays``, leftovers of killed writes are
removed by age, an unreachable server is retried then reported in one line, SFTP uploads are
fsynced on the server.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

from ibsync.errors import StorageError
from ibsync.storage import Kind, LocalStorage, open_storage
from ibsync.storage.remote import FsspecStorage
from ibsync.testing.generator import generate

from conftest import copy_folder, one_line_error, run_subprocess
from servers_fixture import server_fixture

sshd_server = server_fixture("sshd")
samba_server = server_fixture("samba")
seaweedfs_server = server_fixture("seaweedfs")
wsgidav_server = server_fixture("wsgidav")


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """Staging files of other ibsync processes on this machine (killed ones included) stay out
    of the counts of remove_stale_temporary."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


KIND_FOLDERS = [Kind.LOCKS, Kind.INDEX, Kind.SNAPSHOTS, Kind.KEYS, Kind.PACKS]
HEX = "ab" + "cd" * 31  # a valid object name (and pack fan-out folder 'ab')
OLD = time.time() - 7200


def local(root: Path, mode: str) -> LocalStorage:
    """``fd``: folders opened relative to descriptors (POSIX); ``paths``: the lstat-per-component
    fallback used where ``dir_fd`` is missing (Windows), exercised here on the same real links."""
    return LocalStorage(root) if mode == "fd" else LocalStorage(root, dir_fd=False)


MODES = ["fd", "paths"]


def user_files(folder: Path) -> dict[str, bytes]:
    """A folder of a user's files, some of them named as ibsync objects would be."""
    folder.mkdir(parents=True)
    files = {"notes.txt": b"my notes", HEX: b"a file that happens to have a hex name", "ab": b"x"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "sub").mkdir()
    (folder / "sub" / HEX).write_bytes(b"nested")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def finishes(fn, seconds: float = 5.0):
    """Run ``fn`` in a thread; its result or exception, or AssertionError if it blocks."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} blocked for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def unblock_fifo(path: Path) -> None:
    """Release a reader an unfixed storage left blocked in open() on this FIFO."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


# --- defect 2: symlinks below the root -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KIND_FOLDERS, ids=lambda k: k.value)
def test_symlinked_kind_folder_is_never_followed(tmp_path, kind, mode):
    root = tmp_path / "repo"
    s = local(root, mode)
    s.put(Kind.CONFIG, "config", b"{}")
    mine = tmp_path / "Documents"
    before = user_files(mine)
    if kind is Kind.PACKS:  # a pack-shaped file where a pack of the linked folder would be
        (mine / "ab").unlink()
        (mine / "ab").mkdir()
        (mine / "ab" / HEX).write_bytes(b"looks like a pack")
        before = contents(mine)
    (root / kind.value).symlink_to(mine, target_is_directory=True)

    with pytest.raises(StorageError, match="symbolic link") as listed:
        list(s.list(kind))
    assert kind.value in str(listed.value)
    with pytest.raises(StorageError):
        s.delete(kind, HEX)
    with pytest.raises(StorageError):
        s.get(kind, HEX)
    with pytest.raises(StorageError):
        s.put(kind, "ef" * 32, b"new")
    with pytest.raises(StorageError):
        s.stage(kind).commit("ef" * 32)
    assert s.remove_stale_temporary(0) == 0
    assert s.strays(kind) == [kind.value]
    assert contents(mine) == before, "a file outside the repository was changed"


@pytest.mark.parametrize("mode", MODES)
def test_fan_out_folder_linked_into_another_repository(tmp_path, mode):
    other = LocalStorage(tmp_path / "other")
    other.put(Kind.PACKS, HEX, b"the other repository's pack")
    s = local(tmp_path / "repo", mode)
    s.put(Kind.PACKS, "cd" + "00" * 31, b"ours")
    (tmp_path / "repo" / "packs" / "ab").symlink_to(tmp_path / "other" / "packs" / "ab")

    with pytest.raises(StorageError, match="packs/ab is a symbolic link"):
        list(s.list(Kind.PACKS))
    with pytest.raises(StorageError):
        s.delete(Kind.PACKS, HEX)
    with pytest.raises(StorageError):
        s.get(Kind.PACKS, HEX)
    assert s.strays(Kind.PACKS) == ["packs/ab"]
    assert other.get(Kind.PACKS, HEX) == b"the other repository's pack"


@pytest.mark.parametrize("mode", MODES)
def test_symlinked_object_is_neither_read_listed_nor_deleted(tmp_path, mode):
    s = local(tmp_path / "repo", mode)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"host file")
    s.put(Kind.SNAPSHOTS, "11" * 32, b"real")
    (tmp_path / "repo" / "snapshots" / HEX).symlink_to(secret)
    (tmp_path / "repo" / "config").symlink_to(secret)

    assert [i.name for i in s.list(Kind.SNAPSHOTS)] == ["11" * 32]
    for kind, name in ((Kind.SNAPSHOTS, HEX), (Kind.CONFIG, "config")):
        with pytest.raises(StorageError, match="not a regular file|symbolic link"):
            s.get(kind, name)
        with pytest.raises(StorageError):
            s.stat(kind, name)
    with pytest.raises(StorageError):
        s.delete(Kind.SNAPSHOTS, HEX)
    assert not s.exists()
    assert s.strays(Kind.SNAPSHOTS) == [f"snapshots/{HEX}"]
    assert s.strays(Kind.CONFIG) == ["config"]
    assert secret.read_bytes() == b"host file"


@pytest.mark.parametrize("mode", MODES)
def test_symlinked_root_chosen_by_the_user_is_followed(tmp_path, mode):
    # /Volumes/Backup is itself often a link the user chose; only what is below it is refused
    (tmp_path / "disk").mkdir()
    (tmp_path / "Volumes").symlink_to(tmp_path / "disk")
    s = local(tmp_path / "Volumes" / "repo", mode)
    s.put(Kind.INDEX, HEX, b"index")
    assert [i.name for i in s.list(Kind.INDEX)] == [HEX]
    assert (tmp_path / "disk" / "repo" / "index" / HEX).read_bytes() == b"index"


@pytest.mark.parametrize("mode", MODES)
def test_object_names_cannot_leave_their_folder(tmp_path, mode):
    s = local(tmp_path / "repo", mode)
    for name in ("../config", "..", "/etc/passwd", "ab/../../x", "AB" * 32, ""):
        with pytest.raises(StorageError, match="not an object name"):
            s.put(Kind.SNAPSHOTS, name, b"x")
        with pytest.raises(StorageError, match="not an object name"):
            s.get(Kind.SNAPSHOTS, name)
        with pytest.raises(StorageError, match="not an object name"):
            s.delete(Kind.SNAPSHOTS, name)
    assert not (tmp_path / "config").exists() and not (tmp_path / "x").exists()


# The commands the error messages suggest, on a repository whose folders an attacker replaced.


@pytest.fixture
def imported(env, cli, tmp_path):
    cli("init")
    cli("import", generate(tmp_path / "live", seed=5, size_bytes=1 << 20))
    return env


def test_unlock_remove_all_spares_files_behind_a_symlinked_locks_folder(imported, cli, tmp_path):
    mine = tmp_path / "Documents"
    before = user_files(mine)
    (imported / "locks").rmdir()
    (imported / "locks").symlink_to(mine)
    _, err = cli("unlock", "--remove-all", expect=1)
    one_line_error(err, "locks", "symbolic link")
    assert contents(mine) == before


def test_repair_index_spares_files_behind_a_symlinked_index_folder(imported, cli, tmp_path):
    mine = tmp_path / "Documents"
    before = user_files(mine)
    for p in (imported / "index").iterdir():
        (mine / p.name).write_bytes(p.read_bytes())  # the real index, so the repository still opens
    before = contents(mine)
    for p in (imported / "index").iterdir():
        p.unlink()
    (imported / "index").rmdir()
    (imported / "index").symlink_to(mine)
    _, err = cli("repair", "index", expect=1)
    one_line_error(err, "index", "symbolic link")
    assert contents(mine) == before


def test_prune_spares_another_repositorys_packs_behind_a_symlinked_fan_out_folder(imported, cli, tmp_path):
    # The other repository is the user's copy of this one (same key, so its packs authenticate
    # here) that has moved on since: its new packs look like unindexed leftovers to prune.
    other = tmp_path / "other"
    copy_folder(imported, other)
    fresh = generate(tmp_path / "fresh", seed=3, size_bytes=1 << 20)
    cli("import", fresh, "--repo", other)
    ours = {p.name for p in (imported / "packs").iterdir()}
    linked = [p for p in (other / "packs").iterdir() if p.name not in ours]
    assert linked, "the copy's new packs all landed in fan-out folders this repository has"
    for folder in linked:
        (imported / "packs" / folder.name).symlink_to(folder)
    before = contents(other / "packs")
    _, err = cli("prune", expect=1)
    one_line_error(err, "packs/", "symbolic link")
    assert contents(other / "packs") == before


def test_descriptors_stay_few(tmp_path):
    # macOS allows 256 open files by default: folders are opened per operation, the root once
    fds = Path("/proc/self/fd")
    before = len(list(fds.iterdir()))
    s = LocalStorage(tmp_path / "repo")
    names = [f"{d:02x}" + os.urandom(31).hex() for d in range(256)]
    for name in names:
        s.put(Kind.PACKS, name, b"p")
    staged = [s.stage(Kind.PACKS) for _ in range(3)]
    for st, name in zip(staged, ("aa" * 32, "bb" * 32, "cc" * 32)):
        st.commit(name)
    assert len(list(s.list(Kind.PACKS))) == 259 and s.strays(Kind.PACKS) == []
    assert all(s.get(Kind.PACKS, n) == b"p" for n in names)
    s.remove_stale_temporary(0)
    assert len(list(fds.iterdir())) - before <= 1
    s.close()
    assert len(list(fds.iterdir())) == before


# --- defect 7: FIFOs, sockets and devices in place of objects --------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", [Kind.CONFIG, *KIND_FOLDERS], ids=lambda k: k.value)
def test_fifo_in_place_of_an_object_errs_at_once(tmp_path, kind, mode):
    s = local(tmp_path / "repo", mode)
    name = "config" if kind is Kind.CONFIG else HEX
    s.put(kind, name, b"real")
    path = (
        tmp_path
        / "repo"
        / (name if kind is Kind.CONFIG else f"{kind.value}/{'ab/' if kind is Kind.PACKS else ''}{name}")
    )
    path.unlink()
    os.mkfifo(path)
    try:
        with pytest.raises(StorageError, match="not a regular file"):
            finishes(lambda: s.get(kind, name))
        with pytest.raises(StorageError, match="not a regular file"):
            finishes(lambda: s.stat(kind, name))
        if kind is not Kind.CONFIG:
            assert finishes(lambda: list(s.list(kind))) == []
            with pytest.raises(StorageError, match="not a regular file"):
                s.delete(kind, name)
        else:
            assert not s.exists()
        rel = path.relative_to(tmp_path / "repo").as_posix()
        assert s.strays(kind) == [rel]
        assert path.exists()
    finally:
        unblock_fifo(path)


@pytest.mark.parametrize("mode", MODES)
def test_socket_and_device_are_not_objects(tmp_path, mode):
    s = local(tmp_path / "repo", mode)
    s.put(Kind.KEYS, "11" * 32, b"key")
    sock = socket.socket(socket.AF_UNIX)
    short = tempfile.mkdtemp(dir="/tmp")  # a socket's path has at most 108 bytes
    sock.bind(f"{short}/s")
    os.rename(f"{short}/s", tmp_path / "repo" / "keys" / HEX)
    os.rmdir(short)
    try:
        assert [i.name for i in s.list(Kind.KEYS)] == ["11" * 32]
        with pytest.raises(StorageError, match="not a regular file"):
            finishes(lambda: s.get(Kind.KEYS, HEX))
        (tmp_path / "repo" / "keys" / ("22" * 32)).symlink_to("/dev/zero")
        with pytest.raises(StorageError):
            finishes(lambda: s.get(Kind.KEYS, "22" * 32))
        assert s.strays(Kind.KEYS) == sorted([f"keys/{'22' * 32}", f"keys/{HEX}"])
    finally:
        sock.close()


def test_fifo_config_ends_commands_in_one_line(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    os.mkfifo(repo / "config")
    env = {**os.environ, "IBSYNC_REPO": str(repo), "IBSYNC_PASSWORD": "pw", "IBSYNC_CACHE_DIR": str(tmp_path / "c")}
    try:
        done = run_subprocess(["snapshots"], env, timeout=60)
    finally:
        unblock_fifo(repo / "config")
    assert done.returncode == 1, done.stderr
    one_line_error(done.stderr, "config", "not a regular file")


# --- defect 12: junk names are not objects, and are reported ---------------------------------


def plant_junk(put) -> list[str]:
    """Junk beside real objects through ``put(relpath, data)``; returns the strays expected."""
    put(f"packs/ab/{HEX}", b"a real pack")
    put(f"snapshots/{'11' * 32}", b"a real snapshot")
    junk = [
        "packs/ab/not-hex",  # a non-hex name in a pack folder
        f"packs/cd/{HEX}",  # a pack in the wrong fan-out folder
        f"packs/ab/{HEX.upper()}",  # hex, but not as ibsync writes it
        f"packs/{'ef' * 32}",  # a pack outside any fan-out folder
        f"packs/zz/{'00' * 32}",  # a fan-out folder that cannot be one
        f"snapshots/{'11' * 31}",  # too short
        "snapshots/notes.txt",
        f"snapshots/sub/{'22' * 32}",  # a folder where objects should be
    ]
    for rel in junk:
        put(rel, b"junk")
    put(f"snapshots/.tmp-{'0' * 16}", b"a write in progress: neither object nor stray")
    return junk


def expected_strays(junk: list[str], kind: Kind) -> list[str]:
    out = set()
    for rel in junk:
        if not rel.startswith(kind.value + "/"):
            continue
        parts = rel.split("/")
        # a folder that holds no objects is reported as itself, not by its contents
        if kind is Kind.PACKS and len(parts) == 3 and parts[1] == "zz":
            rel = "packs/zz"
        if kind is not Kind.PACKS and len(parts) == 3:
            rel = "/".join(parts[:2])
        out.add(rel)
    return sorted(out)


def assert_junk_handled(s, junk: list[str]) -> None:
    assert [i.name for i in s.list(Kind.PACKS)] == [HEX]
    assert [i.name for i in s.list(Kind.SNAPSHOTS)] == ["11" * 32]
    for kind in (Kind.PACKS, Kind.SNAPSHOTS):
        assert s.strays(kind) == expected_strays(junk, kind), kind
    assert s.strays(Kind.LOCKS) == []


@pytest.mark.parametrize("mode", MODES)
def test_local_junk_is_not_listed_but_reported(tmp_path, mode):
    root = tmp_path / "repo"

    def put(rel: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    junk = plant_junk(put)
    assert_junk_handled(local(root, mode), junk)


def test_memory_junk_is_not_listed_but_reported(tmp_path):
    s = FsspecStorage(f"memory://junk-{tmp_path.name}")
    junk = plant_junk(lambda rel, data: s.fs.pipe_file(f"{s.root}/{rel}", data))
    assert_junk_handled(s, junk)


REMOTE = ["sshd", "samba", "seaweedfs", "wsgidav"]


def plant_on_server(server, s, rel: str, data: bytes) -> None:
    """Junk as another program on the server would leave it: in the folder SFTP, SMB or WebDAV
    serves, or (S3) as an object."""
    if server.kind == "seaweedfs":
        s.fs.pipe_file(f"{s.root}/{rel}", data)
        return
    if server.kind == "sshd":
        path = Path(s.root) / rel  # served as is
    elif server.kind == "samba":
        path = server.workdir / "smb-share" / s.root.strip("/").split("/", 1)[1] / rel  # /backup/<name>
    else:
        path = server.workdir / "webdav-root" / s.root.strip("/") / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("kind", REMOTE)
def test_remote_junk_is_not_listed_but_reported(request, kind):
    server = request.getfixturevalue(f"{kind}_server")
    s = open_storage(server.new_url("junk"), server.options)
    s.put(Kind.CONFIG, "config", b"{}")
    junk = plant_junk(lambda rel, data: plant_on_server(server, s, rel, data))
    assert_junk_handled(s, junk)


def test_sftp_symlinked_folders_are_not_listed_through(sshd_server, tmp_path):
    # an SFTP server follows links itself; its listing shows them as links, so ibsync can refuse
    s = open_storage(sshd_server.new_url("links"), sshd_server.options)
    s.put(Kind.PACKS, "cd" + "00" * 31, b"ours")
    s.put(Kind.CONFIG, "config", b"{}")
    root = Path(s.root)
    mine = tmp_path / "Documents"
    before = user_files(mine)
    (root / "locks").symlink_to(mine)
    (root / "packs" / "ab").symlink_to(mine)
    for kind, where in ((Kind.LOCKS, "locks"), (Kind.PACKS, "packs/ab")):
        with pytest.raises(StorageError, match=f"{where} is a symbolic link"):
            list(s.list(kind))
        assert s.strays(kind) == [where]
    assert s.remove_stale_temporary(0) == 0
    assert contents(mine) == before


# --- leftovers of killed writes ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_local_stale_temporary_objects_are_removed_by_age(tmp_path, mode):
    root = tmp_path / "repo"
    s = local(root, mode)
    s.put(Kind.PACKS, HEX, b"pack")
    s.put(Kind.CONFIG, "config", b"{}")
    old = [
        root / "packs" / "ab" / ".tmp-old1",
        root / "packs" / ".tmp-old2",
        root / "snapshots" / ".tmp-old3",
        root / ".tmp-old4",
    ]
    new = [root / "packs" / "ab" / ".tmp-new1", root / "index" / ".tmp-new2"]
    for p in old + new:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half")
    for p in old:
        os.utime(p, (OLD, OLD))
    victim = tmp_path / "victim"
    victim.write_bytes(b"not ours")
    link = root / "locks" / ".tmp-link"
    link.parent.mkdir()
    link.symlink_to(victim)
    os.utime(link, (OLD, OLD), follow_symlinks=False)

    assert s.remove_stale_temporary(3600) == len(old)
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in new)
    assert link.is_symlink() and victim.read_bytes() == b"not ours"
    assert s.get(Kind.PACKS, HEX) == b"pack"
    assert s.remove_stale_temporary(3600) == 0


@pytest.mark.parametrize("kind", ["sshd", "samba", "wsgidav"])
def test_remote_stale_temporary_objects_are_removed_by_age(request, kind):
    server = request.getfixturevalue(f"{kind}_server")
    s = open_storage(server.new_url("stale"), server.options)
    s.put(Kind.PACKS, HEX, b"pack")
    plant_on_server(server, s, "packs/ab/.tmp-0123456789abcdef", b"half a pack")
    plant_on_server(server, s, "snapshots/.tmp-fedcba9876543210", b"half a snapshot")
    assert s.remove_stale_temporary(3600) == 0
    time.sleep(1.1)  # servers keep whole seconds
    assert s.remove_stale_temporary(0.5) == 2
    assert s.strays(Kind.PACKS) == [] and [i.name for i in s.list(Kind.PACKS)] == [HEX]
    assert s.remove_stale_temporary(0) == 0


def test_staged_files_of_dead_processes_are_removed(tmp_path, private_tempdir):
    s = FsspecStorage(f"memory://staged-{tmp_path.name}")
    staged = s.stage(Kind.PACKS)
    staged.write(b"in progress")
    ours = Path(staged.file.name)
    assert ours.name.startswith(f"ibsync-stage-{os.getpid()}-")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    gone = tmp_path / "tmp" / f"ibsync-stage-{dead_pid}-abc"
    gone.write_bytes(b"left by a kill")
    fresh_gone = tmp_path / "tmp" / f"ibsync-stage-{dead_pid}-fresh"
    fresh_gone.write_bytes(b"maybe another container's")
    other = tmp_path / "tmp" / "ibsync-stage-not-a-pid"
    other.write_bytes(b"not ours to judge")
    for p in (ours, gone, other):
        os.utime(p, (OLD, OLD))

    assert s.remove_stale_temporary(3600) == 1
    assert not gone.exists()
    assert ours.exists() and fresh_gone.exists() and other.exists()
    staged.commit(HEX)
    assert s.get(Kind.PACKS, HEX) == b"in progress"


# --- an unreachable server: retried, then one line --------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("scheme", ["sftp", "smb"])
def test_unreachable_server_at_connect_is_retried_then_one_line(scheme, monkeypatch):
    monkeypatch.setenv("IBSYNC_RETRY_SECONDS", "2")
    url = f"{scheme}://someone@127.0.0.1:{closed_port()}/backup/repo"
    options = {"password": "x"} if scheme == "smb" else {"known_hosts": None}
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        open_storage(url, options)
    assert time.monotonic() - started >= 1.5, "gave up without retrying"
    message = str(raised.value)
    assert "\n" not in message and "still failing after" in message and "127.0.0.1" in message


@pytest.mark.parametrize("wrong", ["client key", "host key"])
def test_refused_login_is_not_retried(sshd_server, tmp_path, monkeypatch, wrong):
    # asyncssh reports a refused key or an unknown host as a disconnect, the same class as a
    # dropped connection: retrying it for minutes would only delay the answer
    import asyncssh

    monkeypatch.setenv("IBSYNC_RETRY_SECONDS", "60")
    stranger = tmp_path / "stranger_ed25519"
    stranger.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    other_hosts = tmp_path / "known_hosts"
    other_hosts.write_text(
        f"[127.0.0.1]:{sshd_server.port} {asyncssh.generate_private_key('ssh-ed25519').export_public_key().decode()}"
    )
    options = dict(sshd_server.options)
    options["client_keys" if wrong == "client key" else "known_hosts"] = (
        [str(stranger)] if wrong == "client key" else str(other_hosts)
    )
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        open_storage(sshd_server.new_url("refused"), options)
    assert time.monotonic() - started < 20, "a refused login was retried"
    assert "\n" not in str(raised.value) and "still failing" not in str(raised.value)


def test_unreachable_sftp_server_from_the_cli(tmp_path):
    env = {
        **os.environ,
        "IBSYNC_REPO": f"sftp://someone@127.0.0.1:{closed_port()}/repo",
        "IBSYNC_PASSWORD": "pw",
        "IBSYNC_CACHE_DIR": str(tmp_path / "c"),
        "IBSYNC_RETRY_SECONDS": "1",
    }
    done = run_subprocess(["snapshots"], env, timeout=120)
    assert done.returncode == 6, done.stderr  # storage unreachable
    # the retry policy's one warning when it starts waiting, then the one-line error
    warning, error = done.stderr.strip().splitlines()
    assert warning.startswith("ibsync: ") and "retrying for up to 1 s" in warning
    one_line_error(error, "127.0.0.1", "still failing after")


# --- durability -------------------------------------------------------------------------------


def test_full_fsync_where_the_platform_has_it(tmp_path):
    from ibsync.storage.folders import choose_fsync

    assert choose_fsync(None) is os.fsync
    assert choose_fsync(types.SimpleNamespace()) is os.fsync  # Linux's fcntl: no F_FULLFSYNC
    calls: list[tuple[int, int]] = []

    def fcntl(fd: int, op: int, arg: int = 0) -> int:
        calls.append((fd, op))
        if len(calls) > 1:
            raise OSError(errno.ENOTSUP, "not supported on this filesystem")
        return 0

    darwin = types.SimpleNamespace(F_FULLFSYNC=51, fcntl=fcntl)
    sync = choose_fsync(darwin)
    with open(tmp_path / "f", "wb") as f:
        fd = f.fileno()
        sync(fd)
        sync(fd)  # an SMB mount refuses F_FULLFSYNC: fsync instead, as Go does
    assert calls == [(fd, 51)] * 2


def test_local_storage_uses_the_platforms_full_sync():
    import fcntl

    from ibsync.storage import folders

    if hasattr(fcntl, "F_FULLFSYNC"):
        assert folders.sync_file is not os.fsync
    else:
        assert folders.sync_file is os.fsync


def test_sftp_upload_is_fsynced_before_the_rename(sshd_server, caplog):
    import asyncssh

    asyncssh.set_debug_level(1)
    caplog.set_level(logging.DEBUG, logger="asyncssh")
    s = open_storage(sshd_server.new_url("fsync"), sshd_server.options)
    caplog.clear()
    s.put(Kind.SNAPSHOTS, HEX, b"durable")
    staged = s.stage(Kind.PACKS)
    staged.write(b"a pack")
    staged.commit(HEX)
    messages = [r.getMessage() for r in caplog.records]
    fsyncs = [i for i, m in enumerate(messages) if "Sending fsync" in m]
    renames = [i for i, m in enumerate(messages) if "rename request from" in m]
    assert len(fsyncs) == 2 and len(renames) == 2, messages
    assert fsyncs[0] < renames[0] < fsyncs[1] < renames[1], "each object is fsynced before its rename"
    assert s.get(Kind.PACKS, HEX) == b"a pack"


def test_an_object_deleted_while_its_folder_is_listed_is_skipped(tmp_path, monkeypatch):
    """Another process deletes a lock between readdir and stat: the listing goes on without it
    (four imports at once met this as 'cannot list locks: No such file or directory')."""
    from ibsync.storage import folders
    from ibsync.storage.base import Kind as K

    storage = LocalStorage(tmp_path / "repo")
    names = [f"{i:064x}" for i in range(3)]
    for n in names:
        storage.put(K.LOCKS, n, b"x")
    real = folders._entry

    def racing(e):
        if e.name == names[1]:
            # by its full path: e.path is only the name when the folder was listed by descriptor
            os.unlink(
                tmp_path / "repo" / "locks" / e.name
            )  # gone just before its stat, as when another process deletes it
        return real(e)

    monkeypatch.setattr(folders, "_entry", racing)
    assert sorted(i.name for i in storage.list(K.LOCKS)) == [names[0], names[2]]
