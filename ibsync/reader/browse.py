"""One snapshot as the phone's things: domains and apps, folders and files by their real names.

The shared browsing layer of the web app, ``ibsync mount`` and ``ibsync export``. Manifest.db
has indexes on domain, relativePath and flags only, so listing a folder's direct children
straight from it means scanning every row below the folder. Instead, on first need, one pass
over Manifest.db builds a compact sqlite index: one row per usable Manifest.db row plus the
folders that rows imply, keyed by full path (so a subtree is one range, in path order), with an
index on (parent folder, folders first, path) so that a page of a folder, a stat and a count are
index lookups. A plaintext backup's index is kept in the cache beside its Manifest.db (reopened
in under a millisecond); an encrypted backup's is a private temporary file, deleted on close,
like its decrypted Manifest.db. docs/design.md §20 gives its costs.

Paths are ``""`` (the snapshot's top), ``"Domain"`` or ``"Domain/relative/path"``; they are
only ever looked up, never joined to a local path. Rows that cannot be used (``BadRow``: types
that lie, an unreadable MBFile, a name that is empty, ``.``, ``..``, holds a NUL or is not
UTF-8) are left out and listed in ``bad_rows``.
"""

from __future__ import annotations

import builtins
import os
import plistlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotFound, UserError
from ..model import Snapshot
from ..repo.repository import Repository
from .apps import GROUPS, AppInfo, build_apps, describe
from .files import read_file_bytes
from .manifest import BadRow, SnapshotManifest, evaluate
from .manifest_cache import ManifestCache, touch, unlink_quietly

__all__ = ["AppInfo", "DomainSummary", "Item", "NotAFolder", "SnapshotView"]

DIR, FILE, SYMLINK = 0, 1, 2
_KINDS = ("dir", "file", "symlink")
_KIND_NUMBER = {"dir": DIR, "file": FILE, "symlink": SYMLINK}
IMPLIED_DIR_MODE = 0o755
_BATCH = 5_000


@dataclass(frozen=True)
class Item:
    path: str  # "" (the snapshot's top), "Domain", or "Domain/relative/path"
    name: str  # last component (the domain itself at the top level)
    kind: str  # "dir" | "file" | "symlink"
    size: int  # bytes (0 for folders)
    mtime: int  # seconds since the epoch (MBFile LastModified; 0 if unknown)
    mode: int  # permission bits (e.g. 0o644)
    file_id: str | None  # Manifest.db fileID of the row (None for implied folders)


@dataclass(frozen=True)
class DomainSummary:
    name: str  # the domain, e.g. "CameraRollDomain"
    title: str  # what a person reads: the app's name, "Camera Roll", "Home", ...
    group: str  # "Apps" | "Photos & media" | "Messages & home" | "System"
    app: AppInfo | None
    files: int
    bytes: int


class NotAFolder(UserError):
    """list() of a path that is a file or a symlink."""


def _name_ok(name: str) -> bool:
    return name not in ("", ".", "..") and "\0" not in name


def _path_problem(domain: str, rel: str) -> str | None:
    """Why a row's domain and path cannot name an item, or None."""
    if not _name_ok(domain) or "/" in domain or (rel and not all(map(_name_ok, rel.split("/")))):
        return "its path has an empty, '.', '..' or NUL name"
    try:
        domain.encode()
        rel.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept by the manifest's text factory
        return "its path is not valid UTF-8"
    return None


def _split(path: str) -> tuple[str, str]:
    """(parent path, name) of a path other than ""."""
    head, sep, tail = path.rpartition("/")
    return (head, tail) if sep else ("", path)


INDEX_VERSION = 1  # of the table layout below: a cached index of another version is rebuilt
_SCHEMA = (
    "CREATE TABLE nodes(path TEXT PRIMARY KEY, parent INTEGER NOT NULL, leaf INTEGER NOT NULL,"
    " kind INTEGER NOT NULL, size INTEGER NOT NULL, mtime INTEGER NOT NULL, mode INTEGER NOT NULL,"
    " file_id TEXT, folder INTEGER, fold TEXT) WITHOUT ROWID;"
    "CREATE TABLE domains(name TEXT PRIMARY KEY, files INTEGER, bytes INTEGER) WITHOUT ROWID;"
    "CREATE TABLE bad(path BLOB, file_id BLOB, reason BLOB);"
)


def _connect(path: str, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        # immutable: a cached index is renamed into place whole and never written again
        db = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro&immutable=1", uri=True, check_same_thread=False)
    else:
        db = sqlite3.connect(path, check_same_thread=False)  # "": a private temp file, gone on close
    db.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
    return db


class _Index:
    """The compact table ``nodes``: per item its full path (the key), its parent folder's number
    (``folders``: path -> number, 0 for the top), ``leaf`` (0 for folders: they list first),
    kind, size, mtime, mode, fileID, its own number when it is a folder, and ``fold``: the
    casefolded path where it is not ASCII. ``domains`` holds each domain's file count and
    bytes, ``bad`` the rows left out."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.folders: dict[str, int] = {}  # path -> number, only while building

    @classmethod
    def build(
        cls, manifest: SnapshotManifest, path: str = "", progress: Callable[[int, int], None] | None = None
    ) -> _Index:
        """Build the index of ``manifest`` into the database file ``path`` ("": a private
        temporary file)."""
        db = _connect(path, read_only=False)
        try:
            db.executescript(
                "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -65536;"
                "PRAGMA temp_store = FILE;" + _SCHEMA
            )
            index = cls(db)
            index.folders[""] = 0
            index._build(manifest, progress)
            db.execute(f"PRAGMA user_version = {INDEX_VERSION}")
        except BaseException:
            db.close()
            raise
        index.folders = {}
        return index

    @classmethod
    def load(cls, path: Path, manifest: SnapshotManifest | _Discard) -> _Index | None:
        """A cached index, its left-out rows noted in ``manifest``; None when it cannot be used."""
        try:
            db = _connect(str(path), read_only=True)
        except (sqlite3.Error, OSError):
            return None
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] != INDEX_VERSION:
                db.close()
                return None
            for row in db.execute("SELECT path, file_id, reason FROM bad ORDER BY rowid"):
                manifest.record(BadRow(*(bytes(x).decode("utf-8", "surrogateescape") for x in row)))
        except sqlite3.Error:
            db.close()
            return None
        return cls(db)

    def _folder(self, path: str, pending: list) -> int:
        """The number of folder ``path``, adding it and its missing ancestors as implied folders."""
        known = self.folders.get(path)
        if known is not None:
            return known
        missing = [path]  # a loop, not recursion: a hostile path may be thousands of folders deep
        while True:
            parent_path = _split(missing[-1])[0]
            parent = self.folders.get(parent_path)
            if parent is not None:
                break
            missing.append(parent_path)
        for p in reversed(missing):
            number = self.folders[p] = len(self.folders)
            pending.append((p, parent, 0, DIR, 0, 0, IMPLIED_DIR_MODE, None, number, None))
            parent = number
        return number

    def _build(self, manifest: SnapshotManifest, progress: Callable[[int, int], None] | None) -> None:
        db = self.db
        batch: list[tuple] = []
        implied: list[tuple] = []
        upsert = "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        # the MBFile is only decoded where its fields are shown (all rows: size, time, mode);
        # not in path order: a sort of every row with its blob would cost more than the dict
        total = next(manifest._rows("SELECT count(*) FROM Files"))[0] if progress is not None else 0
        rows = manifest._rows("SELECT fileID, domain, relativePath, flags, file FROM Files")
        with db:
            for done, row in enumerate(rows, 1):
                if progress is not None and done % _BATCH == 0:
                    progress(done, total)
                e = evaluate(row, None, None)
                if e is None:
                    continue
                if isinstance(e, BadRow):
                    self._bad(manifest, e)
                    continue
                domain, rel = e.domain, e.relative_path
                problem = _path_problem(domain, rel)
                if problem is not None:
                    self._bad(manifest, BadRow(e.path, e.file_id, problem))
                    continue
                kind = _KIND_NUMBER[e.kind]
                path = e.path
                parent_path, _ = _split(path)
                parent = self._folder(parent_path, implied)
                mode = e.mode & 0o7777
                # search folds case in SQL with lower(), which knows ASCII only: other paths keep
                # their casefolded form beside them
                fold = None if path.isascii() else path.casefold()
                if kind == DIR:
                    number = self.folders.get(path)
                    if number is None:
                        number = self.folders[path] = len(self.folders)
                    # a folder row replaces the implied folder (or a file row of the same path)
                    batch.append((path, parent, 0, DIR, 0, e.mtime, mode, e.file_id, number, fold))
                else:
                    if path in self.folders:
                        continue  # a folder of this path is there (a row or implied): it wins
                    batch.append(
                        (path, parent, 1, kind, e.size if kind == FILE else 0, e.mtime, mode, e.file_id, None, fold)
                    )
                if implied:  # before the row: a later folder row of the same path replaces them
                    db.executemany("INSERT OR IGNORE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", implied)
                    implied.clear()
                if len(batch) >= _BATCH:
                    self._flush(batch, upsert)
            self._flush(batch, upsert)
            # a file row met before rows below it: the folder its children need wins (an
            # implied one), and the file no longer counts in its domain
            db.execute("CREATE TEMP TABLE folder_paths(path TEXT PRIMARY KEY, number INTEGER) WITHOUT ROWID")
            db.executemany("INSERT INTO folder_paths VALUES (?, ?)", ((p, n) for p, n in self.folders.items() if p))
            clashes = db.execute(
                "SELECT n.path, n.kind, n.size, f.number FROM folder_paths f JOIN nodes n "
                "ON n.path = f.path WHERE n.kind <> 0"
            ).fetchall()
            for path, _kind, _size, number in clashes:
                db.execute(
                    "UPDATE nodes SET leaf = 0, kind = 0, size = 0, mtime = 0, file_id = NULL, folder = ?,"
                    " mode = ? WHERE path = ?",
                    (number, IMPLIED_DIR_MODE, path),
                )
            db.execute("DROP TABLE folder_paths")
            # counted from what the index holds (duplicates and clashes resolved): one scan
            db.execute(
                "INSERT INTO domains SELECT substr(path, 1, instr(path || '/', '/') - 1) AS d, "
                "sum(kind = 1), sum(CASE WHEN kind = 1 THEN size ELSE 0 END) FROM nodes GROUP BY d"
            )
            db.execute("CREATE INDEX children ON nodes(parent, leaf, path)")
            db.execute("CREATE INDEX folded ON nodes(path) WHERE fold IS NOT NULL")
        if progress is not None:
            progress(total, total)

    def _bad(self, manifest: SnapshotManifest, bad: BadRow) -> None:
        manifest.record(bad)
        # as bytes: a name that is not UTF-8 comes back exactly (surrogateescape both ways)
        self.db.execute(
            "INSERT INTO bad VALUES (?, ?, ?)",
            tuple(x.encode("utf-8", "surrogateescape") for x in (bad.path, bad.file_id, bad.reason)),
        )

    def _flush(self, batch: list, sql: str) -> None:
        # a file row is only written where no folder of its path is: a duplicate file row keeps the first
        files = [r for r in batch if r[2]]
        dirs = [r for r in batch if not r[2]]
        if dirs:
            self.db.executemany(sql, dirs)
        if files:
            self.db.executemany("INSERT OR IGNORE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", files)
        batch.clear()

    def close(self) -> None:
        self.db.close()


_COLUMNS = "path, kind, size, mtime, mode, file_id"


def _item(row: tuple) -> Item:
    path, kind, size, mtime, mode, file_id = row
    return Item(path, path.rpartition("/")[2], _KINDS[kind], size, mtime, mode, file_id)


def _after(prefix: str) -> str:
    """The smallest text above every ``prefix + "/" + ...``: ``/`` is followed by ``0``."""
    return prefix + "0"


class SnapshotView:
    """One snapshot as the phone's things (a context manager; wraps ``SnapshotManifest``).
    Safe to share between threads: queries take turns on one lock."""

    def __init__(
        self, repo: Repository, snapshot: Snapshot, keyring=None, *, cache: ManifestCache | None = None
    ) -> None:
        self.repo = repo
        self.snapshot = snapshot
        self.manifest = SnapshotManifest(repo, snapshot, keyring, cache=cache)
        self._cache = cache
        self._lock = threading.RLock()
        self._index: _Index | None = None
        self._apps: dict[str, AppInfo] | None = None

    def __enter__(self) -> SnapshotView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
                self._index = None
            self.manifest.close()

    @property
    def bad_rows(self) -> list[BadRow]:
        """Rows left out so far (after the index is built: all of them)."""
        return self.manifest.bad_rows

    # ---- the index -----------------------------------------------------------------------

    def _db(self, progress: Callable[[int, int], None] | None = None) -> sqlite3.Connection:
        if self._index is None:
            self._index = self._open_index(progress)
        return self._index.db

    def _open_index(self, progress: Callable[[int, int], None] | None) -> _Index:
        """The cached index of this Manifest.db, or one built now (and cached). Only plaintext
        backups are cached, beside their cached Manifest.db: an encrypted backup's names are
        never kept, its index is a temporary file."""
        folder = self._cache_folder()
        if folder is None:
            return _Index.build(self.manifest, "", progress)
        final = folder / f"{self.manifest.stored.key}.v{INDEX_VERSION}.db"
        index = _Index.load(final, self.manifest) if final.exists() else None
        if index is not None:
            touch(final)
            return index
        tmp = folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        try:
            index = _Index.build(self.manifest, str(tmp), progress)
        except (sqlite3.Error, OSError):  # the cache's disk (full, read-only): a private index instead
            unlink_quietly(tmp)
            return _Index.build(self.manifest, "", progress)
        except BaseException:
            unlink_quietly(tmp)
            raise
        try:
            index.db.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:  # whole on disk before it has its name: a crash leaves no torn index to trust
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            loaded = _Index.load(final, _Discard())
        except OSError:
            loaded = None
        if loaded is None:  # the cache cannot be written or read back: build a private one
            unlink_quietly(tmp)
            return _Index.build(self.manifest, "", progress)
        _evict(folder, keep=final.name)
        return loaded

    def _cache_folder(self) -> Path | None:
        if self._cache is None or self.manifest.keys is not None or getattr(self.manifest, "stored", None) is None:
            return None
        folder = self._cache.folder.parent / "browse"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(folder, follow_symlinks=False)
            if not os.path.isdir(folder) or os.path.islink(folder):
                return None
            if hasattr(os, "getuid") and st.st_uid != os.getuid():
                return None
            if st.st_mode & 0o077:
                os.chmod(folder, 0o700)
        except OSError:
            return None
        return folder

    def prepare(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Build the index now (otherwise the first question builds it); ``progress(rows
        done, rows in all)`` is called every few thousand rows, from this thread."""
        with self._lock:
            self._db(progress)

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db().execute(sql, params).fetchall()

    # ---- domains and apps ------------------------------------------------------------------

    def _plist(self, name: str) -> dict:
        node = next((n for n in self.repo.load_tree(self.snapshot.tree) if n.name == name), None)
        if node is None or node.type != "file":
            return {}
        try:
            got = plistlib.loads(read_file_bytes(self.repo, node))
        except Exception:  # the backup's own plist: unreadable costs only the app names
            return {}
        return got if isinstance(got, dict) else {}

    def _app_map(self) -> dict[str, AppInfo]:
        with self._lock:
            if self._apps is None:
                domains = [r[0] for r in self._query("SELECT name FROM domains")]
                self._apps = build_apps(self._plist("Manifest.plist"), self._plist("Info.plist"), domains)
            return self._apps

    def apps(self) -> list[AppInfo]:
        """Every app the backup names, by name."""
        return sorted(self._app_map().values(), key=lambda a: (a.name.casefold(), a.bundle_id))

    def domains(self) -> list[DomainSummary]:
        """Every domain, sorted by group (in ``GROUPS`` order), then title."""
        apps = self._app_map()
        by_domain = {d: a for a in apps.values() for d in a.domains}
        out = []
        for name, files, size in self._query("SELECT name, files, bytes FROM domains"):
            app = by_domain.get(name)
            title, group = describe(name, app)
            out.append(DomainSummary(name, title, group, app, files, size))
        out.sort(key=lambda d: (GROUPS.index(d.group), d.title.casefold(), d.name))
        return out

    # ---- folders and files -----------------------------------------------------------------

    def stat(self, path: str) -> Item | None:
        """The item at ``path`` ("" and domains are folders), None when there is none."""
        path = path.strip("/")
        if path == "":
            return Item("", "", "dir", 0, 0, IMPLIED_DIR_MODE, None)
        rows = self._query(f"SELECT {_COLUMNS} FROM nodes WHERE path = ?", (path,))
        return _item(rows[0]) if rows else None

    def _folder_number(self, path: str) -> int:
        path = path.strip("/")
        if path == "":
            return 0
        rows = self._query("SELECT kind, folder FROM nodes WHERE path = ?", (path,))
        if not rows:
            raise NotFound(f"snapshot {self.snapshot.short_id} has nothing at {path}")
        if rows[0][0] != DIR:
            raise NotAFolder(f"{path} in snapshot {self.snapshot.short_id} is a {_KINDS[rows[0][0]]}, not a folder")
        return rows[0][1]

    def list(self, path: str, *, offset: int = 0, limit: int | None = None) -> list[Item]:
        """The children of a folder: folders first, then by name. NotFound for a missing path,
        NotAFolder (a UserError) for a file."""
        with self._lock:
            number = self._folder_number(path)
            rows = self._query(
                f"SELECT {_COLUMNS} FROM nodes WHERE parent = ? ORDER BY parent, leaf, path LIMIT ? OFFSET ?",
                (number, -1 if limit is None else max(limit, 0), max(offset, 0)),
            )
        return [_item(r) for r in rows]

    def count(self, path: str) -> int:
        """The number of children of a folder (for paging)."""
        with self._lock:
            number = self._folder_number(path)
            return self._query("SELECT count(*) FROM nodes WHERE parent = ?", (number,))[0][0]

    def walk(self, path: str) -> Iterator[Item]:
        """Every file and symlink at or below ``path``, in path order (read in pages: the
        lock is not held between them)."""
        path = path.strip("/")
        if path:
            top = self.stat(path)
            if top is None:
                raise NotFound(f"snapshot {self.snapshot.short_id} has nothing at {path}")
            if top.kind != "dir":
                yield top
                return
            low, high = path + "/", _after(path)
        else:
            low, high = "", None
        while True:
            sql = f"SELECT {_COLUMNS} FROM nodes WHERE path > ? AND leaf = 1"
            params: tuple = (low,)
            if high is not None:
                sql += " AND path < ?"
                params += (high,)
            rows = self._query(sql + " ORDER BY path LIMIT 1000", params)
            for r in rows:
                yield _item(r)
            if len(rows) < 1000:
                return
            low = rows[-1][0]

    def search(self, text: str, *, limit: int = 200) -> builtins.list[Item]:
        """Files and folders with rows whose ``Domain/relative/path`` holds ``text`` (any
        case), the first ``limit`` in path order."""
        if not text or limit <= 0:
            return []
        needle = text.casefold()
        if not needle.isascii():  # only a path that is not ASCII can hold it: those have their own index
            rows = self._query(
                f"SELECT {_COLUMNS} FROM nodes INDEXED BY folded WHERE fold IS NOT NULL "
                "AND file_id IS NOT NULL AND instr(fold, ?) > 0 ORDER BY path LIMIT ?",
                (needle, limit),
            )
            return [_item(r) for r in rows]
        # an ASCII path (no 'fold') folds as LIKE does, which is the fastest test sqlite has;
        # the others are compared casefolded
        like = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._query(
            f"SELECT {_COLUMNS} FROM nodes WHERE file_id IS NOT NULL AND CASE WHEN fold IS NULL "
            "THEN path LIKE ? ESCAPE '\\' ELSE instr(fold, ?) > 0 END ORDER BY path LIMIT ?",
            (like, needle, limit),
        )
        return [_item(r) for r in rows]

    def link_target(self, item: Item) -> str:
        """Where a symbolic link of the backup points ("" when it records none)."""
        if item.kind != "symlink" or item.file_id is None:
            raise UserError(f"{item.path} is a {item.kind}, not a symbolic link")
        with self._lock:
            return self.manifest.link_target(item.file_id)

    def open(self, item: Item) -> Iterator[bytes]:
        """A file's content as the device had it: verified, decrypted for an encrypted iOS backup."""
        if item.kind != "file" or item.file_id is None:
            raise UserError(f"{item.path} is a {item.kind}, not a file")
        with self._lock:
            entry = self.manifest.entry(item.file_id)
            node = self.manifest.payload(item.file_id) if entry is not None else None
        if entry is None:
            raise NotFound(f"snapshot {self.snapshot.short_id} has no row {item.file_id} ({item.path})")
        if node is None:
            raise NotFound(
                f"snapshot {self.snapshot.short_id} holds no payload for {item.path} "
                f"({item.file_id[:2]}/{item.file_id} is missing)"
            )
        return self.manifest.read(entry, node)


# ---- the cache of indexes ---------------------------------------------------------------------
#
# <cache>/<repository id>/browse/<Manifest.db key>.v<INDEX_VERSION>.db: an index is written to a
# temporary name and renamed into place once complete, so a reader sees a whole one or none; the
# most recently used CACHED_INDEXES are kept.

CACHED_INDEXES = 4
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600


class _Discard:
    """A stand-in manifest for reading back an index just built (its rows are noted already)."""

    def record(self, bad: BadRow) -> None:
        pass


def _evict(folder: Path, keep: str) -> None:
    """Keep the CACHED_INDEXES most recently used indexes; drop temporary files of killed builds."""
    now = time.time()
    found: list[tuple[float, Path]] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if e.name.startswith(TEMP_PREFIX):
            if now - st.st_mtime > STALE_TEMP_SECONDS:
                unlink_quietly(Path(e.path))
        elif e.name.endswith(".db") and e.name != keep:
            found.append((st.st_mtime, Path(e.path)))
    found.sort(reverse=True)
    for _, path in found[CACHED_INDEXES - 1 :]:
        unlink_quietly(path)
