"""The virtual tree above snapshots, shared by the FUSE and WebDAV views.

Every snapshot: ``<device>/<backup date>/<Domain>/<relative path>``, with ``<device>/latest``
a symbolic link to the device's newest snapshot. One snapshot: ``<Domain>/<relative path>`` at
the top. Devices are named by their name (by ``name (UDID)`` when two share one), made safe for
a file system; snapshots by their backup date in UTC, to the minute (``2026-12-04T0312``; to
the second, then with the snapshot id, where that is not unique).

Below a snapshot's folder everything comes from ``SnapshotView``. Opening one rehydrates the
snapshot's Manifest.db and indexes it, so views are opened on first use and the last few kept
open (``max_views``); a view a file is being read from is not closed under it. Paths are
``"a/b/c"`` (no leading slash; ``""`` is the top).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import IbsyncError, NotFound, UserError
from ..model import Snapshot
from .content import SpilledContent

LATEST = "latest"
DIR_MODE = 0o555
FILE_MODE = 0o444
MAX_VIEWS = 3


@dataclass(frozen=True)
class Entry:
    """One name in the tree, as a file system shows it."""

    name: str
    kind: str  # "dir" | "file" | "symlink"
    size: int
    mtime: int  # seconds since the epoch
    mode: int  # permission bits only
    target: str | None = None  # symlinks: what readlink gives
    alias: str | None = None  # symlinks within the tree ("latest"): the path they stand for


class NotADirectory(UserError):
    pass


def safe_name(name: str) -> str:
    """A device name as one file name: no "/" or NUL (both become "_"), never "", "." or ".."."""
    name = name.replace("/", "_").replace("\0", "_")
    return "_" + name if name in ("", ".", "..") else name


def _stamp(s: Snapshot) -> datetime:
    when = s.backup_date or s.time
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def snapshot_names(snapshots: list[Snapshot]) -> dict[str, Snapshot]:
    """A device's snapshots by folder name, oldest first: the backup date (UTC) to the minute;
    to the second where two share a minute; then with the snapshot id."""
    by_minute: dict[str, list[Snapshot]] = {}
    for s in snapshots:
        by_minute.setdefault(_stamp(s).astimezone(UTC).strftime("%Y-%m-%dT%H%M"), []).append(s)
    named: list[tuple[str, Snapshot]] = []
    for minute, group in by_minute.items():
        if len(group) == 1:
            named.append((minute, group[0]))
            continue
        by_second: dict[str, list[Snapshot]] = {}
        for s in group:
            by_second.setdefault(_stamp(s).astimezone(UTC).strftime("%Y-%m-%dT%H%M%S"), []).append(s)
        for second, same in by_second.items():
            if len(same) == 1:
                named.append((second, same[0]))
            else:
                named += [(f"{second}-{s.short_id}", s) for s in same]
    named.sort(key=lambda pair: (pair[1].sort_key(), pair[0]))
    return dict(named)


def device_names(snapshots: list[Snapshot]) -> dict[str, list[Snapshot]]:
    """Snapshots grouped by device folder name: the device's name, or ``name (UDID)`` where
    devices share one (the UDID alone for a device without a name)."""
    by_udid: dict[str, list[Snapshot]] = {}
    for s in snapshots:
        by_udid.setdefault(s.device.udid.upper(), []).append(s)
    names = {udid: (snaps[-1].device.name or snaps[-1].device.udid) for udid, snaps in by_udid.items()}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[safe_name(name)] = counts.get(safe_name(name), 0) + 1
    out: dict[str, list[Snapshot]] = {}
    for udid, name in names.items():
        folder = safe_name(name)
        if counts[folder] > 1 or folder.upper() == LATEST.upper():
            folder = safe_name(f"{name} ({by_udid[udid][-1].device.udid})")
        out[folder] = by_udid[udid]
    return dict(sorted(out.items(), key=lambda kv: kv[0].casefold()))


class _Views:
    """Open ``SnapshotView``s by snapshot id, the least recently used closed beyond ``limit``
    unless a file is being read from it (``pin``/``unpin``)."""

    # views are duck-typed: reader.browse.SnapshotView, or what a test's view_factory makes
    def __init__(self, open_view: Callable[[Snapshot], Any], limit: int) -> None:
        self._open_view = open_view
        self._limit = limit
        self._views: OrderedDict[str, Any] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, snap: Snapshot, *, pin: bool = False):
        with self._lock:
            gate = self._opening.setdefault(snap.id, threading.Lock())
        with gate:  # one rehydration per snapshot, however many threads ask at once
            with self._lock:
                if self._closed:
                    raise IbsyncError("the mount is closing")
                view = self._views.get(snap.id)
                if view is not None:
                    self._views.move_to_end(snap.id)
            if view is None:
                view = self._open_view(snap)
                with self._lock:
                    if self._closed:
                        view.close()
                        raise IbsyncError("the mount is closing")
                    self._views[snap.id] = view
            with self._lock:
                if pin:
                    self._pins[snap.id] = self._pins.get(snap.id, 0) + 1
                surplus = self._evictable()
        for old in surplus:
            old.close()
        return view

    def _evictable(self) -> list:
        out = []
        for sid in list(self._views):
            if len(self._views) <= self._limit:
                break
            if not self._pins.get(sid):
                out.append(self._views.pop(sid))
        return out

    @contextlib.contextmanager
    def using(self, snap: Snapshot):
        """The snapshot's view, not closed before the block ends (another thread may be
        opening a fourth one meanwhile)."""
        view = self.get(snap, pin=True)
        try:
            yield view
        finally:
            self.unpin(snap)

    def unpin(self, snap: Snapshot) -> None:
        with self._lock:
            n = self._pins.get(snap.id, 0) - 1
            if n > 0:
                self._pins[snap.id] = n
            else:
                self._pins.pop(snap.id, None)
            surplus = self._evictable()
        for old in surplus:
            old.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            views, self._views = list(self._views.values()), OrderedDict()
        for view in views:
            view.close()


# Where a path leads: the top, a device folder, a device's "latest", or a path inside a
# snapshot (``inner``: "" for its top). One class per kind, so each carries only what it has.
@dataclass(frozen=True)
class _Root:
    pass


@dataclass(frozen=True)
class _Device:
    device: str


@dataclass(frozen=True)
class _Latest:
    device: str


@dataclass(frozen=True)
class _InSnapshot:
    snapshot: Snapshot
    inner: str = ""
    device: str | None = None  # None for the single snapshot's tree


_Place = _Root | _Device | _Latest | _InSnapshot


class OpenFile:
    """A file being read: reads at any offset; ``close`` once done (it unpins its view)."""

    def __init__(self, content: SpilledContent, release: Callable[[], None], path: str) -> None:
        self.content = content
        self.path = path
        self._release = release
        self._closed = False
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.content.size

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytes:
        return self.content.read(offset, length)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.content.close()
        self._release()


class MountTree:
    """Snapshots as a tree of folders and files (see the module's docstring). ``single``: the
    one snapshot's domains at the top. Safe to share between threads."""

    def __init__(
        self,
        repo,
        snapshots: list[Snapshot],
        keyring=None,
        *,
        cache=None,
        single: bool = False,
        max_views: int = MAX_VIEWS,
        view_factory: Callable | None = None,
    ) -> None:
        if not snapshots:
            raise UserError("the repository has no snapshots to show")
        from ..reader.browse import SnapshotView

        factory = view_factory or SnapshotView
        self.repo = repo
        self.single = snapshots[0] if single else None
        self.devices: dict[str, dict[str, Snapshot]] = {
            name: snapshot_names(snaps) for name, snaps in device_names(snapshots).items()
        }
        self._views = _Views(lambda s: factory(repo, s, keyring, cache=cache), max_views)
        newest = max(snapshots, key=Snapshot.sort_key)
        self._top_mtime = int(_stamp(newest).timestamp())

    def close(self) -> None:
        self._views.close()

    def view(self, snap: Snapshot):
        """The snapshot's view, opened now if it is not (errors such as a wrong iOS backup
        password show here). Another thread may close it once more than ``max_views`` are
        open: the tree's own methods pin it while they use it."""
        return self._views.get(snap)

    # ---- paths -------------------------------------------------------------------------

    def _locate(self, path: str) -> _Place | None:
        path = path.strip("/")
        if self.single is not None:
            return _InSnapshot(self.single, inner=path)
        if not path:
            return _Root()
        parts = path.split("/", 2)
        snaps = self.devices.get(parts[0])
        if snaps is None:
            return None
        if len(parts) == 1:
            return _Device(parts[0])
        if parts[1] == LATEST:
            if len(parts) == 2:
                return _Latest(parts[0])
            snap = next(reversed(snaps.values()))  # a path through the link: its target
        else:
            found = snaps.get(parts[1])
            if found is None:
                return None
            snap = found
        return _InSnapshot(snap, inner=parts[2] if len(parts) == 3 else "", device=parts[0])

    def _device_entry(self, name: str) -> Entry:
        snaps = self.devices[name]
        return Entry(name, "dir", 0, int(_stamp(next(reversed(snaps.values()))).timestamp()), DIR_MODE)

    def _latest_entry(self, device: str) -> Entry:
        snaps = self.devices[device]
        name, snap = next(reversed(snaps.items()))
        return Entry(
            LATEST, "symlink", len(name), int(_stamp(snap).timestamp()), 0o777, target=name, alias=f"{device}/{name}"
        )

    def _snapshot_entry(self, name: str, snap: Snapshot) -> Entry:
        return Entry(name, "dir", 0, int(_stamp(snap).timestamp()), DIR_MODE)

    def _item_entry(self, snap: Snapshot, item, view) -> Entry:
        mtime = item.mtime or int(_stamp(snap).timestamp())  # a folder only implied by its files has none
        if item.kind == "dir":
            return Entry(item.name, "dir", 0, mtime, (item.mode & 0o777) | 0o500)
        if item.kind == "symlink":
            target = view.link_target(item)
            return Entry(
                item.name, "symlink", len(target.encode("utf-8", "surrogateescape")), mtime, 0o777, target=target
            )
        return Entry(item.name, "file", item.size, mtime, (item.mode & 0o777) | 0o400)

    def stat(self, path: str) -> Entry | None:
        place = self._locate(path)
        if place is None:
            return None
        if isinstance(place, _Root):
            return Entry("", "dir", 0, self._top_mtime, DIR_MODE)
        if isinstance(place, _Device):
            return self._device_entry(place.device)
        if isinstance(place, _Latest):
            return self._latest_entry(place.device)
        snap = place.snapshot
        if not place.inner:
            if self.single is not None:
                return Entry("", "dir", 0, int(_stamp(snap).timestamp()), DIR_MODE)
            name = path.strip("/").split("/")[1]
            return self._snapshot_entry(name, snap)
        with self._views.using(snap) as view:
            item = view.stat(place.inner)
            return None if item is None else self._item_entry(snap, item, view)

    def list(self, path: str, *, offset: int = 0, limit: int | None = None) -> list[Entry]:
        """A folder's entries in a stable order (devices and snapshots by name, then as the
        view lists: folders first, then by name). NotFound or NotADirectory otherwise."""
        place = self._locate(path)
        if place is None:
            raise NotFound(f"nothing at {path}")
        if isinstance(place, _Latest):  # listed through the link (WebDAV shows it as the folder)
            place = _InSnapshot(next(reversed(self.devices[place.device].values())), device=place.device)
        if isinstance(place, (_Root, _Device)):
            if isinstance(place, _Root):
                entries = [self._device_entry(name) for name in self.devices]
            else:
                snaps = self.devices[place.device]
                entries = [self._snapshot_entry(n, s) for n, s in snaps.items()] + [self._latest_entry(place.device)]
            end = None if limit is None else offset + limit
            return entries[offset:end]
        snap = place.snapshot
        with self._views.using(snap) as view:
            item = view.stat(place.inner)
            if item is None:
                raise NotFound(f"nothing at {path}")
            if item.kind != "dir":
                raise NotADirectory(f"{path} is not a folder")
            return [self._item_entry(snap, i, view) for i in view.list(place.inner, offset=offset, limit=limit)]

    def iter_list(self, path: str, *, start: int = 0, page: int = 1000, max_page: int = 16384) -> Iterator[Entry]:
        """A folder's entries from ``start`` on, read in pages that grow (a million-entry
        folder is a few dozen queries, not one per kernel request)."""
        offset = start
        while True:
            got = self.list(path, offset=offset, limit=page)
            yield from got
            if len(got) < page:
                return
            offset += len(got)
            page = min(page * 2, max_page)

    def open(self, path: str) -> OpenFile:
        """A file for reading. NotFound, or UserError for what is not a file."""
        place = self._locate(path)
        if not isinstance(place, _InSnapshot) or not place.inner:
            raise UserError(f"{path} is not a file")
        snap = place.snapshot
        view = self._views.get(snap, pin=True)
        try:
            item = view.stat(place.inner)
            if item is None:
                raise NotFound(f"nothing at {path}")
            if item.kind != "file":
                raise UserError(f"{path} is not a file")
        except BaseException:
            self._views.unpin(snap)
            raise
        content = SpilledContent(lambda: view.open(item), item.size)
        return OpenFile(content, lambda: self._views.unpin(snap), path)

    def readlink(self, path: str) -> str:
        entry = self.stat(path)
        if entry is None:
            raise NotFound(f"nothing at {path}")
        if entry.kind != "symlink" or entry.target is None:
            raise UserError(f"{path} is not a symbolic link")
        return entry.target
