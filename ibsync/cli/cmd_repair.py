from __future__ import annotations

import click

from ..errors import UserError
from ..storage import Kind, object_path
from ..ui.text import printable
from .app import App, common_options
from .cmd_prune import fail_if_undeleted, report_undeleted


@click.group("repair")
def repair_group() -> None:
    """Repair a damaged repository: rebuild the index, salvage damaged packs, rewrite snapshots
    whose data is lost. After 'check' reports damage: 'repair index' (index objects), then
    'repair packs' (packs check --read-data named), then 'repair snapshots'."""


@repair_group.command("index")
@click.option("--dry-run", "-n", is_flag=True, help="Read the packs and report; write nothing.")
@common_options
def repair_index_cmd(app: App, dry_run: bool) -> None:
    """Rebuild the index from the headers of the packs themselves.

    Use it when 'check' reports index objects that are unreadable or missing entries, or packs
    listed in the index that are gone. Damaged packs are reported and left out. Every object
    in index/ is replaced, damaged ones included; files there that are not objects are left.
    A pack that cannot be read (the storage failed) stops it before it changes anything.
    """
    from ..maint.repair import rebuild_index

    repo = app.open_repo(lock="exclusive", load_index=False)
    result = rebuild_index(repo, progress=app.progress("repair index"), dry_run=dry_run)
    if app.json:
        app.emit_json(
            {
                "packs": result.packs,
                "blobs": result.blobs,
                "damaged_packs": result.damaged,
                "old_index_objects": result.old_index_objects,
                "not_objects": result.not_objects,
                "failed": result.failed,
                "dry_run": dry_run,
            }
        )
    else:
        for name, why in sorted(result.damaged.items()):
            click.echo(f"ibsync: pack {printable(name[:12])} left out: {printable(why)}", err=True)
        for name in result.not_objects:
            click.echo(
                f"ibsync: not an index object, left in place: {printable(object_path(Kind.INDEX, name))}", err=True
            )
        verb = "would index" if dry_run else "indexed"
        app.say(
            f"{verb} {result.blobs} blobs in {result.packs} packs, replacing {result.old_index_objects} index object(s)"
        )
        if result.damaged:
            app.say("run 'ibsync repair snapshots' to see which files the left-out packs held")
    report_undeleted(result.failed)
    fail_if_undeleted(
        result.failed,
        "the new index is complete and the old objects it lists are redundant;"
        " run 'ibsync repair index' again once the storage allows it",
    )


@repair_group.command("packs")
@click.argument("pack_ids", nargs=-1, metavar="[PACK-ID]...")
@click.option(
    "--read-data", is_flag=True, help="Read every pack and repair each damaged one (reads the whole repository)."
)
@click.option("--dry-run", "-n", is_flag=True, help="Read the packs and report what is damaged; change nothing.")
@common_options
def repair_packs_cmd(app: App, pack_ids: tuple[str, ...], read_data: bool, dry_run: bool) -> None:
    """Salvage damaged packs: the packs named (as 'check --read-data' prints them), or every
    pack with --read-data.

    Each pack is read whole. From a damaged one, every blob that still decrypts and matches
    its id is stored again in new packs; the index is rewritten without the damaged pack, which
    is then deleted if its header shows it is this repository's (otherwise it is left in place
    and only named). Then run 'ibsync repair snapshots': it rewrites the snapshots that used a
    lost blob without the files (or folders) that held it.
    """
    from ..maint.repair import repair_packs, resolve_packs

    if bool(pack_ids) == read_data:
        raise UserError(
            "name the packs to repair (as 'ibsync check --read-data' printed them), or give --read-data"
            " to read and repair every pack, not both"
        )
    repo = app.open_repo(lock="exclusive")
    packs = resolve_packs(repo, pack_ids) if pack_ids else {i.name: i.size for i in repo.storage.list(Kind.PACKS)}
    result = repair_packs(repo, packs, progress=app.progress("repair packs"), dry_run=dry_run)
    if app.json:
        app.emit_json(
            {
                "packs_read": result.read,
                "damaged": {
                    n: {
                        "problems": v.problems,
                        "blobs_salvaged": len({b.id for b in v.good}),
                        "blobs_lost": sorted({b.id.hex() for b in v.lost}),
                        "deleted": n in result.deleted,
                        "left": result.left.get(n),
                    }
                    for n, v in sorted(result.damaged.items())
                },
                "blobs_salvaged": result.salvaged_blobs,
                "packs_written": result.packs_written,
                "failed": result.failed,
                "dry_run": dry_run,
            }
        )
    else:
        _say_packs(app, result, dry_run)
    for name, why in sorted(result.left.items()):  # on stderr with --json too, as undeleted objects
        click.echo(f"ibsync: pack {name[:12]} left in place: {printable(why)}", err=True)
    report_undeleted(result.failed)
    fail_if_undeleted(
        result.failed, "the salvaged blobs are indexed; run 'ibsync repair packs' again once the storage allows it"
    )


def _say_packs(app: App, result, dry_run: bool) -> None:
    for name, v in sorted(result.damaged.items()):
        app.say(
            f"pack {name[:12]}: damaged ({printable(v.problems[0])}"
            + (f", and {len(v.problems) - 1} more problem(s)" if len(v.problems) > 1 else "")
            + ")"
        )
        app.say(f"  {len({b.id for b in v.good})} blob(s) readable, {len({b.id for b in v.lost})} lost")
    if not result.damaged:
        app.say(f"read {result.read} pack(s): no damaged packs")
        return
    if dry_run:
        app.say(f"would repair {len(result.damaged)} damaged pack(s) of the {result.read} read")
        return
    app.say(
        f"salvaged {result.salvaged_blobs} blob(s) into {result.packs_written} new pack(s); "
        f"deleted {len(result.deleted)} damaged pack(s); {result.lost_blobs} blob(s) lost"
    )
    if result.lost_blobs:
        app.say("run 'ibsync repair snapshots' to rewrite the snapshots that used them without the lost files")


@repair_group.command("snapshots")
@click.option("--dry-run", "-n", is_flag=True, help="Show the damaged snapshots and their lost files; change nothing.")
@common_options
def repair_snapshots_cmd(app: App, dry_run: bool) -> None:
    """Rewrite snapshots whose data is partly lost, without the lost files and folders.

    Each damaged snapshot is listed with every file and folder it loses, saved again without
    them (same device, dates and folder; its source records the snapshot it replaces and what
    was removed), and the original is removed. A snapshot whose top folder itself is lost
    cannot be rewritten: it is removed. Snapshot objects that do not authenticate (damaged, or
    not written with this repository's key) are listed and removed too. Snapshots whose data
    is all there are not touched. Run 'repair index' and 'repair packs' first, so the index
    says what really exists. A failed read stops it before it changes anything.
    """
    from ..maint.repair import damaged_snapshots, rewrite_damaged

    repo = app.open_repo(lock="exclusive")
    repair = damaged_snapshots(repo)
    if not dry_run:
        rewrite_damaged(repo, repair)
    if app.json:
        app.emit_json(
            [
                {
                    "id": d.snapshot.id,
                    "udid": d.snapshot.device.udid,
                    "lost_files": d.lost_files,
                    "lost_folders": d.lost_trees,
                    "rewritten_as": d.rewritten,
                    "removed": d.snapshot.id in repair.removed,
                }
                for d in repair.damaged
            ]
            + [
                {
                    "id": name,
                    "udid": None,
                    "lost_files": [],
                    "lost_folders": [],
                    "unreadable": why,
                    "rewritten_as": None,
                    "removed": name in repair.removed,
                }
                for name, why in sorted(repair.unreadable.items())
            ]
        )
    else:
        _say_damage(app, repair)
        _say_outcome(app, repair, dry_run)
    report_undeleted(repair.failed)
    fail_if_undeleted(repair.failed, "run 'ibsync repair snapshots' again once the storage allows it")


def _say_damage(app: App, repair) -> None:
    for d in repair.damaged:
        s = d.snapshot
        app.say(
            printable(
                f"snapshot {s.short_id} of {s.device.name or s.device.udid}: "
                + (
                    "its top folder is lost"
                    if d.root_lost
                    else f"{len(d.lost_files)} file(s) and {len(d.lost_trees)} folder(s) lost"
                )
            )
        )
        for path in d.lost_trees if not d.root_lost else ():
            app.say(f"  lost folder {printable(path)}")
        for path in d.lost_files:
            app.say(f"  lost {printable(path)}")
    for name, why in sorted(repair.unreadable.items()):
        app.say(f"snapshot object {name[:12]} does not authenticate: {printable(why)}")


def _say_outcome(app: App, repair, dry_run: bool) -> None:
    if not repair.count:
        app.say("no damaged snapshots")
        return
    lost_roots = sum(d.root_lost for d in repair.damaged)
    rewritable = len(repair.damaged) - lost_roots
    removable = lost_roots + len(repair.unreadable)
    if dry_run:
        app.say(f"would remove {removable} and rewrite {rewritable} damaged snapshot(s)")
        return
    for d in repair.damaged:
        if d.rewritten:
            app.say(f"snapshot {d.snapshot.short_id} rewritten as {d.rewritten[:8]}")
    removed = sum(1 for d in repair.damaged if d.root_lost and d.snapshot.id in repair.removed)
    removed += sum(1 for n in repair.unreadable if n in repair.removed)
    app.say(f"removed {removed} and rewrote {sum(1 for d in repair.damaged if d.rewritten)} damaged snapshot(s)")
