"""Pack files: many encrypted blobs in one storage object, with a header that lists them.

    pack   = blob_1 || ... || blob_n || sealed_header || u32le(len(sealed_header))
    header = b"IBPH" || u8 version (1) || u32le count || entry * count
    entry  = u8 type || u8 flags || id[32] || u32le stored_length || u32le raw_length

Blob i starts where blob i-1 ends (the first at 0). The header alone is enough to rebuild the
index of a pack, so a lost index never loses data.

A pack is named by the BLAKE3 of its tail (sealed header and length field). The header lists
every blob's id and length, and each blob is authenticated on its own (AEAD, and its id is the
hash of its plaintext), so the name pins the whole pack without hashing its bytes twice.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Generic, Protocol, TypeVar

import blake3

from ..errors import InvalidData
from .crypto import Cipher

HEADER_MAGIC = b"IBPH"
HEADER_VERSION = 1
_ENTRY = struct.Struct("<BB32sII")
_HEAD = struct.Struct("<4sBI")
_TAIL = struct.Struct("<I")
HEADER_AAD = b"ibsync pack header"

FLAG_ZSTD = 1


class BlobType(IntEnum):
    DATA = 0
    TREE = 1


@dataclass(frozen=True)
class PackedBlob:
    type: BlobType
    id: bytes
    offset: int
    length: int  # stored (sealed) bytes in the pack
    raw_length: int  # plaintext bytes after decompression
    compressed: bool


def blob_aad(blob_id: bytes) -> bytes:
    # A blob only decrypts at the id it was stored under: swapping blobs is detected.
    return blob_id


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> object: ...


# The writer keeps its sink's own type, so its owner can still commit or abort it
# (storage.Staged) without this module knowing about storage.
S = TypeVar("S", bound=Sink)


# Blobs are handed to the sink in writes of about this size: a small file's blob is two pieces
# of a few KiB, and two write calls per blob (each a syscall and a GIL hand-over) cost more than
# the rest of storing it. Bounded, so memory still does not grow with the pack size.
WRITE_BUFFER = 1 << 20
COPY_BELOW = 64 << 10


class PackWriter(Generic[S]):
    """Writes sealed blobs to a sink as they come (buffered up to WRITE_BUFFER bytes);
    ``finish`` appends the sealed header and returns the pack's name. Holds only the blob list
    and the write buffer in memory."""

    def __init__(self, sink: S) -> None:
        self.sink = sink
        self.blobs: list[PackedBlob] = []
        self.size = 0
        self._buffer: list[bytes] = []
        self._buffered = 0

    def add(
        self, type: BlobType, blob_id: bytes, sealed: Sequence[bytes | memoryview], raw_length: int, compressed: bool
    ) -> None:
        """Append one blob, given as the pieces of its stored bytes (see Cipher.seal_parts)."""
        length = 0
        for piece in sealed:
            if isinstance(piece, memoryview):
                # a view of the caller's chunk (unencrypted, stored raw): the chunker may reuse
                # its buffer once the next chunk is asked for, so it is copied (small) or
                # written now (large), never kept
                if len(piece) < COPY_BELOW:
                    self._buffer.append(bytes(piece))
                    self._buffered += len(piece)
                else:
                    self._flush()
                    self.sink.write(piece)
            else:
                self._buffer.append(piece)
                self._buffered += len(piece)
            length += len(piece)
        self.blobs.append(PackedBlob(type, blob_id, self.size, length, raw_length, compressed))
        self.size += length
        if self._buffered >= WRITE_BUFFER:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        self.sink.write(data)

    def __len__(self) -> int:
        return len(self.blobs)

    def finish(self, cipher: Cipher) -> str:
        """Write the header; return the pack's storage name."""
        header = bytearray(_HEAD.pack(HEADER_MAGIC, HEADER_VERSION, len(self.blobs)))
        for b in self.blobs:
            header += _ENTRY.pack(b.type, FLAG_ZSTD if b.compressed else 0, b.id, b.length, b.raw_length)
        sealed = cipher.seal(bytes(header), HEADER_AAD)
        tail = sealed + _TAIL.pack(len(sealed))
        self._buffer.append(tail)
        self._flush()
        self.size += len(tail)
        return pack_name(tail)


def pack_name(tail: bytes | memoryview) -> str:
    return blake3.blake3(tail).hexdigest()


def split_tail(pack: bytes) -> bytes:
    """The tail (sealed header and its length) of a whole pack."""
    if len(pack) < _TAIL.size:
        raise InvalidData("pack too short")
    (hlen,) = _TAIL.unpack_from(pack, len(pack) - _TAIL.size)
    if hlen + _TAIL.size > len(pack):
        raise InvalidData("pack header length exceeds the pack")
    return pack[len(pack) - _TAIL.size - hlen :]


def parse_header(tail: bytes, cipher: Cipher) -> list[PackedBlob]:
    """Parse a pack's header from the pack's trailing bytes (the whole pack will do)."""
    if len(tail) < _TAIL.size:
        raise InvalidData("pack too short")
    (hlen,) = _TAIL.unpack_from(tail, len(tail) - _TAIL.size)
    start = len(tail) - _TAIL.size - hlen
    if start < 0:
        raise InvalidData("pack header length exceeds the pack")
    header = cipher.open(tail[start : len(tail) - _TAIL.size], HEADER_AAD)
    # Without encryption, anyone who can write the storage chooses these bytes: every field is
    # checked before use (a short header, a count that disagrees with the length, a type or
    # flag no writer sets).
    if len(header) < _HEAD.size:
        raise InvalidData("pack header too short")
    magic, version, count = _HEAD.unpack_from(header, 0)
    if magic != HEADER_MAGIC or version != HEADER_VERSION:
        raise InvalidData("not an ibsync pack header")
    if len(header) != _HEAD.size + count * _ENTRY.size:
        raise InvalidData("pack header has the wrong length")
    blobs, offset = [], 0
    for type_, flags, blob_id, length, raw_length in _ENTRY.iter_unpack(header[_HEAD.size :]):
        check_entry(type_, flags)
        blobs.append(PackedBlob(BlobType(type_), blob_id, offset, length, raw_length, bool(flags & FLAG_ZSTD)))
        offset += length
    return blobs


_TYPES = frozenset(int(t) for t in BlobType)


def check_entry(type_: int, flags: int) -> None:
    """A header or index entry's type and flags are ones ibsync writes."""
    if type_ not in _TYPES:
        raise InvalidData(f"unknown blob type {type_}")
    if flags & ~FLAG_ZSTD:
        raise InvalidData(f"unknown blob flags {flags:#x}")
