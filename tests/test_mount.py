"""ibsync mount: snapshots as a read-only FUSE file system and over WebDAV.

The mounts run ``ibsync mount`` as a child process, as a user would, read files through the
mountpoint (or over HTTP) and compare their bytes with the generated backup folders. CI has
/dev/fuse and fuse3: nothing here skips.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import types
from datetime import UTC
from pathlib import Path

import pytest

from ibsync.cli import main
from ibsync.mount.content import ContentFile, SpilledContent
from ibsync.mount.tree import MountTree, device_names, safe_name, snapshot_names
from ibsync.repo.repository import Repository
from ibsync.storage import LocalStorage
from ibsync.testing.generator import generate, mutate_folder

from conftest import ENCRYPTED_BACKUP, FAST_KDF, PASSWORD, one_line_error

ENCRYPTED_PASSWORD = "0000"  # pyiosbackup's fixture: MyTestDomain/Media/Test.txt is 'Test data'
ENCRYPTED_FILE = ("MyTestDomain", "Media/Test.txt", b"Test data", 1628082463)


# ---- a repository: two devices of one name (one with two snapshots), an encrypted backup ----


@pytest.fixture(scope="module")
def repo3(tmp_path_factory):
    base = tmp_path_factory.mktemp("mount")
    live = generate(base / "a", seed=31, size_bytes=3 << 20)  # "Test iPhone"
    day1 = shutil.copytree(live, base / "a-day1" / live.name)
    other = generate(base / "b", seed=32, size_bytes=1 << 20)  # also "Test iPhone", another UDID
    encrypted = shutil.copytree(ENCRYPTED_BACKUP, base / "enc" / ENCRYPTED_BACKUP.name)
    repo = base / "repo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IBSYNC_REPO", str(repo))
        mp.setenv("IBSYNC_PASSWORD", PASSWORD)
        mp.setenv("IBSYNC_CACHE_DIR", str(base / "cache"))
        mp.setattr("ibsync.format.crypto.DEFAULT_KDF", FAST_KDF)
        assert main(["init", "-q"]) == 0
        assert main(["import", str(live), "-q"]) == 0
        mutate_folder(live, seed=31)
        assert main(["import", str(live), "-q"]) == 0
        assert main(["import", str(other), "-q"]) == 0
        assert main(["import", str(encrypted), "-q", "--allow-unfinished"]) == 0
    snaps = Repository.open(LocalStorage(repo), lambda: PASSWORD).snapshots()
    pw = base / "ios-pw"
    pw.write_text(ENCRYPTED_PASSWORD + "\n")
    return types.SimpleNamespace(
        repo=repo, base=base, day1=day1, day2=live, other=other, encrypted=encrypted, snaps=snaps, pw=pw
    )


def _snaps(r):
    """Device A's two snapshots, device B's, the encrypted backup's."""

    def of(folder):
        return [s for s in r.snaps if s.device.udid.upper() == folder.name.upper()]

    (a1, a2), (b,) = of(r.day2), of(r.other)
    return a1, a2, b, next(s for s in r.snaps if s.ios_encrypted)


def _env(r) -> dict:
    env = dict(os.environ)
    env.update(
        IBSYNC_REPO=str(r.repo),
        IBSYNC_PASSWORD=PASSWORD,
        IBSYNC_CACHE_DIR=str(r.base / "cache"),
        PYTHONFAULTHANDLER="1",
    )
    env.pop("IBSYNC_BACKUP_PASSWORD", None)
    env.pop("IBSYNC_PASSWORD_FILE", None)
    return env


def _date_folder(snap) -> str:
    return snap.backup_date.astimezone(UTC).strftime("%Y-%m-%dT%H%M")


def _files(folder: Path) -> dict[str, tuple[str, int, int, int]]:
    """Domain/relative path -> (fileID, size, mtime, mode) of every file row of a backup folder."""
    con = sqlite3.connect(f"file:{folder / 'Manifest.db'}?mode=ro", uri=True)
    from ibsync.reader.mbfile import decode_mbfile

    out = {}
    for fid, domain, rel, flags, blob in con.execute("SELECT fileID, domain, relativePath, flags, file FROM Files"):
        if flags == 1:
            size, mtime, mode, _ = decode_mbfile(blob)
            out[f"{domain}/{rel}"] = (fid, size, mtime, mode)
    con.close()
    return out


def _symlinks(folder: Path) -> dict[str, str]:
    from ibsync.reader.mbfile import mbfile_fields

    con = sqlite3.connect(f"file:{folder / 'Manifest.db'}?mode=ro", uri=True)
    try:
        return {
            f"{d}/{r}": mbfile_fields(blob, ("Target",))["Target"]
            for d, r, blob in con.execute("SELECT domain, relativePath, file FROM Files WHERE flags = 4")
        }
    finally:
        con.close()


def _domains(folder: Path) -> set[str]:
    con = sqlite3.connect(f"file:{folder / 'Manifest.db'}?mode=ro", uri=True)
    try:
        return {d for (d,) in con.execute("SELECT DISTINCT domain FROM Files")}
    finally:
        con.close()


def _payload(folder: Path, fid: str) -> bytes:
    return (folder / fid[:2] / fid).read_bytes()


class Mounted:
    """``ibsync mount ARGS`` in a child process, waited for; ``stop`` sends SIGTERM."""

    def __init__(self, args: list, env: dict, mountpoint: Path | None) -> None:
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ibsync", "mount", *map(str, args)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.first_line = ""
        deadline = time.monotonic() + 60
        if mountpoint is not None:
            while not os.path.ismount(mountpoint):
                self._alive_or_fail()
                assert time.monotonic() < deadline, "the mount did not appear within 60 s"
                time.sleep(0.05)
        self.first_line = self.proc.stdout.readline().strip()
        self._alive_or_fail()

    def _alive_or_fail(self) -> None:
        if self.proc.poll() is not None:
            out, err = self.proc.communicate()
            pytest.fail(f"ibsync mount exited {self.proc.returncode}\nstdout:\n{out}\nstderr:\n{err}")

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # the child's threads, for the report (PYTHONFAULTHANDLER)
            self.proc.send_signal(signal.SIGABRT)
            out, err = self.proc.communicate(timeout=30)
            pytest.fail(f"ibsync mount did not end within 30 s of signal {sig}\nstdout:\n{out}\nstderr:\n{err}")
        return self.proc.returncode, out, err

    def cleanup(self) -> None:
        """Whatever a failed test left: never a mount or a process behind."""
        if self.mountpoint is not None and os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def mounted():
    made: list[Mounted] = []

    def start(args, env, mountpoint=None) -> Mounted:
        m = Mounted(args, env, mountpoint)
        made.append(m)
        return m

    yield start
    for m in made:
        m.cleanup()


def _read_at(path: Path, pieces: list[tuple[int, int]]) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, n, off) for off, n in pieces]
    finally:
        os.close(fd)


# ---- FUSE ----------------------------------------------------------------------------------


def test_mount_all_snapshots(repo3, mounted, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = mounted([mp, "--backup-password-file", repo3.pw], _env(repo3), mp)
    assert f"at {mp}" in m.first_line and "read-only" in m.first_line

    # layout: devices (two "Test iPhone"s told apart by UDID), then backup dates and "latest"
    a1, a2, b, enc = _snaps(repo3)
    assert a1.device.udid == a2.device.udid != b.device.udid and a1.device.name == b.device.name == "Test iPhone"
    dev_a, dev_b = f"Test iPhone ({a1.device.udid})", f"Test iPhone ({b.device.udid})"
    dev_enc = enc.device.name or enc.device.udid
    assert sorted(os.listdir(mp)) == sorted([dev_a, dev_b, dev_enc])
    assert sorted(os.listdir(mp / dev_a)) == sorted([_date_folder(a1), _date_folder(a2), "latest"])
    assert os.readlink(mp / dev_a / "latest") == _date_folder(a2)
    assert (mp / dev_a / _date_folder(a2)).stat().st_mtime == a2.backup_date.timestamp()

    # every file of both days and of the other device: bytes, size, mtime, permission bits
    checked = 0
    for snap_dir, folder in (
        (mp / dev_a / _date_folder(a1), repo3.day1),
        (mp / dev_a / "latest", repo3.day2),
        (mp / dev_b / _date_folder(b), repo3.other),
    ):
        files = _files(folder)
        domains = {p.split("/", 1)[0] for p in files}
        assert domains <= set(os.listdir(snap_dir))
        for path, (fid, size, mtime, mode) in files.items():
            st = os.stat(snap_dir / path)
            assert (st.st_size, int(st.st_mtime), st.st_mode & 0o777) == (size, mtime, (mode & 0o777) | 0o400), path
            assert (snap_dir / path).read_bytes() == _payload(folder, fid), path
            checked += 1
    assert checked > 200
    # what changed between the days reads as each day had it
    d1, d2 = _files(repo3.day1), _files(repo3.day2)
    changed = [
        p
        for p in d1.keys() & d2.keys()
        if d1[p][0:2] != d2[p][0:2] or _payload(repo3.day1, d1[p][0]) != _payload(repo3.day2, d2[p][0])
    ]
    assert changed
    p = changed[0]
    assert (mp / dev_a / _date_folder(a1) / p).read_bytes() != (mp / dev_a / "latest" / p).read_bytes()

    # reads at any offset, backwards included, give the file's bytes
    big = max(d2.items(), key=lambda kv: kv[1][1])
    data = _payload(repo3.day2, big[1][0])
    assert len(data) > 100_000
    pieces = [(len(data) - 5000, 5000), (0, 4096), (len(data) // 2, 70_000), (10, 10), (len(data) + 10, 100)]
    assert _read_at(mp / dev_a / "latest" / big[0], pieces) == [data[o : o + n] for o, n in pieces]

    # the encrypted iOS backup, decrypted, with its recorded time
    domain, rel, plain, mtime = ENCRYPTED_FILE
    enc_file = mp / dev_enc / "latest" / domain / rel
    assert enc_file.read_bytes() == plain and int(enc_file.stat().st_mtime) == mtime

    # read-only: every kind of change is refused with EROFS
    target = mp / dev_a / "latest" / p
    attempts = [
        lambda: open(target, "r+b"),
        lambda: open(mp / dev_a / "latest" / "new-file", "wb"),
        lambda: os.mkdir(mp / "new-folder"),
        lambda: os.unlink(target),
        lambda: os.rename(target, target.with_name("renamed")),
        lambda: os.utime(target, (0, 0)),
        lambda: os.chmod(target, 0o777),
        lambda: os.symlink("x", mp / dev_a / "link"),
        lambda: os.truncate(target, 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, attempt
    assert (mp / dev_a / "latest" / p).read_bytes() == _payload(repo3.day2, d2[p][0])

    # the backup's symbolic links, with the targets the device recorded
    links = _symlinks(repo3.day2)
    assert links
    for path, target in links.items():
        assert os.readlink(mp / dev_a / "latest" / path) == target

    with pytest.raises(FileNotFoundError):
        os.stat(mp / dev_a / "latest" / "NoSuchDomain")
    with pytest.raises(FileNotFoundError):
        os.stat(mp / "no such device")

    code, out, err = m.stop(signal.SIGTERM)
    assert code == 0, err
    assert not os.path.ismount(mp) and os.listdir(mp) == []
    assert f"unmounted {mp}" in out and "Traceback" not in err


def test_mount_one_snapshot_and_ctrl_c(repo3, mounted, tmp_path):
    """One snapshot: its domains at the top. Ctrl-C (SIGINT) unmounts as SIGTERM does, even
    with a file still open and a shell inside the mount."""
    mp = tmp_path / "one"
    mp.mkdir()
    a1 = _snaps(repo3)[0]
    m = mounted([mp, a1.id[:10]], _env(repo3), mp)
    assert a1.short_id in m.first_line
    files = _files(repo3.day1)
    assert sorted(os.listdir(mp)) == sorted(_domains(repo3.day1))
    for path, (fid, _size, _mtime, _mode) in list(files.items())[:50]:
        assert (mp / path).read_bytes() == _payload(repo3.day1, fid)
    # a folder listed page by page gives every name once, in a stable order
    home = [p.split("/", 1)[1] for p in files if p.startswith("HomeDomain/")]
    walked = sorted(str(q.relative_to(mp / "HomeDomain")) for q in (mp / "HomeDomain").rglob("*") if q.is_file())
    assert walked == sorted(home)
    held = open(mp / next(iter(files)), "rb")
    shell = subprocess.Popen(["sleep", "60"], cwd=mp / "HomeDomain")
    try:
        code, out, err = m.stop(signal.SIGINT)
    finally:
        held.close()
        shell.kill()
        shell.wait()
    assert code == 0, err
    assert not os.path.ismount(mp)


def test_mount_all_without_the_ios_password(repo3, mounted, tmp_path):
    """Every snapshot without the iOS backup password: a warning, the encrypted backup's
    folders refuse to open (EACCES), everything else reads."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = mounted([mp], _env(repo3), mp)
    a1, a2, b, enc = _snaps(repo3)
    with pytest.raises(PermissionError):
        os.listdir(mp / (enc.device.name or enc.device.udid) / "latest")
    path, (fid, *_r) = next(iter(_files(repo3.other).items()))
    assert (mp / f"Test iPhone ({b.device.udid})" / "latest" / path).read_bytes() == _payload(repo3.other, fid)
    code, _out, err = m.stop()
    assert code == 0
    assert "warning: this is an encrypted iOS backup" in err and "--backup-password-file" in err
    assert "Traceback" not in err


def test_unmount_from_outside_ends_the_command(repo3, mounted, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = mounted([mp, _snaps(repo3)[0].id[:10]], _env(repo3), mp)
    subprocess.run(["fusermount3", "-u", str(mp)], check=True)
    out, err = m.proc.communicate(timeout=30)
    assert m.proc.returncode == 0, err
    assert f"unmounted {mp}" in out and not os.path.ismount(mp)


def test_mount_refuses_bad_mountpoints_and_input(repo3, cli, tmp_path, monkeypatch):
    env = _env(repo3)
    for k in ("IBSYNC_REPO", "IBSYNC_PASSWORD", "IBSYNC_CACHE_DIR"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("IBSYNC_BACKUP_PASSWORD", raising=False)
    _, err = cli("mount", tmp_path / "missing", expect=2)
    one_line_error(err, "does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    _, err = cli("mount", full, expect=2)
    one_line_error(err, "is not empty")
    (tmp_path / "file").write_text("x")
    _, err = cli("mount", tmp_path / "file", expect=2)
    one_line_error(err, "is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _, err = cli("mount", empty, "--port", "8000", expect=2)
    one_line_error(err, "--port goes with --webdav")
    _, err = cli("mount", expect=2)
    one_line_error(err, "MOUNTPOINT")
    _, err = cli("mount", "--webdav", empty, expect=2)
    one_line_error(err, "with --webdav there is no MOUNTPOINT")
    _, err = cli("mount", empty, "ffffffffff", expect=5)
    one_line_error(err, "no snapshot with id")
    # an encrypted iOS backup: the password is needed, and checked before anything is mounted
    enc = next(s for s in repo3.snaps if s.ios_encrypted)
    _, err = cli("mount", empty, enc.id[:12], expect=2)
    one_line_error(err, "--backup-password-file")
    wrong = tmp_path / "wrong"
    wrong.write_text("1234\n")
    _, err = cli("mount", empty, enc.id[:12], "--backup-password-file", wrong, expect=4)
    one_line_error(err, "wrong iOS backup password")
    assert not os.path.ismount(empty)
    # no /dev/fuse
    monkeypatch.setattr("ibsync.mount.fuse.FUSE_DEVICE", str(tmp_path / "no-dev-fuse"))
    _, err = cli("mount", empty, expect=2)
    one_line_error(err, "does not exist", "fuse")


def test_mount_without_libfuse_says_install_fuse3(repo3, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = _env(repo3)
    env["FUSE_LIBRARY_PATH"] = str(tmp_path / "libfuse-missing.so")
    r = subprocess.run(
        [sys.executable, "-m", "ibsync", "mount", str(mp)], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    one_line_error(r.stderr, "install fuse3")
    assert not os.path.ismount(mp)


def test_mount_leftover_mount_is_named(repo3, mounted, tmp_path):
    """A mount whose process was killed (SIGKILL: nothing could unmount) is named with the way
    out, not a traceback."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = mounted([mp, _snaps(repo3)[0].id[:10]], _env(repo3), mp)
    m.proc.kill()
    m.proc.wait()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "ibsync", "mount", str(mp)],
            env=_env(repo3),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2
        one_line_error(r.stderr, "fusermount3 -u")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
    assert not os.path.ismount(mp)


def test_damaged_data_is_an_io_error_naming_the_file(repo3, mounted, tmp_path):
    """A blob that does not authenticate fails the file using it (EIO, named on stderr); the
    other files still read and the mount still ends cleanly."""
    from ibsync.reader.walk import walk

    from conftest import open_repo

    repo_path = shutil.copytree(repo3.repo, tmp_path / "repo")
    repo = open_repo(repo_path)
    b = _snaps(repo3)[2]
    users: dict[bytes, list[str]] = {}
    for path, node in walk(repo, b.tree):
        for c in node.content:
            users.setdefault(c, []).append(path)
    files = _files(repo3.other)
    by_fid = {fid: p for p, (fid, *_r) in files.items()}
    blob_id, fid = next(
        (blob, paths[0].rsplit("/", 1)[-1])
        for blob, paths in users.items()
        if len(paths) == 1 and paths[0].rsplit("/", 1)[-1] in by_fid and repo.locate(blob).length > 1000
    )
    loc = repo.locate(blob_id)
    pack = repo_path / "packs" / loc.pack_id.hex()[:2] / loc.pack_id.hex()
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x40
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))

    env = _env(repo3)
    env.update(IBSYNC_REPO=str(repo_path), IBSYNC_CACHE_DIR=str(tmp_path / "cache"))
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = mounted([mp, b.id[:12]], env, mp)
    victim = by_fid[fid]
    with pytest.raises(OSError) as e:
        (mp / victim).read_bytes()
    assert e.value.errno == errno.EIO
    other, (other_fid, *_r) = next((p, v) for p, v in files.items() if v[0] != fid)
    assert (mp / other).read_bytes() == _payload(repo3.other, other_fid)
    code, _out, err = m.stop()
    assert code == 0
    assert f"cannot read {victim}" in err and "Traceback" not in err


# ---- WebDAV --------------------------------------------------------------------------------


def test_webdav(repo3, mounted):
    from webdav4.client import Client

    m = mounted(["--webdav", "--backup-password-file", repo3.pw], _env(repo3))
    url = m.first_line
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")
    a1, a2, b, enc = _snaps(repo3)
    dev_a, dev_b = f"Test iPhone ({a1.device.udid})", f"Test iPhone ({b.device.udid})"
    dev_enc = enc.device.name or enc.device.udid
    client = Client(url, retry=False)
    try:
        assert sorted(client.ls("/", detail=False)) == sorted([dev_a, dev_b, dev_enc])
        assert sorted(x.rsplit("/", 1)[-1] for x in client.ls(dev_a, detail=False)) == sorted(
            [_date_folder(a1), _date_folder(a2), "latest"]
        )
        assert sorted(x.rsplit("/", 1)[-1] for x in client.ls(f"{dev_a}/latest", detail=False)) == sorted(
            _domains(repo3.day2)
        )
        files = _files(repo3.day2)
        for path, (fid, size, mtime, _mode) in list(files.items())[:40]:
            for snap_dir in ("latest", _date_folder(a2)):
                remote = f"{dev_a}/{snap_dir}/{path}"
                info = client.info(remote)
                assert info["content_length"] == size
                assert int(info["modified"].timestamp()) == mtime
                with client.open(remote, "rb") as f:
                    assert f.read() == _payload(repo3.day2, fid), remote
        day1 = _files(repo3.day1)
        path, (fid, *_rest) = next(iter(day1.items()))
        with client.open(f"{dev_a}/{_date_folder(a1)}/{path}", "rb") as f:
            assert f.read() == _payload(repo3.day1, fid)
        domain, rel, plain, _ = ENCRYPTED_FILE
        with client.open(f"{dev_enc}/latest/{domain}/{rel}", "rb") as f:
            assert f.read() == plain

        # ranges, and read-only
        http = client.http
        big, (fid, size, *_r) = max(files.items(), key=lambda kv: kv[1][1])
        data = _payload(repo3.day2, fid)
        r = http.get(client.join_url(f"{dev_a}/latest/{big}"), headers={"Range": f"bytes={size - 1000}-"})
        assert r.status_code == 206 and r.content == data[-1000:]
        r = http.get(client.join_url(f"{dev_a}/latest/{big}"), headers={"Range": "bytes=0-99"})
        assert r.status_code == 206 and r.content == data[:100]
        for method in ("PUT", "DELETE", "MKCOL", "PROPPATCH"):
            r = http.request(method, client.join_url(f"{dev_a}/latest/{big}"), content=b"x")
            assert r.status_code in (403, 405), (method, r.status_code)
        r = http.request(
            "MOVE",
            client.join_url(f"{dev_a}/latest/{big}"),
            headers={"Destination": str(client.join_url(f"{dev_a}/latest/moved"))},
        )
        assert r.status_code in (403, 405)
        with client.open(f"{dev_a}/latest/{big}", "rb") as f:
            assert f.read() == data
        # without the secret path: nothing
        root = url.split("/", 3)
        import httpx

        r = httpx.request("PROPFIND", f"{root[0]}//{root[2]}/", headers={"Depth": "1"})
        assert r.status_code == 404 and dev_a.encode() not in r.content
        r = httpx.get(f"{root[0]}//{root[2]}/{dev_a}/latest/{big}")
        assert r.status_code == 404
    finally:
        client.http.close()
    code, out, err = m.stop(signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err


def test_webdav_one_device_and_one_snapshot(repo3, mounted):
    """--device: only that device (its name needs no UDID then); SNAPSHOT: its domains at the top."""
    import httpx

    a1, a2, b, _enc = _snaps(repo3)
    m = mounted(["--webdav", "--device", b.device.udid], _env(repo3))
    r = httpx.request("PROPFIND", m.first_line, headers={"Depth": "1"})
    assert r.status_code == 207
    assert b"<ns0:href>" in r.content and r.content.count(b"<ns0:response>") == 2 and b"Test%20iPhone/" in r.content
    assert m.stop()[0] == 0

    m = mounted(["--webdav", "latest", "--device", a1.device.udid.lower()], _env(repo3))
    files = _files(repo3.day2)
    path, (fid, *_r) = next(iter(files.items()))
    r = httpx.get(m.first_line + path)
    assert r.status_code == 200 and r.content == _payload(repo3.day2, fid)
    r = httpx.request("PROPFIND", m.first_line, headers={"Depth": "1"})
    assert r.content.count(b"<ns0:response>") == 1 + len(_domains(repo3.day2))
    assert m.stop()[0] == 0


# ---- the parts -----------------------------------------------------------------------------


def test_names_are_safe_and_unique():
    from datetime import datetime

    from ibsync.model import DeviceInfo, Snapshot

    def snap(udid, name, when, sid):
        return Snapshot(
            time=when,
            tree=b"\0" * 32,
            device=DeviceInfo(udid, name),
            backup_date=when,
            ios_encrypted=False,
            source={},
            id=sid,
        )

    t = datetime(2026, 12, 4, 3, 12, 7, tzinfo=UTC)
    snaps = [
        snap("AAA", "Ann's/Phone", t, "a1" * 32),
        snap("BBB", "Ann's/Phone", t, "b1" * 32),
        snap("CCC", "", t, "c1" * 32),
        snap("DDD", "..", t, "d1" * 32),
        snap("EEE", "x\0y", t, "e1" * 32),
        snap("FFF", "latest", t, "f1" * 32),
    ]
    names = device_names(snaps)
    assert set(names) == {"Ann's_Phone (AAA)", "Ann's_Phone (BBB)", "CCC", "_..", "x_y", "latest (FFF)"}
    assert all("/" not in n and "\0" not in n for n in names)
    assert safe_name("") == "_" and safe_name(".") == "_."
    same_minute = [
        snap("A", "p", t, "01" * 32),
        snap("A", "p", t.replace(second=9), "02" * 32),
        snap("A", "p", t.replace(second=9), "03" * 32),
        snap("A", "p", t.replace(minute=13), "04" * 32),
    ]
    assert list(snapshot_names(same_minute)) == [
        "2026-12-04T031207",
        "2026-12-04T031209-02020202",
        "2026-12-04T031209-03030303",
        "2026-12-04T0313",
    ]


class _FakeView:
    """A SnapshotView of one folder of ``n`` files, counting its queries."""

    instances: list = []

    def __init__(self, repo, snap, keyring=None, *, cache=None, n=0):
        from ibsync.reader.browse import Item

        self.items = [Item(f"D/f{i:07d}", f"f{i:07d}", "file", i, 1_700_000_000, 0o644, f"{i:040x}") for i in range(n)]
        self.lists = 0
        self.closed = False
        self.snapshot = snap
        _FakeView.instances.append(self)

    def stat(self, path):
        from ibsync.reader.browse import Item

        if path in ("", "D"):
            return Item(path, path, "dir", 0, 0, 0o755, None)
        return next((i for i in self.items if i.path == path), None)

    def list(self, path, *, offset=0, limit=None):
        assert not self.closed, "a closed view was used"
        self.lists += 1
        return self.items[offset : None if limit is None else offset + limit]

    def open(self, item):
        assert not self.closed, "a closed view was used"
        yield bytes([item.size % 256]) * item.size

    def close(self):
        self.closed = True


def test_big_folder_is_read_in_few_pages():
    """FUSE readdir resumes at the kernel's offset; a folder of 200,000 entries costs a few
    dozen view queries, not one per kernel request, and each name comes once."""
    from datetime import datetime

    from ibsync.model import DeviceInfo, Snapshot
    from ibsync.mount.fuse import load_mfusepy, make_operations

    when = datetime(2026, 1, 1, tzinfo=UTC)
    snap = Snapshot(
        time=when,
        tree=b"\0" * 32,
        device=DeviceInfo("U", "Phone"),
        backup_date=when,
        ios_encrypted=False,
        source={},
        id="ab" * 32,
    )
    _FakeView.instances.clear()
    tree = MountTree(None, [snap], single=True, view_factory=lambda r, s, k, cache: _FakeView(r, s, n=200_000))
    ops = make_operations(tree, load_mfusepy())
    names, offset = [], 0
    fh = ops.opendir("/D")
    while True:  # as the kernel does: take what fits in a buffer, ask again from the last offset
        batch = []
        for name, _attrs, off in ops.readdir_with_offset("/D", offset, fh):
            batch.append(name)
            offset = off
            if len(batch) == 500:
                break
        if not batch:
            break
        names += batch
    assert names[:2] == [".", ".."] and len(names) == 200_002 and len(set(names)) == 200_002
    view = _FakeView.instances[0]
    # requests resume where the last one stopped: pages that grow, not one query per request
    assert view.lists <= 20
    ops.releasedir("/D", fh)
    # a request that goes back (rewinddir, seekdir) starts over there
    fh = ops.opendir("/D")
    again = [name for name, _a, _o in ops.readdir_with_offset("/D", 2 + 199_998, fh)]
    assert again == ["f0199998", "f0199999"]
    first = []
    for name, _a, _o in ops.readdir_with_offset("/D", 0, fh):
        first.append(name)
        if len(first) == 4:
            break
    assert first == [".", "..", "f0000000", "f0000001"]
    assert ops.getattr("/D/f0000123")["st_size"] == 123


_BIG_FOLDER_MOUNT = """
import sys
from datetime import datetime, timezone
from pathlib import Path

from ibsync.model import DeviceInfo, Snapshot
from ibsync.mount.fuse import mount
from ibsync.mount.tree import MountTree
from ibsync.reader.browse import Item

N = int(sys.argv[2])


class View:
    lists = 0

    def __init__(self, *args, **kwargs):
        self.items = [Item(f"D/name-{i:06d}", f"name-{i:06d}", "file", i % 97, 1_700_000_000 + i, 0o644, f"{i:040x}")
                      for i in range(N)]

    def stat(self, path):
        if path in ("", "D"):
            return Item(path, path, "dir", 0, 1_700_000_000, 0o755, None)
        i = int(path.rsplit("-", 1)[1]) if path.startswith("D/name-") else N
        return self.items[i] if i < N else None

    def list(self, path, *, offset=0, limit=None):
        View.lists += 1
        return self.items[offset: None if limit is None else offset + limit]

    def open(self, item):
        yield item.name.encode() * (item.size // len(item.name) + 1)

    def close(self):
        print(f"lists {View.lists}", flush=True)


when = datetime(2026, 1, 1, tzinfo=timezone.utc)
snap = Snapshot(time=when, tree=bytes(32), device=DeviceInfo("U", "Phone"), backup_date=when, ios_encrypted=False,
                source={}, id="ab" * 32)
tree = MountTree(None, [snap], single=True, view_factory=View)
try:
    mount(tree, Path(sys.argv[1]), ready=lambda: print("ready", flush=True))
finally:
    tree.close()
"""


def test_big_folder_through_the_kernel(mounted, tmp_path):
    """A folder of 30,000 names listed through the real kernel, which asks a buffer at a time
    from its own offsets: every name once, in order, with sizes and times; few view queries."""
    n = 30_000
    mp = tmp_path / "mnt"
    mp.mkdir()
    script = tmp_path / "big.py"
    script.write_text(_BIG_FOLDER_MOUNT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(mp), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONFAULTHANDLER="1"),
    )
    m = Mounted.__new__(Mounted)
    m.mountpoint, m.proc = mp, proc
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mp):
            m._alive_or_fail()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        names = os.listdir(mp / "D")
        assert names == [f"name-{i:06d}" for i in range(n)]
        with os.scandir(mp / "D") as it:
            seen = [(e.name, e.is_file(follow_symlinks=False)) for e in it]
        assert len(seen) == n and all(is_file for _n, is_file in seen)
        st = os.stat(mp / "D" / "name-012345")
        assert (st.st_size, int(st.st_mtime)) == (12345 % 97, 1_700_000_000 + 12345)
        assert (mp / "D" / "name-000050").read_bytes() == (b"name-000050" * 10)[: 50 % 97]
        code, out, err = m.stop()
        assert code == 0, err
        lists = int(out.split("lists ")[1].split()[0])
        assert lists < 40, out  # two listings of 30,000 names: a few growing pages each
    finally:
        m.cleanup()
    assert not os.path.ismount(mp)


def test_views_are_few_and_closed():
    from datetime import datetime, timedelta

    from ibsync.model import DeviceInfo, Snapshot

    t = datetime(2026, 1, 1, tzinfo=UTC)
    snaps = [
        Snapshot(
            time=t + timedelta(days=i),
            tree=b"\0" * 32,
            device=DeviceInfo("U", "Phone"),
            backup_date=t + timedelta(days=i),
            ios_encrypted=False,
            source={},
            id=f"{i:02d}" * 32,
        )
        for i in range(6)
    ]
    _FakeView.instances.clear()
    tree = MountTree(None, snaps, max_views=3, view_factory=lambda r, s, k, cache: _FakeView(r, s, n=3))
    names = list(tree.devices["Phone"])
    held = tree.open(f"Phone/{names[0]}/D/f0000002")  # pinned: not closed while being read
    for name in names[1:]:
        assert [e.name for e in tree.list(f"Phone/{name}/D")] == ["f0000000", "f0000001", "f0000002"]
    open_views = [v for v in _FakeView.instances if not v.closed]
    assert len(open_views) <= 3 and _FakeView.instances[0] in open_views
    assert held.read(0, 10) == b"\x02\x02"
    held.close()
    tree.list(f"Phone/{names[1]}/D")
    assert _FakeView.instances[0].closed
    tree.close()
    assert all(v.closed for v in _FakeView.instances)


def test_views_in_use_are_not_closed_under_other_threads():
    """Eight threads browsing six snapshots with room for two open views: a view is never
    closed while one of them is using it."""
    import threading
    from datetime import datetime, timedelta

    from ibsync.model import DeviceInfo, Snapshot

    t = datetime(2026, 1, 1, tzinfo=UTC)
    snaps = [
        Snapshot(
            time=t + timedelta(days=i),
            tree=b"\0" * 32,
            device=DeviceInfo("U", "Phone"),
            backup_date=t + timedelta(days=i),
            ios_encrypted=False,
            source={},
            id=f"{i:02d}" * 32,
        )
        for i in range(6)
    ]

    class SlowView(_FakeView):
        def list(self, path, *, offset=0, limit=None):
            time.sleep(0.001)  # a query takes a while: others open and evict meanwhile
            return super().list(path, offset=offset, limit=limit)

    _FakeView.instances.clear()
    tree = MountTree(None, snaps, max_views=2, view_factory=lambda r, s, k, cache: SlowView(r, s, n=3))
    names = list(tree.devices["Phone"])
    errors = []

    def browse(k):
        try:
            for i in range(60):
                name = names[(k + i) % len(names)]
                assert len(tree.list(f"Phone/{name}/D")) == 3
                with tree.open(f"Phone/{name}/D/f0000001") as f:
                    assert f.read(0, 5) == b"\x01"
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=browse, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len([v for v in _FakeView.instances if not v.closed]) <= 2
    tree.close()


def test_spilled_content_reads_anywhere_and_streams_once():
    data = os.urandom(3 << 20) + b"end"
    opened = []

    def stream():
        opened.append(1)
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    c = SpilledContent(stream, len(data))
    pieces = [(len(data) - 10, 100), (5, 7), (1_000_000, 300_000), (0, 1), (len(data), 10), (2_999_999, 2)]
    assert [c.read(o, n) for o, n in pieces] == [data[o : o + n] for o, n in pieces]
    assert opened == [1]
    f = ContentFile(c)
    f.seek(-3, os.SEEK_END)
    assert f.read(10) == b"end"
    f.seek(17)
    assert f.read(5) == data[17:22]
    f.close()
    with pytest.raises(ValueError):
        c.read(0, 10)  # closed: the spill file is gone

    # a stream that breaks (a damaged blob) fails every read that needs what it did not give
    def broken():
        yield b"a" * 1000
        raise OSError(5, "damaged")

    c = SpilledContent(broken, 5000)
    assert c.read(0, 10) == b"a" * 10
    for _ in range(2):
        with pytest.raises(OSError):
            c.read(900, 200)
    assert c.read(500, 10) == b"a" * 10  # what was read before the damage still reads
    c.close()
