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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import IbsyncError, RepoError
from ..format.index import PackIndex
from ..format.pack import PackedBlob
from ..progress import NULL_PROGRESS, Progress
from ..reader.walk import collect_blobs
from ..repo.repository import Repository
from ..storage import Kind

@dataclass
class PrunePlan:
    used_blobs: int = 0
    delete: dict[str, int] = field(default_factory=dict)  # pack name -> size: nothing in it is used
    repack: dict[str, list[PackedBlob]] = field(default_factory=dict)  # pack name -> its used blobs
    repack_sizes: dict[str, int] = field(default_factory=dict)
    keep: dict[str, list[PackedBlob]] = field(default_factory=dict)  # pack name -> every blob it holds
    unused_kept_bytes: int = 0  # unused bytes left in packs below the threshold
    old_index: list[str] = field(default_factory=list)

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


def plan_prune(repo: Repository, *, repack_threshold: float = 0.5, ignore: set[str] = frozenset()) -> PrunePlan:
    """Decide what to delete and repack. ``repack_threshold``: the unused share of a pack's
    bytes from which it is repacked (0: any unused byte; 1.0: never repack, only delete wholly
    unused packs)."""
    plan = PrunePlan(old_index=sorted(repo.loaded_index))
    used: set[bytes] = set()
    for snap in repo.snapshots():
        if snap.id not in ignore:
            collect_blobs(repo, snap.tree, used)
    plan.used_blobs = len(used)

    stored = {info.name: info.size for info in repo.storage.list(Kind.PACKS)}
    blobs_of: dict[str, list[tuple[PackedBlob, bool]]] = {}
    located: set[bytes] = set()
    for blob_id, loc in repo.index.entries():
        first = repo.index.get(blob_id)
        # a blob stored twice is used only where lookups find it
        is_used = blob_id in used and first is not None and (first.pack_id, first.offset) == (loc.pack_id, loc.offset)
        if is_used:
            located.add(blob_id)
        blobs_of.setdefault(loc.pack_id.hex(), []).append((loc.as_packed(blob_id), is_used))
    missing = used - located
    if missing:
        raise RepoError(
            f"{len(missing)} blob(s) used by snapshots are not in the index; nothing was pruned. "
            "Run 'ibsync check' to see which snapshots are affected"
        )
    for name, size in stored.items():
        entries = blobs_of.get(name)
        if not entries:
            plan.delete[name] = size  # left by an interrupted run, or already emptied
            continue
        used_bytes = sum(b.length for b, u in entries if u)
        total = sum(b.length for b, _ in entries)
        if used_bytes == 0:
            plan.delete[name] = size
        elif total - used_bytes > 0 and total - used_bytes >= repack_threshold * total and repack_threshold < 1.0:
            plan.repack[name] = [b for b, u in entries if u]
            plan.repack_sizes[name] = size
        else:
            plan.keep[name] = [b for b, _ in entries]
            plan.unused_kept_bytes += total - used_bytes
    gone = {bytes.fromhex(n) for n in blobs_of} - {bytes.fromhex(n) for n in stored}
    if gone:
        raise RepoError(
            f"{len(gone)} pack(s) in the index are missing from the repository; nothing was pruned. "
            "Run 'ibsync check', then 'ibsync repair index'"
        )
    return plan


def execute_prune(repo: Repository, plan: PrunePlan, *, progress: Progress = NULL_PROGRESS) -> PruneResult:
    result = PruneResult(plan)
    if plan.nothing_to_do:
        return result
    # 1. move the used blobs of packs being repacked; a damaged blob stops everything
    session = repo.write_session(rewrite=True)
    with session:
        for name, blobs in plan.repack.items():
            for blob, data, err in repo.read_pack_blobs(bytes.fromhex(name), blobs):
                if err is not None or data is None:
                    raise RepoError(f"pack {name[:12]}: blob {blob.id.hex()[:12]} unreadable ({err}); nothing was deleted")
                session.save_blob(blob.type, data)
                progress.advance(blob.length)
    result.packs_written = session.stats.packs_written
    # 2. index objects for every pack that stays
    repo.save_full_index(PackIndex(bytes.fromhex(name), blobs) for name, blobs in sorted(plan.keep.items()))
    # 3. the index objects read at the start are superseded
    for name in plan.old_index:
        repo.check_lock()
        try:
            repo.storage.delete(Kind.INDEX, name)
        except IbsyncError:
            pass  # already gone: another run of prune got here first
    # 4. packs no index lists any more
    for name, size in [*plan.delete.items(), *plan.repack_sizes.items()]:
        repo.check_lock()
        try:
            repo.storage.delete(Kind.PACKS, name)
        except IbsyncError:
            continue
        result.packs_deleted += 1
        result.bytes_freed += size
    result.bytes_freed -= session.stats.stored_bytes_added
    return result
