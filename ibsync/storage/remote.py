"""A repository on any fsspec filesystem (S3, SFTP, SMB, WebDAV, memory, ...).

``FsspecStorage`` holds what every remote backend shares: paths, retries with reconnects,
listings that never come from a stale cache, error translation. Each protocol's module
(``s3``, ``sftp``, ``smb``, ``webdav``) overrides the few primitives whose semantics differ
between servers: how an object appears atomically, how an exclusive create is decided, how a
range is read. docs/design.md §24 gives the reasoning per backend.

Two ways to make a write atomic:
- object stores (S3): a PUT is atomic by itself, and ``If-None-Match: *`` makes it exclusive;
- filesystems (SFTP, SMB, WebDAV): write ``.tmp-<random>`` in the target folder, then rename
  it into place; the rename replaces for ordinary objects and refuses an existing target for
  exclusive ones, which is both atomic and exclusive on these servers.
"""

from __future__ import annotations

import builtins
import errno
import functools
import os
import re
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from ..errors import AlreadyExists, IbsyncError, NotFound, StorageError, StorageUnreachable
from ..pids import pid_alive
from .base import (
    FANNED_OUT,
    TEMP_PREFIX,
    Kind,
    ObjectInfo,
    Properties,
    check_name,
    is_fan_out_folder,
    is_ignored,
    join_pieces,
    leaves_room_for_init,
    object_at,
    object_path,
)
from .retry import RetryPolicy, is_transient, one_line

T = TypeVar("T")


def redact_url(url: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://user:***@host/...``."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", url)


# Local staging files are named ibsync-stage-<pid>-<random>: a kill leaves them behind, and the
# pid tells a later run whether their writer is gone (remove_stale_temporary).
STAGE_PREFIX = "ibsync-stage-"
_STAGE_NAME = re.compile(re.escape(STAGE_PREFIX) + r"(\d+)-")


@dataclass(frozen=True)
class RemoteEntry:
    """One entry of a remote listing; ``path`` is relative to the listed folder, '/'-separated."""

    path: str
    type: str  # "file", "directory", or what the server calls anything else ("link", "unknown")
    size: int
    mtime: float | None  # seconds since the epoch, where the server tells


def mtime_of(info: dict[str, Any]) -> float | None:
    """Modification time from an fsspec info dict, whichever key and type the backend uses."""
    for key in ("mtime", "LastModified", "modified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def remove_stale_staging(older_than_s: float, folder: str | None = None) -> int:
    """Remove local staging files of processes that are gone, last written more than
    ``older_than_s`` ago (both: a pid namespace shared /tmp could hide a live writer)."""
    folder = folder or tempfile.gettempdir()
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        m = _STAGE_NAME.match(e.name)
        if m is None or not e.is_file(follow_symlinks=False):
            continue
        try:
            if e.stat(follow_symlinks=False).st_mtime >= cutoff or pid_alive(int(m.group(1))):
                continue
            os.unlink(e.path)
        except FileNotFoundError:
            continue
        removed += 1
    return removed


class _SpooledStaged:
    """Stages in a local temporary file, uploaded on commit (memory stays flat)."""

    def __init__(self, storage: FsspecStorage, kind: Kind) -> None:
        self.storage = storage
        self.kind = kind
        self.file = tempfile.NamedTemporaryFile(prefix=f"{STAGE_PREFIX}{os.getpid()}-", delete=False)

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)

    def commit(self, name: str) -> None:
        try:
            self.file.close()
            self.storage.put_file(self.kind, name, self.file.name)
        finally:
            self._remove()

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self._remove()

    def _remove(self) -> None:
        try:
            os.unlink(self.file.name)
        except OSError:
            pass


# Object stores: a PUT is atomic and there are no folders to create.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"})


class FsspecStorage:
    def __init__(self, url: str, options: dict[str, Any] | None = None, *, retry: RetryPolicy | None = None) -> None:
        self.url = redact_url(url)  # what messages show: never a password from the URL
        self._url = url
        self._options = dict(options or {})
        self.retry = retry or RetryPolicy.from_env()
        self.properties = Properties(connections=4, local=False)
        self._dirs: set[str] = set()  # folders known to exist, so each is created once
        self._reconnect_lock = threading.Lock()
        # storage operations tried, by kind (retries included): one request each on S3, except
        # listings, which take one per 1,000 objects; `import --json` reports them
        self.requests: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        # an unreachable server at the start is retried like any other failure (README: a NAS
        # rebooting), then reported in one line
        self.fs, self.root = self._call("connecting", self._connect, on_retry=None)
        self.object_store = self._url.split("://", 1)[0] in OBJECT_STORES

    # -- what a protocol module may override ---------------------------------------------------

    def _connect(self) -> tuple[Any, str]:
        """A fresh filesystem instance and the repository's root path in it."""
        import fsspec  # imported here: it costs a fifth of a second and local repositories skip it
        from fsspec.core import split_protocol

        protocol, _ = split_protocol(self._url)
        if protocol is None:
            raise StorageError(f"{self.url}: not a URL")
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            raise StorageError(f"{self.url}: no storage backend for '{protocol}://' ({e})") from e
        kwargs = {**cls._get_kwargs_from_urls(self._url), **self._options}
        # never shared with other code, so options of one repository cannot leak into another
        return cls(skip_instance_cache=True, **kwargs), cls._strip_protocol(self._url).rstrip("/")

    def _write_object(self, path: str, payload: bytes | None, local: str | None, exclusive: bool) -> None:
        """Object stores: one atomic PUT (exclusive by checking first where nothing better exists)."""
        if exclusive and self.fs.exists(path):
            raise FileExistsError(path)
        if local is not None:
            self.fs.put_file(local, path)
        else:
            self.fs.pipe_file(path, payload)

    def _upload(self, path: str, payload: bytes | None, local: str | None) -> None:
        if local is not None:
            self.fs.put_file(local, path)
        else:
            self.fs.pipe_file(path, payload)

    def _rename(self, src: str, dst: str, *, replace: bool) -> None:
        """Move ``src`` onto ``dst``; without ``replace``, FileExistsError if ``dst`` exists.
        This generic version is not atomic; the protocol modules use the server's own rename."""
        if not replace and self.fs.exists(dst):
            raise FileExistsError(dst)
        self.fs.mv(src, dst)

    def _read(self, path: str, offset: int, length: int | None) -> bytes:
        end = None if length is None else offset + length
        return self.fs.cat_file(path, start=offset or None, end=end)

    def _makedirs(self, folder: str) -> None:
        self.fs.makedirs(folder, exist_ok=True)

    def _remove(self, path: str) -> None:
        self.fs.rm_file(path)

    # -- shared machinery ----------------------------------------------------------------------

    def _reconnect(self, error: BaseException) -> None:
        """After a transient failure: a new client, since the old one's connection may be dead
        (asyncssh and smbprotocol do not reconnect by themselves)."""
        with self._reconnect_lock:
            try:
                self.fs, _ = self._connect()
            except Exception:
                pass  # the next attempt fails again and is retried or reported

    def _run(self, op: str, what: str, fn: Callable[[], T]) -> T:
        def counted() -> T:
            with self._count_lock:  # uploader threads count at once; += alone can lose counts
                self.requests[op] += 1
            return fn()

        return self._call(what, counted, on_retry=self._reconnect)

    def _call(self, what: str, fn: Callable[[], T], *, on_retry: Callable[[BaseException], None] | None) -> T:
        """``fn`` under the retry policy, its failure turned into one StorageError line."""
        started = time.monotonic()
        try:
            return self.retry.call(fn, what=f"{self.url}: {what}", on_retry=on_retry)
        except IbsyncError:
            raise
        except OSError as e:
            if isinstance(e, FileNotFoundError) or e.errno == errno.ENOENT:
                raise NotFound(f"{what} does not exist") from e
            if is_transient(e):
                raise StorageUnreachable(
                    f"{self.url}: {what}: {one_line(e)} (still failing after {time.monotonic() - started:.0f} s of retries)"
                ) from e
            raise StorageError(f"{self.url}: {what}: {one_line(e)}") from e
        except Exception as e:  # every client library raises its own types
            if is_transient(e):
                raise StorageUnreachable(
                    f"{self.url}: {what}: {one_line(e)} (still failing after {time.monotonic() - started:.0f} s of retries)"
                ) from e
            raise StorageError(f"{self.url}: {what}: {one_line(e)}") from e

    def _path(self, kind: Kind, name: str) -> str:
        return f"{self.root}/{object_path(kind, name)}"

    def _ensure_dir(self, folder: str) -> None:
        if folder not in self._dirs:
            self._makedirs(folder)
            self._dirs.add(folder)

    def _store(self, kind: Kind, name: str, payload: bytes | None, local: str | None, exclusive: bool) -> None:
        check_name(kind, name)
        path = self._path(kind, name)

        def attempt() -> None:
            try:
                if self.object_store:
                    self._write_object(path, payload, local, exclusive)
                    return
                parent = path.rsplit("/", 1)[0]
                self._ensure_dir(parent)
                tmp = f"{parent}/{TEMP_PREFIX}{secrets.token_hex(8)}"
                self._upload(tmp, payload, local)
                try:
                    self._rename(tmp, path, replace=not exclusive)
                except BaseException:
                    _quietly(self._remove, tmp)
                    raise
            except FileExistsError:
                raise AlreadyExists(f"{object_path(kind, name)} already exists") from None

        self._run("put", object_path(kind, name), attempt)

    # -- the Storage interface -----------------------------------------------------------------

    def put(self, kind: Kind, name: str, data: bytes | Sequence[bytes], *, exclusive: bool = False) -> None:
        self._store(kind, name, join_pieces(data), None, exclusive)

    def put_file(self, kind: Kind, name: str, local_path: str) -> None:
        self._store(kind, name, None, local_path, False)

    def stage(self, kind: Kind) -> _SpooledStaged:
        return _SpooledStaged(self, kind)

    def get(self, kind: Kind, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(kind, name)
        path = self._path(kind, name)
        data = self._run("get", object_path(kind, name), lambda: self._read(path, offset, length))
        if length is not None and len(data) != length:
            raise StorageError(f"short read of {object_path(kind, name)}: {len(data)} of {length} bytes at {offset}")
        return data

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        check_name(kind, name)
        path = self._path(kind, name)
        info = self._run("stat", object_path(kind, name), lambda: self.fs.info(path))
        return ObjectInfo(name, int(info.get("size") or 0))

    def _list_entries(self, folder: str, recursive: bool) -> list[RemoteEntry]:
        """What ``folder`` holds (and its sub-folders' files if ``recursive``), paths relative
        to it; FileNotFoundError if the folder does not exist."""
        # other clients write to the repository: a cached listing would hide their objects
        self.fs.invalidate_cache(folder)
        infos = self.fs.find(folder, detail=True).values() if recursive else self.fs.ls(folder, detail=True)
        prefix = folder.strip("/") + "/"  # names come with or without the leading '/'
        out = []
        for i in infos:
            name = i["name"].lstrip("/")
            # Some S3 servers list folder markers: "folder/" as a 0-byte object (SeaweedFS), or
            # the folder itself as a directory for minutes after its last object went.
            if name.endswith("/") or not name.startswith(prefix) or name == prefix:
                continue
            kind = str(i.get("type") or "file")
            out.append(RemoteEntry(name[len(prefix) :], kind, int(i.get("size") or 0), mtime_of(i)))
        return out

    def _kind_entries(self, kind: Kind) -> list[RemoteEntry]:
        folder = f"{self.root}/{kind.value}"

        def attempt() -> list[RemoteEntry]:
            if self._kind_folder_type(kind) not in (None, "directory"):
                return [RemoteEntry("", "link", 0, None)]  # the kind folder itself: never listed through
            try:
                return self._list_entries(folder, kind in FANNED_OUT)
            except FileNotFoundError:
                return []

        return self._run("list", f"listing {kind.value}", attempt)

    def _kind_folder_type(self, kind: Kind) -> str | None:
        """What the root's listing says the kind's folder is. An SFTP server lists a link as
        one (its listing is lstat's), and would follow it to list or delete behind it. Object
        stores have no folders or links: no request."""
        if self.object_store:
            return "directory"
        for e in self._entries_or_none(self.root, False):
            if e.path == kind.value:
                return e.type
        return None

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        entries = self._kind_entries(kind)
        linked = [e.path for e in entries if e.type == "link" and _hides_objects(kind, e.path)]
        if linked:
            # what is behind it would be missing from the listing, and prune or repair index
            # would act on a wrong picture of the repository: stop instead
            where = "/".join(p for p in (kind.value, linked[0]) if p)
            raise StorageError(
                f"{self.url}/{where} is a symbolic link; ibsync never follows links inside a repository "
                "(move the real folder there)"
            )
        for e in entries:
            name = object_at(kind, e.path) if e.type == "file" else None
            if name is not None:
                yield ObjectInfo(name, e.size)

    def strays(self, kind: Kind) -> builtins.list[str]:
        if kind is Kind.CONFIG:
            return self._config_strays()
        out: set[str] = set()
        for e in self._kind_entries(kind):
            if not e.path:
                return [kind.value]
            if is_ignored(e.path.rsplit("/", 1)[-1]) and e.type in ("file", "directory"):
                continue  # writes in progress, .DS_Store
            if e.type == "file" and object_at(kind, e.path) is not None:
                continue
            out.add(f"{kind.value}/{_stray_path(kind, e.path)}")
        return sorted(out)

    def _config_strays(self) -> builtins.list[str]:
        path = f"{self.root}/config"

        def attempt() -> str | None:
            try:
                return str(self.fs.info(path).get("type") or "file")
            except FileNotFoundError:
                return None

        kind = self._run("stat", "config", attempt)
        return [] if kind in (None, "file") else ["config"]

    def remove_stale_temporary(self, older_than_s: float) -> int:
        """``.tmp-*`` objects of interrupted uploads (filesystem servers; an object store writes
        none), then this machine's staging files of dead processes."""
        removed = remove_stale_staging(older_than_s)
        if self.object_store:
            return removed
        cutoff = time.time() - older_than_s
        stale: list[str] = []
        root_entries = self._run("list", "listing the repository", lambda: self._entries_or_none(self.root, False))
        stale += [f"{self.root}/{e.path}" for e in root_entries if _stale(e, cutoff)]
        for kind in Kind:
            if kind is not Kind.CONFIG:
                folder = f"{self.root}/{kind.value}"
                stale += [f"{folder}/{e.path}" for e in self._kind_entries(kind) if _stale(e, cutoff)]
        for path in stale:
            try:
                self._run("delete", path[len(self.root) + 1 :], functools.partial(self._remove, path))
            except NotFound:
                continue  # another prune got there first
            removed += 1
        return removed

    def _entries_or_none(self, folder: str, recursive: bool) -> builtins.list[RemoteEntry]:
        try:
            return self._list_entries(folder, recursive)
        except FileNotFoundError:
            return []

    def delete(self, kind: Kind, name: str) -> None:
        check_name(kind, name)
        path = self._path(kind, name)
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            try:
                self._remove(path)
            except FileNotFoundError:
                if attempts == 1:
                    raise  # gone before we came; on a retry, gone because our first try worked

        self._run("delete", object_path(kind, name), attempt)

    def exists(self) -> bool:
        return bool(self._run("stat", "config", lambda: self.fs.exists(f"{self.root}/config")))

    def is_empty(self) -> bool:
        def attempt() -> bool:
            self.fs.invalidate_cache(self.root)
            try:
                if not self.fs.exists(self.root):
                    return True
                entries = self.fs.ls(self.root, detail=True)
                return not entries or leaves_room_for_init(self._describe(entries))
            except FileNotFoundError:
                return True

        return self._run("list", "listing the repository", attempt)

    def _describe(
        self, entries: builtins.list[dict]
    ) -> builtins.list[tuple[str, bool, builtins.list[tuple[str, bool, int]]]]:
        out = []
        for e in entries:
            is_dir = e.get("type") == "directory"
            contents = []
            if is_dir:
                for sub in self.fs.ls(e["name"], detail=True):
                    sub_dir = sub.get("type") == "directory"
                    contents.append(
                        (
                            sub["name"].rstrip("/").rsplit("/", 1)[-1],
                            sub_dir,
                            len(self.fs.ls(sub["name"], detail=False)) if sub_dir else 1,
                        )
                    )
            out.append((e["name"].rstrip("/").rsplit("/", 1)[-1], is_dir, contents))
        return out

    def close(self) -> None:
        pass


def _hides_objects(kind: Kind, path: str) -> bool:
    """Whether a link at ``path`` stands where a folder of objects should be."""
    return path == "" or (kind in FANNED_OUT and is_fan_out_folder(path))


def _stray_path(kind: Kind, path: str) -> str:
    """How a stray at ``path`` (relative to its kind's folder) is named: a folder that cannot
    hold objects by itself, not by everything in it."""
    parts = path.split("/")
    if kind not in FANNED_OUT or not is_fan_out_folder(parts[0]):
        return parts[0]
    return "/".join(parts[:2])


def _stale(e: RemoteEntry, cutoff: float) -> bool:
    return (
        e.type == "file"
        and e.path.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)
        and e.mtime is not None
        and e.mtime < cutoff
    )


def _quietly(fn: Callable[[str], None], arg: str) -> None:
    try:
        fn(arg)
    except Exception:
        pass
