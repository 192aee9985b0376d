"""``ibsync export PRESET SNAPSHOT OUT``: photos, voice memos, voicemail, WhatsApp media and
message attachments out of a snapshot, under their real names (see ``reader/export.py``)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import IbsyncError, UserError
from ..ui.text import printable, size
from .app import App, common_options
from .cmd_browse import _keyring, _snap_ref, backup_password_option


class ExportIncomplete(IbsyncError):
    pass


def _presets_text() -> str:
    from ..reader.export import PRESETS

    lines = []
    for p in PRESETS.values():
        lines.append(f"{p.name}: {p.summary}")
        lines += [f"    {s.describe()}" for s in p.sources]
    return "\n".join(lines)


@click.command("export")
@click.argument("preset", required=False)
@click.argument("snapshot", required=False)
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--list", "list_presets", is_flag=True, help="Print the presets and the domains and paths each one uses.")
@click.option("--device", metavar="UDID|NAME", help="With 'latest': the latest snapshot of this device.")
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in OUT.")
@backup_password_option
@common_options
def export_cmd(
    app: App,
    preset: str | None,
    snapshot: str | None,
    out: Path | None,
    list_presets: bool,
    device: str | None,
    overwrite: bool,
    backup_password_file: str | None,
) -> None:
    """Write the files of a PRESET from SNAPSHOT to OUT, under their real names.

    \b
    Presets (--list shows the domains and paths each one uses):
      photos           camera roll photos and videos, capture dates as file times
      voice-memos      Voice Memos recordings
      voicemail        visual voicemail messages
      whatsapp-media   WhatsApp photos, videos, voice notes and documents
      sms-attachments  Messages attachments

    Files keep the sub-folders below the preset's folder (photos: 100APPLE/IMG_0001.HEIC) and
    their modification times; photos whose EXIF records the capture time with its UTC offset
    get that time. Encrypted iOS backups are decrypted (the backup password is needed). A file
    that cannot be read or written is named and the command fails after writing all the
    others. Existing files are kept unless --overwrite; a symlink in OUT is never followed.

    \b
    Examples:
      ibsync export photos latest ~/Pictures/iphone
      ibsync export voice-memos latest ./memos --device "Anna's iPhone"
      ibsync export --list
    """
    from ..reader.export import PRESETS, existing, plan_export, run_export
    from ..reader.export import preset as find_preset

    if list_presets:
        if app.json:
            app.emit_json(
                {
                    "presets": [
                        {
                            "name": p.name,
                            "summary": p.summary,
                            "capture_dates": p.capture_dates,
                            "sources": [
                                {"domain": s.domain, "folder": s.base, "include": s.include, "exclude": list(s.exclude)}
                                for s in p.sources
                            ],
                        }
                        for p in PRESETS.values()
                    ]
                }
            )
        else:
            click.echo(_presets_text())
        return
    if preset is None or snapshot is None or out is None:
        raise UserError("usage: ibsync export PRESET SNAPSHOT OUT (or ibsync export --list)")
    chosen = find_preset(preset)
    from ..reader.browse import SnapshotView
    from ..reader.manifest_cache import ManifestCache

    out = out.expanduser()
    repo = app.open_repo()
    snap = repo.find_snapshot(snapshot, device)
    started = time.monotonic()
    with SnapshotView(repo, snap, _keyring(backup_password_file), cache=ManifestCache.for_repository(repo)) as view:
        plan = plan_export(view, chosen)  # also names the rows below its folders that browsing left out
        if not overwrite:
            there = existing(str(out), plan.jobs)
            if there:
                more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
                raise UserError(
                    f"{printable(out.joinpath(*there[0].parts))} exists{more}; export elsewhere or pass --overwrite"
                )
        progress = app.progress(f"export {chosen.name} {snap.short_id}")
        progress.start(sum(job.item.size for job in plan.jobs), len(plan.jobs))
        try:
            outcome = run_export(view, chosen, plan, str(out), progress.advance)
        finally:
            progress.finish()
    elapsed = time.monotonic() - started
    failed = sorted(outcome.failed, key=lambda f: f.path)
    if app.json:
        app.emit_json(
            {
                "snapshot": _snap_ref(snap),
                "preset": chosen.name,
                "target": str(out),
                "files": outcome.files,
                "bytes": outcome.bytes,
                "seconds": round(elapsed, 3),
                "failed": [{"path": f.path, "reason": f.reason} for f in failed],
            }
        )
    elif outcome.files:
        app.say(
            f"exported {outcome.files} file(s), {size(outcome.bytes)} ({chosen.name}) from snapshot "
            f"{snap.short_id} to {printable(out)} in {elapsed:.1f} s"
        )
    elif not failed:
        app.say(
            f"snapshot {snap.short_id} holds no {chosen.name} "
            f"({'; '.join(printable(s.describe()) for s in chosen.sources)}): nothing exported"
        )
    if failed:
        for f in failed:
            click.echo(f"ibsync: cannot export {printable(f.path)}: {printable(f.reason)}", err=True)
        raise ExportIncomplete(f"{len(failed)} file(s) could not be exported")
