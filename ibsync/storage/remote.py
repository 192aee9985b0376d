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

import errno
import os
import re
import secrets
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterator, Sequence, TypeVar

from ..errors import AlreadyExists, IbsyncError, NotFound, StorageError
from .base import FANNED_OUT, Kind, ObjectInfo, Properties, join_pieces, object_path
from .retry import RetryPolicy, is_transient, one_line

T = TypeVar("T")


def redact_url(url: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://user:***@host/...``."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", url)


class _SpooledStaged:
    """Stages in a local temporary file, uploaded on commit (memory stays flat)."""

    def __init__(self, storage: "FsspecStorage", kind: Kind) -> None:
        self.storage = storage
        self.kind = kind
        self.file = tempfile.NamedTemporaryFile(prefix="ibsync-stage-", delete=False)

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
        self.fs, self.root = self._connect()
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
        started = time.monotonic()

        def counted() -> T:
            with self._count_lock:  # uploader threads count at once; += alone can lose counts
                self.requests[op] += 1
            return fn()

        try:
            return self.retry.call(counted, what=f"{self.url}: {what}", on_retry=self._reconnect)
        except IbsyncError:
            raise
        except OSError as e:
            if isinstance(e, FileNotFoundError) or e.errno == errno.ENOENT:
                raise NotFound(f"{what} does not exist") from e
            raise StorageError(f"{self.url}: {what}: {one_line(e)}") from e
        except Exception as e:  # every client library raises its own types
            if is_transient(e):
                raise StorageError(f"{self.url}: {what}: {one_line(e)} (still failing after {time.monotonic() - started:.0f} s of retries)") from e
            raise StorageError(f"{self.url}: {what}: {one_line(e)}") from e

    def _path(self, kind: Kind, name: str) -> str:
        return f"{self.root}/{object_path(kind, name)}"

    def _ensure_dir(self, folder: str) -> None:
        if folder not in self._dirs:
            self._makedirs(folder)
            self._dirs.add(folder)

    def _store(self, kind: Kind, name: str, payload: bytes | None, local: str | None, exclusive: bool) -> None:
        path = self._path(kind, name)

        def attempt() -> None:
            try:
                if self.object_store:
                    self._write_object(path, payload, local, exclusive)
                    return
                parent = path.rsplit("/", 1)[0]
                self._ensure_dir(parent)
                tmp = f"{parent}/.tmp-{secrets.token_hex(8)}"
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
        path = self._path(kind, name)
        data = self._run("get", object_path(kind, name), lambda: self._read(path, offset, length))
        if length is not None and len(data) != length:
            raise StorageError(f"short read of {object_path(kind, name)}: {len(data)} of {length} bytes at {offset}")
        return data

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        path = self._path(kind, name)
        info = self._run("stat", object_path(kind, name), lambda: self.fs.info(path))
        return ObjectInfo(name, int(info.get("size") or 0))

    def _list_entries(self, folder: str, recursive: bool) -> list[tuple[str, int]]:
        """(name, size) of the objects in ``folder`` (and its sub-folders if ``recursive``);
        FileNotFoundError if the folder does not exist."""
        # other clients write to the repository: a cached listing would hide their objects
        self.fs.invalidate_cache(folder)
        infos = self.fs.find(folder, detail=True).values() if recursive else self.fs.ls(folder, detail=True)
        # Some S3 servers list folder markers: "folder/" as a 0-byte object (SeaweedFS), or the
        # folder itself as a directory for minutes after its last object went.
        return [
            (i["name"].rsplit("/", 1)[-1], int(i.get("size") or 0))
            for i in infos
            if i.get("type") != "directory" and not i["name"].endswith("/")
        ]

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        folder = f"{self.root}/{kind.value}"

        def attempt() -> list[tuple[str, int]]:
            try:
                return self._list_entries(folder, kind in FANNED_OUT)
            except FileNotFoundError:
                return []

        for name, size in self._run("list", f"listing {kind.value}", attempt):
            if not name.startswith("."):  # temporary names of writes in progress
                yield ObjectInfo(name, size)

    def delete(self, kind: Kind, name: str) -> None:
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
                return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return True

        return self._run("list", "listing the repository", attempt)

    def close(self) -> None:
        pass


def _quietly(fn: Callable[[str], None], arg: str) -> None:
    try:
        fn(arg)
    except Exception:
        pass


