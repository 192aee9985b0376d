"""``find``: which snapshots hold the files matching a pattern, and when each one changed.

Each device is followed from snapshot to snapshot (``history.DeviceHistory``); every matching
path's versions go to a private temporary sqlite database rather than to memory: a year of
snapshots of a phone where the pattern matches most files is paths x snapshots versions.
``find_history`` returns a ``FindResult`` that lists them path by path, one path's versions in
memory at a time.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..errors import NameNotFound
from ..model import Snapshot, utc_iso
from ..repo.repository import Repository
from .history import DeviceHistory, Holding
from .ios_crypto import BackupKeyring
from .manifest import BadRow
from .manifest_cache import ManifestCache
from .paths import PathPattern

# first: in the device's first snapshot; new: appeared later; changed: other content than in the
# device's previous snapshot; unchanged; removed: gone from that snapshot on
STATUSES = ("first", "new", "changed", "unchanged", "removed")


@dataclass(frozen=True)
class Version:
    """One snapshot's state of one path. ``size`` and ``mtime`` are None when ``removed``."""

    snapshot: Snapshot
    size: int | None
    mtime: str | None  # the row's modification time, ISO 8601 in UTC (``utc_iso``)
    status: str  # one of STATUSES


@dataclass(frozen=True)
class PathHistory:
    """One device's path and its versions, oldest snapshot first."""

    udid: str
    device_name: str | None
    domain: str
    relative_path: str
    versions: list[Version]

    @property
    def path(self) -> str:
        return f"{self.domain}/{self.relative_path}"


@dataclass(frozen=True)
class FindCounts:
    paths: int
    devices: int
    versions: int


@dataclass
class FindResult:
    """What ``find_history`` found; close it (or use ``with``) to remove its database."""

    pattern: str
    snapshots: int  # how many snapshots were looked at
    bad: list[tuple[Snapshot, BadRow]] = field(default_factory=list)  # rows that could not be used
    _db: _HistoryDB | None = None

    def __enter__(self) -> FindResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def counts(self) -> FindCounts:
        assert self._db is not None, "FindResult used after close"
        return self._db.counts()

    def paths(self) -> Iterator[PathHistory]:
        """Each path by device (UDID), domain and relative path in code point order."""
        assert self._db is not None, "FindResult used after close"
        return self._db.paths()


def find_history(
    repo: Repository,
    pattern: str,
    *,
    device: str | None = None,
    keyring: BackupKeyring | None = None,
    cache: ManifestCache | None = None,
) -> FindResult:
    """Follow every snapshot (of ``device``, a UDID or name, if given) oldest first and record
    each version of each path matching ``pattern`` (a ``PathPattern`` glob)."""
    pat = PathPattern(pattern)
    snaps = repo.snapshots()
    if device:
        snaps = [s for s in snaps if s.of_device(device)]
        if not snaps:
            raise NameNotFound(f"no snapshot of a device '{device}'")
    result = FindResult(pattern, len(snaps), _db=_HistoryDB())
    earlier: set[str] = set()  # devices with a snapshot already looked at
    followed: dict[str, DeviceHistory] = {}  # each device's rows, followed from snapshot to snapshot
    try:
        try:
            for snap in snaps:
                udid = snap.device.udid
                follow = followed.get(udid)
                if follow is None:
                    follow = followed[udid] = DeviceHistory(repo, pat, keyring, cache)
                holding = follow.step(snap)
                result._db.record(holding, snap, udid in earlier)  # type: ignore[union-attr]
                result.bad += [(snap, b) for b in holding.bad]
                earlier.add(udid)
        finally:
            for follow in followed.values():
                follow.close()
    except BaseException:
        result.close()
        raise
    return result


class _HistoryDB:
    """Each matching path's versions in a private temporary sqlite database. Names are stored as
    UTF-32-BE (surrogates passed through), whose byte order is the code point order Python sorts
    ``str`` by, so ``ORDER BY`` lists paths exactly as sorting them in Python would."""

    def __init__(self) -> None:
        self.db = sqlite3.connect("")  # "": a private temporary file, removed on close
        self.db.executescript(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
            "CREATE TABLE paths(id INTEGER PRIMARY KEY, device BLOB, domain BLOB, rel BLOB, name BLOB,"
            " last BLOB, present INTEGER, seen INTEGER, UNIQUE(device, domain, rel));"
            "CREATE TABLE versions(path INTEGER, snap INTEGER, size INTEGER, mtime TEXT, status TEXT);"
        )
        self.snaps: list[Snapshot] = []  # by the number versions refer to them with

    def close(self) -> None:
        self.db.close()

    def record(self, holding: Holding, snap: Snapshot, seen_device: bool) -> None:
        """Add one snapshot's rows to each path's history: first, new, changed, unchanged, or
        removed (a path the device's previous snapshot held and this one does not)."""
        n = len(self.snaps)
        self.snaps.append(snap)
        udid = _u32(snap.device.udid)
        db = self.db
        with db:
            for e, content in holding.entries:
                key = (udid, _u32(e.domain), _u32(e.relative_path))
                last = _content_key(content)
                got = db.execute(
                    "SELECT id, last, present FROM paths WHERE device = ? AND domain = ? AND rel = ?", key
                ).fetchone()
                if got is None:
                    pid = db.execute(
                        "INSERT INTO paths(device, domain, rel, name, last, present, seen) "
                        "VALUES (?, ?, ?, ?, ?, 1, ?)",
                        key + (_u32(snap.device.name), last, n),
                    ).lastrowid
                    status = "new" if seen_device else "first"
                else:
                    pid = got[0]
                    if not got[2]:
                        status = "new" if seen_device else "first"
                    else:
                        status = "changed" if last != got[1] else "unchanged"
                    db.execute("UPDATE paths SET last = ?, present = 1, seen = ? WHERE id = ?", (last, n, pid))
                db.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?)",
                    (pid, n, e.size, utc_iso(datetime.fromtimestamp(e.mtime, UTC)), status),
                )
            gone = "FROM paths WHERE device = ? AND present = 1 AND seen <> ?"
            db.execute(f"INSERT INTO versions SELECT id, ?, NULL, NULL, 'removed' {gone} ORDER BY id", (n, udid, n))
            db.execute(f"UPDATE paths SET present = 0 WHERE id IN (SELECT id {gone})", (udid, n))

    def counts(self) -> FindCounts:
        paths, devices = self.db.execute("SELECT count(*), count(DISTINCT device) FROM paths").fetchone()
        return FindCounts(paths, devices, self.db.execute("SELECT count(*) FROM versions").fetchone()[0])

    def paths(self) -> Iterator[PathHistory]:
        rows = self.db.execute(
            "SELECT p.id, p.device, p.name, p.domain, p.rel, v.snap, v.size, v.mtime, v.status "
            "FROM paths p JOIN versions v ON v.path = p.id ORDER BY p.device, p.domain, p.rel, p.id, v.rowid"
        )
        current: int | None = None
        head: tuple[str, str | None, str, str] = ("", None, "", "")
        versions: list[Version] = []
        for pid, device, name, domain, rel, n, size_, mtime, status in rows:
            if pid != current:
                if current is not None:
                    yield PathHistory(*head, versions)
                current, versions = pid, []
                head = (_from_u32(device) or "", _from_u32(name), _from_u32(domain) or "", _from_u32(rel) or "")
            versions.append(Version(self.snaps[n], size_, mtime, status))
        if current is not None:
            yield PathHistory(*head, versions)


def _u32(text: str | None) -> bytes | None:
    return None if text is None else text.encode("utf-32-be", "surrogatepass")


def _from_u32(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-32-be", "surrogatepass")


def _content_key(content: object) -> bytes | None:
    """A short digest standing for a payload's content (blob ids and size): only compared."""
    if content is None:
        return None
    return hashlib.blake2b(repr(content).encode("utf-8", "surrogatepass"), digest_size=16).digest()
