"""find and diff across snapshots at the cost of what changed between them.

``find`` follows each device from snapshot to snapshot. The first snapshot's Manifest.db is
queried whole (the rows the pattern selects); for each next one:

1. the root trees are compared with ``diff_folder``: changed ``xx/`` folders give the file ids
   whose payload changed, and a changed ``Manifest.db`` entry its new block list;
2. the device's working copy of Manifest.db (a private file) is patched in place with the
   blocks that changed, read from the repository; the pages of those blocks, old and new,
   name the rows that may have changed (``manifest_delta``);
3. only those rows are read again (by rowid), and only those payloads looked up.

What a snapshot holds of the pattern is then exactly what a query of its whole Manifest.db would
give: rows are kept by rowid and listed in the query's order. Whenever a change cannot be pinned
to rows (an overflow page changed, the schema changed, the blocks do not line up, an encrypted
iOS backup), that snapshot is queried whole, as before.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

from ..errors import UserError
from ..model import Snapshot
from ..repo.repository import Repository
from ..repo.trees import diff_folder, lookup
from .files import read_blobs
from .ios_crypto import BackupKeyring
from .manifest import BadRow, SnapshotManifest, _subtree, changed_payloads, evaluate, order_key
from .manifest_cache import ManifestCache, Rehydration, StoredFile, write_stored
from .manifest_delta import PageDiff, freelist, read_header, same_layout
from .mbfile import ManifestEntry
from .paths import PathPattern

Content = bytes | None  # a digest of a payload's blob ids and size; None when the row has no payload


def content_key(ids: Iterable[str], size: int) -> bytes:
    """A 16-byte digest standing for a payload (its hex blob ids and size): equal payloads give
    equal keys, and a key costs ~50 bytes held where the id list costs ~100 per blob."""
    h = hashlib.blake2b(digest_size=16)
    for blob_id in ids:
        h.update(blob_id.encode("ascii", "surrogateescape") + b",")
    h.update(str(size).encode())
    return h.digest()


FILES = frozenset({"file"})


# ---- the rows two local copies may differ in -------------------------------------------------


def compare_blocks(
    old: StoredFile,
    new: StoredFile,
    read_old: Callable[[int, int], bytes],
    read_new: Callable[[int, int], bytes],
    blocks: Iterable[int],
) -> set[int] | None:
    """Candidate rowids between two versions of a database cut in the same fixed blocks, from the
    pages of the blocks given (those whose ids differ). ``read_old``/``read_new`` read a
    version's bytes at (offset, length). None when the change cannot be pinned to rows."""
    size = old.block
    head_old, head_new = read_header(read_old(0, 100), old.size), read_header(read_new(0, 100), new.size)
    if head_old is None or head_new is None or not same_layout(head_old, head_new) or not size:
        return None
    page = head_old.page_size
    if size % page or new.block not in (None, size):
        return None

    def pages(read, count):
        return lambda p: read((p - 1) * page, page) if p <= count else b""

    old_free = freelist(head_old, pages(read_old, head_old.page_count))
    new_free = freelist(head_new, pages(read_new, head_new.page_count))
    if old_free is None:
        return None
    diff = PageDiff(page, head_old.page_count, head_new.page_count, old_free)
    for i in blocks:
        a = read_old(i * size, old.lengths[i]) if i < len(old.ids) else None
        b = read_new(i * size, new.lengths[i]) if i < len(new.ids) else None
        diff.compare(i * size // page + 1, a, b)
    return diff.result(new_free)


def differing_blocks(old: StoredFile, new: StoredFile) -> list[int]:
    n = max(len(old.ids), len(new.ids))
    return [i for i in range(n) if i >= len(old.ids) or i >= len(new.ids) or old.ids[i] != new.ids[i]]


class WorkingCopy:
    """A private copy of one device's Manifest.db, moved from snapshot to snapshot by writing
    the blocks that changed. Left in the cache as the last snapshot's database when done."""

    def __init__(self, cache: ManifestCache | None, stats: Rehydration) -> None:
        self.cache = cache
        self.stats = stats
        self.path: str | None = None
        self.stored: StoredFile | None = None

    def start(self, repo: Repository, stored: StoredFile) -> None:
        if self.cache is not None:
            fd, path = self.cache.new_temp()
            self.path = str(path)
            try:
                src = self.cache.open(repo, stored)
                try:
                    with open(src, "rb") as f, os.fdopen(os.dup(fd), "wb") as out:
                        shutil.copyfileobj(f, out, 1 << 20)
                finally:
                    self.cache.release(src)
            finally:
                os.close(fd)
        else:
            fd, self.path = tempfile.mkstemp(prefix="ibsync-manifest-", suffix=".db")
            try:
                write_stored(repo, stored, fd, [], self.stats)
            finally:
                os.close(fd)
        self.stored = stored

    def move_to(self, repo: Repository, new: StoredFile) -> set[int] | None:
        """Make the copy hold ``new``, reading only the blocks that differ; the candidate
        rowids of the change, None when they cannot be told (set() when nothing changed)."""
        old = self.stored
        assert old is not None and self.path is not None
        if new.key == old.key:
            return set()
        if not old.block or new.block not in (None, old.block):
            self._rebuild(repo, new)
            return None
        size = old.block
        changed = differing_blocks(old, new)
        wanted: dict[bytes, list[int]] = {}
        for i in changed:
            if i < len(new.ids):
                wanted.setdefault(new.ids[i], []).append(i)
        fd = os.open(self.path, os.O_RDWR)
        self.stored = None  # until done: a copy broken off halfway is never cached
        try:
            olds: dict[int, bytes] = {}  # the old bytes of the blocks rewritten, for their pages
            for blob_id, data in read_blobs(repo, wanted):
                self.stats.blobs_read += 1
                self.stats.bytes_read += len(data)
                for i in wanted[blob_id]:
                    olds[i] = os.pread(fd, old.lengths[i], i * size) if i < len(old.ids) else b""
                    os.pwrite(fd, data, i * size)
            for i in changed:
                if i >= len(new.ids):
                    olds[i] = os.pread(fd, old.lengths[i], i * size)
            os.ftruncate(fd, new.size)
            self.stored = new
            # the old version: the blocks kept aside, else the copy (a block not rewritten is
            # the same in both)
            return compare_blocks(old, new, _overlay(fd, olds, size), lambda o, n: os.pread(fd, n, o), changed)
        finally:
            os.close(fd)
            try:  # in use: not a stale temporary file for another process's cleanup
                os.utime(self.path)
            except OSError:
                pass

    def _rebuild(self, repo: Repository, new: StoredFile) -> None:
        assert self.path is not None and self.stored is not None
        if self.cache is not None:
            fd, tmp = self.cache.new_temp()
            tmp_path = str(tmp)
        else:
            fd, tmp_path = tempfile.mkstemp(prefix="ibsync-manifest-", suffix=".db")
        try:
            with open(self.path, "rb") as base:
                write_stored(repo, new, fd, [(base, self.stored)], self.stats)
        finally:
            os.close(fd)
        os.replace(tmp_path, self.path)
        self.stored = new

    def close(self, keep: bool) -> None:
        """Leave the copy in the cache (``keep``) or remove it."""
        if self.path is None:
            return
        path, self.path = self.path, None
        if keep and self.cache is not None and self.stored is not None:
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                from pathlib import Path

                self.cache.store(Path(path), self.stored)
                return
            except OSError:
                pass
        try:
            os.unlink(path)
        except OSError:
            pass


def _overlay(fd: int, blocks: dict[int, bytes], size: int) -> Callable[[int, int], bytes]:
    """A reader of the file ``fd`` in which the given blocks read as ``blocks`` says."""

    def read(offset: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            i, within = divmod(offset, size)
            n = min(length, size - within)
            data = blocks[i][within : within + n] if i in blocks else os.pread(fd, n, offset)
            if not data:
                break
            out += data
            offset += len(data)
            length -= len(data)
            if len(data) < n:
                break
        return bytes(out)

    return read


# ---- payloads by file id ----------------------------------------------------------------------


class Payloads:
    """A snapshot's payload nodes by file id: ``<fileID[:2]>/<fileID>``, or at the top for
    iOS < 10, only files. ``whole``: load each ``xx/`` folder whole when first needed (many
    rows); otherwise look each name up, reading only the tree nodes on its path (few rows)."""

    def __init__(self, repo: Repository, root: bytes, whole: bool) -> None:
        self.repo, self.root, self.whole = repo, root, whole
        self._dirs: dict[str, bytes | None] = {}
        self._loaded: dict[str, dict[str, dict]] = {}
        self._top: dict[str, dict] | None = None

    def content(self, file_id: str) -> Content:
        node = self._node(file_id)
        if node is None or node.get("type") != "file":
            return None
        return content_key(node.get("content", ()), node.get("size", 0))

    def _node(self, file_id: str) -> dict | None:
        prefix = file_id[:2]
        if prefix not in self._dirs:
            d = self._top_entry(prefix) if len(prefix) == 2 else None
            self._dirs[prefix] = _subtree(d)
        sub = self._dirs[prefix]
        node = None
        if sub is not None:
            if self.whole:
                if prefix not in self._loaded:
                    # one folder at a time: callers ask in file id order, and a million-file
                    # phone's 256 folders together are hundreds of MB of entries
                    self._loaded = {prefix: {e["name"]: e for e in _usable(self.repo, sub)}}
                node = self._loaded[prefix].get(file_id)
            else:
                node = lookup(self.repo, sub, file_id)
        return node if node is not None else self._top_entry(file_id)

    def _top_entry(self, name: str) -> dict | None:
        if self.whole:
            if self._top is None:
                self._top = {e["name"]: e for e in _usable(self.repo, self.root)}
            return self._top.get(name)
        return lookup(self.repo, self.root, name)


def _usable(repo: Repository, tree: bytes) -> list[dict]:
    from ..model import split_entries

    return split_entries(repo.load_tree_entries(tree))[0]


# ---- find ---------------------------------------------------------------------------------------


@dataclass
class Holding:
    """What one snapshot holds of a pattern: matching file rows in query order with their
    payloads, and the matching rows that cannot be used."""

    entries: list[tuple[ManifestEntry, Content]]
    bad: list[BadRow]


@dataclass
class _Row:
    key: tuple
    got: ManifestEntry | BadRow


@dataclass
class DeviceHistory:
    """One device's rows matching a pattern, followed from snapshot to snapshot (module text)."""

    repo: Repository
    pattern: PathPattern
    keyring: BackupKeyring | None
    cache: ManifestCache | None
    stats: Rehydration = field(default_factory=Rehydration)
    whole_queries: int = 0  # snapshots whose Manifest.db was queried whole
    _work: WorkingCopy | None = None
    _root: bytes | None = None
    _rows: dict[int, _Row] = field(default_factory=dict)
    _fids: dict[str, set[int]] = field(default_factory=dict)  # file id -> rowids of matching entries
    _contents: dict[str, Content] = field(default_factory=dict)
    _follow: bool = False
    _last: Holding | None = None

    def step(self, snap: Snapshot) -> Holding:
        """What ``snap`` (the device's next snapshot, oldest first) holds of the pattern."""
        if snap.ios_encrypted:
            return self._encrypted(snap)
        if self._root is None or not self._follow or self._work is None:
            return self._whole(snap)
        if snap.tree == self._root and self._last is not None:
            return self._last
        new_db: dict | None = None
        db_changed = False
        changed_names: set[str] = set()
        for x, y in diff_folder(self.repo, self._root, snap.tree):
            name = cast(dict, x or y)["name"]  # diff_folder pairs hold at least one entry
            if name == "Manifest.db":
                db_changed, new_db = True, y
            elif len(name) == 2:
                changed_names.update(
                    cast(dict, u or v)["name"] for u, v in diff_folder(self.repo, _subtree(x), _subtree(y))
                )
            else:
                changed_names.add(name)
        rowids: set[int] | None = set()
        if db_changed:
            if new_db is None or new_db.get("type") != "file":
                return self._whole(snap)
            stored = StoredFile.of(self.repo, [bytes.fromhex(c) for c in new_db["content"]], new_db["size"])
            rowids = self._work.move_to(self.repo, stored)
            if rowids is None:
                return self._whole(snap)
        with SnapshotManifest(self.repo, snap, file=self._work.path) as m:
            fresh = m.rows_by_rowid(rowids) if rowids else {}
        payloads = Payloads(self.repo, snap.tree, whole=False)
        recheck = {fid for fid in changed_names if fid in self._fids}
        for rowid in rowids or ():
            old = self._rows.pop(rowid, None)
            if old is not None and isinstance(old.got, ManifestEntry):
                self._forget(rowid, old.got.file_id)
            row = fresh.get(rowid)
            got = evaluate(row, self.pattern, FILES) if row is not None else None
            if row is not None and got is not None:
                self._rows[rowid] = _Row(order_key(row) + (rowid,), got)
                if isinstance(got, ManifestEntry):
                    self._fids.setdefault(got.file_id, set()).add(rowid)
                    recheck.add(got.file_id)
        for fid in recheck:
            if fid in self._fids:
                self._contents[fid] = payloads.content(fid)
        self._root = snap.tree
        self._last = self._holding()
        return self._last

    def _forget(self, rowid: int, file_id: str) -> None:
        ids = self._fids.get(file_id)
        if ids is not None:
            ids.discard(rowid)
            if not ids:
                del self._fids[file_id]
                self._contents.pop(file_id, None)

    def _holding(self) -> Holding:
        entries: list[tuple[ManifestEntry, Content]] = []
        bad: dict[tuple[str, str, str], BadRow] = {}
        for r in sorted(self._rows.values(), key=lambda r: r.key):
            if isinstance(r.got, BadRow):
                bad.setdefault((r.got.path, r.got.file_id, r.got.reason), r.got)
            else:
                entries.append((r.got, self._contents.get(r.got.file_id)))
        return Holding(entries, list(bad.values()))

    def _whole(self, snap: Snapshot) -> Holding:
        """Query the snapshot's whole Manifest.db (the pattern's rows) and start following."""
        self.whole_queries += 1
        db = lookup(self.repo, snap.tree, "Manifest.db")
        if db is None or db.get("type") != "file":
            raise UserError(f"snapshot {snap.short_id} has no Manifest.db: browsing needs an iOS 10 or later backup")
        stored = StoredFile.of(self.repo, [bytes.fromhex(c) for c in db["content"]], db["size"])
        if self._work is None:
            self._work = WorkingCopy(self.cache, self.stats)
            self._work.start(self.repo, stored)
        else:
            self._work.move_to(self.repo, stored)
        self._rows, self._fids, self._contents = {}, {}, {}
        payloads = Payloads(self.repo, snap.tree, whole=True)
        with SnapshotManifest(self.repo, snap, file=self._work.path) as m:
            self._follow = m.follows_rowids()
            if not self._follow:  # not a plain rowid table: as a query of it would list it
                rows = list(m.entries(self.pattern))
                contents = {fid: payloads.content(fid) for fid in sorted({e.file_id for e in rows})}
                entries = [(e, contents[e.file_id]) for e in rows]
                self._root = snap.tree
                return Holding(entries, m.bad_rows)
            for rowid, row in m.rows_with_rowid(self.pattern):
                got = evaluate(row, self.pattern, FILES)
                if got is None:
                    continue
                self._rows[rowid] = _Row(order_key(row) + (rowid,), got)
                if isinstance(got, ManifestEntry):
                    self._fids.setdefault(got.file_id, set()).add(rowid)
        for fid in sorted(self._fids):  # in file id order: one xx/ folder loaded at a time
            self._contents[fid] = payloads.content(fid)
        self._root = snap.tree
        self._last = self._holding()
        return self._last

    def _encrypted(self, snap: Snapshot) -> Holding:
        """An encrypted iOS backup: its decrypted database is never kept, so it is read whole
        (its stored ciphertext still comes from the cache)."""
        self.whole_queries += 1
        self._follow = False
        with SnapshotManifest(self.repo, snap, self.keyring, cache=self.cache) as m:
            if self.cache is None:
                self.stats.add(m.stats)
            entries = []
            for e in m.entries(self.pattern):
                node = m.payload(e.file_id)
                entries.append(
                    (e, content_key((c.hex() for c in node.content), node.size) if node is not None else None)
                )
            return Holding(entries, m.bad_rows)

    def close(self, keep: bool = True) -> None:
        if self._work is not None:
            self._work.close(keep)
            self._work = None


# ---- diff ---------------------------------------------------------------------------------------


@dataclass
class Change:
    domain: str
    relative_path: str
    kind: str  # added | removed | changed
    file_id: str
    size: int


def diff_snapshots(
    repo: Repository, a: Snapshot, b: Snapshot, keyring: BackupKeyring | None, cache: ManifestCache | None
) -> tuple[list[Change], list[tuple[Snapshot, BadRow]]]:
    """Files added, removed and changed from ``a`` to ``b`` (by Domain/path), and the rows that
    could not be read. A file changed when its payload differs (``changed_payloads``); rows are
    compared only where the two databases' pages differ, or all of them when that cannot be told."""
    with SnapshotManifest(repo, a, keyring, cache=cache) as ma, SnapshotManifest(repo, b, keyring, cache=cache) as mb:
        touched = changed_payloads(repo, a.tree, b.tree)
        # a snapshot against itself reads every row: what differs is nothing, but that is how
        # its unreadable rows are listed (and a damaged database is named), as before
        rowids = _rows_between(ma, mb) if a.id != b.id else None
        if rowids is None:
            found = _merge_all(ma, mb, touched)
        else:
            found = _merge_some(ma, mb, touched, rowids)
        changes = []
        for domain, rel, kind, file_id in found:  # sizes from Manifest.db, decoded for these rows only
            e = (ma if kind == "removed" else mb).entry(file_id)
            changes.append(Change(domain, rel, kind, file_id, e.size if e is not None else 0))
        changes.sort(key=lambda c: (c.domain, c.relative_path))
        bad = [(a, r) for r in ma.bad_rows] + ([(b, r) for r in mb.bad_rows] if b.id != a.id else [])
    return changes, bad


def _rows_between(ma: SnapshotManifest, mb: SnapshotManifest) -> set[int] | None:
    if ma.snapshot.ios_encrypted or mb.snapshot.ios_encrypted:
        return None
    if not ma.follows_rowids() or not mb.follows_rowids():
        return None
    old, new = ma.stored, mb.stored
    if old.key == new.key:
        return set()
    if not old.block or new.block not in (None, old.block):
        return None
    return compare_blocks(old, new, ma.read_at, mb.read_at, differing_blocks(old, new))


def _merge_all(ma: SnapshotManifest, mb: SnapshotManifest, touched: set[str]) -> list[tuple[str, str, str, str]]:
    """Every file row of both, merged in fileID order (when pages cannot tell what changed)."""
    found: list[tuple[str, str, str, str]] = []
    rows_a, rows_b = ma.files_by_id(), mb.files_by_id()
    ra, rb = next(rows_a, None), next(rows_b, None)
    while ra is not None or rb is not None:
        if ra is not None and (rb is None or ra[0] < rb[0]):
            found.append((ra[1], ra[2], "removed", ra[0]))
            ra = next(rows_a, None)
        elif rb is not None and (ra is None or rb[0] < ra[0]):
            found.append((rb[1], rb[2], "added", rb[0]))
            rb = next(rows_b, None)
        else:
            assert ra is not None and rb is not None  # the same fileID on both sides
            if rb[0] in touched:
                found.append((rb[1], rb[2], "changed", rb[0]))
            ra, rb = next(rows_a, None), next(rows_b, None)
    return found


def _merge_some(
    ma: SnapshotManifest, mb: SnapshotManifest, touched: set[str], rowids: set[int]
) -> list[tuple[str, str, str, str]]:
    """The file rows of the candidate rowids and of the touched payloads, looked up in both."""
    fids = set(touched)
    for m in (ma, mb):
        for row in m.rows_by_rowid(rowids, file_view=True).values():
            got = evaluate(row, None, FILES)
            if isinstance(got, BadRow):
                m.record(got)
            elif got is not None:
                fids.add(got.file_id)
    found = []
    for fid in sorted(fids, key=lambda f: f.encode("utf-8", "surrogateescape")):
        ea, eb = ma.file_row(fid), mb.file_row(fid)
        if ea is not None and eb is None:
            found.append((ea.domain, ea.relative_path, "removed", fid))
        elif eb is not None and ea is None:
            found.append((eb.domain, eb.relative_path, "added", fid))
        elif ea is not None and eb is not None and fid in touched:
            found.append((eb.domain, eb.relative_path, "changed", fid))
    return found
