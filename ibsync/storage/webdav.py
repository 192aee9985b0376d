"""WebDAV servers (Nextcloud, ownCloud, a NAS's WebDAV, rclone serve webdav) through webdav4.

- URL ``webdav+https://host[:port]/path`` (or ``webdav+http://`` on a trusted network); the
  credentials go in the storage options as ``auth = ["user", "password"]`` (a list in TOML,
  turned into the tuple httpx wants).
- Writes: one PUT to ``.tmp-<random>``, then a server-side MOVE; ``Overwrite: T`` replaces
  atomically, ``Overwrite: F`` is refused with 412 if the target exists, which makes exclusive
  creates atomic on servers that check it inside the MOVE (design.md §24 notes which do).
- webdav4's own ``pipe_file`` sends three PROPFINDs and a MKCOL per write, each listing the whole
  folder, so thousands of packs cost O(n²); this backend creates each folder once and PUTs
  directly with the client.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ..errors import StorageError
from .remote import FsspecStorage

T = TypeVar("T")

_URL = re.compile(r"^webdav\+(https?)://(?:([^:/@]*)(?::([^/@]*))?@)?([^/]+)(/.*)?$")


def _translated(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from webdav4.client import HTTPError, ResourceAlreadyExists, ResourceNotFound

        try:
            return fn(*args, **kwargs)
        except ResourceNotFound as e:
            raise FileNotFoundError(str(e)) from e
        except ResourceAlreadyExists as e:
            raise FileExistsError(str(e)) from e
        except HTTPError as e:
            if e.status_code == 404:
                raise FileNotFoundError(str(e)) from e
            if e.status_code == 412:
                raise FileExistsError(str(e)) from e
            raise

    return wrapper


class WebdavStorage(FsspecStorage):
    def _connect(self) -> tuple[Any, str]:
        from webdav4.fsspec import WebdavFileSystem

        m = _URL.match(self._url)
        if m is None:
            raise StorageError(f"{self.url}: expected webdav+https://HOST[:PORT]/PATH")
        scheme, user, password, host, path = m.groups()
        options = dict(self._options)
        auth = options.pop("auth", None)
        if auth is None and user:
            auth = (user, password or "")
        if isinstance(auth, list):
            auth = tuple(auth)  # httpx refuses a list
        fs = WebdavFileSystem(f"{scheme}://{host}", auth=auth, skip_instance_cache=True, **options)
        return fs, (path or "/").strip("/")

    @_translated
    def _upload(self, path: str, payload: bytes | None, local: str | None) -> None:
        if local is not None:
            self.fs.client.upload_file(local, path, overwrite=True)
        else:
            # _store passes exactly one of payload and local
            self.fs.client.upload_fileobj(io.BytesIO(cast(bytes, payload)), path, overwrite=True)

    @_translated
    def _rename(self, src: str, dst: str, *, replace: bool) -> None:
        self.fs.client.move(src, dst, overwrite=replace)

    @_translated
    def _read(self, path: str, offset: int, length: int | None) -> bytes:
        return super()._read(path, offset, length)

    @_translated
    def _makedirs(self, folder: str) -> None:
        parts = [p for p in folder.split("/") if p]
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix in self._dirs:
                continue
            try:
                self.fs.client.mkdir(prefix)
            except Exception as e:
                if type(e).__name__ != "ResourceAlreadyExists":
                    raise
            self._dirs.add(prefix)

    @_translated
    def _remove(self, path: str) -> None:
        self.fs.client.remove(path)
