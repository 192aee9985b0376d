from __future__ import annotations

import click

from ..ui.text import printable, size
from .app import App, common_options


@click.command("backup")
@common_options
@click.option("--device", "-d", metavar="UDID|NAME", help="The device to back up (default: the only one connected).")
@click.option("--all", "all_devices", is_flag=True, help="Back up every connected device, one after the other.")
@click.option("--full", is_flag=True, help="Ask the device for a full backup instead of an incremental one.")
@click.option(
    "--allow-partial",
    is_flag=True,
    help="Commit the snapshot even if the device could not read some files (they are listed).",
)
@click.option(
    "--wifi/--no-wifi",
    default=None,
    help="Also (--wifi) or never (--no-wifi) reach paired phones directly on the local network. "
    "Default: only when usbmuxd offers no device (or not the one asked for).",
)
def backup_cmd(
    app: App, device: str | None, all_devices: bool, full: bool, allow_partial: bool, wifi: bool | None
) -> None:
    """Back up a connected iPhone or iPad straight into the repository.

    The device sends its backup over USB or Wi-Fi (mobilebackup2); files go into the repository
    as they arrive, with no copy of the backup on this computer. The previous snapshot of the
    same device answers the device's questions, so later backups are incremental. A snapshot is
    committed only when the device reports success; an interrupted backup leaves the last good
    snapshot as it was and keeps what was already uploaded for the next run.

    Wi-Fi: a phone paired with this computer (over USB, once) is also reached directly on the
    local network, without usbmuxd (see `ibsync devices --wifi`); USB is used when the phone is
    on both.
    """
    from ..capture.backup import capture
    from ..capture.discovery import choose, list_for, open_lockdown, run
    from ..errors import DeviceError

    connected = run(list_for(None if all_devices else device, wifi))
    if all_devices:
        if device:
            raise click.UsageError("--device and --all exclude each other")
        if not connected:
            raise DeviceError("no device connected (connect it with a cable, unlock it, and trust this computer)")
        chosen = connected
    else:
        chosen = [choose(connected, device)]
    repo = app.open_repo()
    results, failures = [], []
    for d in chosen:
        label = printable(f"{d.name or d.udid} ({d.udid})")  # the device chose its name

        async def one(d):
            lockdown = await open_lockdown(d)
            try:
                return await capture(
                    lockdown,
                    repo,
                    full=full,
                    allow_partial=allow_partial,
                    progress=app.progress(f"backup {printable((d.name or d.udid)[:16])}"),
                )
            finally:
                await lockdown.close()

        try:
            outcome = run(one(d))
        except DeviceError as e:
            if len(chosen) == 1:
                raise
            failures.append({"udid": d.udid, "error": str(e)})
            click.echo(f"ibsync: {label}: {printable(e)}", err=True)
            continue
        results.append(outcome)
        s = outcome.snapshot
        app.say(
            f"snapshot {s.short_id} of {label}: {'full' if outcome.full else 'incremental'}, "
            f"{outcome.files_received} files received ({size(outcome.bytes_received)}), "
            f"{s.summary.files} files in the backup, added {size(s.summary.added_bytes)}"
        )
        for f in outcome.failed:
            click.echo(
                f"ibsync: warning: the device could not read {printable(f.device_name)}: {printable(f.reason)}",
                err=True,
            )
    if app.json:
        app.emit_json({"snapshots": [r.to_dict() for r in results], "failed": failures})
    if failures:
        raise DeviceError(f"{len(failures)} of {len(chosen)} devices were not backed up")
