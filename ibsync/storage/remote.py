"""A repository on any fsspec filesystem (S3, SFTP, SMB, WebDAV, memory, ...).

The filesystem comes from fsspec's registry by URL scheme; ``options`` are passed to its
constructor (credentials, endpoints). Instances are never shared with other code
(``skip_instance_cache``), so options of one repository cannot leak into another.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from typing import Any, Iterator, Sequence

from ..errors import AlreadyExists, NotFound, StorageError
from .base import FANNED_OUT, Kind, ObjectInfo, Properties, join_pieces, object_path

def redact_url(url: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://user:***@host/...``."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", url)


# Object stores have no folders and PUT is atomic; on the others a write goes to a temporary
# name first and is moved into place, so a reader never sees half an object.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"})


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


class FsspecStorage:
    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        import fsspec  # imported here: it costs a fifth of a second and local repositories skip it
        from fsspec.core import split_protocol

        protocol, _ = split_protocol(url)
        if protocol is None:
            raise StorageError(f"{url}: not a URL")
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            raise StorageError(f"{url}: no storage backend for '{protocol}://' ({e})") from e
        self.url = redact_url(url)  # what messages show: never a password from the URL
        self.protocol = protocol
        self.fs = cls(skip_instance_cache=True, **(options or {}))
        self.root = cls._strip_protocol(url).rstrip("/")
        self.object_store = protocol in OBJECT_STORES
        self.properties = Properties(connections=4, local=False)

    def _path(self, kind: Kind, name: str) -> str:
        return f"{self.root}/{object_path(kind, name)}"

    def _wrap(self, e: Exception, what: str) -> StorageError:
        if isinstance(e, FileNotFoundError):
            return NotFound(f"{what} does not exist")
        return StorageError(f"{self.url}: {what}: {e}")

    def put(self, kind: Kind, name: str, data: bytes | Sequence[bytes], *, exclusive: bool = False) -> None:
        path = self._path(kind, name)
        payload = join_pieces(data)
        try:
            if exclusive and self.fs.exists(path):
                raise AlreadyExists(f"{object_path(kind, name)} already exists")
            parent = path.rsplit("/", 1)[0]
            if self.object_store:
                self.fs.pipe_file(path, payload)
                return
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{secrets.token_hex(8)}"
            self.fs.pipe_file(tmp, payload)
            self.fs.mv(tmp, path)
        except AlreadyExists:
            raise
        except Exception as e:  # fsspec backends raise their own error types
            raise self._wrap(e, object_path(kind, name)) from e

    def stage(self, kind: Kind) -> _SpooledStaged:
        return _SpooledStaged(self, kind)

    def put_file(self, kind: Kind, name: str, local_path: str) -> None:
        path = self._path(kind, name)
        try:
            if self.object_store:
                self.fs.put_file(local_path, path)
                return
            parent = path.rsplit("/", 1)[0]
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{secrets.token_hex(8)}"
            self.fs.put_file(local_path, tmp)
            self.fs.mv(tmp, path)
        except Exception as e:
            raise self._wrap(e, object_path(kind, name)) from e

    def get(self, kind: Kind, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(kind, name)
        try:
            end = None if length is None else offset + length
            data = self.fs.cat_file(path, start=offset or None, end=end)
        except Exception as e:
            raise self._wrap(e, object_path(kind, name)) from e
        if length is not None and len(data) != length:
            raise StorageError(f"short read of {object_path(kind, name)}: {len(data)} of {length} bytes at {offset}")
        return data

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        try:
            info = self.fs.info(self._path(kind, name))
        except Exception as e:
            raise self._wrap(e, object_path(kind, name)) from e
        return ObjectInfo(name, int(info.get("size") or 0))

    def _ls(self, folder: str) -> list[dict[str, Any]]:
        # Other clients write to the repository: a cached listing would hide their objects.
        self.fs.invalidate_cache(folder)
        try:
            return self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self._wrap(e, f"listing {folder}") from e

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        folder = f"{self.root}/{kind.value}"
        if kind in FANNED_OUT:
            self.fs.invalidate_cache(folder)
            try:
                found = self.fs.find(folder, detail=True)
            except FileNotFoundError:
                return
            except Exception as e:
                raise self._wrap(e, f"listing {folder}") from e
            entries = found.values()
        else:
            entries = self._ls(folder)
        for info in entries:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "directory" or name.startswith("."):
                continue
            yield ObjectInfo(name, int(info.get("size") or 0))

    def delete(self, kind: Kind, name: str) -> None:
        try:
            self.fs.rm_file(self._path(kind, name))
        except Exception as e:
            raise self._wrap(e, object_path(kind, name)) from e

    def exists(self) -> bool:
        try:
            return bool(self.fs.exists(f"{self.root}/config"))
        except Exception as e:
            raise self._wrap(e, "config") from e

    def is_empty(self) -> bool:
        try:
            return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True
        except Exception as e:
            raise self._wrap(e, "listing the repository") from e

    def close(self) -> None:
        pass
