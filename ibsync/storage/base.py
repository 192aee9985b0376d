"""The storage interface every layer above talks to.

A backend stores opaque objects of a few fixed kinds; it never sees blobs, keys or JSON.
Objects are written once and never modified; every ``put`` is atomic (a reader sees the whole
object or nothing).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from ..errors import StorageError


class Kind(str, Enum):
    CONFIG = "config"
    KEYS = "keys"
    LOCKS = "locks"
    SNAPSHOTS = "snapshots"
    INDEX = "index"
    PACKS = "packs"


# Packs are numerous: they sit in 256 sub-folders named by the first two hex digits of their
# name, so no single folder on a local or network drive grows past a few thousand entries.
FANNED_OUT = frozenset({Kind.PACKS})


# Every object but the config is named by the BLAKE3 hash of its bytes (format.crypto.storage_name).
# Anything else found in a kind's folder is not ibsync's: listings never yield it, so no command
# reads or deletes it as an object; `strays` names it for `check` to report.
_OBJECT_NAME = re.compile(r"[0-9a-f]{64}")
_FAN_OUT_NAME = re.compile(r"[0-9a-f]{2}")

# Writes in progress: ``.tmp-<random>`` beside the target (local, SFTP, SMB, WebDAV).
TEMP_PREFIX = ".tmp-"


def is_object_name(name: str) -> bool:
    return _OBJECT_NAME.fullmatch(name) is not None


def is_fan_out_folder(name: str) -> bool:
    return _FAN_OUT_NAME.fullmatch(name) is not None


def is_ignored(name: str) -> bool:
    """Dot files are neither objects nor strays: ``.tmp-*`` are writes in progress (see
    ``remove_stale_temporary``), ``.DS_Store`` and ``._*`` are what macOS leaves on any drive."""
    return name.startswith(".")


def object_at(kind: Kind, relpath: str) -> str | None:
    """The object name stored at ``relpath`` (relative to the kind's folder, '/'-separated), or
    None if no object of ``kind`` can be there: a pack counts only inside the fan-out folder of
    its first two digits, every other kind only directly in its folder."""
    parts = relpath.split("/")
    name = parts[-1]
    if not is_object_name(name):
        return None
    if kind in FANNED_OUT:
        return name if len(parts) == 2 and parts[0] == name[:2] else None
    return name if len(parts) == 1 else None


def check_name(kind: Kind, name: str) -> None:
    """Refuse a name that is not an object's before it becomes part of a path (``../x``)."""
    ok = name == "config" if kind is Kind.CONFIG else is_object_name(name)
    if not ok:
        raise StorageError(f"{kind.value}: {name!r} is not an object name")


def object_path(kind: Kind, name: str) -> str:
    """Path of an object relative to the repository root ('config' is a single object)."""
    if kind is Kind.CONFIG:
        return "config"
    if kind in FANNED_OUT:
        return f"{kind.value}/{name[:2]}/{name}"
    return f"{kind.value}/{name}"


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int


@dataclass(frozen=True)
class Properties:
    connections: int  # how many requests may run at once with profit
    local: bool  # objects live on a filesystem of this machine


class Staged(Protocol):
    """An object being written piece by piece, invisible until committed under its name.
    Lets a pack be written as it fills (its name is the hash of its bytes, known only at the
    end) without holding it in memory."""

    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self, name: str) -> None: ...

    def abort(self) -> None: ...


class Storage(Protocol):
    """What ibsync needs of a place to keep a repository."""

    url: str
    properties: Properties

    def put(self, kind: Kind, name: str, data: bytes | Sequence[bytes], *, exclusive: bool = False) -> None:
        """Store an object atomically. ``exclusive`` fails with AlreadyExists if it is there."""

    def stage(self, kind: Kind) -> Staged:
        """Start writing an object whose name is given at commit."""

    def get(self, kind: Kind, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read an object or a range of it; a short read raises InvalidData, a missing one NotFound."""

    def stat(self, kind: Kind, name: str) -> ObjectInfo: ...

    def list(self, kind: Kind) -> Iterator[ObjectInfo]: ...

    def delete(self, kind: Kind, name: str) -> None: ...

    def strays(self, kind: Kind) -> builtins.list[str]:
        """What sits where ``kind``'s objects live but is not one of them, as sorted paths
        relative to the root: a name that is not 64 lowercase hex digits, a pack in the wrong
        fan-out folder, a folder, link, FIFO, socket or device, a kind folder that is a link
        ('packs/ab', 'locks'). ``list`` never yields these; nothing deletes them."""

    def remove_stale_temporary(self, older_than_s: float) -> int:
        """Remove the ``.tmp-*`` objects of interrupted writes last modified more than
        ``older_than_s`` seconds ago (and, for remote storage, the local staging files of
        processes that are gone); returns how many were removed."""

    def exists(self) -> bool:
        """Whether the repository root holds a config object."""

    def is_empty(self) -> bool:
        """Whether the repository root holds nothing at all (init refuses anything else)."""

    def close(self) -> None: ...


def join_pieces(data: bytes | Sequence[bytes]) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return b"".join(data)


def pieces_of(data: bytes | Sequence[bytes]) -> Iterable[bytes | memoryview]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return (data,)
    return data


def leaves_room_for_init(entries: Iterable[tuple[str, bool, Sequence[tuple[str, bool, int]]]]) -> bool:
    """Whether a root holding these entries may be initialised: nothing at all, or only the empty
    folders of our kinds that an ``init`` which failed after its key file leaves behind
    (``packs`` with empty fan-out folders). ``entries``: (name, is a real folder, its
    contents as (name, is a real folder, number of entries inside))."""
    kinds = {k.value for k in Kind if k is not Kind.CONFIG}
    for name, is_dir, contents in entries:
        if not is_dir or name not in kinds:
            return False
        for sub, sub_is_dir, inside in contents:
            if not (name == Kind.PACKS.value and sub_is_dir and is_fan_out_folder(sub) and inside == 0):
                return False
    return True
