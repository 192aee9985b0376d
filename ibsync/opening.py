"""Opening a repository the user named: its URL or config-file name resolved, its password
read from the first source that gives one, the downgrade checks of design.md §3 applied."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError


def read_password_file(path: str) -> str:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            pw = f.read().rstrip("\r\n")
    except OSError as e:
        raise UserError(f"cannot read password file {path}: {e.strerror}") from e
    if not pw:
        raise UserError(f"password file {path} is empty")
    return pw


def _password_from_env(variable: str, owner: str) -> str:
    """A config file's password_env: named, so unset is an error rather than a prompt."""
    if not os.environ.get(variable):
        raise UserError(f"{owner}: environment variable {variable} is not set")
    return os.environ[variable]


@dataclass
class RepoSource:
    """A repository as a user names it (a URL, a path, or a name from the config file) and where
    its password comes from: what the CLI, the agent and library callers open repositories
    with, so that all of them resolve passwords and get the downgrade checks alike."""

    repo_url: str | None  # a URL, a path, or the name of a repository in the config file
    password_file: str | None = None
    password_command: str | None = None
    config_path: str | None = None
    env_prefix: str = "IBSYNC_"  # IBSYNC_FROM_ for the source of `copy`
    _repo: Any = field(default=None, repr=False)  # the resolved RepoConfig

    def repo_config(self):
        """The repository the options name, resolved through the config file."""
        if self._repo is None:
            from .config import load_config, resolve_repo

            if not self.repo_url:
                raise UserError("no repository given: pass --repo URL|NAME or set IBSYNC_REPO")
            self._repo = resolve_repo(self.repo_url, load_config(Path(self.config_path) if self.config_path else None))
        return self._repo

    def require_repo(self) -> str:
        return self.repo_config().url

    def storage(self):
        from .config import expand_secrets
        from .storage import open_storage

        rc = self.repo_config()
        where = f"repository '{rc.name}'" if rc.name else "repository"
        return open_storage(rc.url, expand_secrets(rc.options, where) if rc.options else None)

    def password(self, *, confirm: bool = False) -> str:
        """The repository password: the options, then the config file's source for this
        repository, then the environment, then a prompt."""
        source = self._password_source()
        if source is not None:
            return source()
        env = self.env_prefix
        if not sys.stdin.isatty():
            raise UserError(
                f"no password given for {self.repo_url}: use a password option, {env}PASSWORD, "
                f"{env}PASSWORD_FILE, the config file, or run interactively"
            )
        import getpass

        pw = getpass.getpass(f"password of {self.repo_url}: ")
        if confirm and getpass.getpass("repeat the password: ") != pw:
            raise UserError("the passwords do not match")
        if not pw:
            raise UserError("an empty password is not allowed; use 'init --no-encryption' for no encryption")
        return pw

    def password_given(self) -> bool:
        """Whether a password is configured for this repository (an option, the config file or
        the environment), known without reading it or prompting: an unencrypted repository is
        then refused as a likely downgrade (Repository.open)."""
        return self._password_source() is not None

    def _password_source(self) -> Callable[[], str] | None:
        """The configured password, not yet read, from the first source that names one (the
        order password() promises); None when only a prompt is left. One list for password()
        and password_given(), so a new source counts for both."""
        if self.password_file:
            return functools.partial(read_password_file, self.password_file)
        if self.password_command:
            return functools.partial(self._run_password_command, self.password_command)
        rc = self.repo_config() if self.repo_url else None
        if rc is not None and rc.password_file:
            return functools.partial(read_password_file, rc.password_file)
        if rc is not None and rc.password_command:
            return functools.partial(self._run_password_command, rc.password_command)
        if rc is not None and rc.password_env:
            return functools.partial(_password_from_env, rc.password_env, f"repository '{rc.name}'")
        env = self.env_prefix
        if os.environ.get(f"{env}PASSWORD"):
            return functools.partial(os.environ.__getitem__, f"{env}PASSWORD")
        if os.environ.get(f"{env}PASSWORD_FILE"):
            return functools.partial(read_password_file, os.environ[f"{env}PASSWORD_FILE"])
        if os.environ.get(f"{env}PASSWORD_COMMAND"):
            return functools.partial(self._run_password_command, os.environ[f"{env}PASSWORD_COMMAND"])
        return None

    @staticmethod
    def known():
        """What this user remembers of repositories (repo/known.py), in the cache folder root."""
        from .repo.cache import cache_root
        from .repo.known import KnownRepositories

        return KnownRepositories(cache_root())

    def open_unlocked(self, password: Callable[[], str] | None = None, *, password_given: bool = False):
        """Open the repository, neither locked nor with its index loaded: every command and the
        library entry points open through here, so all of them get the downgrade checks.
        ``password``: a source replacing this App's own (which is then still consulted for
        whether a password is given); ``password_given``: the caller has one of its own."""
        from .repo.repository import Repository

        repo = Repository.open(
            self.storage(),
            password or self.password,
            password_given=password_given or self.password_given(),
            known=self.known(),
        )
        if not repo.storage.properties.local and not os.environ.get("IBSYNC_NO_CACHE"):
            from .repo.cache import cache_root

            repo.use_cache(cache_root())
        return repo

    def open(self, *, lock: str = "shared", command: str = "ibsync", load_index: bool = True):
        """The repository opened, locked ("shared", "exclusive" or "none") and its index loaded,
        as a context manager that releases the lock and closes the repository."""
        from .repo.lock import RepoLock

        repo = self.open_unlocked()
        held = None
        try:
            if lock != "none":
                held = RepoLock(repo, exclusive=lock == "exclusive", command=command).acquire()
            if load_index:
                repo.load_index()
        except BaseException:
            if held is not None:
                held.release()
            repo.close()
            raise
        return _Opened(repo, held)

    @staticmethod
    def _run_password_command(command: str) -> str:
        try:
            out = subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout
        except subprocess.CalledProcessError as e:
            raise UserError(f"password command failed with exit code {e.returncode}") from None
        pw = out.rstrip("\r\n")
        if not pw:
            raise UserError("password command printed nothing")
        return pw


class _Opened:
    def __init__(self, repo: Any, held: Any) -> None:
        self.repo, self.held = repo, held

    def __enter__(self):
        return self.repo

    def __exit__(self, *exc: object) -> None:
        try:
            if self.held is not None:
                self.held.release()
        finally:
            self.repo.close()
