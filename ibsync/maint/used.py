"""Which blobs the snapshots use, in about 36 bytes per blob.

prune and check mark every blob reachable from the snapshots, stats counts them per snapshot,
copy remembers what it already sent. A Python ``set[bytes]`` costs 80–100 bytes per id (a
33-byte-payload bytes object plus its hash slot), about 100 MB at a million blobs, beside an
index that takes 54. ``BlobMarks`` keeps the 32-byte ids in bytearrays chosen by their first
bits (ids are keyed hashes, so the buckets fill evenly) with a parallel array of one small
counter per id: a lookup is one C-speed ``find`` over a few KiB, as in ``repo.index``.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

from ..errors import IbsyncError
from ..model import Rejected
from ..repo.repository import Repository

ID_LEN = 32
# Ids per bucket the table aims at: a find over ~64 ids (2 KiB) stays well under a microsecond,
# and a bucket's own overhead (~120 bytes) is spread over enough ids.
_PER_BUCKET = 64


class BlobMarks:
    """Blob id -> counter (0 .. 2**32-1). Ids of any length other than 32 bytes (only a refused
    tree entry can name one) are kept aside in a small dict, so nothing is lost."""

    def __init__(self, expected: int = 0) -> None:
        bits = max(4, min(16, (max(expected, 1) // _PER_BUCKET).bit_length()))
        self._shift = 16 - bits
        self._ids: list[bytearray | None] = [None] * (1 << bits)
        self._counts: list[array | None] = [None] * (1 << bits)
        self._odd: dict[bytes, int] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _slot(self, blob_id: bytes) -> tuple[int, int]:
        """(bucket, record number in it, or -1)."""
        key = ((blob_id[0] << 8) | blob_id[1]) >> self._shift
        ids = self._ids[key]
        if ids is None:
            return key, -1
        pos = ids.find(blob_id)
        while pos != -1 and pos % ID_LEN:
            # a match straddling two ids: never for random ids in practice, but cheap to rule out
            pos = ids.find(blob_id, pos + 1)
        return key, (-1 if pos == -1 else pos // ID_LEN)

    def __contains__(self, blob_id: bytes) -> bool:
        if len(blob_id) != ID_LEN:
            return blob_id in self._odd
        return self._slot(blob_id)[1] != -1

    def add(self, blob_id: bytes, count: int = 0) -> bool:
        """Record the id (with ``count`` if new); True if it was not there."""
        if len(blob_id) != ID_LEN:
            if blob_id in self._odd:
                return False
            self._odd[blob_id] = count
            self._len += 1
            return True
        key, rec = self._slot(blob_id)
        if rec != -1:
            return False
        if self._ids[key] is None:
            self._ids[key], self._counts[key] = bytearray(), array("I")
        self._ids[key] += blob_id  # type: ignore[operator]
        self._counts[key].append(count)  # type: ignore[union-attr]
        self._len += 1
        return True

    def get(self, blob_id: bytes) -> int | None:
        if len(blob_id) != ID_LEN:
            return self._odd.get(blob_id)
        key, rec = self._slot(blob_id)
        return None if rec == -1 else self._counts[key][rec]  # type: ignore[index]

    def set(self, blob_id: bytes, count: int) -> None:
        """Set the counter of an id already recorded (KeyError otherwise)."""
        if len(blob_id) != ID_LEN:
            if blob_id not in self._odd:
                raise KeyError(blob_id)
            self._odd[blob_id] = count
            return
        key, rec = self._slot(blob_id)
        if rec == -1:
            raise KeyError(blob_id)
        self._counts[key][rec] = count  # type: ignore[index]

    def items(self) -> Iterator[tuple[bytes, int]]:
        for ids, counts in zip(self._ids, self._counts):
            if ids is None:
                continue
            for i, count in enumerate(counts):  # type: ignore[arg-type]
                yield bytes(ids[i * ID_LEN : (i + 1) * ID_LEN]), count
        yield from self._odd.items()

    def nbytes(self) -> int:
        """Bytes the table's arrays hold (for the benchmark's per-blob figure)."""
        return sum(len(i) + len(c) * 4 for i, c in zip(self._ids, self._counts) if i is not None and c is not None)


def collect_used(repo: Repository, roots: Iterable[bytes], marks: BlobMarks | None = None) -> BlobMarks:
    """Every blob below the given root trees, as ``reader.walk.collect_blobs`` (with refused
    entries) finds them, into a compact table: each tree's parts (``repo.tree_parts``) and its
    files' data; a tree shared between snapshots or folders is walked once. Entries readers
    refuse count too, as far as they can be read: prune must not delete what a snapshot still
    refers to."""
    used = marks if marks is not None else BlobMarks(len(repo.index))
    for root in roots:
        _collect(repo, root, used)
    return used


def _collect(repo: Repository, tree_id: bytes, used: BlobMarks) -> None:
    stack = [(tree_id, False)]  # (tree, named by a refused entry: may not be a tree at all)
    while stack:
        tid, refused = stack.pop()
        if not used.add(tid):
            continue
        try:
            nodes = repo.load_tree(tid)
            parts = repo.tree_parts(tid)
        except IbsyncError:
            if refused:
                continue
            raise
        for part in parts:
            used.add(part)
        for node in nodes:
            if node.type == "dir" and node.subtree is not None:
                stack.append((node.subtree, refused))
            elif node.type == "file":
                for blob in node.content:
                    used.add(blob)
        for r in getattr(nodes, "rejected", ()):
            _rejected_blobs(r, used, stack)


def _rejected_blobs(r: Rejected, used: BlobMarks, stack: list[tuple[bytes, bool]]) -> None:
    """The blob ids a refused entry names, as far as they read as ids."""
    if not isinstance(r.entry, dict):
        return
    ids = r.entry.get("content")
    for hex_id in ids if isinstance(ids, list) else ():
        blob = _blob_id(hex_id)
        if blob is not None:
            used.add(blob)
    sub = _blob_id(r.entry.get("subtree"))
    if sub is not None:
        stack.append((sub, True))


def _blob_id(v: object) -> bytes | None:
    try:
        return bytes.fromhex(v) if isinstance(v, str) else None
    except ValueError:
        return None


class BlobMap:
    """32-byte id -> 32-byte id (copy: a source blob -> the same bytes' id in the target), in
    64-byte records bucketed as in :class:`BlobMarks`, about 70 bytes per pair where a dict
    of bytes takes about 230."""

    _RECORD = 2 * ID_LEN

    def __init__(self, expected: int = 0) -> None:
        bits = max(4, min(16, (max(expected, 1) // _PER_BUCKET).bit_length()))
        self._shift = 16 - bits
        self._buckets: list[bytearray | None] = [None] * (1 << bits)
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _find(self, key: bytes) -> tuple[bytearray | None, int]:
        bucket = self._buckets[((key[0] << 8) | key[1]) >> self._shift]
        if bucket is None:
            return None, -1
        pos = bucket.find(key)
        while pos != -1 and pos % self._RECORD:
            pos = bucket.find(key, pos + 1)  # a value, or a match straddling records
        return bucket, pos

    def get(self, key: bytes) -> bytes | None:
        if len(key) != ID_LEN:
            return None
        bucket, pos = self._find(key)
        return None if pos == -1 else bytes(bucket[pos + ID_LEN : pos + self._RECORD])  # type: ignore[index]

    def put(self, key: bytes, value: bytes) -> None:
        if len(key) != ID_LEN or len(value) != ID_LEN:
            raise ValueError("BlobMap holds 32-byte ids only")
        bucket, pos = self._find(key)
        if pos != -1:
            bucket[pos + ID_LEN : pos + self._RECORD] = value  # type: ignore[index]
            return
        k = ((key[0] << 8) | key[1]) >> self._shift
        if self._buckets[k] is None:
            self._buckets[k] = bytearray()
        self._buckets[k] += key + value  # type: ignore[operator]
        self._len += 1
