"""stats: what the repository stores, per device, and how much deduplication saves."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model import Snapshot, utc_iso
from ..repo.repository import Repository
from ..repo.trees import diff_folder
from ..storage import Kind
from .used import BlobMarks


@dataclass
class DeviceStats:
    udid: str
    name: str
    snapshots: int = 0
    latest_bytes: int = 0  # logical size of the newest snapshot
    logical_bytes: int = 0  # sum over all its snapshots
    stored_bytes: int = 0  # stored bytes of the distinct blobs its snapshots use
    unique_blobs: int = 0

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 0.0


@dataclass
class SnapshotStats:
    id: str
    udid: str
    backup_date: str | None
    logical_bytes: int  # the files of the backup folder
    stored_bytes: int  # stored bytes of the distinct blobs it uses (shared ones included)
    added_bytes: int  # what the repository grew by when it was stored

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 0.0


@dataclass
class RepoStats:
    snapshots: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0  # every object in the repository
    pack_bytes: int = 0
    packs: int = 0
    blobs: int = 0
    devices: list[DeviceStats] = field(default_factory=list)
    snapshot_stats: list[SnapshotStats] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 0.0


class _DeviceTally:
    """The blobs of one device's snapshots, moved from one snapshot to the next.

    Going from a snapshot to the next only the folders that differ are read (``diff_folder``
    skips equal subtrees and, in tree format 2, equal nodes), so a tree shared by many
    snapshots is read when it first appears and once more when it goes, never once per
    snapshot. Each blob has a counter: how often the current snapshot uses it. A blob's stored
    bytes count for the snapshot while its counter is above zero, and for the device from the
    first time it is seen (records are never dropped, so the table is also the device's set)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.marks = BlobMarks(len(repo.index))
        self.current: bytes | None = None
        self.snapshot_stored = 0  # stored bytes of the distinct blobs of the current snapshot
        self.device_stored = 0  # stored bytes of every distinct blob seen
        # [parts, folders using it] of each folder tree of the current snapshot, so one that goes
        # is not read again just for them (a few ids per folder: small beside the blobs)
        self.parts: dict[bytes, list] = {}

    def move_to(self, root: bytes) -> int:
        """Make ``root`` the current snapshot's tree; its stored bytes."""
        self._change(self.current, root)
        self.current = root
        return self.snapshot_stored

    def _length(self, blob_id: bytes) -> int:
        loc = self.repo.index.get(blob_id)
        return loc.length if loc is not None else 0

    def _use(self, blob_id: bytes) -> None:
        count = self.marks.get(blob_id)
        if count is None:
            self.marks.add(blob_id, 1)
            length = self._length(blob_id)
            self.device_stored += length
            self.snapshot_stored += length
            return
        if count == 0:
            self.snapshot_stored += self._length(blob_id)
        self.marks.set(blob_id, count + 1)

    def _drop(self, blob_id: bytes) -> None:
        count = self.marks.get(blob_id)
        if not count:
            return  # not counted in (cannot happen for a tree read before)
        if count == 1:
            self.snapshot_stored -= self._length(blob_id)
        self.marks.set(blob_id, count - 1)

    def _change(self, old: bytes | None, new: bytes | None) -> None:
        """Count out folder ``old`` and count in folder ``new`` (None: absent), subfolders included."""
        if old == new:
            return
        if new is not None:
            held = self.parts.get(new)
            if held is None:
                held = self.parts[new] = [self.repo.tree_parts(new), 0]
            held[1] += 1
            for part in held[0]:
                self._use(part)
        if old is not None:
            held = self.parts[old]
            held[1] -= 1
            if not held[1]:
                del self.parts[old]
            for part in held[0]:
                self._drop(part)
        for before, after in diff_folder(self.repo, old, new):
            if after is not None and after["type"] == "file":
                for h in after["content"]:
                    self._use(bytes.fromhex(h))
            if before is not None and before["type"] == "file":
                for h in before["content"]:
                    self._drop(bytes.fromhex(h))
            old_sub, new_sub = _subtree(before), _subtree(after)
            if old_sub is not None or new_sub is not None:
                self._change(old_sub, new_sub)


def _subtree(entry: dict | None) -> bytes | None:
    if entry is None or entry["type"] != "dir" or not entry.get("subtree"):
        return None
    return bytes.fromhex(entry["subtree"])


def stats(repo: Repository, snapshots: list[Snapshot] | None = None) -> RepoStats:
    snaps = snapshots if snapshots is not None else repo.snapshots()
    out = RepoStats(snapshots=len(snaps), blobs=len(repo.index), packs=repo.index.pack_count)
    for kind in Kind:
        for info in repo.storage.list(kind) if kind is not Kind.CONFIG else ():
            out.stored_bytes += info.size
            if kind is Kind.PACKS:
                out.pack_bytes += info.size
    by_device: dict[str, tuple[DeviceStats, _DeviceTally]] = {}
    for snap in snaps:
        ds, tally = by_device.setdefault(
            snap.device.udid, (DeviceStats(snap.device.udid, snap.device.name), _DeviceTally(repo))
        )
        ds.snapshots += 1
        ds.logical_bytes += snap.summary.total_bytes
        ds.latest_bytes = snap.summary.total_bytes
        ds.name = snap.device.name or ds.name
        out.logical_bytes += snap.summary.total_bytes
        out.snapshot_stats.append(
            SnapshotStats(
                snap.id,
                snap.device.udid,
                utc_iso(snap.backup_date) if snap.backup_date else None,
                snap.summary.total_bytes,
                tally.move_to(snap.tree),
                snap.summary.added_bytes,
            )
        )
    for ds, tally in by_device.values():
        ds.unique_blobs = len(tally.marks)
        ds.stored_bytes = tally.device_stored
        out.devices.append(ds)
    return out
