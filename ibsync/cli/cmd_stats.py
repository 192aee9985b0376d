from __future__ import annotations

import click

from ..ui.text import size, table
from .app import App, common_options


@click.command("stats")
@common_options
def stats_cmd(app: App) -> None:
    """Stored and logical bytes, and the deduplication ratio, per device and per snapshot.

    Logical: the backup folders' bytes. Stored: the repository bytes of the distinct data they
    use (compressed, encrypted). Added: what the repository grew by when a snapshot was stored.
    """
    from ..maint.stats import stats

    repo = app.open_repo()
    st = stats(repo)
    if app.json:
        app.emit_json(
            {
                "snapshots": st.snapshots,
                "logical_bytes": st.logical_bytes,
                "stored_bytes": st.stored_bytes,
                "pack_bytes": st.pack_bytes,
                "packs": st.packs,
                "blobs": st.blobs,
                "dedup_ratio": round(st.dedup_ratio, 3),
                "devices": [
                    {
                        "udid": d.udid,
                        "name": d.name,
                        "snapshots": d.snapshots,
                        "latest_bytes": d.latest_bytes,
                        "logical_bytes": d.logical_bytes,
                        "stored_bytes": d.stored_bytes,
                        "blobs": d.unique_blobs,
                        "dedup_ratio": round(d.dedup_ratio, 3),
                    }
                    for d in st.devices
                ],
                "snapshots_detail": [
                    {
                        "id": s.id,
                        "udid": s.udid,
                        "backup_date": s.backup_date,
                        "logical_bytes": s.logical_bytes,
                        "stored_bytes": s.stored_bytes,
                        "added_bytes": s.added_bytes,
                        "dedup_ratio": round(s.dedup_ratio, 3),
                    }
                    for s in st.snapshot_stats
                ],
            }
        )
        return
    rows = [
        [
            d.name or "-",
            d.udid,
            str(d.snapshots),
            size(d.latest_bytes),
            size(d.logical_bytes),
            size(d.stored_bytes),
            f"{d.dedup_ratio:.1f}x",
        ]
        for d in st.devices
    ]
    click.echo(
        table(["Device", "UDID", "Snapshots", "Latest", "Logical", "Stored", "Dedup"], rows, right={2, 3, 4, 5, 6})
    )
    click.echo()
    srows = [
        [
            s.id[:8],
            s.udid,
            (s.backup_date or "-")[:19].replace("T", " "),
            size(s.logical_bytes),
            size(s.stored_bytes),
            size(s.added_bytes),
            f"{s.dedup_ratio:.1f}x",
        ]
        for s in st.snapshot_stats
    ]
    click.echo(
        table(
            ["Snapshot", "UDID", "Backup date (UTC)", "Logical", "Stored", "Added", "Dedup"], srows, right={3, 4, 5, 6}
        )
    )
    click.echo()
    click.echo(
        f"repository: {st.snapshots} snapshot(s), {size(st.logical_bytes)} logical in {size(st.stored_bytes)} stored "
        f"({st.packs} packs, {st.blobs} blobs); deduplication and compression {st.dedup_ratio:.1f}x"
    )
