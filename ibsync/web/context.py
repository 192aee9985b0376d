"""What every page of the web app works with: the config file, the agent's settings and
history, the repositories it names, opened repositories kept warm between requests, and the
running jobs. One WebContext per server; nothing here is global."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agent.history import History
from ..agent.settings import AgentSettings, parse_agent_settings
from ..config import load_config, load_document
from ..errors import UserError
from .jobs import Jobs

#: idle opened repositories kept per name (each one is used by one request at a time)
IDLE_PER_REPO = 4


@dataclass(frozen=True)
class RepoRef:
    #: what pages and URLs call it: the config file's name; for a repository the agent names by
    #: URL or path, a short name made of its last path part (made unique), fit for a URL segment
    name: str
    url: str
    spec: str = ""  # how the config file names it (the name, or the URL/path): RepoSource's argument


def _short_name(url: str, taken: set[str]) -> str:
    tail = url.rstrip("/").rsplit("/", 1)[-1] or "repository"
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip(".-") or "repository"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


@dataclass
class WebContext:
    config_path: Path | None = None  # None: the platform's default config file
    settings: AgentSettings = field(default_factory=AgentSettings)
    history: History | None = None
    jobs: Jobs = field(default_factory=Jobs)
    #: in the agent: ``request_backup(udid) -> None`` asks its loop to back that device up now;
    #: None under ``ibsync ui`` alone (the app then runs the backup itself)
    request_backup: Callable[[str], None] | None = None
    #: the login settings (auth.AuthConfig); create_app makes one when none is given
    auth: Any = None
    _pools: dict[str, _RepoPool] = field(default_factory=dict, repr=False)
    #: (when, {UDID: ConnectedDevice}) of the last look for devices (ibsync.web.backup)
    _present_cache: tuple[float, dict[str, Any]] | None = field(default=None, repr=False)
    #: backups and restores running in the server's event loop, held so the loop keeps them
    _tasks: set[Any] = field(default_factory=set, repr=False)
    _pools_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _history_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, config_path: str | Path | None = None, *, history: History | None = None, **kw: Any) -> WebContext:
        """The context for a config file (default: the platform's); the agent's history is
        opened (created if missing) in the user's state folder unless one is given."""
        doc, path = load_document(Path(config_path) if config_path else None)
        settings = parse_agent_settings(doc, f"config file {path}")
        return cls(
            config_path=path if path.exists() else None,
            settings=settings,
            history=history if history is not None else History(),
            **kw,
        )

    # ---- repositories --------------------------------------------------------------------------

    def repositories(self) -> list[RepoRef]:
        """The config file's named repositories, then those the agent's settings name by URL
        (named ones are listed once, under their name)."""
        named = load_config(self.config_path)
        refs = [RepoRef(name, rc.url, name) for name, rc in named.items()]
        taken = set(named)
        specs = set(named)
        wanted = [self.settings.defaults.repository] + [t.get("repository") for t in self.settings.devices.values()]
        for spec in wanted:
            if spec and spec not in specs:
                specs.add(spec)
                name = _short_name(spec, taken)
                taken.add(name)
                refs.append(RepoRef(name, spec, spec))
        return refs

    def repo_ref(self, name_or_spec: str) -> RepoRef:
        """The listed repository called so in the pages, or named so in the config file
        (a device's ``repository``); UserError for any other (pages never open arbitrary URLs)."""
        refs = self.repositories()
        for ref in refs:
            if ref.name == name_or_spec:
                return ref
        for ref in refs:
            if ref.spec == name_or_spec:
                return ref
        raise UserError(f"no repository named '{name_or_spec}' in the config file or the agent's settings")

    def repo_source(self, name: str):
        from ..opening import RepoSource

        spec = self.repo_ref(name).spec
        return RepoSource(spec, config_path=str(self.config_path) if self.config_path else None)

    @contextmanager
    def open_repo(self, name: str, *, lock: str = "shared", load_index: bool = True) -> Iterator[Any]:
        """An open Repository of a listed repository, locked as asked for the duration, its
        index brought up to date. Call from a worker thread (it does storage I/O). The
        Repository is this caller's alone until the block ends; then it is kept for the next
        request (the password is not asked again, decoded trees stay cached)."""
        name = self.repo_ref(name).name
        with self._pools_lock:
            pool = self._pools.get(name)
            if pool is None:
                pool = self._pools[name] = _RepoPool(self.repo_source(name))
        with pool.borrow(lock=lock, load_index=load_index) as repo:
            yield repo

    def forget_repo(self, name: str) -> None:
        """Drop the warm copies of a repository (after a forget/prune made by this process)."""
        with self._pools_lock:
            pool = self._pools.pop(name, None)
        if pool is not None:
            pool.close()

    # ---- the agent's history ---------------------------------------------------------------------

    @contextmanager
    def reading_history(self) -> Iterator[History]:
        """The agent's history for one request: its single SQLite connection is shared by
        threads, so one at a time."""
        if self.history is None:
            raise UserError("no agent history")
        with self._history_lock:
            yield self.history

    def close(self) -> None:
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


class _RepoPool:
    """Opened copies of one repository. Opening costs a key derivation (Argon2id, on purpose
    slow) and loading the index; so the first copy's key is re-used for the next ones, and a
    copy returned idle is lent again with its index and tree cache warm. Each lend takes the
    repository lock afresh (so prune or forget by the agent waits for a page's read, never for an
    idle tab), lists the index again (new backups appear), and throws a copy away when an index
    object it loaded has gone (a prune rewrote the index: its entries may name deleted packs)."""

    def __init__(self, source) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._template = None  # the first opened copy: its storage, config and master key
        self._idle: list[Any] = []

    def _new_copy(self):
        from ..repo.repository import Repository

        with self._lock:
            template = self._template
        if template is None:
            repo = self.source.open_unlocked(self._configured_password)
            with self._lock:
                if self._template is None:
                    self._template = repo
                    return repo
                template = self._template
            repo.close()
        copy = Repository(template.storage, template.config, template.master, template.key_name)
        copy.cache = template.cache
        return copy

    def _configured_password(self) -> str:
        """The password from the config file or the environment; never a prompt (the server's
        terminal is not where a page's user looks, and a prompt would hold the request)."""
        if not self.source.password_given():
            raise UserError(
                f"no password configured for repository {self.source.repo_url}: set password-file, "
                "password-command or password-env for it in the config file, or IBSYNC_PASSWORD_FILE"
            )
        return self.source.password()

    @contextmanager
    def borrow(self, *, lock: str, load_index: bool) -> Iterator[Any]:
        from ..repo.lock import RepoLock

        with self._lock:
            repo = self._idle.pop() if self._idle else None
        if repo is None:
            repo = self._new_copy()
        held = None
        try:
            if lock != "none":
                held = RepoLock(repo, exclusive=lock == "exclusive", command="ibsync ui").acquire()
            if load_index:
                if repo.loaded_index and not self._index_still_there(repo):
                    repo = self._fresh(repo)
                repo.load_index()
        except BaseException:
            if held is not None:
                held.release()
                repo.lock = None
            raise
        ok = False
        try:
            yield repo
            ok = True
        finally:
            if held is not None:
                held.release()
                repo.lock = None
            if ok:
                with self._lock:
                    if len(self._idle) < IDLE_PER_REPO:
                        self._idle.append(repo)

    @staticmethod
    def _index_still_there(repo) -> bool:
        from ..storage import Kind

        listed = {info.name for info in repo.storage.list(Kind.INDEX)}
        return repo.loaded_index <= listed

    def _fresh(self, old):
        """A copy with an empty index, keeping the old copy's lock (held by the caller)."""
        from ..repo.repository import Repository

        repo = Repository(old.storage, old.config, old.master, old.key_name)
        repo.cache, repo.lock = old.cache, old.lock
        with self._lock:
            self._idle.clear()  # they have the same stale index
        return repo

    def close(self) -> None:
        with self._lock:
            template, self._template, self._idle = self._template, None, []
        if template is not None:
            template.close()
