"""repair: rebuild the index from the packs themselves, and drop snapshots whose data is gone.

Both run under the exclusive lock and write before they delete: a new index is complete before
the old index objects go, so an interruption leaves a valid (if redundant) index. They delete
only names that are objects (64 hex digits, listed by the storage) in the folder they repair,
and a failed deletion is reported, never passed over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import IbsyncError, InvalidData, NotFound
from ..format.index import PackIndex
from ..format.pack import PackedBlob, pack_name, parse_header
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import MAX_PACK_SIZE, Repository
from ..storage import Kind, object_path
from ..storage.base import is_object_name

TAIL_GUESS = 64 << 10  # one read gets the header of a pack of up to ~1,500 blobs
# The largest header a pack ibsync wrote can have: the largest pack (the largest pack size plus
# one maximum chunk) filled with the smallest stored blobs (AEAD overhead + 1 byte), 42 bytes of
# header each. Real headers are a few MB; this only stops a planted object's last four bytes
# from making us read gigabytes.
MAX_HEADER_READ = ((MAX_PACK_SIZE + (4 << 20)) // 29 + 1) * 42 + 64


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
        data = repo.storage.get(Kind.PACKS, name, size - hlen, hlen)
    return data[-hlen:] if hlen <= len(data) else data


def read_pack_header(repo: Repository, name: str, size: int) -> list[PackedBlob]:
    """The blobs of pack ``name`` (``size`` bytes) from its own header. Raises unless the pack
    is one of this repository's, intact: its name is the hash of its tail and the header opens
    with the repository key. What passes may be deleted; what fails is not ibsync's to delete."""
    tail = _read_tail(repo, name, size)
    if pack_name(tail) != name:
        raise InvalidData("header does not match the pack's name")
    blobs = parse_header(tail, repo.cipher)
    if blobs and blobs[-1].offset + blobs[-1].length + len(tail) != size:
        raise InvalidData("its blobs do not fill the pack up to the header")
    return blobs


def rebuild_index(repo: Repository, *, progress: Progress = NULL_PROGRESS, dry_run: bool = False) -> IndexRepair:
    """Index every pack from its own header; replace all index objects with the result."""
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
        except IbsyncError as e:
            result.damaged[info.name] = str(e)
            continue
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


@dataclass
class SnapshotDamage:
    snapshot: object
    lost_files: list[str] = field(default_factory=list)  # paths in the backup folder
    lost_trees: list[str] = field(default_factory=list)  # folders whose listing is gone


@dataclass
class SnapshotRepair:
    damaged: list[SnapshotDamage] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # snapshot object -> why it does not authenticate
    failed: dict[str, str] = field(default_factory=dict)  # object path -> why it could not be deleted
    removed: set[str] = field(default_factory=set)  # snapshot object names deleted

    @property
    def count(self) -> int:
        return len(self.damaged) + len(self.unreadable)


def _damage_of(repo: Repository, snap) -> SnapshotDamage:
    damage = SnapshotDamage(snap)
    stack = [(snap.tree, "")]
    while stack:
        tid, path = stack.pop()
        try:
            nodes = repo.load_tree(tid)
        except IbsyncError:
            damage.lost_trees.append(path or "/")
            continue
        for node in nodes:
            child = f"{path}/{node.name}" if path else node.name
            if node.type == "dir" and node.subtree is not None:
                stack.append((node.subtree, child))
            elif node.type == "file" and not all(repo.index.has(c) for c in node.content):
                damage.lost_files.append(child)
    damage.lost_files.sort()
    return damage


def damaged_snapshots(repo: Repository) -> SnapshotRepair:
    """Snapshots referring to data the index does not have (or trees that do not read), and
    snapshot objects that do not authenticate at all."""
    snaps, unreadable = repo.snapshots_with_damage()
    out = SnapshotRepair(unreadable={n: why for n, why in unreadable.items() if is_object_name(n)})
    for snap in snaps:
        damage = _damage_of(repo, snap)
        if damage.lost_files or damage.lost_trees:
            out.damaged.append(damage)
    return out


def forget_damaged(repo: Repository, repair: SnapshotRepair) -> None:
    names = [d.snapshot.id for d in repair.damaged] + sorted(repair.unreadable)
    delete_objects(repo, Kind.SNAPSHOTS, names, repair.failed)
    repair.removed = {n for n in names if object_path(Kind.SNAPSHOTS, n) not in repair.failed}
