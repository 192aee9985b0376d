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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast, overload

from ..errors import InvalidData, UserError
from ..model import Node, Snapshot
from ..repo.repository import Repository
from ..repo.trees import diff_folder
from .files import read_file, read_file_bytes
from .ios_crypto import BackupKeyring, BackupKeys
from .manifest_cache import ManifestCache, Rehydration, StoredFile, write_stored
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
    manager. The database comes from the Manifest.db cache (``manifest_cache``; rebuilt there
    from the blocks it shares with cached ones) or, without a cache, from a temporary file; for
    an encrypted iOS backup the decrypted database is only ever a temporary file. Either way the
    file is unlinked once open, so nothing is left behind if the command is killed."""

    def __init__(
        self,
        repo: Repository,
        snapshot: Snapshot,
        keyring: BackupKeyring | None = None,
        *,
        cache: ManifestCache | None = None,
        file: str | os.PathLike | None = None,
    ) -> None:
        """``file``: use this file, which holds the snapshot's stored Manifest.db (plaintext
        backups; the caller keeps it and must not change it while this is open)."""
        self.repo = repo
        self.snapshot = snapshot
        self.keys: BackupKeys | None = None
        self.stats = cache.stats if cache is not None else Rehydration()
        self._con: sqlite3.Connection | None = None
        self._path: str | None = None
        self._fd: int | None = None  # the database file, for reading its pages
        self._root_nodes: dict[str, Node] | None = None  # the root tree, loaded when needed
        self._payloads: dict[str, dict[str, Node]] = {}
        self._bad: dict[tuple[str, str, str], BadRow] = {}  # rows met so far that cannot be used
        if file is not None:  # the caller knows what it holds: the root is loaded only for payloads
            self._connect(os.fspath(file), owned=False)
            return
        db = self._root.get("Manifest.db")
        if db is None or db.type != "file":
            raise UserError(
                f"snapshot {snapshot.short_id} has no Manifest.db: browsing needs an iOS 10 or later backup"
            )
        self.stored = StoredFile.of(repo, db.content, db.size)
        try:
            if snapshot.ios_encrypted:
                self._open_encrypted(cache, keyring)
            else:
                self._open_plain(cache)
        except BaseException:
            self.close()
            raise

    def _open_plain(self, cache: ManifestCache | None) -> None:
        if cache is not None:
            link = cache.open(self.repo, self.stored)
            try:
                self._connect(str(link), owned=False)
            finally:
                cache.release(link)
            return
        fd, path = tempfile.mkstemp(prefix="ibsync-manifest-", suffix=".db")
        self._path = path
        try:
            write_stored(self.repo, self.stored, fd, [], self.stats)
        finally:
            os.close(fd)
        self._connect(path, owned=True)

    def _open_encrypted(self, cache: ManifestCache | None, keyring: BackupKeyring | None) -> None:
        """Decrypt the stored (cached) ciphertext into a private temporary file: the plaintext
        of an encrypted backup is never kept."""
        snapshot = self.snapshot
        if keyring is None:
            raise UserError(f"snapshot {snapshot.short_id} is an encrypted iOS backup: its password is needed")
        plist_node = self._root.get("Manifest.plist")
        if plist_node is None or plist_node.type != "file":
            raise InvalidData(f"snapshot {snapshot.short_id} has no Manifest.plist")
        try:
            plist = plistlib.loads(read_file_bytes(self.repo, plist_node))
        except plistlib.InvalidFileException as e:
            raise InvalidData(f"snapshot {snapshot.short_id}: Manifest.plist does not parse ({e})") from None
        manifest_key = plist.get("ManifestKey")
        if not isinstance(manifest_key, bytes):
            raise InvalidData(f"snapshot {snapshot.short_id}: the encrypted backup's Manifest.plist has no ManifestKey")
        self.keys = keyring.keys_for(plist)
        link = cache.open(self.repo, self.stored) if cache is not None else None
        try:
            chunks: Iterable[bytes] = (
                _file_chunks(link) if link is not None else read_file(self.repo, self._root["Manifest.db"])
            )
            fd, self._path = tempfile.mkstemp(prefix="ibsync-manifest-", suffix=".db")
            with os.fdopen(fd, "wb") as f:
                for chunk in self.keys.decrypt_database(chunks, manifest_key):
                    f.write(chunk)
        finally:
            if link is not None and cache is not None:  # a link comes only from a cache
                cache.release(link)
        self._connect(self._path, owned=True)

    @property
    def _root(self) -> dict[str, Node]:
        if self._root_nodes is None:
            self._root_nodes = {n.name: n for n in self.repo.load_tree(self.snapshot.tree)}
        return self._root_nodes

    @property
    def _dirs(self) -> dict[str, Node]:
        return {name: n for name, n in self._root.items() if n.type == "dir" and len(name) == 2}

    def read_at(self, offset: int, length: int) -> bytes:
        """Bytes of the open database file (its pages, for comparing two versions)."""
        assert self._fd is not None, "manifest is closed"
        return os.pread(self._fd, length, offset)

    def _connect(self, path: str, *, owned: bool) -> None:
        """Open ``path`` read-only; ``owned``: a temporary file of ours, unlinked once open."""
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        uri = Path(path).absolute().as_uri() + "?mode=ro&immutable=1"
        self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
        # a name that is not UTF-8 must not fail the whole query: keep its bytes (an extracted
        # file gets them back as its name), and escape them where they are printed
        self._con.text_factory = _text
        try:
            self._con.execute("SELECT fileID, domain, relativePath, flags, file FROM Files LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            what = "does not decrypt to a database" if self.snapshot.ios_encrypted else "is not a readable database"
            raise InvalidData(f"snapshot {self.snapshot.short_id}: Manifest.db {what} ({e})") from None
        if owned:
            try:  # the open connection keeps it readable; nothing is left behind if we are killed
                os.unlink(path)
                self._path = None
            except OSError:
                pass  # Windows: removed on close

    def __enter__(self) -> SnapshotManifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
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
            for row in self._con.execute(sql, params):  # noqa: UP028 - see above
                yield row
        except sqlite3.DatabaseError as e:
            raise InvalidData(f"snapshot {self.snapshot.short_id}: its Manifest.db is damaged ({e})") from None

    def _query(self, sql: str, pattern: PathPattern | None, extra: str = "") -> Iterator[tuple]:
        if pattern is not None and pattern.domain is not None:
            return self._rows(f"{sql} WHERE domain = ? {extra}", (pattern.domain,))
        return self._rows(f"{sql} {extra}")

    def _reject(self, row: tuple, reason: str) -> None:
        self.record(BadRow(_row_path(row[1], row[2]), _as_text(row[0]), reason))

    def record(self, bad: BadRow) -> None:
        """Note a row that cannot be used (once per path, id and reason)."""
        self._bad.setdefault((bad.path, bad.file_id, bad.reason), bad)

    def _entry(self, row: tuple, pattern: PathPattern | None, kinds: set[str] | None) -> ManifestEntry | None:
        """The row as an entry when it matches and is of one of ``kinds``; None when it does not
        match, or cannot be used (then recorded in ``bad_rows``)."""
        got = evaluate(row, pattern, kinds)
        if isinstance(got, BadRow):
            self.record(got)
            return None
        return got

    def entries(
        self, pattern: PathPattern | None = None, *, kinds: Iterable[str] | None = ("file",)
    ) -> Iterator[ManifestEntry]:
        """Rows matching ``pattern`` of the given kinds (all kinds for None), ordered by
        domain, path and fileID; only these rows' MBFiles are decoded. Matching rows that
        cannot be used go to ``bad_rows``."""
        kinds = set(kinds) if kinds is not None else None
        rows = self._query(
            "SELECT fileID, domain, relativePath, flags, file FROM Files",
            pattern,
            "ORDER BY domain, relativePath, fileID",
        )
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
        for row in self._rows(
            "SELECT fileID, domain, relativePath, flags, file FROM Files WHERE fileID = ?", (file_id,)
        ):
            return self._entry(row, None, None)
        return None

    def follows_rowids(self) -> bool:
        """Whether rows can be followed by rowid from one version to the next: Files is an
        ordinary rowid table of its five columns with no collation that would change its
        order (anything else is read whole, as a hostile database deserves)."""
        assert self._con is not None, "manifest is closed"
        try:
            sql = self._con.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'Files'").fetchall()
            cols = [str(r[1]).lower() for r in self._con.execute("PRAGMA table_info(Files)")]
        except sqlite3.DatabaseError:
            return False
        if len(sql) != 1 or not isinstance(sql[0][0], str):
            return False
        text = " ".join(sql[0][0].lower().split())
        return (
            cols == ["fileid", "domain", "relativepath", "flags", "file"]
            and "without rowid" not in text
            and "collate" not in text
        )

    def rows_by_rowid(self, rowids: Iterable[int], *, file_view: bool = False) -> dict[int, tuple]:
        """``rowid -> (fileID, domain, relativePath, flags, file)`` of those rowids that exist.
        ``file_view``: as ``files_by_id`` sees them (no MBFile where the flags say the kind)."""
        out: dict[int, tuple] = {}
        ids = sorted(set(rowids))
        file_col = "CASE WHEN flags IN (1, 2, 4) THEN NULL ELSE file END" if file_view else "file"
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            marks = ",".join("?" * len(part))
            for row in self._rows(
                f"SELECT rowid, fileID, domain, relativePath, flags, {file_col} FROM Files WHERE rowid IN ({marks})",
                tuple(part),
            ):
                out[row[0]] = row[1:]
        return out

    def rows_with_rowid(self, pattern: PathPattern | None) -> Iterator[tuple[int, tuple]]:
        """``(rowid, row)`` of every row (of the pattern's domain when it names one)."""
        for row in self._query("SELECT rowid, fileID, domain, relativePath, flags, file FROM Files", pattern):
            yield row[0], row[1:]

    def file_row(self, file_id: str) -> ManifestEntry | None:
        """The file row of ``file_id`` as ``files_by_id`` sees it (None when there is none, it
        is not a file, or it cannot be used: then recorded)."""
        for row in self._rows(
            "SELECT fileID, domain, relativePath, flags, CASE WHEN flags IN (1, 2, 4) THEN NULL ELSE file END "
            "FROM Files WHERE fileID = ?",
            (file_id,),
        ):
            return self._entry(row, None, {"file"})
        return None

    def link_target(self, file_id: str) -> str:
        """Where a symbolic link row points (its MBFile's ``Target``; "" when it has none or the
        row cannot be read: an odd row costs its target only)."""
        from .mbfile import mbfile_fields

        for (blob,) in self._rows("SELECT file FROM Files WHERE fileID = ?", (file_id,)):
            if not isinstance(blob, (bytes, bytearray)):
                return ""
            try:
                target = mbfile_fields(bytes(blob), ("Target",)).get("Target")
            except (InvalidData, ValueError, KeyError, IndexError, TypeError):
                return ""
            return target.replace("\0", "") if isinstance(target, str) else ""
        return ""

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
            d = self._root.get(prefix) if len(prefix) == 2 else None
            d = d if d is not None and d.type == "dir" else None
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


def evaluate(
    row: tuple, pattern: PathPattern | None, kinds: set[str] | frozenset[str] | None
) -> ManifestEntry | BadRow | None:
    """A ``(fileID, domain, relativePath, flags, file)`` row as an entry when it matches and is of
    one of ``kinds`` (None: any); a BadRow when it matches but cannot be used; else None."""
    file_id, domain, rel, flags, blob = row
    problem = _type_problem(file_id, domain, rel, flags)
    if problem is not None:
        if pattern is None or pattern.matches(_as_text(domain), _as_text(rel)):
            return BadRow(_row_path(domain, rel), _as_text(file_id), problem)
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
        return BadRow(_row_path(domain, rel), file_id, str(e))
    if kinds is not None and known is None and kind_of(flags, mode) not in kinds:
        return None
    return ManifestEntry(domain, rel, file_id, flags, size, mtime, mode, key)


def order_key(row: tuple) -> tuple:
    """Where a row sorts in ``ORDER BY domain, relativePath, fileID`` (sqlite's BINARY order:
    NULL, numbers, text by its bytes, blobs), so rows kept from an earlier snapshot list in the
    order a query of this one would give."""
    return (_sql_order(row[1]), _sql_order(row[2]), _sql_order(row[0]))


def _sql_order(value: object) -> tuple:
    if value is None:
        return (0, 0)
    if isinstance(value, (int, float)):
        return (1, value)
    if isinstance(value, str):
        return (2, value.encode("utf-8", "surrogateescape"))
    return (3, bytes(cast(bytes, value)))  # SQLite has no other type left: a blob


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


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
    return {bytes: "a blob", int: "an integer", float: "a real number", str: "text"}.get(
        type(value), type(value).__name__
    )


def changed_payloads(repo: Repository, root_a: bytes, root_b: bytes) -> set[str]:
    """File ids whose stored payload differs between two snapshots' root trees: other blobs,
    another size, or present in one only. Only what differs is read (``diff_folder`` skips the
    ``xx/`` folders and the tree nodes two snapshots share)."""
    out: set[str] = set()
    # diff_folder pairs what differs: one side may be missing, never both
    for x, y in diff_folder(repo, root_a, root_b):
        name = cast(dict, x or y)["name"]
        if len(name) == 2:
            for u, v in diff_folder(repo, _subtree(x), _subtree(y)):
                if _payload_key(u) != _payload_key(v):
                    out.add(cast(dict, u or v)["name"])
        elif len(name) == 40 and (x is None or y is None or _payload_key(x)[1:] != _payload_key(y)[1:]):
            out.add(name)  # iOS < 10 layouts keep payloads at the top level
    return out


def _subtree(entry: dict | None) -> bytes | None:
    if entry is None or entry.get("type") != "dir" or not entry.get("subtree"):
        return None
    return bytes.fromhex(entry["subtree"])


@overload
def _payload_key(entry: dict) -> tuple: ...
@overload
def _payload_key(entry: None) -> None: ...
@overload
def _payload_key(entry: dict | None) -> tuple | None: ...
def _payload_key(entry: dict | None) -> tuple | None:
    if entry is None:
        return None
    return (entry.get("type"), entry.get("size", 0), tuple(entry.get("content", ())))
