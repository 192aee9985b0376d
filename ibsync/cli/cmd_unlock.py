from __future__ import annotations

import click

from .app import App, common_options


@click.command("unlock")
@click.option("--remove-all", is_flag=True, help="Remove every lock, not only stale ones (only when no other ibsync runs on this repository).")
@common_options
def unlock_cmd(app: App, remove_all: bool) -> None:
    """Remove stale locks left by crashed or killed processes.

    A lock is stale when its process on this host is gone, or when it has not been refreshed
    for 30 minutes (its holders refresh it every 5 minutes).
    """
    from ..repo.lock import remove_locks

    repo = app.open_repo(lock="none", load_index=False)
    removed = remove_locks(repo, all_locks=remove_all)
    if app.json:
        app.emit_json({"removed": [lk.name for lk in removed]})
        return
    for lk in removed:
        app.say(f"removed {lk.describe()}")
    app.say(f"removed {len(removed)} lock(s)")
