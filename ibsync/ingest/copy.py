"""copy: send snapshots from one repository to another (different passwords allowed).

Blob ids are keyed per repository, so the same bytes have different ids in the two. Copy
therefore reads each blob a snapshot uses from the source (a pack range at a time, verified),
computes its id under the target's key, and uploads it only if the target lacks it: only
missing data travels. Trees are then rewritten with the target's ids, bottom up, and the
snapshot is saved last, recording where it came from so that a later copy skips it.

Blobs keep the source's chunk boundaries. sqlite blocks and whole small files are cut the same
way in every repository and deduplicate with the target's own imports; large files cut by
FastCDC use each repository's secret gear seed, so they deduplicate only with other copies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from ..errors import RepoError
from ..format.pack import BlobType, PackedBlob
from ..model import Snapshot, encode_tree
from ..progress import NULL_PROGRESS, Progress
from ..reader.walk import collect_blobs
from ..repo.repository import Repository

log = logging.getLogger("ibsync")


@dataclass
class CopyResult:
    copied: list[tuple[Snapshot, Snapshot]] = field(default_factory=list)  # (source, target)
    skipped: list[Snapshot] = field(default_factory=list)  # already in the target
    blobs_read: int = 0
    blobs_sent: int = 0
    bytes_sent: int = 0  # stored bytes the target grew by
    duration_s: float = 0.0


def already_copied(src: Repository, dst: Repository) -> set[str]:
    """Ids of source snapshots the target already holds a copy of."""
    return {
        s.source.get("snapshot")
        for s in dst.snapshots()
        if s.source.get("kind") == "copy" and s.source.get("repository") == src.id
    }


def copy_snapshots(
    src: Repository, dst: Repository, snapshots: list[Snapshot], *, progress: Progress = NULL_PROGRESS
) -> CopyResult:
    started = time.monotonic()
    result = CopyResult()
    done = already_copied(src, dst)
    mapping: dict[bytes, bytes] = {}  # source blob id -> target blob id
    for snap in snapshots:
        if snap.id in done:
            result.skipped.append(snap)
            continue
        with dst.write_session() as session:
            _send_data(src, dst, snap, session, mapping, result, progress)
            root = _rewrite_tree(src, snap.tree, session, mapping)
        copy = replace(
            snap,
            tree=root,
            source={"kind": "copy", "repository": src.id, "snapshot": snap.id, "original": snap.source},
            parent=None,
            id="",
        )
        copy.summary = replace(snap.summary, added_bytes=session.stats.stored_bytes_added)
        dst.save_snapshot(copy)
        result.copied.append((snap, copy))
        result.blobs_sent += session.stats.blobs_added
        result.bytes_sent += session.stats.stored_bytes_added
    result.duration_s = round(time.monotonic() - started, 3)
    return result


def _send_data(src, dst, snap, session, mapping, result, progress) -> None:
    """Every data blob of the snapshot not mapped yet: read once, re-id, upload if missing."""
    used: set[bytes] = set()
    collect_blobs(src, snap.tree, used, with_refused=False)  # _rewrite_tree leaves refused entries out
    by_pack: dict[bytes, list[PackedBlob]] = {}
    for blob_id in used:
        if blob_id in mapping:
            continue
        loc = src.index.get(blob_id)
        if loc is None:
            raise RepoError(f"snapshot {snap.short_id}: blob {blob_id.hex()[:12]} is missing from the source; run 'ibsync check' there")
        if loc.type == BlobType.DATA:
            by_pack.setdefault(loc.pack_id, []).append(loc.as_packed(blob_id))
    progress.start(sum(b.raw_length for bs in by_pack.values() for b in bs), None)
    for pack_id, blobs in by_pack.items():
        for blob, data, err in src.read_pack_blobs(pack_id, blobs):
            if err is not None or data is None:
                raise RepoError(f"snapshot {snap.short_id}: blob {blob.id.hex()[:12]} unreadable in the source ({err})")
            mapping[blob.id], _ = session.save_blob(BlobType.DATA, data)
            result.blobs_read += 1
            progress.advance(len(data))
    progress.finish()


def _rewrite_tree(src: Repository, tree_id: bytes, session, mapping: dict[bytes, bytes]) -> bytes:
    """The tree with every id translated; sub-trees first. Shared sub-trees are done once."""
    if tree_id in mapping:
        return mapping[tree_id]
    entries = []
    nodes = src.load_tree(tree_id)
    for rejected in getattr(nodes, "rejected", ()):
        # a copy never carries an entry no reader may use; say so rather than drop it silently
        log.warning("entry '%s' of a folder left out of the copy: %s", rejected.name, rejected.reason)
    for node in nodes:
        d = node.to_dict()
        if node.type == "file":
            d["content"] = [mapping[c].hex() for c in node.content]
        elif node.type == "dir" and node.subtree is not None:
            d["subtree"] = _rewrite_tree(src, node.subtree, session, mapping).hex()
        entries.append(d)
    new_id, _ = session.save_blob(BlobType.TREE, encode_tree(entries))
    mapping[tree_id] = new_id
    return new_id
