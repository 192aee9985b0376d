from __future__ import annotations

import click

from ..model import utc_iso
from ..ui.text import size, table, when
from .app import App, common_options


def snapshot_dict(s) -> dict:
    from dataclasses import asdict

    return {
        "id": s.id,
        "short_id": s.short_id,
        "time": utc_iso(s.time),
        "backup_date": utc_iso(s.backup_date) if s.backup_date else None,
        "device": asdict(s.device),
        "ios_encrypted": s.ios_encrypted,
        "source": s.source,
        "hostname": s.hostname,
        "parent": s.parent,
        "snapshot_state": s.snapshot_state,
        "summary": asdict(s.summary),
    }


@click.command("snapshots")
@click.option("--device", metavar="UDID|NAME", help="Only snapshots of this device.")
@common_options
def snapshots_cmd(app: App, device: str | None) -> None:
    """List snapshots, oldest backup first."""
    repo = app.open_repo()
    snaps = repo.snapshots()
    if device:
        snaps = [s for s in snaps if s.of_device(device)]
    if app.json:
        app.emit_json([snapshot_dict(s) for s in snaps])
        return
    rows = [
        [
            s.short_id,
            when(s.backup_date),
            s.device.name or "-",
            s.device.udid,
            s.device.ios_version or "-",
            "yes" if s.ios_encrypted else "no",
            str(s.summary.files),
            size(s.summary.total_bytes),
            size(s.summary.added_bytes),
            s.source.get("kind", "-"),
        ]
        for s in snaps
    ]
    click.echo(
        table(
            ["ID", "Backup date", "Device", "UDID", "iOS", "Encrypted", "Files", "Size", "Added", "Source"],
            rows,
            right={6, 7, 8},
        )
    )
    click.echo(f"{len(snaps)} snapshot(s)")
