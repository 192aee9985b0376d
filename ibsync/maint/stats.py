"""stats: what the repository stores, per device, and how much deduplication saves."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model import Snapshot, utc_iso
from ..reader.walk import collect_blobs
from ..repo.repository import Repository
from ..storage import Kind


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


def _stored(repo: Repository, blobs: set[bytes]) -> int:
    total = 0
    for b in blobs:
        loc = repo.index.get(b)
        if loc is not None:
            total += loc.length
    return total


def stats(repo: Repository, snapshots: list[Snapshot] | None = None) -> RepoStats:
    snaps = snapshots if snapshots is not None else repo.snapshots()
    out = RepoStats(snapshots=len(snaps), blobs=len(repo.index), packs=repo.index.pack_count)
    for kind in Kind:
        for info in repo.storage.list(kind) if kind is not Kind.CONFIG else ():
            out.stored_bytes += info.size
            if kind is Kind.PACKS:
                out.pack_bytes += info.size
    by_device: dict[str, tuple[DeviceStats, set[bytes]]] = {}
    for snap in snaps:
        ds, blobs = by_device.setdefault(snap.device.udid, (DeviceStats(snap.device.udid, snap.device.name), set()))
        ds.snapshots += 1
        ds.logical_bytes += snap.summary.total_bytes
        ds.latest_bytes = snap.summary.total_bytes
        ds.name = snap.device.name or ds.name
        out.logical_bytes += snap.summary.total_bytes
        own: set[bytes] = set()
        collect_blobs(repo, snap.tree, own)
        blobs |= own
        out.snapshot_stats.append(
            SnapshotStats(
                snap.id, snap.device.udid, utc_iso(snap.backup_date) if snap.backup_date else None,
                snap.summary.total_bytes, _stored(repo, own), snap.summary.added_bytes,
            )
        )
    for ds, blobs in by_device.values():
        ds.unique_blobs = len(blobs)
        ds.stored_bytes = _stored(repo, blobs)
        out.devices.append(ds)
    return out
