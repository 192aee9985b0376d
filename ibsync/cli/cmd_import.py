from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..ui.text import printable, size
from .app import App, common_options


@click.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--allow-unfinished", is_flag=True, help="Store a backup whose Status.plist is not 'finished'.")
@click.option("--force", is_flag=True, help="Re-read every file, even those unchanged since the last snapshot.")
@common_options
def import_cmd(app: App, path: Path, allow_unfinished: bool, force: bool) -> None:
    """Import an existing backup folder (Finder, iTunes, idevicebackup2, pymobiledevice3).

    PATH is one device folder (holding Info.plist, Manifest.plist, Status.plist, Manifest.db)
    or a folder of several, such as ~/Library/Application Support/MobileSync/Backup.
    Each device folder becomes one snapshot.
    """
    from ..ingest.folder_import import import_folder
    from ..source.backup_folder import find_device_folders
    from ..source.folder import FolderSource

    # Every folder is validated before the password is asked for: bad input fails first.
    sources = [FolderSource.open(f, allow_unfinished=allow_unfinished) for f in find_device_folders(path.expanduser())]
    sources[0].prefetch()
    repo = app.open_repo()
    results = []
    for source in sources:
        folder = source.root
        outcome = import_folder(
            repo, source, force=force, progress=app.progress(f"import {printable(folder.name[:12])}")
        )
        results.append(outcome)
        snap, s = outcome.snapshot, outcome.snapshot.summary
        if outcome.created:
            app.say(
                f"snapshot {snap.short_id} of {printable(snap.device.name or snap.device.udid)} ({printable(snap.device.udid)}): "
                f"{s.files} files, {size(s.total_bytes)}; {s.files_new} new, {s.files_changed} changed, "
                f"{s.files_unmodified} unchanged; added {size(s.added_bytes)} in {s.duration_s:.1f} s"
            )
        else:
            app.say(f"{printable(folder)}: unchanged since snapshot {snap.short_id}; nothing to do")
    if app.json:
        report: dict[str, Any] = {"snapshots": [r.to_dict() for r in results]}
        requests = getattr(repo.storage, "requests", None)  # remote storage counts its operations
        if requests is not None:
            report["storage_operations"] = {"total": sum(requests.values()), **dict(sorted(requests.items()))}
        app.emit_json(report)
