"""The in-memory index: blob id -> (pack, offset, lengths), in 48 bytes per blob.

A Python dict costs about 230 bytes per entry; a 256 GB phone is millions of chunks. Entries
are fixed 48-byte records (id[32] || u32 pack number || u32 offset || u32 stored length ||
u32 raw length with the blob type in bit 30 and the zstd flag in bit 31) appended to one of
65,536 bytearrays chosen by the id's first two bytes. Ids are uniformly random (keyed BLAKE3),
so a bucket holds n/65536 records and a lookup is one C-speed ``find`` over a few KiB.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..format.pack import FLAG_ZSTD, BlobType, PackedBlob

RECORD = 48
_LOC = struct.Struct("<IIII")
_TYPE_BIT = 1 << 30
_ZSTD_BIT = 1 << 31
_RAW_MASK = _TYPE_BIT - 1
BUCKETS = 1 << 16


@dataclass(frozen=True)
class BlobLocation:
    pack_id: bytes
    offset: int
    length: int
    raw_length: int
    type: BlobType
    compressed: bool

    def as_packed(self, blob_id: bytes) -> PackedBlob:
        return PackedBlob(self.type, blob_id, self.offset, self.length, self.raw_length, self.compressed)


class MasterIndex:
    def __init__(self) -> None:
        self._buckets: list[bytearray | None] = [None] * BUCKETS
        self._packs: list[bytes] = []
        self._pack_numbers: dict[bytes, int] = {}
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    @property
    def pack_count(self) -> int:
        return len(self._packs)

    def _find(self, blob_id: bytes) -> tuple[bytearray, int] | None:
        bucket = self._buckets[(blob_id[0] << 8) | blob_id[1]]
        if bucket is None:
            return None
        pos = bucket.find(blob_id)
        while pos != -1 and pos % RECORD:
            # a match straddling two records: impossible for random ids in practice, but cheap to rule out
            pos = bucket.find(blob_id, pos + 1)
        return None if pos == -1 else (bucket, pos)

    def has(self, blob_id: bytes) -> bool:
        return self._find(blob_id) is not None

    def has_all_hex(self, ids: list[str]) -> bool:
        """Whether every blob (ids as hex, as trees hold them) is indexed: the files cache's
        check, once per unchanged file, so written without a call per id."""
        buckets = self._buckets
        for h in ids:
            blob_id = bytes.fromhex(h)
            bucket = buckets[(blob_id[0] << 8) | blob_id[1]]
            if bucket is None:
                return False
            pos = bucket.find(blob_id)
            while pos != -1 and pos % RECORD:
                pos = bucket.find(blob_id, pos + 1)
            if pos == -1:
                return False
        return True

    def get(self, blob_id: bytes) -> BlobLocation | None:
        found = self._find(blob_id)
        if found is None:
            return None
        bucket, pos = found
        pack, offset, length, raw = _LOC.unpack_from(bucket, pos + 32)
        return BlobLocation(
            self._packs[pack],
            offset,
            length,
            raw & _RAW_MASK,
            BlobType(1 if raw & _TYPE_BIT else 0),
            bool(raw & _ZSTD_BIT),
        )

    def add_pack(self, pack_id: bytes, blobs: list[PackedBlob]) -> None:
        """Record a pack's blobs."""
        self.add_records(
            pack_id, [(b.type, FLAG_ZSTD if b.compressed else 0, b.id, b.offset, b.length, b.raw_length) for b in blobs]
        )

    def add_records(self, pack_id: bytes, records: list[tuple[int, int, bytes, int, int, int]]) -> None:
        """As add_pack, from index-object tuples (type, flags, id, offset, length, raw length).

        A blob listed again (two writers stored it at once, or a repaired index) is appended
        again: lookups return its first location and ``entries`` yields every location."""
        with self._lock:
            number = self._pack_numbers.get(pack_id)
            if number is None:
                number = self._pack_numbers[pack_id] = len(self._packs)
                self._packs.append(pack_id)
            buckets, pack = self._buckets, _LOC.pack
            for type_, flags, blob_id, offset, length, raw_length in records:
                key = (blob_id[0] << 8) | blob_id[1]
                bucket = buckets[key]
                if bucket is None:
                    bucket = buckets[key] = bytearray()
                raw = (
                    raw_length | (_TYPE_BIT if type_ == BlobType.TREE else 0) | (_ZSTD_BIT if flags & FLAG_ZSTD else 0)
                )
                # one append per record, so a concurrent lookup never sees half of one
                bucket += blob_id + pack(number, offset, length, raw)
                self._count += 1

    def packs(self) -> Iterator[bytes]:
        return iter(self._packs)

    def has_pack(self, pack_id: bytes) -> bool:
        return pack_id in self._pack_numbers

    def entries(self) -> Iterator[tuple[bytes, BlobLocation]]:
        for bucket in self._buckets:
            if not bucket:
                continue
            for pos in range(0, len(bucket), RECORD):
                blob_id = bytes(bucket[pos : pos + 32])
                pack, offset, length, raw = _LOC.unpack_from(bucket, pos + 32)
                yield (
                    blob_id,
                    BlobLocation(
                        self._packs[pack],
                        offset,
                        length,
                        raw & _RAW_MASK,
                        BlobType(1 if raw & _TYPE_BIT else 0),
                        bool(raw & _ZSTD_BIT),
                    ),
                )
