"""Bad input gives one clear line on stderr and a non-zero exit, never a traceback."""

import os
import plistlib

import pytest

from conftest import MIT_BACKUP, PASSWORD, copy_folder, one_line_error, run_subprocess


def _finished(path):
    """The MIT fixture with a real Status.plist, so it is importable without --allow-unfinished."""
    with open(path / "Status.plist", "wb") as f:
        plistlib.dump({"SnapshotState": "finished", "BackupState": "new", "Version": "3.3"}, f, fmt=plistlib.FMT_BINARY)
    return path


@pytest.fixture
def repo_env(tmp_path, cli, env):
    cli("init")
    e = dict(os.environ)
    return e


CASES = {
    "not a backup folder": (lambda p: p.mkdir(), "not an iOS backup folder"),
    "missing path": (lambda p: None, "no such folder"),
    "truncated Manifest.db": (
        lambda p: (_finished(copy_folder(MIT_BACKUP, p)), os.truncate(p / "Manifest.db", 9000)),
        "truncated",
    ),
    "garbage Manifest.db": (
        lambda p: (_finished(copy_folder(MIT_BACKUP, p)), (p / "Manifest.db").write_bytes(b"x" * 5000)),
        "not an SQLite database",
    ),
    "malformed Info.plist": (
        lambda p: (
            _finished(copy_folder(MIT_BACKUP, p)),
            (p / "Info.plist").write_bytes(b"<?xml version='1.0'?><plist><dict><key>a"),
        ),
        "malformed plist",
    ),
    "binary plist cut short": (
        lambda p: (_finished(copy_folder(MIT_BACKUP, p)), os.truncate(p / "Manifest.plist", 40)),
        "Manifest.plist",
    ),
    "missing Manifest.db": (
        lambda p: (_finished(copy_folder(MIT_BACKUP, p)), os.unlink(p / "Manifest.db")),
        "missing Manifest.db",
    ),
    "iOS 9 format": (
        lambda p: (_finished(copy_folder(MIT_BACKUP, p)), os.rename(p / "Manifest.db", p / "Manifest.mbdb")),
        "iOS 9 or older",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_backup_folder(repo_env, tmp_path, case):
    make, needle = CASES[case]
    path = tmp_path / "input" / "sample_backup"
    path.parent.mkdir()
    make(path)
    r = run_subprocess(["import", path], repo_env)
    assert r.returncode != 0
    one_line_error(r.stderr, needle)
    assert not list((tmp_path / "repo" / "snapshots").glob("*")) if (tmp_path / "repo" / "snapshots").exists() else True


def test_wrong_password(repo_env, tmp_path):
    r = run_subprocess(["snapshots"], {**repo_env, "IBSYNC_PASSWORD": "not it"})
    assert r.returncode != 0
    one_line_error(r.stderr, "wrong password")


def test_no_password_without_terminal(repo_env):
    e = {k: v for k, v in repo_env.items() if k != "IBSYNC_PASSWORD"}
    r = run_subprocess(["snapshots"], e, stdin=open(os.devnull))
    one_line_error(r.stderr, "no password given")


def test_password_file_and_command(repo_env, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    e = {k: v for k, v in repo_env.items() if k != "IBSYNC_PASSWORD"}
    assert run_subprocess(["snapshots", "--password-file", pw], e).returncode == 0
    assert run_subprocess(["snapshots"], {**e, "IBSYNC_PASSWORD_FILE": str(pw)}).returncode == 0
    assert run_subprocess(["snapshots", "--password-command", f"cat {pw}"], e).returncode == 0
    r = run_subprocess(["snapshots", "--password-file", tmp_path / "nope"], e)
    one_line_error(r.stderr, "cannot read password file")


def test_not_a_repository(tmp_path):
    r = run_subprocess(["snapshots", "--repo", tmp_path / "empty"], {**os.environ, "IBSYNC_PASSWORD": "x"})
    one_line_error(r.stderr, "not an ibsync repository", "ibsync init")


def test_no_repository_given(tmp_path):
    e = {k: v for k, v in os.environ.items() if k != "IBSYNC_REPO"}
    r = run_subprocess(["snapshots"], e)
    one_line_error(r.stderr, "no repository given")


def test_init_refuses_existing_or_nonempty(repo_env, tmp_path):
    r = run_subprocess(["init"], repo_env)
    one_line_error(r.stderr, "already holds an ibsync repository")
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.jpg").write_bytes(b"x")
    r = run_subprocess(["init", "--repo", other], repo_env)
    one_line_error(r.stderr, "not empty")


def test_unknown_snapshot(repo_env):
    r = run_subprocess(["restore", "deadbeef", "/tmp/nowhere"], repo_env)
    one_line_error(r.stderr, "no snapshot with id")


def test_newer_repository_format(repo_env, tmp_path):
    import json

    cfg = tmp_path / "repo" / "config"
    d = json.loads(cfg.read_text())
    d["version"] = 99
    cfg.write_text(json.dumps(d))
    r = run_subprocess(["snapshots"], repo_env)
    one_line_error(r.stderr, "upgrade ibsync")


def test_tampered_config_is_refused(repo_env, tmp_path):
    import json

    cfg = tmp_path / "repo" / "config"
    d = json.loads(cfg.read_text())
    d["encryption"] = "none"  # an attacker trying to make clients write plaintext
    cfg.write_text(json.dumps(d))
    r = run_subprocess(["snapshots"], repo_env)
    one_line_error(r.stderr, "tampered")
    d["encryption"] = "aes-256-gcm"
    d["pack_size"] = 1
    cfg.write_text(json.dumps(d))
    r = run_subprocess(["snapshots"], repo_env)
    one_line_error(r.stderr, "altered")
