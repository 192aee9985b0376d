"""Import an existing backup folder: validate it, pick its parent snapshot, archive it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..model import Snapshot, utc_iso
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from ..source.folder import FolderSource
from .archiver import Archiver


@dataclass
class ImportOutcome:
    folder: Path
    snapshot: Snapshot
    created: bool
    skipped: list[str] = field(default_factory=list)  # FIFOs, sockets, devices: not stored

    def to_dict(self) -> dict:
        s = self.snapshot
        return {
            "folder": str(self.folder),
            "status": "created" if self.created else "unchanged",
            "id": s.id,
            "udid": s.device.udid,
            "device_name": s.device.name,
            "backup_date": utc_iso(s.backup_date) if s.backup_date else None,
            "ios_encrypted": s.ios_encrypted,
            "parent": s.parent,
            "summary": asdict(s.summary),
            "skipped": self.skipped,
        }


def import_folder(
    repo: Repository,
    source: FolderSource | Path,
    *,
    allow_unfinished: bool = False,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
    workers: int = 2,
) -> ImportOutcome:
    """Store one device folder as a snapshot (``source`` already validated, or a path)."""
    if not isinstance(source, FolderSource):
        source = FolderSource.open(source, allow_unfinished=allow_unfinished)
    folder = source.root
    info = source.info
    parent = repo.latest_of_device(info.device.udid)
    archiver = Archiver(repo, progress=progress, workers=workers, force=force)
    snapshot, created = archiver.archive(
        source,
        device=info.device,
        backup_date=info.backup_date,
        ios_encrypted=info.ios_encrypted,
        snapshot_state=info.snapshot_state,
        parent=parent,
        folder=folder.name,
    )
    return ImportOutcome(folder, snapshot, created, sorted(source.skipped))
