"""prune: give back the space of data no snapshot uses.

Mark every blob reachable from a snapshot; a pack with no such blob is deleted, a pack whose
unused share reaches the threshold is repacked (its used blobs are written to new packs, then
it is deleted), the others stay. The caller holds the exclusive lock, so no import is adding
data meanwhile.

Order, so that an interruption at any instant loses nothing (design.md §13):
  1. new packs with the moved blobs, and index objects for them;
  2. index objects listing every pack that stays;
  3. removal of the index objects read at the start (now all superseded);
  4. removal of the packs no longer listed.
Interrupted before 3, blobs are listed twice (harmless); before 4, some packs are listed
nowhere (the next prune removes them).

A pack listed in no index is deleted only if its own header authenticates (its name is the hash
of its tail, the header opens with the repository key): anything else in packs/ may be someone
else's file, so it is reported and left. A deletion that fails is reported by name, never passed
over; the repository stays valid (what was not deleted is unused, and the next prune tries
again). While an old index object could not be deleted, the packs are kept: it still lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from ..errors import IbsyncError, NotFound, RepoError
from ..format.index import PackIndex, iter_index
from ..format.pack import FLAG_ZSTD, BlobType, PackedBlob
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from ..storage import Kind
from .repair import delete_objects, read_pack_header
from .used import BlobMarks, collect_used

# BlobMarks counters prune uses: a used blob, and one found at the location lookups return
_USED, _LOCATED = 0, 1

# A write in progress keeps touching its temporary file; one untouched this long was left by a
# killed process. The margin covers a holder that lost its lock (asleep) and resumes writing.
STALE_TEMPORARY_AFTER = timedelta(hours=6)


@dataclass
class PrunePlan:
    used_blobs: int = 0
    delete: dict[str, int] = field(default_factory=dict)  # pack name -> size: nothing in it is used
    repack: dict[str, list[PackedBlob]] = field(default_factory=dict)  # pack name -> its used blobs
    repack_sizes: dict[str, int] = field(default_factory=dict)
    # packs that stay as they are; their index entries are copied from the old index objects
    # when the index is rewritten, so no list of every blob is held (48+ bytes each)
    keep: set[str] = field(default_factory=set)
    unused_kept_bytes: int = 0  # unused bytes left in packs below the threshold
    old_index: list[str] = field(default_factory=list)
    junk: dict[str, str] = field(default_factory=dict)  # name in packs/ -> why it is not an ibsync pack: left alone

    @property
    def delete_bytes(self) -> int:
        return sum(self.delete.values())

    @property
    def repack_bytes(self) -> int:
        return sum(self.repack_sizes.values())

    @property
    def nothing_to_do(self) -> bool:
        return not self.delete and not self.repack


@dataclass
class PruneResult:
    plan: PrunePlan
    packs_deleted: int = 0
    packs_written: int = 0
    bytes_freed: int = 0  # deleted packs minus the packs written for moved blobs
    failed: dict[str, str] = field(default_factory=dict)  # object path -> why it could not be deleted
    temporary_removed: int = 0  # .tmp-* files of interrupted writes
    packs_left_listed: int = 0  # packs kept because an old index object that lists them could not be deleted
    dry_run: bool = False  # only planned: the counts above are all 0

    @property
    def problems(self) -> list[str]:
        """One line per object that could not be deleted (the repository is still valid)."""
        return [f"could not delete {path}: {why}" for path, why in sorted(self.failed.items())]

    def to_dict(self) -> dict:
        """What ``prune --json`` prints: the plan, then (unless a dry run) what was done."""
        plan = self.plan
        out: dict = {
            "used_blobs": plan.used_blobs,
            "packs_to_delete": len(plan.delete),
            "bytes_to_delete": plan.delete_bytes,
            "packs_to_repack": len(plan.repack),
            "bytes_to_repack": plan.repack_bytes,
            "packs_kept": len(plan.keep),
            "unused_bytes_kept": plan.unused_kept_bytes,
            "junk_packs": dict(plan.junk),
            "dry_run": self.dry_run,
        }
        if not self.dry_run:
            out.update(
                packs_deleted=self.packs_deleted,
                packs_written=self.packs_written,
                bytes_freed=self.bytes_freed,
                temporary_files_removed=self.temporary_removed,
                packs_left_listed=self.packs_left_listed,
                failed=dict(self.failed),
            )
        return out


def plan_prune(
    repo: Repository, *, repack_threshold: float = 0.5, ignore: frozenset[str] | set[str] = frozenset()
) -> PrunePlan:
    """Decide what to delete and repack. ``repack_threshold``: the unused share of a pack's
    bytes from which it is repacked (0: any unused byte; 1.0: never repack, only delete wholly
    unused packs)."""
    # What prune cannot read it must not judge: a snapshot object that does not authenticate
    # may still be the only record of data, and an index object skipped as damaged may list
    # packs a snapshot needs. restic's prune refuses in both cases too.
    if repo.index_damage:
        raise RepoError(
            f"{len(repo.index_damage)} index object(s) cannot be read; nothing was pruned. Run 'ibsync repair index' first"
        )
    snapshots, damaged = repo.snapshots_with_damage()
    if damaged:
        raise RepoError(
            f"{len(damaged)} snapshot object(s) cannot be read; nothing was pruned. "
            "Run 'ibsync repair snapshots' first (it lists and removes them)"
        )
    plan = PrunePlan(old_index=sorted(repo.loaded_index))
    used = collect_used(repo, (snap.tree for snap in snapshots if snap.id not in ignore))
    plan.used_blobs = len(used)
    stored = {info.name: info.size for info in repo.storage.list(Kind.PACKS)}
    totals = _pack_totals(repo, used)
    missing = sum(1 for _, mark in used.items() if mark != _LOCATED)
    if missing:
        raise RepoError(
            f"{missing} blob(s) used by snapshots are not in the index; nothing was pruned. "
            "Run 'ibsync check' to see which snapshots are affected"
        )
    repack: set[bytes] = set()
    for name, size in stored.items():
        pack_totals = totals.get(bytes.fromhex(name))
        if pack_totals is None:
            _plan_unindexed(repo, plan, name, size)
            continue
        used_bytes, total = pack_totals
        if used_bytes == 0:
            plan.delete[name] = size
        elif total - used_bytes > 0 and total - used_bytes >= repack_threshold * total and repack_threshold < 1.0:
            repack.add(bytes.fromhex(name))
            plan.repack_sizes[name] = size
        else:
            plan.keep.add(name)
            plan.unused_kept_bytes += total - used_bytes
    gone = {pack_id.hex() for pack_id in totals} - set(stored)
    if gone:
        raise RepoError(
            f"{len(gone)} pack(s) in the index are missing from the repository; nothing was pruned. "
            "Run 'ibsync check', then 'ibsync repair index'"
        )
    if repack:
        for pack_id, blob in _used_locations(repo, used):
            if pack_id in repack:
                plan.repack.setdefault(pack_id.hex(), []).append(blob)
    return plan


def _is_used_here(repo: Repository, used: BlobMarks, blob_id: bytes, pack_id: bytes, offset: int) -> bool:
    """Whether this index entry is where a used blob is read from: a blob stored twice is used
    only at the location lookups return."""
    if blob_id not in used:
        return False
    first = repo.index.get(blob_id)
    return first is not None and (first.pack_id, first.offset) == (pack_id, offset)


def _pack_totals(repo: Repository, used: BlobMarks) -> dict[bytes, list[int]]:
    """Per indexed pack [used bytes, all bytes]; marks each used blob found where lookups read it."""
    totals: dict[bytes, list[int]] = {}
    for blob_id, loc in repo.index.entries():
        acc = totals.get(loc.pack_id)
        if acc is None:
            acc = totals[loc.pack_id] = [0, 0]
        acc[1] += loc.length
        if _is_used_here(repo, used, blob_id, loc.pack_id, loc.offset):
            acc[0] += loc.length
            used.set(blob_id, _LOCATED)
    return totals


def _used_locations(repo: Repository, used: BlobMarks):
    """(pack id, blob) of every index entry a used blob is read from."""
    for blob_id, loc in repo.index.entries():
        if _is_used_here(repo, used, blob_id, loc.pack_id, loc.offset):
            yield loc.pack_id, loc.as_packed(blob_id)


def _kept_index(repo: Repository, old_index: list[str], keep: set[str]):
    """The entries of every kept pack, as the index objects read at the start list them (a pack
    listed in several objects is listed as often again, as loading them did): one object in
    memory at a time rather than every blob of the repository. A read that fails stops prune
    before it deletes anything."""
    for name in old_index:
        for pack_id, records in iter_index(repo.load_object(Kind.INDEX, name)):
            if pack_id.hex() in keep:
                yield PackIndex(
                    pack_id,
                    [
                        PackedBlob(BlobType(t), blob_id, offset, length, raw, bool(flags & FLAG_ZSTD))
                        for t, flags, blob_id, offset, length, raw in records
                    ],
                )


def _plan_unindexed(repo: Repository, plan: PrunePlan, name: str, size: int) -> None:
    """A pack no index lists: left by an interrupted run (delete it), or not ibsync's (leave it)."""
    try:
        read_pack_header(repo, name, size)
    except NotFound:
        return  # gone since the listing
    except IbsyncError as e:
        plan.junk[name] = str(e)
        return
    plan.delete[name] = size


def remove_stale_temporary(repo: Repository, result: PruneResult) -> None:
    """Remove what killed writes left (only under the exclusive lock: no write of ours runs)."""
    repo.check_lock()
    try:
        result.temporary_removed = repo.storage.remove_stale_temporary(STALE_TEMPORARY_AFTER.total_seconds())
    except IbsyncError as e:
        result.failed[".tmp-* (temporary files of interrupted writes)"] = str(e)


def execute_prune(repo: Repository, plan: PrunePlan, *, progress: Progress = NULL_PROGRESS) -> PruneResult:
    result = PruneResult(plan)
    remove_stale_temporary(repo, result)
    if plan.nothing_to_do:
        return result
    # 1. move the used blobs of packs being repacked; a damaged blob stops everything
    session = repo.write_session(rewrite=True)
    with session:
        for name, blobs in plan.repack.items():
            for blob, data, err in repo.read_pack_blobs(bytes.fromhex(name), blobs):
                if err is not None or data is None:
                    raise RepoError(
                        f"pack {name[:12]}: blob {blob.id.hex()[:12]} unreadable ({err}); nothing was deleted"
                    )
                session.save_blob(blob.type, data)
                progress.advance(blob.length)
    result.packs_written = session.stats.packs_written
    # 2. index objects for every pack that stays
    repo.save_full_index(_kept_index(repo, plan.old_index, plan.keep))
    # 3. the index objects read at the start (so authenticated) are superseded
    index_failed: dict[str, str] = {}
    delete_objects(repo, Kind.INDEX, plan.old_index, index_failed)
    result.failed.update(index_failed)
    if index_failed:
        # an old index object that stays still lists the packs below (a repacked blob's old
        # place among them): deleting them would break lookups; the next prune deletes them
        result.packs_left_listed = len(plan.delete) + len(plan.repack_sizes)
        result.bytes_freed -= session.stats.stored_bytes_added
        return result
    # 4. packs no index lists any more
    sizes = {**plan.delete, **plan.repack_sizes}
    for name in delete_objects(repo, Kind.PACKS, sizes, result.failed):
        result.packs_deleted += 1
        result.bytes_freed += sizes[name]
    result.bytes_freed -= session.stats.stored_bytes_added
    return result
