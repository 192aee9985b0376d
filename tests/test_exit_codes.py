"""Each exit status of the table in ibsync.errors, provoked by its real condition through the CLI,
with its one-line message; and the table as README and `ibsync --help` document it."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest

import ibsync.errors as errors
from ibsync.repo.lock import Locked, RepoLock
from ibsync.testing.device import run_sim_usbmuxd

from conftest import ENCRYPTED_BACKUP, MIT_BACKUP, copy_folder, one_line_error, open_repo, run_subprocess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo(env, cli, monkeypatch):
    monkeypatch.delenv("IBSYNC_DEBUG", raising=False)
    cli("init")
    return env


def _last_error_line(err: str, *needles: str) -> str:
    """The error a command ended with: its last stderr line (warnings may come before it)."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("ibsync: error:") and "Traceback" not in err, err
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"
    return last


def test_0_done(repo, cli):
    out, err = cli("snapshots", expect=0)
    assert "0 snapshot(s)" in out and err == ""


def test_1_check_finds_damage(repo, cli, tmp_path):
    cli("import", copy_folder(MIT_BACKUP, tmp_path / "src"), "--allow-unfinished")
    pack = next(p for p in (repo / "packs").rglob("*") if p.is_file())
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))
    _, err = cli("check", "--read-data", expect=1)
    _last_error_line(err)


def test_2_usage_and_bad_input(repo, cli, tmp_path):
    _, err = cli("ls", expect=2)  # click's own: a missing argument
    assert "Missing argument 'SNAPSHOT'" in err and "Traceback" not in err
    _, err = cli("snapshots", "--password-file", tmp_path / "missing", expect=2)
    one_line_error(err, "cannot read password file")


def test_3_repository_locked(repo):
    held = RepoLock(open_repo(repo), exclusive=True, command="prune").acquire()  # as a running prune
    try:
        r = run_subprocess(["snapshots"], dict(os.environ))
    finally:
        held.release()
    assert r.returncode == errors.EXIT_LOCKED == 3, r.stderr
    one_line_error(r.stderr, "prune")
    assert issubclass(Locked, errors.RepoLocked)


def test_4_wrong_repository_password(repo, cli, monkeypatch):
    monkeypatch.setenv("IBSYNC_PASSWORD", "not the password")
    _, err = cli("snapshots", expect=4)
    one_line_error(err, "wrong password")


def test_4_wrong_ios_backup_password(repo, cli, tmp_path, monkeypatch):
    cli("import", copy_folder(ENCRYPTED_BACKUP, tmp_path / "src" / ENCRYPTED_BACKUP.name), "--allow-unfinished")
    monkeypatch.setenv("IBSYNC_BACKUP_PASSWORD", "1234")  # the fixture's is 0000
    _, err = cli("ls", "latest", expect=4)
    one_line_error(err, "wrong iOS backup password")


def test_5_not_found(repo, cli, tmp_path):
    _, err = cli("ls", "deadbeef", expect=5)
    one_line_error(err, "no snapshot with id 'deadbeef'")
    _, err = cli("restore", "latest", tmp_path / "out", expect=5)
    one_line_error(err, "no snapshots yet")
    _, err = cli("find", "sms.db", "--device", "nobody", expect=5)
    one_line_error(err, "no snapshot of a device 'nobody'")
    (tmp_path / "empty").mkdir()
    _, err = cli("snapshots", "--repo", tmp_path / "empty", expect=5)
    one_line_error(err, "not an ibsync repository")


def test_6_storage_unreachable(repo, cli, monkeypatch):
    monkeypatch.setenv("IBSYNC_RETRY_SECONDS", "0.2")  # the retries a NAS reboot gets, shortened
    _, err = cli("snapshots", "--repo", "webdav+http://127.0.0.1:1/repo", expect=6)
    _last_error_line(err, "webdav+http://127.0.0.1:1/repo", "still failing after")


def test_7_no_device_connected(repo, tmp_path):
    with run_sim_usbmuxd([], tmp_path / "mux") as mux:
        r = run_subprocess(["backup"], {**os.environ, **mux.env(home=tmp_path / "home")})
    assert r.returncode == 7, r.stderr
    one_line_error(r.stderr, "no device connected")


def test_70_internal_error(repo, cli, monkeypatch):
    def bug(self):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("ibsync.repo.repository.Repository.snapshots", bug)
    _, err = cli("snapshots", expect=70)
    lines = err.strip().splitlines()
    assert lines == [
        "ibsync: internal error: ZeroDivisionError: division by zero "
        "(set IBSYNC_DEBUG=1 for details, and please report it)"
    ], err


def _error_classes() -> list[type]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.IbsyncError)]


def test_every_error_class_has_a_documented_code():
    codes = {c.__name__: c.exit_code for c in _error_classes()}
    assert set(codes.values()) <= set(errors.EXIT_CODES), codes
    assert codes["UserError"] == 2 and codes["RepoLocked"] == 3 and codes["WrongPassword"] == 4
    assert codes["WrongBackupPassword"] == 4 and codes["NameNotFound"] == 5 and codes["RepoNotFound"] == 5
    assert codes["StorageUnreachable"] == 6 and codes["DeviceError"] == 7 and codes["TrustNotAnswered"] == 7
    assert codes["IbsyncError"] == codes["RepoError"] == codes["StorageError"] == codes["InvalidData"] == 1
    assert errors.EXIT_INTERNAL == 70 and errors.EXIT_INTERRUPTED == 130


def test_help_and_readme_list_the_table(cli):
    out, _ = cli("--help")
    section = out[out.index("Exit codes:") :]
    for code, meaning in errors.EXIT_CODES.items():
        assert re.search(rf"^  {code} +{re.escape(meaning.split()[0])}", section, flags=re.MULTILINE), (code, section)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("**Exit codes**") :]
    table = table[: table.index("\n\n", table.index("|"))]
    assert {int(n) for n in re.findall(r"^\| (\d+) \|", table, flags=re.MULTILINE)} == set(errors.EXIT_CODES)
