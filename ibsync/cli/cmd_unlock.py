from __future__ import annotations

import click

from ..storage import Kind, object_path
from ..ui.text import printable
from .app import App, common_options
from .cmd_prune import fail_if_undeleted, report_undeleted


@click.command("unlock")
@click.option(
    "--remove-all",
    is_flag=True,
    help="Remove every lock, not only stale ones (only when no other ibsync runs on this repository).",
)
@common_options
def unlock_cmd(app: App, remove_all: bool) -> None:
    """Remove stale locks left by crashed or killed processes.

    A lock is stale when its process on this host is gone, or when it has not been refreshed
    for 30 minutes (its holders refresh it every 5 minutes). Objects in locks/ that are not
    locks of this repository (they do not authenticate with its key) are ignored by every
    command and never removed: they are listed, for you to look at.
    """
    from ..repo.lock import remove_locks

    repo = app.open_repo(lock="none", load_index=False)
    result = remove_locks(repo, all_locks=remove_all)
    failed = {object_path(Kind.LOCKS, name): why for name, why in result.failed.items()}
    if app.json:
        app.emit_json({"removed": [lk.name for lk in result.removed], "junk": result.junk, "failed": failed})
    else:
        for lk in result.removed:
            app.say(f"removed {printable(lk.describe())}")
        for name, why in sorted(result.junk.items()):
            app.say(f"not a lock, left in place: {printable(object_path(Kind.LOCKS, name))} ({why})")
        app.say(f"removed {len(result.removed)} lock(s)")
    report_undeleted(failed)
    fail_if_undeleted(failed, "run 'ibsync unlock' again once the storage allows it")
