from __future__ import annotations

from pathlib import Path

import click

from ..errors import IbsyncError
from ..ui.text import size
from .app import App, common_options


class RestoreIncomplete(IbsyncError):
    pass


@click.command("restore")
@click.argument("snapshot")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--device", metavar="UDID|NAME", help="With 'latest': the latest snapshot of this device.")
@click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty device folder.")
@common_options
def restore_cmd(app: App, snapshot: str, target: Path, device: str | None, overwrite: bool) -> None:
    """Rehydrate SNAPSHOT as a standard backup folder TARGET/<UDID>.

    SNAPSHOT is an id (or a unique prefix of one) or 'latest'. The folder is byte-identical to
    what the device wrote, so Finder, iTunes, idevicebackup2 or pymobiledevice3 can restore it
    to a device.
    """
    import time

    from ..reader.restorer import restore_folder

    repo = app.open_repo()
    snap = repo.find_snapshot(snapshot, device)
    started = time.monotonic()
    result = restore_folder(repo, snap, target.expanduser(), progress=app.progress(f"restore {snap.short_id}"), overwrite=overwrite)
    elapsed = time.monotonic() - started
    if app.json:
        app.emit_json(
            {
                "snapshot": snap.id,
                "target": str(result.target),
                "files": result.files,
                "dirs": result.dirs,
                "bytes": result.bytes,
                "seconds": round(elapsed, 3),
                "failed": result.failed,
            }
        )
    else:
        app.say(f"restored snapshot {snap.short_id}: {result.files} files, {size(result.bytes)} to {result.target} in {elapsed:.1f} s")
    if result.failed:
        for path, reason in sorted(result.failed.items()):
            click.echo(f"ibsync: cannot restore {path}: {reason}", err=True)
        raise RestoreIncomplete(
            f"{len(result.failed)} file(s) could not be restored (damaged or missing data); the folder is incomplete"
        )
