"""repair: rebuild the index from the packs, salvage damaged packs, rewrite damaged snapshots.

Three commands, run in this order after `check` (restic's `repair index`, `repair packs`,
`repair snapshots` are the model):

- ``rebuild_index``: index every pack from its own header; replace every index object.
- ``repair_packs``: read packs whole; from each damaged one, store every blob that still
  decrypts and matches its id in new packs, then drop the damaged pack from the index (and
  delete it, when its header authenticates as ours).
- ``repair_snapshots``: rewrite each snapshot that refers to data the index no longer has,
  without the files and folders whose data is lost; remove the original.

All run under the exclusive lock and write before they delete: new packs, then index objects,
then snapshots, then deletions, so an interruption leaves a valid (if redundant) repository.
Only bytes that fail to authenticate count as damage (InvalidData): a read that failed (a
dropped connection, permission denied) says nothing about the object, so it stops the command
before anything is deleted. They delete only names that are objects (64 hex digits, listed by
the storage), and a failed deletion is reported, never passed over.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import IbsyncError, InvalidData, NotFound, RepoError, StorageError
from ..format.index import PackIndex
from ..format.pack import BlobType, PackedBlob, pack_name, parse_header, split_tail
from ..model import MalformedTree, Snapshot, split_entries
from ..progress import NULL_PROGRESS, Progress
from ..repo.ids import resolve_prefix
from ..repo.repository import MAX_PACK_SIZE, Repository
from ..storage import Kind, object_path
from ..storage.base import is_object_name

TAIL_GUESS = 64 << 10  # one read gets the header of a pack of up to ~1,500 blobs
# The largest header a pack ibsync wrote can have: the largest pack (the largest pack size plus
# one maximum chunk) filled with the smallest stored blobs (AEAD overhead + 1 byte), 42 bytes of
# header each. Real headers are a few MB; this only stops a planted object's last four bytes
# from making us read gigabytes.
MAX_HEADER_READ = ((MAX_PACK_SIZE + (4 << 20)) // 29 + 1) * 42 + 64
# A rewritten snapshot records the paths it lost in its "source"; beyond this many, their count.
REMOVED_PATHS_RECORDED = 100


class ReadFailed(StorageError):
    """A repair command could not read an object: not damage, so it stops before deleting."""


def delete_objects(repo: Repository, kind: Kind, names, failed: dict[str, str]) -> list[str]:
    """Delete each named object; a deletion that fails is added to ``failed`` (object path ->
    why), one already gone is fine. Returns the names this call deleted."""
    done = []
    for name in names:
        repo.check_lock()
        try:
            repo.storage.delete(kind, name)
        except NotFound:
            continue  # already gone: another run got here first
        except IbsyncError as e:
            failed[object_path(kind, name)] = str(e)
            continue
        done.append(name)
    return done


def _read_failed(what: str, e: StorageError, command: str, changed: str = "nothing was changed") -> ReadFailed:
    return ReadFailed(f"could not read {what} ({e}); {changed}: run 'ibsync {command}' again")


# ---- repair index ---------------------------------------------------------------------------


@dataclass
class IndexRepair:
    packs: int = 0
    blobs: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # pack name -> why it could not be indexed
    old_index_objects: int = 0
    not_objects: list[str] = field(default_factory=list)  # names in index/ left alone: not objects
    failed: dict[str, str] = field(default_factory=dict)  # object path -> why it could not be deleted


def _read_tail(repo: Repository, name: str, size: int) -> bytes:
    start = max(0, size - TAIL_GUESS)
    data = repo.storage.get(Kind.PACKS, name, start, size - start)
    hlen = int.from_bytes(data[-4:], "little") + 4
    if hlen > MAX_HEADER_READ:
        # The length is whatever the object's last bytes say: never read that much on trust.
        raise InvalidData(f"its header claims {hlen} bytes, more than a pack header can be")
    if hlen > len(data) and hlen <= size:
        # only the part of the header the first read did not reach
        data = repo.storage.get(Kind.PACKS, name, size - hlen, hlen - len(data)) + data
    return data[-hlen:] if hlen <= len(data) else data


def read_pack_header(repo: Repository, name: str, size: int) -> list[PackedBlob]:
    """The blobs of pack ``name`` (``size`` bytes) from its own header. Raises InvalidData unless
    the pack is one of this repository's, intact: its name is the hash of its tail and the
    header opens with the repository key. What passes may be deleted; what fails is not
    ibsync's to delete. A failed read raises StorageError (NotFound if the pack is gone)."""
    tail = _read_tail(repo, name, size)
    if pack_name(tail) != name:
        raise InvalidData("header does not match the pack's name")
    blobs = parse_header(tail, repo.cipher)
    if blobs and blobs[-1].offset + blobs[-1].length + len(tail) != size:
        raise InvalidData("its blobs do not fill the pack up to the header")
    return blobs


def rebuild_index(repo: Repository, *, progress: Progress = NULL_PROGRESS, dry_run: bool = False) -> IndexRepair:
    """Index every pack from its own header; replace all index objects with the result. A pack
    that cannot be read (as opposed to one that does not authenticate) stops it before it
    writes or deletes anything: leaving it out would drop data the snapshots need."""
    result = IndexRepair()
    listed = sorted(info.name for info in repo.storage.list(Kind.INDEX))
    # every object in index/ goes, damaged ones being what repair is for; other names are not ours
    old = [n for n in listed if is_object_name(n)]
    result.not_objects = [n for n in listed if not is_object_name(n)]
    result.old_index_objects = len(old)
    packs: list[PackIndex] = []
    listing = list(repo.storage.list(Kind.PACKS))
    progress.start(None, len(listing))
    for info in listing:
        try:
            blobs = read_pack_header(repo, info.name, info.size)
        except NotFound:
            continue  # gone since the listing: nothing to index
        except InvalidData as e:
            result.damaged[info.name] = str(e)
            continue
        except StorageError as e:
            raise _read_failed(f"pack {info.name[:12]}", e, "repair index") from None
        finally:
            progress.advance(files=1)
        packs.append(PackIndex(bytes.fromhex(info.name), blobs))
        result.packs += 1
        result.blobs += len(blobs)
    progress.finish()
    if dry_run:
        return result
    repo.save_full_index(packs)
    delete_objects(repo, Kind.INDEX, old, result.failed)
    return result


# ---- repair packs -----------------------------------------------------------------------------


@dataclass
class PackVerdict:
    """What one pack holds, read whole: which blobs decode, and whether the pack is ours."""

    name: str
    problems: list[str] = field(default_factory=list)  # why it is damaged; empty: intact
    good: list[PackedBlob] = field(default_factory=list)  # blobs that decrypt and match their id
    lost: list[PackedBlob] = field(default_factory=list)  # blobs listed (header or index) that do not
    ours: bool = False  # authenticated as this repository's: deleting it is ours to do


@dataclass
class PackRepair:
    read: int = 0  # packs read
    damaged: dict[str, PackVerdict] = field(default_factory=dict)
    salvaged_blobs: int = 0
    packs_written: int = 0
    deleted: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # damaged pack left in place -> why
    failed: dict[str, str] = field(default_factory=dict)  # object path -> why it could not be deleted

    @property
    def lost_blobs(self) -> int:
        """Blobs of the damaged packs that no copy in them saved (other packs may hold one)."""
        good = {b.id for v in self.damaged.values() for b in v.good}
        return len({b.id for v in self.damaged.values() for b in v.lost} - good)


def resolve_packs(repo: Repository, prefixes: Iterable[str]) -> dict[str, int]:
    """The stored packs the given ids (or unique prefixes of 4+ hex digits) name -> size."""
    stored = {info.name: info.size for info in repo.storage.list(Kind.PACKS)}
    chosen: dict[str, int] = {}
    for p in prefixes:
        name = resolve_prefix(p, stored, "pack", hint="'ibsync check --read-data' names damaged packs", min_length=4)
        chosen[name] = stored[name]
    return chosen


def _blobs_by_pack(repo: Repository) -> dict[str, list[PackedBlob]]:
    out: dict[str, list[PackedBlob]] = {}
    for blob_id, loc in repo.index.entries():
        out.setdefault(loc.pack_id.hex(), []).append(loc.as_packed(blob_id))
    return out


def examine_pack(repo: Repository, name: str, data: bytes, indexed: list[PackedBlob]) -> PackVerdict:
    """Judge a whole pack: its header (authentic, matching the name, filling the pack) and every
    blob its header or the index places in it. Locations need not be trusted: a blob counts only
    if it decrypts and hashes to its id. Only the repository's key can make a header or blob
    authenticate, so either proves the pack ours (without encryption, only the name does)."""
    verdict = PackVerdict(name)
    header: list[PackedBlob] = []
    try:
        tail = split_tail(data)
        header = parse_header(tail, repo.cipher)
        header_ok = True
    except InvalidData as e:
        verdict.problems.append(f"header unreadable: {e}")
        tail, header_ok = b"", False
    name_ok = header_ok and pack_name(tail) == name
    if header_ok and not name_ok:
        verdict.problems.append("header does not match the pack's name")
    if header and header[-1].offset + header[-1].length != len(data) - len(tail):
        verdict.problems.append("its blobs do not fill the pack up to the header")
    places = {(b.id, b.offset, b.length): b for b in [*header, *indexed]}
    for key in sorted(places, key=lambda k: k[1]):
        b = places[key]
        try:
            if b.offset + b.length > len(data):
                raise InvalidData("it lies beyond the end of the pack")
            repo.decode_blob(b, memoryview(data)[b.offset : b.offset + b.length])
            verdict.good.append(b)
        except InvalidData as e:
            verdict.lost.append(b)
            verdict.problems.append(f"{'tree' if b.type == BlobType.TREE else 'data'} blob {b.id.hex()[:12]}: {e}")
    verdict.ours = (header_ok and (name_ok or repo.encrypted)) or (repo.encrypted and bool(verdict.good))
    return verdict


def _salvage(repo: Repository, session, data: bytes, verdict: PackVerdict) -> int:
    """Store the good blobs of a damaged pack again (in new packs); returns how many."""
    done: set[bytes] = set()
    for b in verdict.good:
        if b.id in done:
            continue
        session.save_blob(b.type, repo.decode_blob(b, memoryview(data)[b.offset : b.offset + b.length]))
        done.add(b.id)
    return len(done)


def repair_packs(
    repo: Repository, packs: dict[str, int], *, progress: Progress = NULL_PROGRESS, dry_run: bool = False
) -> PackRepair:
    """Read each of ``packs`` (name -> size) whole; salvage the damaged ones.

    Order (as prune's repack): 1. the good blobs of damaged packs into new packs, indexed by
    the write session; 2. index objects for every other pack the index had; 3. removal of the
    index objects read at the start; 4. removal of the damaged packs that authenticate as ours
    (one that does not is left in place: it may be someone else's file; no index lists it any
    more, so check only warns about it). Interrupted before 3, the old index still lists the
    damaged pack (the next run does it again); before 4, it is an unindexed leftover."""
    if repo.index_damage:
        raise RepoError(
            f"{len(repo.index_damage)} index object(s) cannot be read; nothing was changed. "
            "Run 'ibsync repair index' first"
        )
    result = PackRepair()
    old_index = sorted(repo.loaded_index)
    by_pack = _blobs_by_pack(repo)
    progress.start(sum(packs.values()), len(packs))
    session = repo.write_session(rewrite=True)
    with session:
        for name in sorted(packs):
            repo.check_lock()
            try:
                data = repo.storage.get(Kind.PACKS, name)
            except NotFound:
                continue  # gone since the listing
            except StorageError as e:
                raise _read_failed(f"pack {name[:12]}", e, "repair packs", "nothing was deleted") from None
            result.read += 1
            progress.advance(len(data), files=1)
            verdict = examine_pack(repo, name, data, by_pack.get(name, []))
            if not verdict.problems:
                continue
            result.damaged[name] = verdict
            if not dry_run:
                result.salvaged_blobs += _salvage(repo, session, data, verdict)
    progress.finish()
    result.packs_written = session.stats.packs_written
    if dry_run or not result.damaged:
        return result
    index_failed: dict[str, str] = {}
    if any(n in by_pack for n in result.damaged):  # else no index object names a damaged pack
        repo.save_full_index(
            PackIndex(bytes.fromhex(n), blobs) for n, blobs in sorted(by_pack.items()) if n not in result.damaged
        )
        delete_objects(repo, Kind.INDEX, old_index, index_failed)
        result.failed.update(index_failed)
    for name, verdict in sorted(result.damaged.items()):
        if index_failed:
            result.left[name] = (
                "an old index object that lists it could not be deleted; run 'ibsync repair packs' again"
            )
        elif not verdict.ours:
            result.left[name] = "not authenticated as this repository's pack; no index lists it"
    ours = [n for n in sorted(result.damaged) if n not in result.left]
    result.deleted = delete_objects(repo, Kind.PACKS, ours, result.failed)
    return result


# ---- repair snapshots ---------------------------------------------------------------------------


@dataclass
class TreeFix:
    """A tree without its lost entries: ``id`` the new tree (the old id when nothing was lost,
    None when the tree itself is lost), and the paths lost below it (relative to it)."""

    id: bytes | None
    lost_files: list[str] = field(default_factory=list)
    lost_folders: list[str] = field(default_factory=list)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _entry_name(d: Any) -> str:
    name = d.get("name") if isinstance(d, dict) else None
    return name if isinstance(name, str) else repr(name)[:60]


def _blob_ids(values: Any) -> list[bytes]:
    """The ids an entry's "content" lists, as far as they read as ids (a malformed entry is
    restored by no one, but prune keeps what it names, so its lost ids count too)."""
    ids = []
    for v in values if isinstance(values, list) else ():
        try:
            b = bytes.fromhex(v) if isinstance(v, str) else b""
        except ValueError:
            continue
        if len(b) == 32:
            ids.append(b)
    return ids


class TreeCleaner:
    """Rewrites trees without the entries whose data the index does not have. New trees are
    only computed here (``new_trees``: id -> bytes); the caller stores them. Trees shared by
    several folders or snapshots are judged once."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.new_trees: dict[bytes, bytes] = {}
        self._fixes: dict[bytes, TreeFix] = {}

    def clean(self, tree_id: bytes, command: str) -> TreeFix:
        fix = self._fixes.get(tree_id)
        if fix is None:
            fix = self._fixes[tree_id] = self._clean(tree_id, command)
        return fix

    def _load(self, tree_id: bytes, command: str) -> list[Any] | None:
        """A tree's stored entries, or None if its blob is lost (damaged, or in no index)."""
        try:
            return self.repo.load_tree_entries(tree_id)
        except (InvalidData, MalformedTree):
            return None
        except NotFound as e:
            raise ReadFailed(
                f"a pack the index lists is missing ({e}); nothing was changed: "
                "run 'ibsync repair index' first, then this again"
            ) from None
        except StorageError as e:
            raise _read_failed(f"tree {tree_id.hex()[:12]}", e, command) from None

    def _clean(self, tree_id: bytes, command: str) -> TreeFix:
        # Recursion follows folder depth; trees ibsync writes are a few levels deep, and Python's
        # limit (1000) is far beyond any backup folder a phone makes.
        entries = self._load(tree_id, command)
        if entries is None:
            return TreeFix(None)
        usable = {id(d) for d in split_entries(entries)[0]}
        fix = TreeFix(tree_id)
        kept: list[Any] = []
        changed = False
        for d in entries:
            if isinstance(d, dict) and not all(self.repo.index.has(b) for b in _blob_ids(d.get("content"))):
                fix.lost_files.append(_entry_name(d))
                changed = True
                continue
            if id(d) in usable and d["type"] == "dir" and d.get("subtree"):
                sub = self.clean(bytes.fromhex(d["subtree"]), command)
                name = d["name"]
                if sub.id is None:
                    fix.lost_folders.append(name)
                    changed = True
                    continue
                fix.lost_files += [_join(name, p) for p in sub.lost_files]
                fix.lost_folders += [_join(name, p) for p in sub.lost_folders]
                if sub.id.hex() != d["subtree"]:
                    d = {**d, "subtree": sub.id.hex()}
                    changed = True
            kept.append(d)
        if changed:
            # built canonically (sorted, the repository's tree format), as an import would
            built = self.repo.build_tree(kept)  # every node blob of the folder, nothing stored yet
            fix.id = built.id
            self.new_trees.update(built.blobs)
        return fix


@dataclass
class SnapshotDamage:
    snapshot: Snapshot
    lost_files: list[str] = field(default_factory=list)  # paths in the backup folder
    lost_trees: list[str] = field(default_factory=list)  # folders whose listing is gone ("/": the whole snapshot)
    new_tree: bytes | None = None  # the root without what is lost; None: the root itself is lost
    rewritten: str | None = None  # id of the snapshot saved in its place

    @property
    def root_lost(self) -> bool:
        return self.new_tree is None


@dataclass
class SnapshotRepair:
    damaged: list[SnapshotDamage] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # snapshot object -> why it does not authenticate
    new_trees: dict[bytes, bytes] = field(default_factory=dict)  # trees the rewritten snapshots need
    # rewrites an interrupted run already saved: (original id, new tree) -> rewritten snapshot id
    saved_rewrites: dict[tuple[str, bytes], str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # object path -> why it could not be deleted
    removed: set[str] = field(default_factory=set)  # snapshot object names deleted

    @property
    def count(self) -> int:
        return len(self.damaged) + len(self.unreadable)


def damaged_snapshots(repo: Repository, command: str = "repair snapshots") -> SnapshotRepair:
    """Snapshots referring to data the index does not have (or to trees that do not
    authenticate), each with its rewritten tree; and snapshot objects that do not authenticate.
    A failed read stops it (ReadFailed), as does an index object that did not load: what it
    lists would look lost."""
    if repo.index_damage:
        raise RepoError(
            f"{len(repo.index_damage)} index object(s) cannot be read, so data would look lost that is "
            "not; nothing was changed. Run 'ibsync repair index' first"
        )
    snaps, unreadable = repo.snapshots_with_damage()
    out = SnapshotRepair(unreadable={n: why for n, why in unreadable.items() if is_object_name(n)})
    for snap in snaps:
        origin = snap.source.get("repaired_from")
        if isinstance(origin, str):
            out.saved_rewrites.setdefault((origin, snap.tree), snap.id)
    cleaner = TreeCleaner(repo)
    for snap in snaps:
        fix = cleaner.clean(snap.tree, command)
        if fix.id == snap.tree:
            continue
        lost_trees = ["/"] if fix.id is None else sorted(fix.lost_folders)
        out.damaged.append(SnapshotDamage(snap, sorted(fix.lost_files), lost_trees, fix.id))
    out.new_trees = cleaner.new_trees
    return out


def _removed_record(damage: SnapshotDamage) -> dict[str, Any]:
    paths = sorted([f"{p}/" for p in damage.lost_trees] + damage.lost_files)
    if len(paths) > REMOVED_PATHS_RECORDED:
        return {"removed_count": len(paths)}
    return {"removed": paths}


def rewritten_snapshot(damage: SnapshotDamage) -> Snapshot:
    """The snapshot as it was, but for its tree: same device, dates, folder and summary; its
    source says which snapshot it replaces and what was removed (folders end with '/')."""
    old = damage.snapshot
    assert damage.new_tree is not None
    # a snapshot repaired before: only this repair's record stays
    source = {k: v for k, v in old.source.items() if k not in ("removed", "removed_count")}
    source.update(repaired_from=old.id, **_removed_record(damage))
    return replace(old, tree=damage.new_tree, source=source, id="")


def rewrite_damaged(repo: Repository, repair: SnapshotRepair) -> None:
    """Store the new trees, save each rewritten snapshot, then remove every damaged original
    (a root that is lost leaves nothing to rewrite) and every unreadable snapshot object. An
    original is removed only once its replacement is saved. A run interrupted before removing
    an original left its rewrite behind: that one is kept, not saved a second time (sealed
    objects differ at every write, so saving again would make a duplicate)."""
    with repo.write_session() as session:
        for data in repair.new_trees.values():
            session.save_blob(BlobType.TREE, data)
    for d in repair.damaged:
        if not d.root_lost:
            assert d.new_tree is not None
            d.rewritten = repair.saved_rewrites.get((d.snapshot.id, d.new_tree)) or repo.save_snapshot(
                rewritten_snapshot(d)
            )
    names = [d.snapshot.id for d in repair.damaged] + sorted(repair.unreadable)
    delete_objects(repo, Kind.SNAPSHOTS, names, repair.failed)
    repair.removed = {n for n in names if object_path(Kind.SNAPSHOTS, n) not in repair.failed}
