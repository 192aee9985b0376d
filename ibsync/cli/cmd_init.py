from __future__ import annotations

import click

from .app import App, common_options


@click.command("init")
@click.option("--no-encryption", is_flag=True, help="Store data unencrypted (only for a drive you trust).")
@click.option(
    "--pack-size",
    type=click.IntRange(4, 128),
    default=20,
    show_default=True,
    metavar="MIB",
    help="Target size of pack files in MiB: larger means fewer objects on S3, more memory per upload.",
)
@common_options
def init_cmd(app: App, no_encryption: bool, pack_size: int) -> None:
    """Create a new, empty repository."""
    from ..repo.repository import Repository

    storage = app.storage()
    password = None if no_encryption else app.password(confirm=True)
    repo = Repository.init(storage, password, pack_size=pack_size << 20)
    # A new repository replaces what this location held before, encrypted or not.
    app.known().remember(storage.url, repo.id, repo.encrypted, repo.key_name)
    if app.json:
        app.emit_json({"id": repo.id, "repository": storage.url, "encryption": repo.config["encryption"]})
    else:
        mode = "encrypted (AES-256-GCM)" if repo.encrypted else "UNENCRYPTED"
        app.say(f"created {mode} ibsync repository {repo.id[:8]} at {storage.url}")
        if repo.encrypted:
            app.say("Keep the password safe: without it the data in this repository cannot be read back.")
