from __future__ import annotations

import click

from ..storage import Kind, object_path
from ..ui.text import printable
from .app import App, common_options
from .cmd_prune import fail_if_undeleted, report_undeleted


@click.group("repair")
def repair_group() -> None:
    """Repair a damaged repository: rebuild the index, drop snapshots whose data is gone."""


@repair_group.command("index")
@click.option("--dry-run", "-n", is_flag=True, help="Read the packs and report; write nothing.")
@common_options
def repair_index_cmd(app: App, dry_run: bool) -> None:
    """Rebuild the index from the headers of the packs themselves.

    Use it when 'check' reports index objects that are unreadable or missing entries, or packs
    listed in the index that are gone. Damaged packs are reported and left out. Every object
    in index/ is replaced, damaged ones included; files there that are not objects are left.
    """
    from ..maint.repair import rebuild_index

    repo = app.open_repo(lock="exclusive", load_index=False)
    result = rebuild_index(repo, progress=app.progress("repair index"), dry_run=dry_run)
    if app.json:
        app.emit_json({"packs": result.packs, "blobs": result.blobs, "damaged_packs": result.damaged,
                       "old_index_objects": result.old_index_objects, "not_objects": result.not_objects,
                       "failed": result.failed, "dry_run": dry_run})
    else:
        for name, why in sorted(result.damaged.items()):
            click.echo(f"ibsync: pack {printable(name[:12])} left out: {printable(why)}", err=True)
        for name in result.not_objects:
            click.echo(f"ibsync: not an index object, left in place: {printable(object_path(Kind.INDEX, name))}", err=True)
        verb = "would index" if dry_run else "indexed"
        app.say(f"{verb} {result.blobs} blobs in {result.packs} packs, replacing {result.old_index_objects} index object(s)")
        if result.damaged:
            app.say("run 'ibsync repair snapshots' to see which files the left-out packs held")
    report_undeleted(result.failed)
    fail_if_undeleted(result.failed, "the new index is complete and the old objects it lists are redundant;"
                                     " run 'ibsync repair index' again once the storage allows it")


@repair_group.command("snapshots")
@click.option("--dry-run", "-n", is_flag=True, help="Show the damaged snapshots and their lost files; remove nothing.")
@common_options
def repair_snapshots_cmd(app: App, dry_run: bool) -> None:
    """Remove snapshots whose data is gone, after listing every file they lose.

    Snapshots whose data is all there are not touched. Snapshot objects that do not
    authenticate (damaged, or not written with this repository's key) are listed and removed
    too. Run 'repair index' first if packs or index objects were lost, so the index says what
    really exists.
    """
    from ..maint.repair import damaged_snapshots, forget_damaged

    repo = app.open_repo(lock="exclusive")
    repair = damaged_snapshots(repo)
    if not dry_run:
        forget_damaged(repo, repair)
    if app.json:
        app.emit_json([
            {"id": d.snapshot.id, "udid": d.snapshot.device.udid, "lost_files": d.lost_files,
             "lost_folders": d.lost_trees, "removed": d.snapshot.id in repair.removed}
            for d in repair.damaged
        ] + [
            {"id": name, "udid": None, "lost_files": [], "lost_folders": [], "unreadable": why,
             "removed": name in repair.removed}
            for name, why in sorted(repair.unreadable.items())
        ])
    else:
        _say_damage(app, repair)
        verb = "would remove" if dry_run else "removed"
        done = repair.count if dry_run else len(repair.removed)
        app.say(f"{verb} {done} damaged snapshot(s)" if repair.count else "no damaged snapshots")
    report_undeleted(repair.failed)
    fail_if_undeleted(repair.failed, "run 'ibsync repair snapshots' again once the storage allows it")


def _say_damage(app: App, repair) -> None:
    for d in repair.damaged:
        s = d.snapshot
        app.say(printable(f"snapshot {s.short_id} of {s.device.name or s.device.udid}: "
                          f"{len(d.lost_files)} file(s) and {len(d.lost_trees)} folder listing(s) lost"))
        for path in d.lost_trees:
            app.say(f"  lost folder {printable(path)}")
        for path in d.lost_files:
            app.say(f"  lost {printable(path)}")
    for name, why in sorted(repair.unreadable.items()):
        app.say(f"snapshot object {name[:12]} does not authenticate: {printable(why)}")
