"""What every command shares: repository and password options, output mode, progress."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from ..opening import RepoSource
from ..progress import NULL_PROGRESS, Progress


@dataclass
class App(RepoSource):
    """A command's repository (RepoSource) and how it reports: JSON or text, quiet, progress."""

    json: bool = False
    quiet: bool = False

    def open_repo(self, *, lock: str = "shared", load_index: bool = True):
        """Open the repository, lock it ("shared", "exclusive" or "none") until the command
        ends, and load its index (check and repair load it themselves: a damaged index object
        is what they are there to report or replace)."""
        from ..repo.lock import RepoLock

        repo = self.open_unlocked()
        if lock != "none":
            ctx = click.get_current_context()
            held = RepoLock(
                repo, exclusive=lock == "exclusive", command=ctx.command_path.removeprefix("ibsync ")
            ).acquire()
            ctx.call_on_close(held.release)
        if load_index:
            repo.load_index()
        return repo

    def progress(self, description: str) -> Progress:
        if self.quiet or self.json or not sys.stderr.isatty():
            return NULL_PROGRESS
        from ..ui.progress import TerminalProgress

        return TerminalProgress(description)

    def say(self, text: str) -> None:
        if not self.quiet and not self.json:
            click.echo(text)

    def emit_json(self, value: Any) -> None:
        click.echo(json.dumps(value, indent=2, default=str))


def common_options(func: Callable) -> Callable:
    """--repo, password options, --json and --quiet on every command."""

    @click.option(
        "--repo",
        "-r",
        "repo_url",
        envvar="IBSYNC_REPO",
        metavar="URL|NAME",
        help="Repository: a path; s3://BUCKET/PATH, sftp://USER@HOST/PATH, smb://HOST/SHARE/PATH, webdav+https://HOST/PATH or another fsspec URL; or a name from the config file (README: storage options). Default: $IBSYNC_REPO.",
    )
    @click.option(
        "--config",
        "config_path",
        envvar="IBSYNC_CONFIG",
        metavar="FILE",
        help="Config file naming repositories (default: the platform's user config folder, ibsync/config.toml).",
    )
    @click.option(
        "--password-file",
        "-p",
        metavar="FILE",
        help="Read the repository password from FILE (also $IBSYNC_PASSWORD_FILE).",
    )
    @click.option(
        "--password-command",
        metavar="CMD",
        help="Run CMD and use what it prints as the password (also $IBSYNC_PASSWORD_COMMAND).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")
    @click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors; no progress bars.")
    @functools.wraps(func)
    def wrapper(repo_url, config_path, password_file, password_command, as_json, quiet, **kwargs):
        app = App(repo_url, password_file, password_command, config_path, json=as_json, quiet=quiet)
        return func(app, **kwargs)

    return wrapper
