"""unlock, prune and repair never delete what is not ibsync's own, are never blocked by junk,
never hide a failed deletion; the lock's own objects never outlive release."""

import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from ibsync.errors import StorageError
from ibsync.repo.lock import RepoLock, list_locks
from ibsync.repo.repository import Repository
from ibsync.storage import Kind, LocalStorage
from ibsync.testing.generator import generate

from conftest import FAST_KDF, PASSWORD, open_repo

WAIT = 60  # seconds: only a safety net against a hung test, never reached when the code is right


@pytest.fixture(scope="module")
def backup(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("src"), seed=11, size_bytes=1 << 20)


def _plant(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@contextlib.contextmanager
def _failing_deletes(kind: Kind, count: int = 1) -> Iterator[list[str]]:
    """While open, the first ``count`` deletions of ``kind`` objects fail as in a read-only
    folder (we run as root, which ignores permission bits); yields the names that failed."""
    failed: list[str] = []
    real = LocalStorage.delete

    def delete(self, k, name):
        if k is kind and len(failed) < count:
            failed.append(name)
            raise StorageError(f"cannot delete {k.value}/{name}: Permission denied")
        return real(self, k, name)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(LocalStorage, "delete", delete)
        yield failed


def _snapshot_ids(cli) -> list[str]:
    return [s["id"] for s in json.loads(cli("snapshots", "--json")[0])]


# ---- junk in locks/ -----------------------------------------------------------------------------


def test_junk_in_locks_blocks_nothing_and_unlock_leaves_it(env, cli, backup, caplog):
    cli("init")
    hex_junk = env / "locks" / secrets.token_hex(32)  # a valid object name, random content
    odd_junk = env / "locks" / "notes.txt"
    _plant(hex_junk, os.urandom(300))
    _plant(odd_junk, b"my own file")
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        cli("snapshots")
        cli("import", backup)
        cli("prune")
    assert f"ignoring locks/{hex_junk.name}: not a lock of this repository" in caplog.text
    out, _ = cli("unlock", "--remove-all")
    assert f"not a lock, left in place: locks/{hex_junk.name}" in out and "removed 0 lock(s)" in out
    out, _ = cli("unlock", "--remove-all", "--json")
    assert hex_junk.name in json.loads(out)["junk"] and json.loads(out)["removed"] == []
    assert hex_junk.read_bytes() and odd_junk.read_bytes() == b"my own file"


def test_a_lock_written_with_the_key_but_unreadable_still_blocks(env, cli):
    """Written with the repository key: an ibsync (maybe a newer one) holds it."""
    cli("init")
    repo = open_repo(env)
    name, _ = repo.save_object(Kind.LOCKS, b"{not json")
    _, err = cli("snapshots", expect=3)
    assert "exclusive lock by 'unknown (unreadable lock)'" in err
    out, _ = cli("unlock")
    assert "removed 0 lock(s)" in out  # not stale: its time is unknown
    out, _ = cli("unlock", "--remove-all", "--json")
    assert json.loads(out)["removed"] == [name]
    cli("snapshots")


def test_a_same_host_lock_with_pid_0_is_stale(env, cli):
    import socket

    cli("init")
    repo = open_repo(env)
    body = {
        "time": "2099-01-01T00:00:00Z",
        "exclusive": True,
        "hostname": socket.gethostname(),
        "username": "u",
        "pid": 0,
        "command": "prune",
    }
    repo.save_object(Kind.LOCKS, json.dumps(body).encode())
    cli("snapshots")  # PID 0 names a process group, never a holder: not alive


def test_unlock_reports_a_lock_it_could_not_delete(env, cli):
    cli("init")
    repo = open_repo(env)
    body = {
        "time": "2000-01-01T00:00:00Z",
        "exclusive": True,
        "hostname": "elsewhere",
        "username": "u",
        "pid": 1,
        "command": "prune",
    }
    name, _ = repo.save_object(Kind.LOCKS, json.dumps(body).encode())
    with _failing_deletes(Kind.LOCKS) as failed:
        _, err = cli("unlock", expect=1)
    assert failed == [name] and f"could not delete locks/{name}" in err and "Permission denied" in err
    assert (env / "locks" / name).exists()


# ---- junk in packs/ -------------------------------------------------------------------------------


def test_prune_deletes_only_packs_that_authenticate(env, cli, backup):
    cli("init")
    cli("import", backup)
    real_packs = sorted(p for p in (env / "packs").rglob("*") if p.is_file())
    # the snapshot forgotten and the index lost: every pack is unused and listed in no index,
    # as after an interrupted run; only the real packs may go
    for sid in _snapshot_ids(cli):
        cli("forget", sid)
    for obj in (env / "index").iterdir():
        obj.unlink()
    name = "ab" + secrets.token_hex(31)
    junk = env / "packs" / "ab" / name
    _plant(junk, os.urandom(5000))
    out, err = cli("prune")
    assert junk.exists() and not any(p.exists() for p in real_packs)
    assert f"not an ibsync pack, left in place: packs/ab/{name}" in err
    assert f"deleted {len(real_packs)} pack(s)" in out
    out, _ = cli("prune", "--dry-run", "--json")  # reported again, never deleted
    assert list(json.loads(out)["junk_packs"]) == [name]  # the reason depends on its random last bytes
    assert json.loads(out)["packs_to_delete"] == 0
    cli("prune")
    assert junk.exists()
    cli("check")


def test_prune_removes_temporary_files_of_killed_writes_only_when_old(env, cli, backup):
    cli("init")
    cli("import", backup)
    old, fresh = env / "packs" / "ab" / ".tmp-0123456789abcdef", env / "index" / ".tmp-fedcba9876543210"
    _plant(old, b"half a pack")
    _plant(fresh, b"an upload under way")
    hours_ago = time.time() - 7 * 3600
    os.utime(old, (hours_ago, hours_ago))
    cli("prune", "--dry-run")
    assert old.exists()
    out, _ = cli("prune")
    assert "removed 1 temporary file(s) left by interrupted writes" in out
    assert not old.exists() and fresh.exists()
    cli("check")


# ---- deletions that fail ----------------------------------------------------------------------------


def test_prune_reports_a_pack_it_could_not_delete_and_exits_1(env, cli, backup):
    cli("init")
    cli("import", backup)
    for sid in _snapshot_ids(cli):
        cli("forget", sid)
    with _failing_deletes(Kind.PACKS) as failed:
        out, err = cli("prune", expect=1)
    assert len(failed) == 1 and f"could not delete packs/{failed[0][:2]}/{failed[0]}" in err
    assert "Permission denied" in err and "the repository is still valid" in err
    assert (env / "packs" / failed[0][:2] / failed[0]).exists()
    cli("check")
    out, _ = cli("prune", "--json")  # the next run removes what is left
    assert json.loads(out)["packs_deleted"] == 1 and json.loads(out)["failed"] == {}
    assert not (env / "packs" / failed[0][:2] / failed[0]).exists()


def test_forget_prune_json_lists_a_failed_deletion_and_exits_1(env, cli, backup):
    cli("init")
    cli("import", backup)
    packs = sum(1 for p in (env / "packs").rglob("*") if p.is_file())
    with _failing_deletes(Kind.INDEX) as failed:
        out, err = cli("forget", "--prune", "--json", *_snapshot_ids(cli), expect=1)
    doc = json.loads(out)
    assert list(doc["prune"]["failed"]) == [f"index/{failed[0]}"] and "still valid" in err
    # the index object left behind still lists the unused packs: they stay until it goes
    assert doc["prune"]["packs_deleted"] == 0 and doc["prune"]["packs_left_listed"] == packs
    cli("check")
    out, _ = cli("prune", "--json")
    assert json.loads(out)["packs_deleted"] == packs
    cli("check")


def test_repair_index_reports_an_index_object_it_could_not_delete(env, cli, backup):
    cli("init")
    cli("import", backup)
    with _failing_deletes(Kind.INDEX) as failed:
        out, err = cli("repair", "index", "--json", expect=1)
    assert list(json.loads(out)["failed"]) == [f"index/{failed[0]}"]
    assert f"could not delete index/{failed[0]}" in err and "still valid" in err
    cli("check")


def test_repair_index_leaves_names_that_are_not_objects(env, cli, backup):
    cli("init")
    cli("import", backup)
    mine = env / "index" / "README"
    _plant(mine, b"not an index object")
    cli("repair", "index")
    assert mine.read_bytes() == b"not an index object"


# ---- junk in snapshots/ -------------------------------------------------------------------------------


def test_repair_snapshots_lists_and_removes_snapshot_objects_that_do_not_authenticate(env, cli, backup):
    cli("init")
    cli("import", backup)
    junk = env / "snapshots" / secrets.token_hex(32)
    _plant(junk, os.urandom(400))
    out, _ = cli("repair", "snapshots", "--dry-run")
    assert f"snapshot object {junk.name[:12]} does not authenticate" in out and "would remove 1" in out
    assert junk.exists()
    with _failing_deletes(Kind.SNAPSHOTS) as failed:
        _, err = cli("repair", "snapshots", expect=1)
    assert failed == [junk.name] and f"could not delete snapshots/{junk.name}" in err and junk.exists()
    out, _ = cli("repair", "snapshots", "--json")
    assert [(d["id"], d["removed"]) for d in json.loads(out)] == [(junk.name, True)]
    assert not junk.exists() and len(_snapshot_ids(cli)) == 1


# ---- the lock's own objects -------------------------------------------------------------------------


class _GatedStorage:
    """The real storage, but a lock written while armed waits until ``proceed`` is set; a lock
    deleted sets it (what release does if it does not wait for the refresh under way)."""

    def __init__(self, inner, proceed: threading.Event) -> None:
        self.inner = inner
        self.proceed = proceed
        self.armed = False
        self.writing = threading.Event()

    def put(self, kind, name, data, **kw):
        if kind is Kind.LOCKS and self.armed:
            self.armed = False
            self.writing.set()
            assert self.proceed.wait(WAIT)
        return self.inner.put(kind, name, data, **kw)

    def delete(self, kind, name):
        if kind is Kind.LOCKS:
            self.proceed.set()
        return self.inner.delete(kind, name)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


class _ContendedLock:
    """A threading.Lock that sets ``proceed`` when a second thread has to wait for it."""

    def __init__(self, proceed: threading.Event) -> None:
        self._lock = threading.Lock()
        self.proceed = proceed

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        self.proceed.set()
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def test_release_during_a_refresh_leaves_no_lock(env):
    """The refresher writing its new lock object while release runs: whichever order the two
    steps take, no lock object survives release (a stray one would block prune for 30 min)."""
    repo = Repository.init(LocalStorage(env), PASSWORD, kdf=FAST_KDF)
    proceed = threading.Event()
    repo.storage = gated = _GatedStorage(repo.storage, proceed)
    lock = RepoLock(repo, exclusive=False, command="import").acquire()
    lock._lock = _ContendedLock(proceed)
    gated.armed = True
    refresh = threading.Thread(target=lock.refresh)
    refresh.start()
    assert gated.writing.wait(WAIT)  # the refresh is writing its new object, and waits
    release = threading.Thread(target=lock.release)
    release.start()
    refresh.join(WAIT)
    release.join(WAIT)
    assert not refresh.is_alive() and not release.is_alive()
    assert list(gated.inner.list(Kind.LOCKS)) == [] and list_locks(repo) == []
    assert not lock._refresher.is_alive()


class _FailingSecondListing:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.listings = 0

    def list(self, kind):
        if kind is Kind.LOCKS:
            self.listings += 1
            if self.listings == 2:
                raise StorageError("listing failed: connection reset")
        return self.inner.list(kind)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


@pytest.mark.parametrize("exclusive", [False, True])
def test_acquire_removes_its_lock_when_the_recheck_fails(env, exclusive):
    repo = Repository.init(LocalStorage(env), PASSWORD, kdf=FAST_KDF)
    repo.storage = _FailingSecondListing(repo.storage)
    with pytest.raises(StorageError, match="connection reset"):
        RepoLock(repo, exclusive=exclusive, command="prune").acquire()
    assert list(repo.storage.inner.list(Kind.LOCKS)) == []
    assert repo.lock is None


# ---- is the holder alive? -------------------------------------------------------------------------------


def test_pid_liveness():
    """psutil's answer (on Windows os.kill(pid, 0) would terminate the process asked about)."""
    from ibsync.pids import pid_alive

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert pid_alive(os.getpid()) and not pid_alive(dead.pid)
    assert not pid_alive(0) and not pid_alive(-1) and not pid_alive(2**80)


def test_a_junk_pack_claiming_a_huge_header_is_not_read_whole(env, cli, backup):
    from ibsync.maint import repair

    cli("init")
    cli("import", backup)
    name = "cd" + secrets.token_hex(31)
    junk = env / "packs" / "cd" / name
    # a sparse file whose last four bytes claim a header just past what any pack can have
    claim = repair.MAX_HEADER_READ
    _plant(junk, b"")
    with open(junk, "r+b") as f:
        f.truncate(claim + 4096)
        f.seek(claim + 4092)
        f.write(claim.to_bytes(4, "little"))
    out, _ = cli("prune", "--dry-run", "--json")
    assert "more than a pack header can be" in json.loads(out)["junk_packs"][name]


def test_prune_refuses_while_a_snapshot_object_cannot_be_read(env, cli, backup):
    cli("init")
    cli("import", backup)
    packs = sorted(p for p in (env / "packs").rglob("*") if p.is_file())
    (snap,) = list((env / "snapshots").iterdir())
    data = snap.read_bytes()
    snap.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # damaged: its data must not look unused
    _, err = cli("prune", expect=1)
    assert "cannot be read; nothing was pruned" in err and "repair snapshots" in err
    assert all(p.exists() for p in packs)
