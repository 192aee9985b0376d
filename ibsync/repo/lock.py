"""Repository locks: many shared holders (imports, restores, checks) or one exclusive holder
(prune, repair), never both.

A lock is an object ``locks/<name>`` (sealed like a snapshot, so host and user names are not
readable in the storage). Taking one is create-then-check: list the locks, write ours, list
again; a conflicting lock seen in either listing makes us remove ours and fail. Two lockers
racing each see the other in their second listing, whichever wrote first, so at most one side
proceeds. An exclusive locker also waits a moment before its second listing, for storage whose
listings lag behind writes. Holders refresh their lock every few minutes (a new object, then
the old one removed); a lock not refreshed for 30 minutes, or left by a dead process on this
host, is stale and ignored, and `ibsync unlock` removes it.

Only objects that authenticate (their name is the hash of their content and they decrypt with
the repository key) are locks. Anything else in ``locks/`` is junk: anyone with write access to
the storage could put it there, so it neither blocks anyone nor is ever deleted; it is reported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ..errors import IbsyncError, InvalidData, NotFound, RepoError, RepoLocked
from ..format.crypto import storage_name
from ..format.objects import open_object
from ..model import parse_iso, utc_iso
from ..pids import pid_alive
from ..storage import Kind

STALE_AFTER = timedelta(minutes=30)
REFRESH_EVERY = 5 * 60.0
# A holder that could not refresh for this long (storage unreachable, laptop asleep) assumes
# others may already see its lock as stale, and stops before it writes an index or snapshot or
# deletes anything: the 5 minutes left cover the time to the next write and some clock skew.
LOST_AFTER = (STALE_AFTER - timedelta(minutes=5)).total_seconds()
EXCLUSIVE_SETTLE = 0.2  # seconds an exclusive locker waits before its second listing
# A lock is a few hundred bytes; a bigger object is junk, and is not read into memory.
MAX_LOCK_SIZE = 64 << 10

log = logging.getLogger("ibsync")


class Locked(RepoLocked):
    """Another process holds a conflicting lock."""


class LockLost(RepoError):
    """Our own lock was not refreshed in time; others may have ignored it meanwhile."""


@dataclass(frozen=True)
class LockInfo:
    name: str
    time: datetime
    exclusive: bool
    hostname: str
    username: str
    pid: int
    command: str

    def stale(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        if now - self.time > STALE_AFTER:
            return True
        return self.hostname == socket.gethostname() and not pid_alive(self.pid)

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"{kind} lock by '{self.command}' (PID {self.pid} on {self.hostname}, since {self.time:%Y-%m-%d %H:%M:%S} UTC)"


# ---- reading the locks ------------------------------------------------------------------------


class _NotALock(Exception):
    """An object in locks/ that does not authenticate: not ibsync's, whoever put it there."""


@dataclass
class LockScan:
    locks: list[LockInfo] = field(default_factory=list)
    junk: dict[str, str] = field(default_factory=dict)  # object name -> why it is not a lock


def _open_lock(repo, name: str, size: int) -> bytes:
    """The plaintext of lock ``name``; _NotALock if it does not authenticate."""
    if size > MAX_LOCK_SIZE:
        raise _NotALock(f"{size} bytes, far more than a lock")
    stored = repo.storage.get(Kind.LOCKS, name)
    if storage_name(stored) != name:
        raise _NotALock("its content does not match its name")
    try:
        return open_object(stored, Kind.LOCKS.value, repo.cipher, repo.compressor)
    except InvalidData:
        try:
            repo.cipher.open(stored, Kind.LOCKS.value.encode())
        except InvalidData:
            raise _NotALock("it does not decrypt with this repository's key") from None
        raise  # written with our key, in an envelope we cannot read: a newer ibsync's


def _unknown_lock(name: str) -> LockInfo:
    # Written with the repository key (so by an ibsync, maybe a newer one) but not readable
    # here: honour it as a live exclusive lock; 'unlock --remove-all' removes it.
    return LockInfo(name, datetime.now(UTC), True, "?", "?", 0, "unknown (unreadable lock)")


def _parse_lock(name: str, body: bytes) -> LockInfo:
    try:
        d = json.loads(body)
        return LockInfo(
            name,
            parse_iso(d["time"]),
            bool(d["exclusive"]),
            str(d.get("hostname", "")),
            str(d.get("username", "")),
            int(d.get("pid", 0)),
            str(d.get("command", "")),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return _unknown_lock(name)


def scan_locks(repo) -> LockScan:
    """Every lock in the repository, and the junk (objects that do not authenticate) beside them.
    A lock that cannot be read for a storage failure raises: it may well be a live one."""
    scan = LockScan()
    for info in repo.storage.list(Kind.LOCKS):
        try:
            body = _open_lock(repo, info.name, info.size)
        except NotFound:
            continue  # removed while we listed
        except _NotALock as e:
            scan.junk[info.name] = str(e)
            continue
        except InvalidData:
            scan.locks.append(_unknown_lock(info.name))
            continue
        scan.locks.append(_parse_lock(info.name, body))
    return scan


def list_locks(repo) -> list[LockInfo]:
    return scan_locks(repo).locks


def junk_warning(name: str, why: str) -> str:
    from ..ui.text import printable

    return f"ignoring locks/{printable(name)}: not a lock of this repository ({why}); it is left in place"


# ---- holding a lock ---------------------------------------------------------------------------


class RepoLock:
    """Held while a command works on the repository; use as a context manager."""

    def __init__(self, repo, *, exclusive: bool, command: str) -> None:
        self.repo = repo
        self.exclusive = exclusive
        self.command = command
        self.name: str | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        # Held for a whole refresh and by release: a refresh either completes before release
        # (which then deletes the new object) or sees the stop and writes nothing.
        self._lock = threading.Lock()
        self._refreshed = 0.0  # wall clock: a suspended machine's monotonic clock stands still
        self._lost = False
        self._warned: set[str] = set()

    def _write(self) -> str:
        body = {
            "time": utc_iso(datetime.now(UTC)),
            "exclusive": self.exclusive,
            "hostname": socket.gethostname(),
            "username": os.environ.get("USER", ""),
            "pid": os.getpid(),
            "command": self.command,
        }
        name, _ = self.repo.save_object(Kind.LOCKS, json.dumps(body).encode())
        return name

    def _conflicts(self) -> list[LockInfo]:
        scan = scan_locks(self.repo)
        for name, why in scan.junk.items():
            if name not in self._warned:  # once per locker, not at each of its listings
                self._warned.add(name)
                log.warning(junk_warning(name, why))
        return [lk for lk in scan.locks if lk.name != self.name and (self.exclusive or lk.exclusive) and not lk.stale()]

    def _refuse(self, conflicts: list[LockInfo]) -> Locked:
        what = conflicts[0].describe()
        return Locked(
            f"the repository is in use: {what}; try again when it has finished"
            " (a lock left by a crashed process expires after 30 minutes, or remove it with 'ibsync unlock')"
        )

    def acquire(self) -> RepoLock:
        conflicts = self._conflicts()
        if conflicts:
            raise self._refuse(conflicts)
        self.name = self._write()
        try:
            if self.exclusive:
                time.sleep(EXCLUSIVE_SETTLE)
            conflicts = self._conflicts()
        except BaseException:
            self.release()  # a failed re-check (storage error, Ctrl-C) must not strand our lock
            raise
        if conflicts:
            self.release()
            raise self._refuse(conflicts)
        self._refreshed = time.time()
        self.repo.lock = self
        self._refresher = threading.Thread(target=self._refresh_loop, name="ibsync-lock", daemon=True)
        self._refresher.start()
        return self

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            if not self.refresh():
                return

    def refresh(self) -> bool:
        """Replace our lock object with a fresh one; False once the lock is lost or released."""
        with self._lock:
            if self._stop.is_set() or self.name is None:
                return False
            if time.time() - self._refreshed > LOST_AFTER:
                self._lost = True  # a fresh lock now would hide that we were gone; stay lost
                return False
            try:
                new = self._write()
            except IbsyncError:
                return True  # tried again at the next interval; the lock stays valid for 30 minutes
            self._refreshed = time.time()
            old, self.name = self.name, new
            try:
                self.repo.storage.delete(Kind.LOCKS, old)
            except IbsyncError:
                pass  # left behind, it goes stale by itself and is never mistaken for a live one
            return True

    def check(self) -> None:
        """Raise LockLost if the lock may have looked stale to others at some point."""
        gap = time.time() - self._refreshed
        if self._lost or gap > LOST_AFTER:
            self._lost = True
            raise LockLost(
                f"this command could not refresh its repository lock for {gap / 60:.0f} minutes"
                " (storage unreachable or the computer asleep), so another command may have changed the"
                " repository meanwhile; it stopped without committing. Run it again: data already"
                " uploaded is reused"
            )

    def release(self) -> None:
        self._stop.set()
        if getattr(self.repo, "lock", None) is self:
            self.repo.lock = None
        with self._lock:  # waits for a refresh under way, so the name below is the last one written
            name, self.name = self.name, None
        if self._refresher is not None and self._refresher is not threading.current_thread():
            self._refresher.join()  # it sees the stop at once: nothing of it survives release
        if name:
            try:
                self.repo.storage.delete(Kind.LOCKS, name)
            except IbsyncError:
                pass  # left behind, it goes stale by itself

    def __enter__(self) -> RepoLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- unlock -----------------------------------------------------------------------------------


@dataclass
class Unlocked:
    removed: list[LockInfo] = field(default_factory=list)
    junk: dict[str, str] = field(default_factory=dict)  # left in place: not ibsync's to delete
    failed: dict[str, str] = field(default_factory=dict)  # lock name -> why it could not be deleted


def remove_locks(repo, *, all_locks: bool = False) -> Unlocked:
    """Remove stale locks (or every lock). Only objects that authenticate are removed."""
    scan = scan_locks(repo)
    out = Unlocked(junk=scan.junk)
    for lk in scan.locks:
        if not (all_locks or lk.stale()):
            continue
        try:
            repo.storage.delete(Kind.LOCKS, lk.name)
        except NotFound:
            continue
        except IbsyncError as e:
            out.failed[lk.name] = str(e)
            continue
        out.removed.append(lk)
    return out
