"""The storage interface every layer above talks to.

A backend stores opaque objects of a few fixed kinds; it never sees blobs, keys or JSON.
Objects are written once and never modified; every ``put`` is atomic (a reader sees the whole
object or nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Iterator, Protocol, Sequence


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

    def exists(self) -> bool:
        """Whether the repository root holds a config object."""

    def is_empty(self) -> bool:
        """Whether the repository root holds nothing at all (init refuses anything else)."""

    def close(self) -> None: ...


def join_pieces(data: bytes | Sequence[bytes]) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return b"".join(data)


def pieces_of(data: bytes | Sequence[bytes]) -> Iterable[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return (data,)
    return data
