from __future__ import annotations

import click

from .app import App, common_options


@click.command("upgrade")
@common_options
def upgrade_cmd(app: App) -> None:
    """Upgrade the repository to the newest format (2: compact trees that grow with what changed).

    Rewrites only the config (same id, keys and settings), under the exclusive lock; existing
    snapshots stay as they are, and readable. Afterwards an ibsync that reads only format 1
    refuses the repository.
    """
    from ..repo.repository import FORMAT_VERSION, upgrade_format

    repo = app.open_repo(lock="exclusive", load_index=False)
    old = upgrade_format(repo)
    if app.json:
        app.emit_json({"from_version": old, "version": repo.config["version"]})
    elif old >= FORMAT_VERSION:
        app.say(f"the repository already has format version {old}; nothing to do")
    else:
        app.say(f"upgraded the repository from format version {old} to {FORMAT_VERSION}")
