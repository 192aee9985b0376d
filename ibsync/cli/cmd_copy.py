from __future__ import annotations

import click

from ..errors import UserError
from ..ui.text import printable, size
from .app import App, common_options


@click.command("copy")
@click.argument("snapshots", nargs=-1)
@click.option(
    "--from-repo",
    required=True,
    metavar="URL|NAME",
    help="The repository to copy from (a path, URL or configured name).",
)
@click.option("--from-password-file", metavar="FILE", help="Password of the source (also $IBSYNC_FROM_PASSWORD_FILE).")
@click.option(
    "--from-password-command",
    metavar="CMD",
    help="Command printing the source's password (also $IBSYNC_FROM_PASSWORD_COMMAND).",
)
@click.option("--device", metavar="UDID|NAME", help="Only snapshots of this device.")
@common_options
def copy_cmd(
    app: App,
    snapshots: tuple[str, ...],
    from_repo: str,
    from_password_file: str | None,
    from_password_command: str | None,
    device: str | None,
) -> None:
    """Copy snapshots from --from-repo into --repo; only data the target lacks is sent.

    SNAPSHOTS are ids, unique prefixes or 'latest' (default: every snapshot). Snapshots copied
    before are skipped, so running the same copy every day sends just the new ones; the two
    repositories may have different passwords. For example, off-site:

    \b
      ibsync copy --from-repo /Volumes/External/ibsync --repo s3://my-bucket/iphone
    """
    from ..ingest.copy import copy_snapshots

    source_app = App(
        from_repo,
        from_password_file,
        from_password_command,
        app.config_path,
        env_prefix="IBSYNC_FROM_",
        json=app.json,
        quiet=app.quiet,
    )
    src = source_app.open_repo()
    dst = app.open_repo()
    if src.id == dst.id:
        raise UserError("--from-repo and --repo are the same repository")
    chosen = src.snapshots()
    if device:
        chosen = [s for s in chosen if s.of_device(device)]
    if snapshots:
        chosen = list(
            {s.id: s for s in (src.find_snapshot(spec, device, snapshots=chosen) for spec in snapshots)}.values()
        )
    result = copy_snapshots(src, dst, chosen, progress=app.progress("copy"))
    if app.json:
        app.emit_json(
            {
                "copied": [{"source": s.id, "target": t.id, "udid": s.device.udid} for s, t in result.copied],
                "skipped": [s.id for s in result.skipped],
                "blobs_read": result.blobs_read,
                "blobs_sent": result.blobs_sent,
                "bytes_sent": result.bytes_sent,
                "duration_s": result.duration_s,
            }
        )
        return
    for s, t in result.copied:
        app.say(f"copied snapshot {s.short_id} of {printable(s.device.name or s.device.udid)} as {t.short_id}")
    if result.skipped:
        app.say(f"{len(result.skipped)} snapshot(s) already in the target")
    app.say(
        f"copied {len(result.copied)} snapshot(s): read {result.blobs_read} blobs, sent {result.blobs_sent} "
        f"({size(result.bytes_sent)}) in {result.duration_s:.1f} s"
    )
