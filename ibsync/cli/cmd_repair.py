from __future__ import annotations

import click

from .app import App, common_options


@click.group("repair")
def repair_group() -> None:
    """Repair a damaged repository: rebuild the index, drop snapshots whose data is gone."""


@repair_group.command("index")
@click.option("--dry-run", "-n", is_flag=True, help="Read the packs and report; write nothing.")
@common_options
def repair_index_cmd(app: App, dry_run: bool) -> None:
    """Rebuild the index from the headers of the packs themselves.

    Use it when 'check' reports index objects that are unreadable or missing entries, or packs
    listed in the index that are gone. Damaged packs are reported and left out.
    """
    from ..maint.repair import rebuild_index

    repo = app.open_repo(lock="exclusive", load_index=False)
    result = rebuild_index(repo, progress=app.progress("repair index"), dry_run=dry_run)
    if app.json:
        app.emit_json({"packs": result.packs, "blobs": result.blobs, "damaged_packs": result.damaged,
                       "old_index_objects": result.old_index_objects, "dry_run": dry_run})
        return
    for name, why in sorted(result.damaged.items()):
        click.echo(f"ibsync: pack {name[:12]} left out: {why}", err=True)
    verb = "would index" if dry_run else "indexed"
    app.say(f"{verb} {result.blobs} blobs in {result.packs} packs, replacing {result.old_index_objects} index object(s)")
    if result.damaged:
        app.say("run 'ibsync repair snapshots' to see which files the left-out packs held")


@repair_group.command("snapshots")
@click.option("--dry-run", "-n", is_flag=True, help="Show the damaged snapshots and their lost files; remove nothing.")
@common_options
def repair_snapshots_cmd(app: App, dry_run: bool) -> None:
    """Remove snapshots whose data is gone, after listing every file they lose.

    Snapshots whose data is all there are not touched. Run 'repair index' first if packs or
    index objects were lost, so the index says what really exists.
    """
    from ..maint.repair import damaged_snapshots, forget_damaged

    repo = app.open_repo(lock="exclusive")
    damaged = damaged_snapshots(repo)
    if app.json:
        app.emit_json([
            {"id": d.snapshot.id, "udid": d.snapshot.device.udid, "lost_files": d.lost_files,
             "lost_folders": d.lost_trees, "removed": not dry_run}
            for d in damaged
        ])
    else:
        for d in damaged:
            s = d.snapshot
            app.say(f"snapshot {s.short_id} of {s.device.name or s.device.udid}: "
                    f"{len(d.lost_files)} file(s) and {len(d.lost_trees)} folder listing(s) lost")
            for path in d.lost_trees:
                app.say(f"  lost folder {path}")
            for path in d.lost_files:
                app.say(f"  lost {path}")
    if not dry_run:
        forget_damaged(repo, damaged)
    if not app.json:
        verb = "would remove" if dry_run else "removed"
        app.say(f"{verb} {len(damaged)} damaged snapshot(s)" if damaged else "no damaged snapshots")
