"""Index objects: which blobs each pack holds, so readers need not open every pack.

    index  = b"IBIX" || u8 version (1) || u32le pack_count || pack * pack_count
    pack   = id[32] || u32le blob_count || entry * blob_count
    entry  = u8 type || u8 flags || id[32] || u32le offset || u32le stored_length || u32le raw_length

Stored like every other unpacked object (see ``objects``). An ingest writes one index object
every few packs, so an interrupted run keeps what it uploaded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import InvalidData
from .pack import FLAG_ZSTD, BlobType, PackedBlob, check_entry

MAGIC = b"IBIX"
VERSION = 1
_HEAD = struct.Struct("<4sBI")
_PACK = struct.Struct("<32sI")
_ENTRY = struct.Struct("<BB32sIII")


@dataclass(frozen=True)
class PackIndex:
    pack_id: bytes
    blobs: list[PackedBlob]


def encode_index(packs: list[PackIndex]) -> bytes:
    out = bytearray(_HEAD.pack(MAGIC, VERSION, len(packs)))
    for p in packs:
        out += _PACK.pack(p.pack_id, len(p.blobs))
        for b in p.blobs:
            out += _ENTRY.pack(b.type, FLAG_ZSTD if b.compressed else 0, b.id, b.offset, b.length, b.raw_length)
    return bytes(out)


def iter_index(data: bytes) -> Iterator[tuple[bytes, list[tuple[int, int, bytes, int, int, int]]]]:
    """(pack id, [(type, flags, blob id, offset, stored length, raw length), ...]) per pack:
    the cheap form for loading large indexes. The whole object is checked before the first
    pack is yielded, so a reader may add each pack as it comes: a bad object adds nothing."""
    for pack_id, pos, end in _pack_spans(data):
        yield pack_id, list(_ENTRY.iter_unpack(data[pos:end]))


def _pack_spans(data: bytes) -> list[tuple[bytes, int, int]]:
    """(pack id, start, end) of each pack's entries, after checking the object's structure and
    every entry's type and flags (what every reader turns into a BlobType)."""
    spans = []
    try:
        magic, version, count = _HEAD.unpack_from(data, 0)
        if magic != MAGIC or version != VERSION:
            raise InvalidData("not an ibsync index object")
        pos = _HEAD.size
        for _ in range(count):
            pack_id, n = _PACK.unpack_from(data, pos)
            pos += _PACK.size
            end = pos + n * _ENTRY.size
            if end > len(data):
                raise InvalidData("index object truncated")
            # each entry's type and flags bytes, sliced out in C: one check per distinct pair
            for type_, flags in set(zip(data[pos : end : _ENTRY.size], data[pos + 1 : end : _ENTRY.size])):
                check_entry(type_, flags)
            spans.append((pack_id, pos, end))
            pos = end
    except struct.error as e:
        raise InvalidData(f"index object truncated: {e}") from e
    if pos != len(data):
        raise InvalidData("index object has trailing bytes")
    return spans


def decode_index(data: bytes) -> list[PackIndex]:
    return [
        PackIndex(
            pack_id,
            [
                PackedBlob(BlobType(t), bid, off, length, raw, bool(flags & FLAG_ZSTD))
                for t, flags, bid, off, length, raw in records
            ],
        )
        for pack_id, records in iter_index(data)
    ]
