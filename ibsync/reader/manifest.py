"""A snapshot's Manifest.db: iOS paths (``Domain/relative/path``) and where their payloads are.

A device folder names each file by ``fileID = sha1(domain + "-" + relativePath)`` and stores it
at ``<fileID[:2]>/<fileID>``; its Manifest.db ``Files`` table maps the ids back to domains and
paths, with an NSKeyedArchiver ``MBFile`` per row (size, times, mode and, in encrypted backups,
the file's wrapped key). :class:`SnapshotManifest` rehydrates a snapshot's Manifest.db into a
temporary file (decrypting it for an encrypted iOS backup), opens it read-only, and maps each
``fileID`` to the payload's node in the snapshot's ``xx/`` sub-trees.
"""

from __future__ import annotations

import os
import plistlib
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import InvalidData, UserError
from ..model import Node, Snapshot
from ..repo.repository import Repository
from .files import read_file, read_file_bytes
from .ios_crypto import BackupKeyring, BackupKeys
from .mbfile import _KIND_OF_FLAGS, ManifestEntry, decode_mbfile, kind_of
from .paths import PathPattern, entry_path


@dataclass(frozen=True)
class BadRow:
    """A Manifest.db row that cannot be used: its types lie or its MBFile is unreadable."""

    path: str  # Domain/relative/path as far as the row spells it (raw: escape before printing)
    file_id: str
    reason: str


@dataclass
class DomainStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0


class SnapshotManifest:
    """A snapshot's Manifest.db opened read-only, and its payloads by file id. Use as a context
    manager: the rehydrated database is a temporary file, removed on close."""

    def __init__(self, repo: Repository, snapshot: Snapshot, keyring: BackupKeyring | None = None) -> None:
        self.repo = repo
        self.snapshot = snapshot
        self.keys: BackupKeys | None = None
        self._con: sqlite3.Connection | None = None
        self._path: str | None = None
        root = repo.load_tree(snapshot.tree)
        self._root = {n.name: n for n in root}
        self._dirs = {n.name: n for n in root if n.type == "dir" and len(n.name) == 2}
        self._payloads: dict[str, dict[str, Node]] = {}
        self._bad: dict[tuple[str, str, str], BadRow] = {}  # rows met so far that cannot be used
        db = self._root.get("Manifest.db")
        if db is None or db.type != "file":
            raise UserError(
                f"snapshot {snapshot.short_id} has no Manifest.db: browsing needs an iOS 10 or later backup"
            )
        chunks: Iterable[bytes] = read_file(repo, db)
        if snapshot.ios_encrypted:
            if keyring is None:
                raise UserError(f"snapshot {snapshot.short_id} is an encrypted iOS backup: its password is needed")
            plist_node = self._root.get("Manifest.plist")
            if plist_node is None or plist_node.type != "file":
                raise InvalidData(f"snapshot {snapshot.short_id} has no Manifest.plist")
            try:
                plist = plistlib.loads(read_file_bytes(repo, plist_node))
            except plistlib.InvalidFileException as e:
                raise InvalidData(f"snapshot {snapshot.short_id}: Manifest.plist does not parse ({e})") from None
            manifest_key = plist.get("ManifestKey")
            if not isinstance(manifest_key, bytes):
                raise InvalidData(f"snapshot {snapshot.short_id}: the encrypted backup's Manifest.plist has no ManifestKey")
            self.keys = keyring.keys_for(plist)
            chunks = self.keys.decrypt_database(chunks, manifest_key)
        fd, self._path = tempfile.mkstemp(prefix="ibsync-manifest-", suffix=".db")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            uri = Path(self._path).absolute().as_uri() + "?mode=ro&immutable=1"
            self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
            # a name that is not UTF-8 must not fail the whole query: keep its bytes (an extracted
            # file gets them back as its name), and escape them where they are printed
            self._con.text_factory = _text
            try:
                self._con.execute("SELECT fileID, domain, relativePath, flags, file FROM Files LIMIT 1").fetchall()
            except sqlite3.DatabaseError as e:
                what = "does not decrypt to a database" if snapshot.ios_encrypted else "is not a readable database"
                raise InvalidData(f"snapshot {snapshot.short_id}: Manifest.db {what} ({e})") from None
            try:  # the open connection keeps it readable; nothing is left behind if we are killed
                os.unlink(self._path)
                self._path = None
            except OSError:
                pass  # Windows: removed on close
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "SnapshotManifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path = None

    # ---- rows ------------------------------------------------------------------------------
    #
    # Every column is checked before use: Manifest.db is input, and a row whose types lie, or
    # whose MBFile does not decode, is recorded in ``bad_rows`` and skipped, so that one odd row
    # costs that row, not the command.

    @property
    def bad_rows(self) -> list[BadRow]:
        """Rows met so far that could not be used, in the order met."""
        return list(self._bad.values())

    def _rows(self, sql: str, params: tuple = ()) -> Iterator[tuple]:
        """The rows of a query; a database that breaks under it is one clear error."""
        assert self._con is not None, "manifest is closed"
        try:
            # not 'yield from': closing this generator would close the cursor too, which raises
            # once the connection is closed (a merge left suspended when the other side failed)
            for row in self._con.execute(sql, params):
                yield row
        except sqlite3.DatabaseError as e:
            raise InvalidData(f"snapshot {self.snapshot.short_id}: its Manifest.db is damaged ({e})") from None

    def _query(self, sql: str, pattern: PathPattern | None, extra: str = "") -> Iterator[tuple]:
        if pattern is not None and pattern.domain is not None:
            return self._rows(f"{sql} WHERE domain = ? {extra}", (pattern.domain,))
        return self._rows(f"{sql} {extra}")

    def _reject(self, row: tuple, reason: str) -> None:
        bad = BadRow(_row_path(row[1], row[2]), _as_text(row[0]), reason)
        self._bad.setdefault((bad.path, bad.file_id, bad.reason), bad)

    def _entry(self, row: tuple, pattern: PathPattern | None, kinds: set[str] | None) -> ManifestEntry | None:
        """The row as an entry when it matches and is of one of ``kinds``; None when it does not
        match, or cannot be used (then recorded in ``bad_rows``)."""
        file_id, domain, rel, flags, blob = row
        problem = _type_problem(file_id, domain, rel, flags)
        if problem is not None:
            if pattern is None or pattern.matches(_as_text(domain), _as_text(rel)):
                self._reject(row, problem)
            return None
        rel = rel or ""
        flags = flags or 0
        if pattern is not None and not pattern.matches(domain, rel):
            return None
        known = _KIND_OF_FLAGS.get(flags)
        if kinds is not None and known is not None and known not in kinds:
            return None
        try:
            size, mtime, mode, key = decode_mbfile(blob) if blob else (0, 0, 0, None)
        except InvalidData as e:
            self._reject(row, str(e))
            return None
        if kinds is not None and known is None and kind_of(flags, mode) not in kinds:
            return None
        return ManifestEntry(domain, rel, file_id, flags, size, mtime, mode, key)

    def entries(self, pattern: PathPattern | None = None, *, kinds: Iterable[str] | None = ("file",)) -> Iterator[ManifestEntry]:
        """Rows matching ``pattern`` of the given kinds (all kinds for None), ordered by
        domain, path and fileID; only these rows' MBFiles are decoded. Matching rows that
        cannot be used go to ``bad_rows``."""
        kinds = set(kinds) if kinds is not None else None
        rows = self._query("SELECT fileID, domain, relativePath, flags, file FROM Files", pattern,
                           "ORDER BY domain, relativePath, fileID")
        for row in rows:
            entry = self._entry(row, pattern, kinds)
            if entry is not None:
                yield entry

    def files_by_id(self) -> Iterator[tuple[str, str, str]]:
        """``(fileID, domain, relative path)`` of every file row, in fileID order (the primary
        key's index: two manifests merge in one pass, in constant memory). Rows whose flags
        say what they are are not decoded."""
        for row in self._rows(
            "SELECT fileID, domain, relativePath, flags, CASE WHEN flags IN (1, 2, 4) THEN NULL ELSE file END "
            "FROM Files ORDER BY fileID"
        ):
            entry = self._entry(row, None, {"file"})
            if entry is not None:
                yield entry.file_id, entry.domain, entry.relative_path

    def entry(self, file_id: str) -> ManifestEntry | None:
        """The row of ``file_id``, None when there is none or it cannot be used."""
        for row in self._rows("SELECT fileID, domain, relativePath, flags, file FROM Files WHERE fileID = ?", (file_id,)):
            return self._entry(row, None, None)
        return None

    def domains(self) -> dict[str, DomainStats]:
        """Files, folders, symlinks and file bytes (MBFile sizes) per domain."""
        out: dict[str, DomainStats] = {}
        for row in self._rows(
            "SELECT fileID, domain, relativePath, flags, CASE WHEN flags IN (2, 4) THEN NULL ELSE file END FROM Files"
        ):
            e = self._entry(row, None, None)
            if e is None:
                continue
            st = out.get(e.domain)
            if st is None:
                st = out[e.domain] = DomainStats()
            kind = e.kind
            if kind == "file":
                st.files += 1
                st.bytes += e.size
            elif kind == "dir":
                st.dirs += 1
            else:
                st.symlinks += 1
        return dict(sorted(out.items()))

    # ---- payloads --------------------------------------------------------------------------

    def payload(self, file_id: str) -> Node | None:
        """The stored payload ``<fileID[:2]>/<fileID>`` of a row, None when the backup has none."""
        prefix = file_id[:2]
        nodes = self._payloads.get(prefix)
        if nodes is None:
            d = self._dirs.get(prefix)
            nodes = {n.name: n for n in self.repo.load_tree(d.subtree)} if d is not None and d.subtree else {}
            self._payloads[prefix] = nodes
        node = nodes.get(file_id)
        if node is None:  # iOS < 10 kept payloads at the top level
            node = self._root.get(file_id)
        return node if node is not None and node.type == "file" else None

    def read(self, entry: ManifestEntry, node: Node) -> Iterator[bytes]:
        """A file's content as the device had it: the stored payload, decrypted for an
        encrypted iOS backup."""
        chunks = read_file(self.repo, node)
        if self.keys is not None and entry.encryption_key:
            return self.keys.decrypt_file(chunks, entry.encryption_key, entry.size)
        return chunks


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _as_text(value: object) -> str:
    """A column's value as text for naming a row: whatever its type."""
    if value is None:
        return "?"
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _row_path(domain: object, rel: object) -> str:
    return entry_path(_as_text(domain), "" if rel is None else _as_text(rel))


def _type_problem(file_id: object, domain: object, rel: object, flags: object) -> str | None:
    """Why a row's columns cannot be used as they are, or None (the file column is checked by
    decoding it)."""
    for name, value, nullable in (("fileID", file_id, False), ("domain", domain, False), ("relativePath", rel, True)):
        if not isinstance(value, str) and not (nullable and value is None):
            return f"its {name} is {_kind_of_value(value)}, not text"
    if flags is not None and (isinstance(flags, bool) or not isinstance(flags, int)):
        return f"its flags are {_kind_of_value(flags)}, not an integer"
    return None


def _kind_of_value(value: object) -> str:
    if value is None:
        return "NULL"
    return {bytes: "a blob", int: "an integer", float: "a real number", str: "text"}.get(type(value), type(value).__name__)


def changed_payloads(a: SnapshotManifest, b: SnapshotManifest) -> set[str]:
    """File ids whose stored payload differs between two snapshots: other blobs, another size,
    or present in one only. Sub-trees are compared by id first, so the ``xx/`` folders two
    snapshots share are not even loaded; one pair of sub-trees is held at a time."""
    out: set[str] = set()
    for prefix in sorted(set(a._dirs) | set(b._dirs)):
        da, db = a._dirs.get(prefix), b._dirs.get(prefix)
        if da is not None and db is not None and da.subtree == db.subtree:
            continue
        na = {n.name: n for n in a.repo.load_tree(da.subtree)} if da is not None and da.subtree else {}
        nb = {n.name: n for n in b.repo.load_tree(db.subtree)} if db is not None and db.subtree else {}
        for name in na.keys() | nb.keys():
            x, y = na.get(name), nb.get(name)
            if x is None or y is None or x.content != y.content or x.size != y.size or x.type != y.type:
                out.add(name)
    # iOS < 10 layouts keep payloads at the top level
    for name in (a._root.keys() | b._root.keys()) - set(a._dirs) - set(b._dirs):
        x, y = a._root.get(name), b._root.get(name)
        if len(name) == 40 and (x is None or y is None or x.content != y.content or x.size != y.size):
            out.add(name)
    return out
