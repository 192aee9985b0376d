"""copy: send snapshots from one repository to another (different passwords allowed).

Blob ids are keyed per repository, so the same bytes have different ids in the two. Copy
therefore reads each blob a snapshot uses from the source (a pack range at a time, verified),
computes its id under the target's key, and uploads it only if the target lacks it: only
missing data travels. Trees are then rewritten with the target's ids, bottom up, and the
snapshot is saved last, recording where it came from so that a later copy skips it.

A snapshot whose device has a snapshot already copied (its parent, usually: yesterday's) is
copied against that pair instead: the copy rewrote the earlier tree entry for entry, so where
the new tree equals the old one the old copy's ids are the answer, and only what differs is
read. Folders are compared with ``diff_folder`` (equal subtrees, and in tree format 2 equal
nodes, are skipped unread), a file's blobs that were already in the old version of the same
file map through the old copy's entry, and only the remaining blobs are read from the source.
Every pair of entries used this way is checked to agree (type, size, mode, time, number of
blobs); a folder where they do not (a repaired or otherwise altered copy) is copied whole.
A daily copy thus reads about what the day added, not the phone.

Blobs keep the source's chunk boundaries. sqlite blocks and whole small files are cut the same
way in every repository and deduplicate with the target's own imports; large files cut by
FastCDC use each repository's secret gear seed, so they deduplicate only with other copies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import RepoError
from ..format.pack import BlobType
from ..maint.used import BlobMap, BlobMarks
from ..model import Node, Snapshot, split_entries
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from ..repo.trees import diff_folder

log = logging.getLogger("ibsync")

# What a tree id stands for while the first pass only finds the blobs to read
_PLACEHOLDER = bytes(32)


@dataclass
class CopyResult:
    copied: list[tuple[Snapshot, Snapshot]] = field(default_factory=list)  # (source, target)
    skipped: list[Snapshot] = field(default_factory=list)  # already in the target
    blobs_read: int = 0
    blobs_sent: int = 0
    bytes_sent: int = 0  # stored bytes the target grew by
    duration_s: float = 0.0


@dataclass(frozen=True)
class _Base:
    """A source tree and the target's copy of it: the copy rewrote it entry for entry."""

    source: bytes
    target: bytes


class _Mismatch(Exception):
    """A copied folder does not agree with the source folder it was copied from."""


def _copies_of(src: Repository, dst: Repository) -> dict[str, Snapshot]:
    """Source snapshot id -> the target's copy of it."""
    return {
        s.source["snapshot"]: s
        for s in dst.snapshots()
        if s.source.get("kind") == "copy"
        and s.source.get("repository") == src.id
        and isinstance(s.source.get("snapshot"), str)
    }


def _choose_base(snap: Snapshot, sources: dict[str, Snapshot], copies: dict[str, Snapshot]) -> _Base | None:
    """The copied pair to copy ``snap`` against: its parent if copied, else the copied snapshot
    of the same device nearest in time. A copy that ``repair snapshots`` rewrote lost entries
    its source still has, so it is no base."""
    candidates = []
    for sid, copy in copies.items():
        source = sources.get(sid)
        if source is None or source.device.udid != snap.device.udid or "repaired_from" in copy.source:
            continue
        if sid == snap.parent:
            return _Base(source.tree, copy.tree)
        candidates.append((abs((source.time - snap.time).total_seconds()), sid, source, copy))
    if not candidates:
        return None
    _, _, source, copy = min(candidates, key=lambda c: (c[0], c[1]))
    return _Base(source.tree, copy.tree)


def copy_snapshots(
    src: Repository, dst: Repository, snapshots: list[Snapshot], *, progress: Progress = NULL_PROGRESS
) -> CopyResult:
    started = time.monotonic()
    result = CopyResult()
    copies = _copies_of(src, dst)
    sources = {s.id: s for s in src.snapshots()}
    sources.update((s.id, s) for s in snapshots)
    for snap in snapshots:
        if snap.id in copies:
            result.skipped.append(snap)
            continue
        base = _choose_base(snap, sources, copies)
        with dst.write_session() as session:
            root = _copy_tree(src, dst, session, snap, base, result, progress)
        copy = replace(
            snap,
            tree=root,
            source={"kind": "copy", "repository": src.id, "snapshot": snap.id, "original": snap.source},
            parent=None,
            id="",
        )
        copy.summary = replace(snap.summary, added_bytes=session.stats.stored_bytes_added)
        copy.id = dst.save_snapshot(copy)
        copies[snap.id] = copy
        result.copied.append((snap, copy))
        result.blobs_sent += session.stats.blobs_added
        result.bytes_sent += session.stats.stored_bytes_added
    result.duration_s = round(time.monotonic() - started, 3)
    return result


def _copy_tree(src, dst, session, snap: Snapshot, base: _Base | None, result: CopyResult, progress: Progress) -> bytes:
    """Two passes over what differs from the base: the first finds the blobs nothing maps (they
    are then read a pack range at a time), the second writes the trees."""
    wanted = _Wanted(src, snap)
    _TreeCopier(src, dst, wanted.add, None).rewrite(snap.tree, base)
    sent = _send(src, session, snap, wanted, result, progress)
    del wanted
    return _TreeCopier(src, dst, lambda blob: _sent_id(sent, blob), session.save_tree).rewrite(snap.tree, base)


def _sent_id(sent: BlobMap, blob: bytes) -> bytes:
    found = sent.get(blob)
    if found is None:  # the first pass read every blob the second asks for
        raise RepoError(f"copy: blob {blob.hex()[:12]} was not read from the source")
    return found


class _Wanted:
    """Source blobs to read, grouped by pack (32 bytes each), each once."""

    def __init__(self, src: Repository, snap: Snapshot) -> None:
        self.src, self.snap = src, snap
        self.seen = BlobMarks()
        self.by_pack: dict[bytes, bytearray] = {}
        self.raw_bytes = 0

    def add(self, blob: bytes) -> bytes:
        if self.seen.add(blob):
            loc = self.src.index.get(blob)
            if loc is None:
                raise RepoError(
                    f"snapshot {self.snap.short_id}: blob {blob.hex()[:12]} is missing from the source; "
                    "run 'ibsync check' there"
                )
            self.by_pack.setdefault(loc.pack_id, bytearray()).extend(blob)
            self.raw_bytes += loc.raw_length
        return _PLACEHOLDER


def _send(src, session, snap: Snapshot, wanted: _Wanted, result: CopyResult, progress: Progress) -> BlobMap:
    """Read every wanted blob (one ranged read per run of them in a pack, verified), store it in
    the target if missing; source id -> target id."""
    sent = BlobMap(len(wanted.seen))
    progress.start(wanted.raw_bytes, None)
    while wanted.by_pack:
        pack_id, ids = wanted.by_pack.popitem()
        blobs = []
        for i in range(0, len(ids), 32):
            blob = bytes(ids[i : i + 32])
            blobs.append(src.index.get(blob).as_packed(blob))
        for blob, data, err in src.read_pack_blobs(pack_id, blobs):
            if err is not None or data is None:
                raise RepoError(f"snapshot {snap.short_id}: blob {blob.id.hex()[:12]} unreadable in the source ({err})")
            target_id, _ = session.save_blob(BlobType.DATA, data)
            sent.put(blob.id, target_id)
            result.blobs_read += 1
            progress.advance(len(data))
    progress.finish()
    return sent


def _agrees(old: dict[str, Any], copied: dict[str, Any] | None) -> bool:
    """Whether the target's entry is what copying the source entry ``old`` wrote."""
    old = Node.from_dict(old).to_dict()  # the form the copy wrote it in
    if copied is None or copied.get("type") != old["type"]:
        return False
    if any(copied.get(k) != old.get(k) for k in ("name", "mode", "mtime_ns", "size", "target")):
        return False
    if old["type"] == "file":
        return len(copied.get("content") or ()) == len(old.get("content") or ())
    if old["type"] == "dir":
        return bool(copied.get("subtree")) == bool(old.get("subtree"))
    return True


class _TreeCopier:
    """Rewrites source trees with target ids. ``blob_for`` gives the target id of a data blob
    nothing else maps; ``save`` stores a folder's entries (None: the first pass, which only
    looks for blobs to read and stores nothing)."""

    def __init__(
        self,
        src: Repository,
        dst: Repository,
        blob_for: Callable[[bytes], bytes],
        save: Callable[[list[dict]], bytes] | None,
    ) -> None:
        self.src, self.dst, self.blob_for, self.save = src, dst, blob_for, save
        self.done: dict[bytes, bytes] = {}  # source tree -> target tree, this snapshot (shared subtrees once)

    def rewrite(self, tree: bytes, base: _Base | None) -> bytes:
        new = self.done.get(tree)
        if new is None:
            new = self.done[tree] = self._rewrite(tree, base)
        return new

    def _rewrite(self, tree: bytes, base: _Base | None) -> bytes:
        if base is not None:
            if tree == base.source and self.dst.index.has(base.target):
                return base.target
            try:
                return self._from_base(tree, base)
            except _Mismatch as e:
                log.info(
                    "copy: folder tree %s: the earlier copy does not match its source (%s); copying it whole",
                    tree.hex()[:12],
                    e,
                )
        return self._whole(tree)

    def _store(self, entries: list[dict]) -> bytes:
        return _PLACEHOLDER if self.save is None else self.save(entries)

    def _whole(self, tree: bytes) -> bytes:
        nodes = self.src.load_tree(tree)
        if self.save is not None:
            for rejected in getattr(nodes, "rejected", ()):
                # a copy never carries an entry no reader may use; say so rather than drop it silently
                log.warning("entry '%s' of a folder left out of the copy: %s", rejected.name, rejected.reason)
        entries = []
        for node in nodes:
            d = node.to_dict()
            if node.type == "file":
                d["content"] = [self.blob_for(c).hex() for c in node.content]
            elif node.type == "dir" and node.subtree is not None:
                d["subtree"] = self.rewrite(node.subtree, None).hex()
            entries.append(d)
        return self._store(entries)

    def _from_base(self, tree: bytes, base: _Base) -> bytes:
        """The folder as the base's copy, with only the entries that differ from the base
        folder rewritten. Every pair used is checked first (nothing is stored on a mismatch)."""
        changes = list(diff_folder(self.src, base.source, tree))
        copied, refused = split_entries(self.dst.load_tree_entries(base.target))
        if refused:
            raise _Mismatch("the copy holds entries no reader may use")
        by_name = {d["name"]: d for d in copied}
        for old, new in changes:
            name = (old or new)["name"]  # type: ignore[index]
            if old is None and name in by_name:
                raise _Mismatch(f"'{name}' is in the copy but not in its source")
            if old is not None and not _agrees(old, by_name.get(name)):
                raise _Mismatch(f"'{name}' differs between the copy and its source")
        out = dict(by_name)
        for old, new in changes:
            name = (old or new)["name"]  # type: ignore[index]
            if new is None:
                del out[name]
                continue
            out[name] = self._entry(new, old, by_name.get(name))
        return self._store(list(out.values()))

    def _entry(self, new: dict[str, Any], old: dict[str, Any] | None, copied: dict[str, Any] | None) -> dict[str, Any]:
        """A changed entry for the target: its blobs already in the old version of the same file
        map through the copy's entry; a subfolder is copied against the old one."""
        node = Node.from_dict(new)
        d = node.to_dict()  # the form a whole rewrite writes
        same_type = old is not None and copied is not None and old["type"] == node.type
        if node.type == "file":
            known = dict(zip(old["content"], copied["content"])) if same_type else {}  # type: ignore[index]
            d["content"] = [known.get(h) or self.blob_for(c).hex() for h, c in zip(d["content"], node.content)]
        elif node.type == "dir" and node.subtree is not None:
            sub_base = None
            if same_type and old.get("subtree") and copied.get("subtree"):  # type: ignore[union-attr]
                sub_base = _Base(bytes.fromhex(old["subtree"]), bytes.fromhex(copied["subtree"]))  # type: ignore[index]
            d["subtree"] = self.rewrite(node.subtree, sub_base).hex()
        return d
