from __future__ import annotations

import os
import sys

import click

from ..errors import UserError
from ..model import parse_iso
from ..opening import read_password_file
from ..ui.text import table, when
from .app import App, common_options

NEW_PASSWORD_FILE_HELP = "Read the new password from FILE (also $IBSYNC_NEW_PASSWORD; else a prompt)."


class _Session:
    """The repository opened with the current password, which is remembered so that a new
    password equal to it can be refused."""

    def __init__(self, app: App, *, exclusive: bool = False) -> None:
        from ..repo.keys import require_encrypted
        from ..repo.lock import RepoLock

        self.password: str | None = None

        def password() -> str:
            self.password = app.password()
            return self.password

        # Keys need neither the index nor the snapshots: open the config and keys only.
        self.repo = app.open_unlocked(password)
        require_encrypted(self.repo)
        if exclusive:
            # two removals racing could each see the other's key still there and delete both
            ctx = click.get_current_context()
            held = RepoLock(self.repo, exclusive=True, command=ctx.command_path.removeprefix("ibsync ")).acquire()
            ctx.call_on_close(held.release)

    def new_password(self, path: str | None) -> str:
        pw = _new_password(path)
        if self.password is not None and pw == self.password:
            raise UserError("the new password is the same as the current one")
        return pw


def _new_password(path: str | None) -> str:
    if path:
        return read_password_file(path)
    if os.environ.get("IBSYNC_NEW_PASSWORD"):
        return os.environ["IBSYNC_NEW_PASSWORD"]
    if not sys.stdin.isatty():
        raise UserError("no new password given: use --new-password-file FILE, IBSYNC_NEW_PASSWORD or run interactively")
    import getpass

    pw = getpass.getpass("new password: ")
    if not pw:
        raise UserError("an empty password is not allowed")
    if getpass.getpass("repeat the new password: ") != pw:
        raise UserError("the passwords do not match")
    return pw


def _created(text: str) -> str:
    try:
        return when(parse_iso(text))
    except (ValueError, TypeError):
        return text or "-"


@click.group("key", short_help="Manage the passwords that open the repository.")
def key_group() -> None:
    """Manage the passwords that open the repository (one key file each).

    All keys unlock the same master key, so adding, removing or changing a password
    rewrites no data.
    """


@key_group.command("list")
@common_options
def key_list_cmd(app: App) -> None:
    """List the keys; '*' marks the one your password opened."""
    from ..repo.keys import list_keys

    keys = list_keys(_Session(app).repo)
    if app.json:
        app.emit_json(
            [
                {
                    "id": k.id,
                    "short_id": k.short_id,
                    "created": k.created,
                    "hostname": k.hostname,
                    "username": k.username,
                    "kdf": k.kdf,
                    "current": k.current,
                    "error": k.error,
                }
                for k in keys
            ]
        )
        return
    rows = [
        [k.short_id, _created(k.created), k.hostname or "-", k.username or "-", "*" if k.current else ""]
        + ([f"({k.error})"] if k.error else [])
        for k in keys
    ]
    headers = ["ID", "Created", "Host", "User", "Current"]
    if any(k.error for k in keys):
        headers.append("Problem")
        rows = [r + [""] * (len(headers) - len(r)) for r in rows]
    click.echo(table(headers, rows))
    click.echo(f"{len(keys)} key(s)")


@key_group.command("add", short_help="Add a password (a new key).")
@click.option("--new-password-file", metavar="FILE", help=NEW_PASSWORD_FILE_HELP)
@common_options
def key_add_cmd(app: App, new_password_file: str | None) -> None:
    """Add a password: a new key that opens the repository as well as the existing ones."""
    from ..repo.keys import add_key

    session = _Session(app)
    name = add_key(session.repo, session.new_password(new_password_file))
    if app.json:
        app.emit_json({"added": name})
    else:
        app.say(f"added key {name[:8]}: the new password opens the repository too")


@key_group.command("remove", short_help="Remove a key: its password stops working.")
@click.argument("key_id", metavar="ID")
@common_options
def key_remove_cmd(app: App, key_id: str) -> None:
    """Remove the key ID (or a unique prefix of it): its password no longer opens the repository.

    The key your password opened, and the last key, cannot be removed.
    """
    from ..repo.keys import remove_key

    name = remove_key(_Session(app, exclusive=True).repo, key_id)
    if app.json:
        app.emit_json({"removed": name})
    else:
        app.say(f"removed key {name[:8]}")


@key_group.command("passwd", short_help="Change the password you opened with.")
@click.option("--new-password-file", metavar="FILE", help=NEW_PASSWORD_FILE_HELP)
@common_options
def key_passwd_cmd(app: App, new_password_file: str | None) -> None:
    """Change the password: add a key for the new password, then remove the key the current one opened."""
    from ..repo.keys import change_password

    session = _Session(app, exclusive=True)
    old = session.repo.key_name
    new = change_password(session.repo, session.new_password(new_password_file))
    app.known().remember(session.repo.storage.url, session.repo.id, True, new)  # try the new key first next time
    if app.json:
        app.emit_json({"added": new, "removed": old})
    else:
        app.say(f"password changed: key {new[:8]} replaces key {(old or '-')[:8]}")
