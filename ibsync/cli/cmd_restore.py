from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import IbsyncError
from ..ui.text import printable, size
from .app import App, common_options
from .cmd_browse import backup_password_option, backup_password_source

if TYPE_CHECKING:
    from ..reader.restorer import RestoreResult


class RestoreIncomplete(IbsyncError):
    pass


@click.command("restore")
@click.argument("snapshot")
@click.argument("target", type=click.Path(path_type=Path), required=False)
@click.option("--device", metavar="UDID|NAME", help="With 'latest': the latest snapshot of this device.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing device folder (kept until the new one is complete)."
)
@click.option(
    "--to-device",
    "to_device",
    metavar="UDID|NAME",
    help="Restore onto this connected device instead of into a folder (no TARGET).",
)
@click.option("--system", is_flag=True, help="With --to-device: restore system files too.")
@click.option("--no-reboot", is_flag=True, help="With --to-device: do not reboot the device when done.")
@click.option(
    "--no-copy",
    is_flag=True,
    help="With --to-device: send RestoreDontCopyBackup (no copy of the backup made before restoring).",
)
@click.option("--settings", is_flag=True, help="With --to-device: keep the device's current settings.")
@click.option(
    "--remove", is_flag=True, help="With --to-device: remove files on the device that the snapshot does not have."
)
@backup_password_option
@common_options
def restore_cmd(
    app: App,
    snapshot: str,
    target: Path | None,
    device: str | None,
    overwrite: bool,
    to_device: str | None,
    system: bool,
    no_reboot: bool,
    no_copy: bool,
    settings: bool,
    remove: bool,
    backup_password_file: str | None,
) -> None:
    """Rehydrate SNAPSHOT as a standard backup folder TARGET/<UDID>, or restore it onto a
    connected device with --to-device.

    SNAPSHOT is an id (or a unique prefix of one) or 'latest'. The folder is byte-identical to
    what the device wrote, so Finder, iTunes, idevicebackup2 or pymobiledevice3 can restore it
    to a device.

    With --to-device UDID|NAME (and no TARGET) the snapshot goes straight onto that device
    over USB or Wi-Fi (mobilebackup2), its files streamed from the repository: nothing is
    written on this computer. The snapshot may be of another device. An encrypted iOS backup
    needs its password (--backup-password-file FILE or $IBSYNC_BACKUP_PASSWORD, else asked
    on a terminal). The device replaces its data with the snapshot's and, unless --no-reboot,
    restarts.

    \b
      ibsync restore latest ./out
      ibsync restore latest --to-device "Alice's iPhone"
      ibsync restore 3f2a --to-device 00008030-001A2B3C4D5E6F70 --no-reboot
    """
    device_flags = [
        n
        for n, v in (
            ("--system", system),
            ("--no-reboot", no_reboot),
            ("--no-copy", no_copy),
            ("--settings", settings),
            ("--remove", remove),
            ("--backup-password-file", backup_password_file),
        )
        if v
    ]
    if to_device is not None:
        if target is not None:
            raise click.UsageError("give either TARGET (restore into a folder) or --to-device UDID|NAME, not both")
        if overwrite:
            raise click.UsageError("--overwrite is for restoring into a folder; it does not go with --to-device")
        _restore_to_device(
            app,
            snapshot,
            device,
            to_device,
            system=system,
            reboot=not no_reboot,
            copy=not no_copy,
            settings=settings,
            remove=remove,
            backup_password_file=backup_password_file,
        )
        return
    if target is None:
        raise click.UsageError("missing TARGET (a folder to restore into) or --to-device UDID|NAME")
    if device_flags:
        raise click.UsageError(f"{device_flags[0]} only goes with --to-device")
    import time

    from ..reader.restorer import restore_folder

    repo = app.open_repo()
    snap = repo.find_snapshot(snapshot, device)
    started = time.monotonic()
    result = restore_folder(
        repo, snap, target.expanduser(), progress=app.progress(f"restore {snap.short_id}"), overwrite=overwrite
    )
    elapsed = time.monotonic() - started
    if app.json:
        app.emit_json(
            {
                "snapshot": snap.id,
                "target": str(result.target),
                "complete": result.complete,
                "partial": str(result.partial) if result.partial else None,
                "files": result.files,
                "files_reused": result.files_reused,
                "dirs": result.dirs,
                "bytes": result.bytes,
                "blobs_read": result.blobs_read,
                "seconds": round(elapsed, 3),
                "failed": result.failed,
                "refused": result.refused,
            }
        )
    elif result.complete:
        reused = f" ({result.files_reused} already restored by an interrupted run)" if result.files_reused else ""
        app.say(
            f"restored snapshot {snap.short_id}: {result.files} files{reused}, {size(result.bytes)} to "
            f"{printable(result.target)} in {elapsed:.1f} s"
        )
    if result.failed:
        for path, reason in sorted(result.failed.items()):
            click.echo(f"ibsync: cannot restore '{printable(path)}': {printable(reason)}", err=True)
        raise RestoreIncomplete(_incomplete(result))


def _incomplete(result: RestoreResult) -> str:
    """The last line of a restore that could not complete: what failed, where the rest is, and
    that nothing looking like a finished backup was put where the backup goes."""
    failed, refused = len(result.failed), result.refused
    parts = []
    if refused:
        parts.append(
            f"{refused} entr{'y' if refused == 1 else 'ies'} of the snapshot refused (unsafe or malformed "
            "names or fields: see 'ibsync check')"
        )
    if failed - refused:
        parts.append(f"{failed - refused} file(s) could not be restored (damaged or missing data, or not writable)")
    kept = "was left as it was" if result.replaced else "was not created"
    where = (
        f"the {result.files} restored files are in {printable(result.partial)}; {printable(result.target)} "
        f"{kept}, as the restore is incomplete"
    )
    again = "; run the same restore again to retry the failed files (it keeps what is done)" if failed - refused else ""
    return "; ".join(parts) + "; " + where + again


def _restore_to_device(
    app: App,
    snapshot: str,
    device: str | None,
    to_device: str,
    *,
    system: bool,
    reboot: bool,
    copy: bool,
    settings: bool,
    remove: bool,
    backup_password_file: str | None,
) -> None:
    from ..capture.discovery import choose, list_connected, open_lockdown, run
    from ..capture.restore import restore

    repo = app.open_repo()
    snap = repo.find_snapshot(snapshot, device)
    password = None
    if snap.ios_encrypted:
        password = backup_password_source(backup_password_file)()
    target = choose(run(list_connected()), to_device)
    label = f"{target.name or target.udid} ({target.udid})"

    async def one():
        lockdown = await open_lockdown(target)
        try:
            return await restore(
                lockdown,
                repo,
                snap,
                system=system,
                reboot=reboot,
                copy=copy,
                settings=settings,
                remove=remove,
                password=password,
                progress=app.progress(f"restore {(target.name or target.udid)[:16]}"),
                notify=lambda text: click.echo(f"ibsync: {text}", err=True),
            )
        finally:
            await lockdown.close()

    outcome = run(one())
    if app.json:
        app.emit_json(outcome.to_dict())
    else:
        app.say(
            f"restored snapshot {snap.short_id} onto {label}: {outcome.files_sent} files sent "
            f"({size(outcome.bytes_sent)}) in {outcome.seconds:.1f} s"
        )
