"""The user's configuration file: named repositories with their URL, storage options and
password source, so that `--repo nas` is all a command needs.

    # ~/.config/ibsync/config.toml   (path: --config, $IBSYNC_CONFIG, or the platform default)
    [repositories.nas]
    url = "sftp://nas.local/volume1/ibsync"
    password-command = "security find-generic-password -s ibsync-nas -w"
    [repositories.nas.options]          # passed to the fsspec filesystem
    username = "me"
    key_filename = "~/.ssh/id_ed25519"

    [repositories.offsite]
    url = "s3://my-bucket/iphone"
    password-file = "~/.ibsync-offsite"
    [repositories.offsite.options]
    endpoint_url = "https://s3.example.com"
    secret = "${OFFSITE_SECRET}"       # taken from the environment when the command runs

Secrets live in the environment, a password file or a password command; the file holds only
references to them. Nothing from here is written into a repository, and error messages never
quote option values.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .userdirs import user_dir

REPO_KEYS = {"url", "options", "password-file", "password-command", "password-env"}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class RepoConfig:
    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    password_file: str | None = None
    password_command: str | None = None
    password_env: str | None = None  # name of an environment variable holding the password


def default_config_path() -> Path:
    return user_dir("config") / "config.toml"


TOP_KEYS = {"repositories", "agent", "devices"}


def load_document(path: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """The whole config file, parsed, and its path; empty when the default file does not exist.
    Top-level tables other than [repositories], [agent] and [devices] are refused."""
    explicit = path is not None
    path = Path(path).expanduser() if path is not None else default_config_path()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise UserError(f"config file {path} does not exist") from None
        return {}, path
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path}: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise UserError(
            f"config file {path}: unknown table(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})"
        )
    return doc, path


def load_config(path: Path | None = None) -> dict[str, RepoConfig]:
    """Named repositories from the config file; none when the default file does not exist."""
    doc, path = load_document(path)
    repos = doc.get("repositories", {})
    if not isinstance(repos, dict):
        raise UserError(f"config file {path}: [repositories] must be a table")
    out = {}
    for name, table in repos.items():
        where = f"config file {path}, repository '{name}'"
        if not isinstance(table, dict):
            raise UserError(f"{where}: must be a table")
        unknown = set(table) - REPO_KEYS
        if unknown:
            raise UserError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(REPO_KEYS))})"
            )
        if not isinstance(table.get("url"), str) or not table["url"]:
            raise UserError(f"{where}: 'url' is missing")
        options = table.get("options", {})
        if not isinstance(options, dict):
            raise UserError(f"{where}: 'options' must be a table")
        out[name] = RepoConfig(
            name=name,
            url=table["url"],
            options=options,
            password_file=table.get("password-file"),
            password_command=table.get("password-command"),
            password_env=table.get("password-env"),
        )
    return out


def expand_secrets(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Replace ``${VAR}`` in option strings by the environment's value (at use, never stored)."""

    def expand(value: Any) -> Any:
        if isinstance(value, str):

            def sub(m: re.Match) -> str:
                if m.group(1) not in os.environ:
                    raise UserError(f"{where}: environment variable {m.group(1)} is not set")
                return os.environ[m.group(1)]

            return _ENV_REF.sub(sub, value)
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        if isinstance(value, list):
            return [expand(v) for v in value]
        return value

    return expand(options)


def resolve_repo(spec: str, repos: dict[str, RepoConfig]) -> RepoConfig:
    """A configured repository by name, or a bare URL/path with no options."""
    if spec in repos:
        return repos[spec]
    return RepoConfig(name="", url=spec)
