from __future__ import annotations

import click

from ..errors import StorageError
from ..storage import Kind, object_path
from ..ui.text import printable, size
from .app import App, common_options


@click.command("prune")
@click.option("--repack-threshold", type=click.IntRange(0, 100), default=50, show_default=True, metavar="PCT",
              help="Repack a pack once this percentage of it is unused (0: any unused data; 100: only delete packs nothing uses).")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be freed; change nothing.")
@common_options
def prune_cmd(app: App, repack_threshold: int, dry_run: bool) -> None:
    """Delete data no snapshot uses, and repack packs that are mostly unused.

    Takes the repository's exclusive lock: it waits for no one and refuses to run while an
    import, restore or check holds the repository. Safe to interrupt at any point. Files in
    packs/ that are not packs of this repository are listed and left in place.
    """
    summary = run_prune(app, app.open_repo(lock="exclusive"), repack_threshold / 100, dry_run)
    if app.json:
        app.emit_json(summary)
    fail_if_undeleted(summary.get("failed", {}), PRUNE_AGAIN)


PRUNE_AGAIN = "they are unreferenced, and the next 'ibsync prune' tries again"


def report_undeleted(failed: dict[str, str]) -> None:
    """One line on stderr for each object whose deletion failed (also with --json, which lists them)."""
    for path, why in sorted(failed.items()):
        click.echo(f"ibsync: could not delete {printable(path)}: {printable(why)}", err=True)


def fail_if_undeleted(failed: dict[str, str], then: str) -> None:
    """Exit 1 when something could not be deleted: a script must not take it for success."""
    if failed:
        raise StorageError(f"{len(failed)} object(s) could not be deleted (named above); the repository is still valid: {then}")


def run_prune(app: App, repo, threshold: float, dry_run: bool, ignore: set[str] = frozenset()) -> dict:
    """Plan and (unless dry_run) carry out a prune; prints text (and every failed deletion, on
    stderr), returns the JSON summary, whose "failed" the caller turns into exit status 1 after
    printing. The caller holds the exclusive lock; ``ignore`` names snapshots to plan without."""
    from ..maint.prune import execute_prune, plan_prune

    plan = plan_prune(repo, repack_threshold=threshold, ignore=ignore)
    summary = {
        "used_blobs": plan.used_blobs,
        "packs_to_delete": len(plan.delete),
        "bytes_to_delete": plan.delete_bytes,
        "packs_to_repack": len(plan.repack),
        "bytes_to_repack": plan.repack_bytes,
        "packs_kept": len(plan.keep),
        "unused_bytes_kept": plan.unused_kept_bytes,
        "junk_packs": plan.junk,
        "dry_run": dry_run,
    }
    for name, why in sorted(plan.junk.items()):
        click.echo(f"ibsync: not an ibsync pack, left in place: {printable(object_path(Kind.PACKS, name))} ({printable(why)})", err=True)
    if not dry_run:
        result = execute_prune(repo, plan, progress=app.progress("prune"))
        summary.update(packs_deleted=result.packs_deleted, packs_written=result.packs_written, bytes_freed=result.bytes_freed,
                       temporary_files_removed=result.temporary_removed, packs_left_listed=result.packs_left_listed,
                       failed=result.failed)
        report_undeleted(result.failed)
    if app.json:
        return summary
    verb = "would" if dry_run else "will"
    app.say(
        f"{plan.used_blobs} blobs in use; {len(plan.delete)} pack(s) unused ({size(plan.delete_bytes)}), "
        f"{len(plan.repack)} pack(s) to repack ({size(plan.repack_bytes)}), {len(plan.keep)} kept "
        f"with {size(plan.unused_kept_bytes)} unused below the threshold"
    )
    if plan.nothing_to_do:
        app.say("nothing to prune")
    elif dry_run:
        app.say(f"{verb} free about {size(plan.delete_bytes + plan.repack_bytes)} before repacking")
    else:
        app.say(f"deleted {summary['packs_deleted']} pack(s), wrote {summary['packs_written']}; freed {size(summary['bytes_freed'])}")
    if summary.get("packs_left_listed"):
        app.say(f"kept {summary['packs_left_listed']} unused pack(s): an old index object that lists them could not be deleted")
    if summary.get("temporary_files_removed"):
        app.say(f"removed {summary['temporary_files_removed']} temporary file(s) left by interrupted writes")
    return summary
