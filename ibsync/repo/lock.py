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
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..errors import IbsyncError, NotFound, RepoError
from ..model import parse_iso, utc_iso
from ..storage import Kind

STALE_AFTER = timedelta(minutes=30)
REFRESH_EVERY = 5 * 60.0
# A holder that could not refresh for this long (storage unreachable, laptop asleep) assumes
# others may already see its lock as stale, and stops before it writes an index or snapshot or
# deletes anything: the 5 minutes left cover the time to the next write and some clock skew.
LOST_AFTER = (STALE_AFTER - timedelta(minutes=5)).total_seconds()
EXCLUSIVE_SETTLE = 0.2  # seconds an exclusive locker waits before its second listing


class Locked(RepoError):
    """Another process holds a conflicting lock."""

    exit_code = 3


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
        now = now or datetime.now(timezone.utc)
        if now - self.time > STALE_AFTER:
            return True
        return self.hostname == socket.gethostname() and not _pid_alive(self.pid)

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"{kind} lock by '{self.command}' (PID {self.pid} on {self.hostname}, since {self.time:%Y-%m-%d %H:%M:%S} UTC)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_locks(repo) -> list[LockInfo]:
    out = []
    for info in repo.storage.list(Kind.LOCKS):
        try:
            d = json.loads(repo.load_object(Kind.LOCKS, info.name))
        except NotFound:
            continue  # removed while we listed
        except IbsyncError:
            # unreadable: treat as a live exclusive lock of unknown origin rather than ignore it
            out.append(LockInfo(info.name, datetime.now(timezone.utc), True, "?", "?", 0, "unknown (unreadable lock)"))
            continue
        out.append(
            LockInfo(info.name, parse_iso(d["time"]), bool(d["exclusive"]), d.get("hostname", ""),
                     d.get("username", ""), int(d.get("pid", 0)), d.get("command", ""))
        )
    return out


class RepoLock:
    """Held while a command works on the repository; use as a context manager."""

    def __init__(self, repo, *, exclusive: bool, command: str) -> None:
        self.repo = repo
        self.exclusive = exclusive
        self.command = command
        self.name: str | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._refreshed = 0.0  # wall clock: a suspended machine's monotonic clock stands still
        self._lost = False

    def _write(self) -> str:
        body = {
            "time": utc_iso(datetime.now(timezone.utc)),
            "exclusive": self.exclusive,
            "hostname": socket.gethostname(),
            "username": os.environ.get("USER", ""),
            "pid": os.getpid(),
            "command": self.command,
        }
        name, _ = self.repo.save_object(Kind.LOCKS, json.dumps(body).encode())
        return name

    def _conflicts(self) -> list[LockInfo]:
        return [
            lk for lk in list_locks(self.repo)
            if lk.name != self.name and (self.exclusive or lk.exclusive) and not lk.stale()
        ]

    def _refuse(self, conflicts: list[LockInfo]) -> Locked:
        what = conflicts[0].describe()
        return Locked(
            f"the repository is in use: {what}; try again when it has finished"
            " (a lock left by a crashed process expires after 30 minutes, or remove it with 'ibsync unlock')"
        )

    def acquire(self) -> "RepoLock":
        conflicts = self._conflicts()
        if conflicts:
            raise self._refuse(conflicts)
        self.name = self._write()
        if self.exclusive:
            time.sleep(EXCLUSIVE_SETTLE)
        conflicts = self._conflicts()
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
            if time.time() - self._refreshed > LOST_AFTER:
                self._lost = True  # a fresh lock now would hide that we were gone; stay lost
                return
            try:
                new = self._write()
                self._refreshed = time.time()
                with self._lock:
                    old, self.name = self.name, new
                if old:
                    self.repo.storage.delete(Kind.LOCKS, old)
            except IbsyncError:
                pass  # tried again at the next interval; the lock stays valid for 30 minutes

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
        with self._lock:
            name, self.name = self.name, None
        if name:
            try:
                self.repo.storage.delete(Kind.LOCKS, name)
            except IbsyncError:
                pass  # left behind, it goes stale by itself

    def __enter__(self) -> "RepoLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_locks(repo, *, all_locks: bool = False) -> list[LockInfo]:
    """Remove stale locks (or every lock); returns what was removed."""
    removed = []
    for lk in list_locks(repo):
        if all_locks or lk.stale():
            try:
                repo.storage.delete(Kind.LOCKS, lk.name)
            except NotFound:
                continue
            removed.append(lk)
    return removed
