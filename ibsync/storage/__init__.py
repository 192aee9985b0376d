"""Where repositories live: a narrow object-store interface and its backends."""

from __future__ import annotations

import re
from typing import Any

from .base import Kind, ObjectInfo, Properties, Storage, object_path
from .local import LocalStorage

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def open_storage(url: str, options: dict[str, Any] | None = None) -> Storage:
    """A plain path or file:// URL is a local folder; any other URL goes to fsspec by scheme."""
    m = _SCHEME.match(url)
    if m is None or m.group(1) == "file":
        return LocalStorage(url[len("file://"):] if m else url)
    from .remote import FsspecStorage

    return FsspecStorage(url, options)


__all__ = ["Kind", "ObjectInfo", "Properties", "Storage", "LocalStorage", "object_path", "open_storage"]
