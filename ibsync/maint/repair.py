"""repair: rebuild the index from the packs themselves, and drop snapshots whose data is gone.

Both run under the exclusive lock and write before they delete: a new index is complete before
the old index objects go, so an interruption leaves a valid (if redundant) index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import IbsyncError
from ..format.index import PackIndex
from ..format.pack import pack_name, parse_header
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from ..storage import Kind

TAIL_GUESS = 64 << 10  # one read gets the header of a pack of up to ~1,500 blobs


@dataclass
class IndexRepair:
    packs: int = 0
    blobs: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # pack name -> why it could not be indexed
    old_index_objects: int = 0


def _read_tail(repo: Repository, name: str, size: int) -> bytes:
    start = max(0, size - TAIL_GUESS)
    data = repo.storage.get(Kind.PACKS, name, start, size - start)
    hlen = int.from_bytes(data[-4:], "little") + 4
    if hlen > len(data) and hlen <= size:
        data = repo.storage.get(Kind.PACKS, name, size - hlen, hlen)
    return data[-hlen:] if hlen <= len(data) else data


def rebuild_index(repo: Repository, *, progress: Progress = NULL_PROGRESS, dry_run: bool = False) -> IndexRepair:
    """Index every pack from its own header; replace all index objects with the result."""
    result = IndexRepair()
    old = sorted(info.name for info in repo.storage.list(Kind.INDEX))
    result.old_index_objects = len(old)
    packs: list[PackIndex] = []
    listing = list(repo.storage.list(Kind.PACKS))
    progress.start(None, len(listing))
    for info in listing:
        try:
            tail = _read_tail(repo, info.name, info.size)
            if pack_name(tail) != info.name:
                raise IbsyncError("header does not match the pack's name")
            blobs = parse_header(tail, repo.cipher)
            if blobs and blobs[-1].offset + blobs[-1].length + len(tail) != info.size:
                raise IbsyncError("its blobs do not fill the pack up to the header")
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
    for name in old:
        try:
            repo.storage.delete(Kind.INDEX, name)
        except IbsyncError:
            pass
    return result


@dataclass
class SnapshotDamage:
    snapshot: object
    lost_files: list[str] = field(default_factory=list)  # paths in the backup folder
    lost_trees: list[str] = field(default_factory=list)  # folders whose listing is gone


def damaged_snapshots(repo: Repository) -> list[SnapshotDamage]:
    """Snapshots referring to data the index does not have (or trees that do not read)."""
    out = []
    for snap in repo.snapshots():
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
        if damage.lost_files or damage.lost_trees:
            damage.lost_files.sort()
            out.append(damage)
    return out


def forget_damaged(repo: Repository, damaged: list[SnapshotDamage]) -> None:
    for d in damaged:
        repo.storage.delete(Kind.SNAPSHOTS, d.snapshot.id)
