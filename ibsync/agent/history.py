"""The agent's durable memory: every attempt to back up a device, what each device is waiting
for, when each notice was last sent, and maintenance runs. ``ibsync status`` (and the web app)
read it without opening a repository, so it answers while the NAS sleeps.

A SQLite database in the user's state folder (``$XDG_STATE_HOME/ibsync/agent.db``; with the
configuration on macOS and Windows), in WAL mode so that readers never wait for the agent. Times
are stored as UTC seconds since the epoch. An attempt is written as ``running`` when it starts
and completed when it ends; a ``running`` row whose process is gone (a crash, a power cut) is
reported as ``failed`` with the reason "interrupted", and the next agent marks it so for good.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, overload

from ..pids import pid_alive
from ..userdirs import user_dir
from .schedule import backoff

OK, SKIPPED, FAILED, RUNNING = "ok", "skipped", "failed", "running"
RESULTS = (OK, SKIPPED, FAILED, RUNNING)
INTERRUPTED = "interrupted: the agent stopped during the backup (crash, kill or power loss)"
#: an attempt cut short by the agent's own clean stop: the device is not to blame, so no back-off
STOPPED = "the agent was stopped during the backup; nothing was committed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    udid TEXT NOT NULL,
    name TEXT,
    repository TEXT,
    connection TEXT,
    started REAL NOT NULL,
    ended REAL,
    result TEXT NOT NULL,
    reason TEXT,
    snapshot TEXT,
    bytes_added INTEGER,
    bytes_received INTEGER,
    files INTEGER,
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS attempts_by_device ON attempts (udid, started);
CREATE TABLE IF NOT EXISTS devices (
    udid TEXT PRIMARY KEY,
    name TEXT,
    first_seen REAL,
    last_seen REAL,
    connection TEXT,
    last_success REAL,
    last_snapshot TEXT,
    waiting TEXT
);
CREATE TABLE IF NOT EXISTS notices (key TEXT PRIMARY KEY, sent REAL NOT NULL);
CREATE TABLE IF NOT EXISTS maintenance (
    id INTEGER PRIMARY KEY,
    repository TEXT NOT NULL,
    kind TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    result TEXT NOT NULL,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS agent (key TEXT PRIMARY KEY, value TEXT);
"""


def default_history_path() -> Path:
    return user_dir("state") / "agent.db"


@overload
def to_time(seconds: float) -> datetime: ...
@overload
def to_time(seconds: None) -> None: ...
@overload
def to_time(seconds: float | None) -> datetime | None: ...
def to_time(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True)
class Attempt:
    id: int
    udid: str
    name: str | None
    repository: str | None
    connection: str | None
    started: datetime
    ended: datetime | None
    result: str
    reason: str | None
    snapshot: str | None
    bytes_added: int | None
    bytes_received: int | None
    files: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "udid": self.udid,
            "name": self.name,
            "repository": self.repository,
            "connection": self.connection,
            "started": _iso(self.started),
            "ended": _iso(self.ended),
            "result": self.result,
            "reason": self.reason,
            "snapshot": self.snapshot,
            "bytes_added": self.bytes_added,
            "bytes_received": self.bytes_received,
            "files": self.files,
        }


@dataclass(frozen=True)
class DeviceRecord:
    udid: str
    name: str | None
    first_seen: datetime | None
    last_seen: datetime | None
    connection: str | None
    last_success: datetime | None
    last_snapshot: str | None
    waiting: str | None  # why a present device is not being backed up now (no attempt is made)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat(timespec="seconds")


class History:
    """One connection per thread that uses it (sqlite3 objects belong to their thread)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_history_path()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        os.chmod(self.path, 0o600)  # device names, repository names: this user's business

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---- attempts -----------------------------------------------------------------------------

    def begin(self, udid: str, name: str | None, repository: str | None, connection: str | None) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO attempts (udid, name, repository, connection, started, result, pid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (udid, name, repository, connection, time.time(), RUNNING, os.getpid()),
            )
            return int(cur.lastrowid or 0)

    def end(
        self,
        attempt: int,
        result: str,
        reason: str | None = None,
        *,
        snapshot: str | None = None,
        bytes_added: int | None = None,
        bytes_received: int | None = None,
        files: int | None = None,
        success_time: float | None = None,
    ) -> None:
        assert result in (OK, SKIPPED, FAILED)
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET ended=?, result=?, reason=?, snapshot=?, bytes_added=?, bytes_received=?, "
                "files=? WHERE id=?",
                (now, result, reason, snapshot, bytes_added, bytes_received, files, attempt),
            )
            if result == OK:
                udid = db.execute("SELECT udid FROM attempts WHERE id=?", (attempt,)).fetchone()[0]
                self._success(db, udid, success_time or now, snapshot)

    def record_success(self, udid: str, name: str | None, when: datetime, snapshot: str | None) -> None:
        """A good snapshot made outside the agent (``ibsync backup``, an import) found in the
        repository: it counts for the schedule like the agent's own."""
        with self._tx() as db:
            self._ensure(db, udid, name)
            self._success(db, udid, when.timestamp(), snapshot)

    @staticmethod
    def _success(db: sqlite3.Connection, udid: str, when: float, snapshot: str | None) -> None:
        db.execute(
            "UPDATE devices SET last_success=?, last_snapshot=? WHERE udid=? AND "
            "(last_success IS NULL OR last_success < ?)",
            (when, snapshot, udid, when),
        )

    def mark_interrupted(self) -> int:
        """Every ``running`` attempt whose process is gone becomes ``failed`` (interrupted); the
        number of them."""
        with self._tx() as db:
            stale = [
                row[0]
                for row in db.execute("SELECT id, pid FROM attempts WHERE result=?", (RUNNING,))
                if not pid_alive(row[1] or 0) or row[1] == os.getpid()
            ]
            for attempt in stale:
                db.execute(
                    "UPDATE attempts SET result=?, reason=?, ended=COALESCE(ended, ?) WHERE id=?",
                    (FAILED, INTERRUPTED, time.time(), attempt),
                )
        return len(stale)

    def attempts(self, udid: str | None = None, limit: int = 50) -> list[Attempt]:
        query = (
            "SELECT id, udid, name, repository, connection, started, ended, result, reason, snapshot, "
            "bytes_added, bytes_received, files, pid FROM attempts"
        )
        args: tuple[Any, ...] = ()
        if udid is not None:
            query += " WHERE udid=?"
            args = (udid,)
        rows = self._db.execute(query + " ORDER BY started DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
        return [self._attempt(row) for row in rows]

    def last_attempt(self, udid: str) -> Attempt | None:
        found = self.attempts(udid, 1)
        return found[0] if found else None

    def unsuccessful_in_a_row(self, udid: str) -> int:
        """Attempts since the last good one that were skipped or failed (for the back-off)."""
        n = 0
        for row in self._db.execute(
            "SELECT result FROM attempts WHERE udid=? ORDER BY started DESC, id DESC LIMIT 64", (udid,)
        ):
            if row[0] == OK:
                break
            if row[0] in (SKIPPED, FAILED):
                n += 1
        return n

    def retry_after(self, udid: str, base: timedelta, ceiling: timedelta) -> datetime | None:
        """When a device whose last attempts were skipped or failed may be tried again: ``base``
        after the first, doubling with each one in a row, at most ``ceiling``."""
        last = self.last_attempt(udid)
        if last is None or last.result not in (SKIPPED, FAILED) or last.ended is None or last.reason == STOPPED:
            return None
        return last.ended + backoff(self.unsuccessful_in_a_row(udid), base, ceiling)

    @staticmethod
    def _attempt(row: tuple) -> Attempt:
        result, reason = row[7], row[8]
        started: float = row[5]  # NOT NULL
        if result == RUNNING and not pid_alive(row[13] or 0):
            result, reason = FAILED, INTERRUPTED  # the agent died; the next one will record it so
        return Attempt(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            to_time(started),
            to_time(row[6]),
            result,
            reason,
            row[9],
            row[10],
            row[11],
            row[12],
        )

    # ---- devices ------------------------------------------------------------------------------

    def _ensure(self, db: sqlite3.Connection, udid: str, name: str | None) -> None:
        db.execute(
            "INSERT INTO devices (udid, name, first_seen) VALUES (?, ?, ?) ON CONFLICT(udid) DO UPDATE SET "
            "name=COALESCE(excluded.name, devices.name)",
            (udid, name, time.time()),
        )

    def seen(self, udid: str, name: str | None, connection: str | None) -> None:
        with self._tx() as db:
            self._ensure(db, udid, name)
            db.execute("UPDATE devices SET last_seen=?, connection=? WHERE udid=?", (time.time(), connection, udid))

    def set_waiting(self, udid: str, why: str | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE devices SET waiting=? WHERE udid=?", (why, udid))

    def gone(self, udid: str) -> None:
        self.set_waiting(udid, None)
        with self._tx() as db:
            db.execute("UPDATE devices SET connection=NULL WHERE udid=?", (udid,))

    def device(self, udid: str) -> DeviceRecord | None:
        row = self._db.execute(
            "SELECT udid, name, first_seen, last_seen, connection, last_success, last_snapshot, "
            "waiting FROM devices WHERE upper(udid)=upper(?)",
            (udid,),
        ).fetchone()
        return None if row is None else self._device(row)

    def devices(self) -> list[DeviceRecord]:
        rows = self._db.execute(
            "SELECT udid, name, first_seen, last_seen, connection, last_success, last_snapshot, "
            "waiting FROM devices ORDER BY name, udid"
        ).fetchall()
        return [self._device(r) for r in rows]

    @staticmethod
    def _device(row: tuple) -> DeviceRecord:
        return DeviceRecord(row[0], row[1], to_time(row[2]), to_time(row[3]), row[4], to_time(row[5]), row[6], row[7])

    # ---- notices and maintenance --------------------------------------------------------------

    def notice_due(self, key: str, every: float | None) -> bool:
        """Whether the notice ``key`` may be sent now (never sent, or last sent ``every``
        seconds ago or more; ``every=None``: only once until cleared), and if so record it."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT sent FROM notices WHERE key=?", (key,)).fetchone()
            if row is not None and (every is None or now - row[0] < every):
                return False
            db.execute("INSERT OR REPLACE INTO notices (key, sent) VALUES (?, ?)", (key, now))
            return True

    def clear_notice(self, key: str) -> bool:
        """Forget a notice (the condition ended); whether it had been sent."""
        with self._tx() as db:
            return db.execute("DELETE FROM notices WHERE key=?", (key,)).rowcount > 0

    def begin_maintenance(self, repository: str, kind: str) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO maintenance (repository, kind, started, result) VALUES (?, ?, ?, ?)",
                (repository, kind, time.time(), RUNNING),
            )
            return int(cur.lastrowid or 0)

    def end_maintenance(self, run: int, result: str, detail: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE maintenance SET ended=?, result=?, detail=? WHERE id=?", (time.time(), result, detail, run)
            )

    def last_maintenance(self, repository: str, kind: str, *, result: str | None = OK) -> datetime | None:
        query = "SELECT MAX(started) FROM maintenance WHERE repository=? AND kind=?"
        args: tuple[Any, ...] = (repository, kind)
        if result is not None:
            query += " AND result=?"
            args += (result,)
        return to_time(self._db.execute(query, args).fetchone()[0])

    def maintenance(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT repository, kind, started, ended, result, detail FROM maintenance ORDER BY started DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            {
                "repository": r[0],
                "kind": r[1],
                "started": _iso(to_time(r[2])),
                "ended": _iso(to_time(r[3])),
                "result": r[4],
                "detail": r[5],
            }
            for r in rows
        ]

    # ---- the agent itself ---------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM agent WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, value: str | None) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO agent (key, value) VALUES (?, ?)", (key, value))
