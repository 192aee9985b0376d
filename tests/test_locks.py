"""Locks: shared holders together, an exclusive holder alone, stale locks ignored and removable."""

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from ibsync.repo.lock import Locked, LockLost, RepoLock, list_locks
from ibsync.repo.repository import Repository
from ibsync.storage import Kind, LocalStorage

from conftest import FAST_KDF, PASSWORD, one_line_error


@pytest.fixture
def repo(env):
    return Repository.init(LocalStorage(env), PASSWORD, kdf=FAST_KDF)


def test_shared_locks_coexist_and_exclude_exclusive(repo):
    with RepoLock(repo, exclusive=False, command="import"), RepoLock(repo, exclusive=False, command="restore"):
        assert len(list_locks(repo)) == 2
        with pytest.raises(Locked, match="in use: shared lock by '(import|restore)'"):
            RepoLock(repo, exclusive=True, command="prune").acquire()
    assert list_locks(repo) == []
    with RepoLock(repo, exclusive=True, command="prune"):
        with pytest.raises(Locked, match="exclusive lock by 'prune'"):
            RepoLock(repo, exclusive=False, command="import").acquire()
    assert list_locks(repo) == []


def _plant_lock(repo, **fields):
    body = {
        "time": datetime.now(UTC).isoformat(),
        "exclusive": True,
        "hostname": "elsewhere",
        "username": "u",
        "pid": 1,
        "command": "prune",
    }
    body.update(fields)
    name, _ = repo.save_object(Kind.LOCKS, json.dumps(body).encode())
    return name


def test_stale_locks_are_ignored_and_unlock_removes_them(repo, env, cli):
    old = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    _plant_lock(repo, time=old)  # not refreshed for an hour: its holder is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    _plant_lock(repo, hostname=socket.gethostname(), pid=dead.pid)  # dead process on this host
    with RepoLock(repo, exclusive=True, command="prune"):
        pass
    live = _plant_lock(repo)  # a fresh exclusive lock from another host blocks
    with pytest.raises(Locked):
        RepoLock(repo, exclusive=False, command="import").acquire()
    out, _ = cli("unlock", "--json")
    assert len(json.loads(out)["removed"]) == 2 and [lk.name for lk in list_locks(repo)] == [live]
    _, err = cli("snapshots", expect=3)
    assert "in use" in err and "ibsync unlock" in err and len(err.strip().splitlines()) == 1
    cli("unlock", "--remove-all")
    cli("snapshots")


def test_lock_objects_are_sealed(repo, env):
    with RepoLock(repo, exclusive=False, command="import"):
        raw = b"".join(p.read_bytes() for p in (env / "locks").iterdir())
    assert b"import" not in raw and os.uname().nodename.encode() not in raw


def test_a_lock_not_refreshed_in_time_stops_the_commit(env, cli, tmp_path, monkeypatch):
    """A holder whose lock may have looked stale to others (storage unreachable, laptop asleep
    for half an hour) must not write a snapshot: a prune may have removed data it relies on."""
    from ibsync.testing.generator import generate

    folder = generate(tmp_path / "src", seed=5, size_bytes=2 << 20)
    cli("init")
    monkeypatch.setattr("ibsync.repo.lock.LOST_AFTER", -1.0)  # as if the last refresh was long ago
    _, err = cli("import", folder, expect=1)
    one_line_error(err, "could not refresh its repository lock", "Run it again")
    out, _ = cli("snapshots", "--json")
    assert json.loads(out) == []
    monkeypatch.setattr("ibsync.repo.lock.LOST_AFTER", 25 * 60.0)
    out, _ = cli("import", folder, "--json")
    assert json.loads(out)["snapshots"][0]["status"] == "created"


def test_a_lost_lock_stays_lost_after_a_late_refresh(repo):
    lock = RepoLock(repo, exclusive=True, command="prune").acquire()
    try:
        lock._refreshed -= 26 * 60  # asleep for 26 minutes
        with pytest.raises(LockLost):
            repo.check_lock()
        lock._refreshed = time.time()  # a refresh that comes late does not make it good again
        with pytest.raises(LockLost):
            repo.check_lock()
    finally:
        lock.release()
    repo.check_lock()  # released: nothing to check
