"""Where repositories live: a narrow object-store interface and its backends."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .base import Kind, ObjectInfo, Properties, Storage, object_path
from .local import LocalStorage

if TYPE_CHECKING:  # the remote backends are imported only when a URL needs one
    from .remote import FsspecStorage

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def open_storage(url: str, options: dict[str, Any] | None = None) -> Storage:
    """A plain path or file:// URL is a local folder; s3, sftp, smb and webdav have their own
    backends; any other URL goes to fsspec by scheme."""
    m = _SCHEME.match(url)
    if m is None or m.group(1) == "file":
        return LocalStorage(url[len("file://") :] if m else url)
    scheme = m.group(1).lower()
    backend: type[FsspecStorage]
    if scheme in ("s3", "s3a"):
        from .s3 import S3Storage as backend
    elif scheme in ("sftp", "ssh"):
        from .sftp import SftpStorage as backend
    elif scheme == "smb":
        from .smb import SmbStorage as backend
    elif scheme in ("webdav+http", "webdav+https"):
        from .webdav import WebdavStorage as backend
    else:
        from .remote import FsspecStorage as backend
    return backend(url, options)


__all__ = ["Kind", "ObjectInfo", "Properties", "Storage", "LocalStorage", "object_path", "open_storage"]
