"""What the snapshot pages keep between requests, per app: open snapshot views, the snapshots
of each repository, thumbnails, recent diffs.

Everything here is bounded and safe between the worker threads requests run on; it lives on
``app.state`` (see :func:`pages_state`), never in a module global.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidData, NotFound
from ..model import Snapshot
from ..reader.browse import SnapshotView
from ..storage import Kind
from .thumbs import ThumbnailCache

MAX_OPEN_VIEWS = 4
VIEW_IDLE_SECONDS = 300.0  # an unused view is closed after this (it holds a shared lock)


@dataclass
class _Entry:
    key: Hashable
    opened: threading.Event = field(default_factory=threading.Event)
    stack: ExitStack | None = None
    view: SnapshotView | None = None
    error: BaseException | None = None
    users: int = 0
    last_used: float = 0.0
    evicted: bool = False
    progress: tuple[int, int] = (0, 0)  # index rows done, in all (0, 0: still reading Manifest.db)


Opener = Callable[[ExitStack, Callable[[int, int], None]], SnapshotView]


class StillOpening(Exception):
    """The view is being opened in the background; ``done`` of ``total`` index rows so far."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"opening: {done} of {total} rows")
        self.done, self.total = done, total


class Lease:
    """One request's use of a cached view; ``release`` exactly once (a streamed download
    releases when its last byte is sent)."""

    def __init__(self, cache: ViewCache, entry: _Entry) -> None:
        self._cache, self._entry = cache, entry
        self.view: SnapshotView = entry.view  # type: ignore[assignment]
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self._entry)

    def __enter__(self) -> SnapshotView:
        return self.view

    def __exit__(self, *exc: object) -> None:
        self.release()


class ViewCache:
    """Open SnapshotViews shared by requests: opening one rehydrates Manifest.db and indexes it,
    which takes seconds on a large backup, so the last few are kept (at most ``max_open``; one
    unused for ``idle_seconds`` is closed at the next request). One opener per key: requests
    for a view being opened wait for it rather than open it twice. A view evicted while in use
    is closed by its last user."""

    def __init__(
        self,
        max_open: int = MAX_OPEN_VIEWS,
        idle_seconds: float = VIEW_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_open = max_open
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def acquire(self, key: Hashable, opener: Opener, *, wait: float | None = None) -> Lease:
        """The view for ``key``, opened by ``opener`` when not cached: ``opener(stack,
        progress)`` enters what the view needs (the open repository) into ``stack`` and may
        report ``progress(rows_done, rows_total)``. ``wait``: None waits for the view however
        long opening takes; a number of seconds opens it in the background and raises
        StillOpening (with the progress) if it is not ready by then, so that a page can show
        how far it got and ask again. A failed opening reaches the requests waiting for it, or
        else the next one; the key is then opened anew."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the app is shutting down")
            doomed = self._sweep()
            entry = self._entries.get(key)
            if entry is not None and entry.opened.is_set() and entry.error is not None:
                del self._entries[key]  # a background opening that failed with no one waiting
                raise entry.error
            owner = entry is None
            if entry is None:
                entry = self._entries[key] = _Entry(key)
            else:
                self._entries.move_to_end(key)
            entry.users += 1
            if self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep_loop, name="ibsync-web-views", daemon=True)
                self._sweeper.start()
        _close_all(doomed)
        if owner and wait is None:
            self._open(entry, opener)
        elif owner:
            threading.Thread(target=self._open, args=(entry, opener), name="ibsync-web-open", daemon=True).start()
        if not entry.opened.wait(wait):
            with self._lock:
                entry.users -= 1
                entry.last_used = self._clock()
            raise StillOpening(*entry.progress)
        if entry.error is not None:
            with self._lock:
                entry.users -= 1
            raise entry.error
        return Lease(self, entry)

    def _open(self, entry: _Entry, opener: Opener) -> None:
        def progress(done: int, total: int) -> None:
            entry.progress = (done, total)

        stack = ExitStack()
        try:
            entry.view = opener(stack, progress)
            entry.stack = stack
        except BaseException as e:  # every waiter gets it (re-raised in acquire)
            entry.error = e
            stack.close()
            with self._lock:
                entry.last_used = self._clock()
                # kept for the next request when no one waits for it now
                if entry.users > 0 and self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
        finally:
            entry.opened.set()
        with self._lock:
            closed = self._closed
        if closed:  # the app stopped while this was opening
            _close_all([entry])

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            entry.last_used = self._clock()
            doomed = self._sweep()
            if entry.evicted and entry.users == 0 and entry not in doomed:
                doomed.append(entry)
        _close_all(doomed)

    def _sweep(self) -> list[_Entry]:
        """Entries to close (under the lock): idle ones, then the least recently used beyond
        max_open. Those in use are only marked; their last user closes them."""
        now = self._clock()
        doomed: list[_Entry] = []
        for key, e in list(self._entries.items()):
            if e.users == 0 and e.opened.is_set() and now - e.last_used > self.idle_seconds:
                del self._entries[key]
                doomed.append(e)
        extra = len(self._entries) - self.max_open
        for key, e in list(self._entries.items()):
            if extra <= 0:
                break
            if e.opened.is_set():
                del self._entries[key]
                extra -= 1
                e.evicted = True
                if e.users == 0:
                    doomed.append(e)
        return doomed

    def _sweep_loop(self) -> None:
        """Idle views are closed without waiting for a request: an open tab left alone must
        not hold the repository's shared lock (and so block a prune) for hours."""
        while not self._stop.wait(min(self.idle_seconds / 2, 30.0)):
            with self._lock:
                doomed = self._sweep()
            _close_all(doomed)

    def close_all(self) -> None:
        """Close every view (app shutdown); views in use are closed too."""
        self._stop.set()
        with self._lock:
            self._closed = True
            doomed = list(self._entries.values())
            self._entries.clear()
        _close_all(doomed)

    def __len__(self) -> int:
        return len(self._entries)


def _close_all(entries: list[_Entry]) -> None:
    for e in entries:
        stack, e.stack = e.stack, None
        if stack is not None:
            try:
                stack.close()
            except Exception:  # closing must go on for the others (a lock already gone, ...)
                pass


class SnapshotCatalog:
    """Each repository's snapshots: listed on every call, but each snapshot object loaded only
    once (snapshots are content-addressed and never change), so a device with hundreds of
    snapshots costs one listing per page, not hundreds of reads."""

    def __init__(self) -> None:
        self._known: dict[str, dict[str, Snapshot]] = {}
        self._damaged: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def snapshots(self, repo_name: str, repo: Any) -> list[Snapshot]:
        """The repository's snapshots that load, oldest backup first."""
        names = [info.name for info in repo.storage.list(Kind.SNAPSHOTS)]
        with self._lock:
            known = dict(self._known.get(repo_name, {}))
            damaged = set(self._damaged.get(repo_name, ()))
        fresh: dict[str, Snapshot] = {}
        for name in names:
            snap = known.get(name)
            if snap is None and name not in damaged:
                try:
                    snap = repo.load_snapshot(name)
                except NotFound:
                    continue
                except InvalidData:
                    damaged.add(name)
                    continue
            if snap is not None:
                fresh[name] = snap
        with self._lock:
            self._known[repo_name] = fresh
            self._damaged[repo_name] = damaged & set(names)
        return sorted(fresh.values(), key=Snapshot.sort_key)

    def snapshot(self, repo_name: str, snap_id: str, load: Callable[[], Snapshot]) -> Snapshot:
        """One snapshot by its full id: known, else ``load`` (which raises NotFound)."""
        with self._lock:
            got = self._known.get(repo_name, {}).get(snap_id)
        if got is not None:
            return got
        snap = load()
        with self._lock:
            self._known.setdefault(repo_name, {})[snap_id] = snap
        return snap


def password_digest(password: str | None) -> str:
    """What the caches are keyed by instead of the password itself."""
    if password is None:
        return ""
    return hashlib.sha256(password.encode("utf-8", "surrogatepass")).hexdigest()


class SmallLru:
    def __init__(self, max_entries: int) -> None:
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            got = self._items.get(key)
            if got is not None:
                self._items.move_to_end(key)
            return got

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)


@dataclass
class PagesState:
    views: ViewCache = field(default_factory=ViewCache)
    catalog: SnapshotCatalog = field(default_factory=SnapshotCatalog)
    thumbs: ThumbnailCache = field(default_factory=ThumbnailCache)
    diffs: SmallLru = field(default_factory=lambda: SmallLru(8))


def pages_state(app: Any) -> PagesState:
    """The app's PagesState, made on first use. Called from the event loop thread only (the
    handlers' async part), so making it needs no lock."""
    state = getattr(app.state, "snapshot_pages", None)
    if state is None:
        state = app.state.snapshot_pages = PagesState()
    return state
