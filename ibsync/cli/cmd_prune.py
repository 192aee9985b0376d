from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..errors import StorageError
from ..progress import NULL_PROGRESS
from ..storage import Kind, object_path
from ..ui.text import printable, size
from .app import App, common_options

if TYPE_CHECKING:  # unlock and repair import this module: they need not load prune
    from ..maint.prune import PruneResult


@click.command("prune")
@click.option(
    "--repack-threshold",
    type=click.IntRange(0, 100),
    default=50,
    show_default=True,
    metavar="PCT",
    help="Repack a pack once this percentage of it is unused (0: any unused data; 100: only delete packs nothing uses).",
)
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be freed; change nothing.")
@common_options
def prune_cmd(app: App, repack_threshold: int, dry_run: bool) -> None:
    """Delete data no snapshot uses, and repack packs that are mostly unused.

    Takes the repository's exclusive lock: it waits for no one and refuses to run while an
    import, restore or check holds the repository. Safe to interrupt at any point. Files in
    packs/ that are not packs of this repository are listed and left in place.
    """
    result = run_prune(app, app.open_repo(lock="exclusive"), repack_threshold / 100, dry_run)
    if app.json:
        app.emit_json(result.to_dict())
    fail_if_undeleted(result.failed, PRUNE_AGAIN)


PRUNE_AGAIN = "they are unreferenced, and the next 'ibsync prune' tries again"


def report_undeleted(failed: dict[str, str]) -> None:
    """One line on stderr for each object whose deletion failed (also with --json, which lists them)."""
    for path, why in sorted(failed.items()):
        click.echo(f"ibsync: could not delete {printable(path)}: {printable(why)}", err=True)


def fail_if_undeleted(failed: dict[str, str], then: str) -> None:
    """Exit 1 when something could not be deleted: a script must not take it for success."""
    if failed:
        raise StorageError(
            f"{len(failed)} object(s) could not be deleted (named above); the repository is still valid: {then}"
        )


def run_prune(
    app: App, repo, threshold: float, dry_run: bool, ignore: frozenset[str] | set[str] = frozenset()
) -> PruneResult:
    """Prune through the library and print what it did: text, junk packs and every failed
    deletion on stderr. The caller holds the exclusive lock, prints ``to_dict()`` for --json and
    turns ``failed`` into exit status 1; ``ignore`` names snapshots to plan without."""
    from ..maint import api

    result = api.prune(
        repo,
        repack_threshold=threshold,
        dry_run=dry_run,
        ignore_snapshots=ignore,
        progress=NULL_PROGRESS if dry_run else app.progress("prune"),
    )
    plan = result.plan
    for name, why in sorted(plan.junk.items()):
        click.echo(
            f"ibsync: not an ibsync pack, left in place: {printable(object_path(Kind.PACKS, name))} ({printable(why)})",
            err=True,
        )
    report_undeleted(result.failed)
    if app.json:
        return result
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
        app.say(
            f"deleted {result.packs_deleted} pack(s), wrote {result.packs_written}; freed {size(result.bytes_freed)}"
        )
    if result.packs_left_listed:
        app.say(
            f"kept {result.packs_left_listed} unused pack(s): an old index object that lists them could not be deleted"
        )
    if result.temporary_removed:
        app.say(f"removed {result.temporary_removed} temporary file(s) left by interrupted writes")
    return result
