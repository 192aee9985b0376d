"""Which Manifest.db rows two versions of the database may differ in, from the pages that differ.

Browsing many snapshots must not query every row of every snapshot. Two versions of a sqlite
file that share most blocks share most pages, and a row is stored whole on one b-tree leaf page
(plus overflow pages for a row larger than a page). So the rows that can differ are those on
the leaf pages that differ (sqlite file format, https://www.sqlite.org/fileformat2.html):

- a table leaf page (type 13) that differs, in either version, gives its cells' rowids: rows
  added, removed, changed or moved are among them;
- interior and index pages hold no row of a rowid table: they are skipped;
- free pages (the freelist of each version) hold nothing;
- any other page that differs and is in use in the newer version (an overflow page, a pointer
  map page) means rows may have changed without their leaf page changing: the answer is then
  "unknown" (None), and the caller compares every row, as it would without this module.

A page equal byte for byte in both versions is taken to hold the same rows. Rowids are
candidates: callers look each one up in both versions and compare the rows themselves, so a
rowid of another table (sqlite_master, Properties) costs a lookup, never a wrong answer.
A change of page size, text encoding or schema also answers None.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

_TABLE_LEAF, _TABLE_INTERIOR, _INDEX_LEAF, _INDEX_INTERIOR = 13, 5, 10, 2
_BTREE = frozenset((_TABLE_LEAF, _TABLE_INTERIOR, _INDEX_LEAF, _INDEX_INTERIOR))


@dataclass(frozen=True)
class Header:
    page_size: int
    reserved: int
    encoding: int
    schema_cookie: int
    freelist_trunk: int
    page_count: int  # from the file's size: what sqlite reads


def read_header(first: bytes, file_size: int) -> Header | None:
    """The fields of a database header this module needs; None if it is not one."""
    if len(first) < 100 or not first.startswith(b"SQLite format 3\x00"):
        return None
    raw = struct.unpack_from(">H", first, 16)[0]
    page_size = 65536 if raw == 1 else raw
    if page_size < 512 or page_size & (page_size - 1):
        return None
    return Header(
        page_size,
        first[20],
        struct.unpack_from(">I", first, 56)[0],
        struct.unpack_from(">I", first, 40)[0],
        struct.unpack_from(">I", first, 32)[0],
        file_size // page_size,
    )


def same_layout(a: Header, b: Header) -> bool:
    """Whether pages of the two versions can be compared one for one."""
    return (a.page_size, a.reserved, a.encoding, a.schema_cookie) == (
        b.page_size,
        b.reserved,
        b.encoding,
        b.schema_cookie,
    )


def freelist(header: Header, read_page: Callable[[int], bytes]) -> set[int] | None:
    """The free pages (trunks and leaves) of a version; None if the list is damaged."""
    pages: set[int] = set()
    trunk = header.freelist_trunk
    most = header.page_size // 4 - 2
    while trunk:
        if trunk > header.page_count or trunk in pages:
            return None
        page = read_page(trunk)
        if len(page) < 8:
            return None
        pages.add(trunk)
        nxt, count = struct.unpack_from(">II", page, 0)
        if count > most:
            return None
        pages.update(struct.unpack_from(f">{count}I", page, 8))
        trunk = nxt
    return pages


def _varint(page: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        b = page[at + i]
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, at + i + 1
    return (value << 8) | page[at + 8], at + 9


def is_btree(page: bytes, page_no: int, page_count: int) -> bool:
    """Whether a page in use is a b-tree page. An overflow page starts with the number of the
    next one (at most ``page_count``); a b-tree page's first byte makes that number at least
    2**25, more pages than any Manifest.db has, so the two are never confused."""
    if page_no == 1:
        return page[100] in _BTREE
    return page[0] in _BTREE and int.from_bytes(page[:4], "big") > page_count


def leaf_rowids(page: bytes, page_no: int) -> list[int] | None:
    """The rowids of a table leaf page's cells ([] for other b-tree pages); None if damaged."""
    at = 100 if page_no == 1 else 0
    if page[at] != _TABLE_LEAF:
        return []
    try:
        count = struct.unpack_from(">H", page, at + 3)[0]
        out = []
        for k in range(count):
            cell = struct.unpack_from(">H", page, at + 8 + 2 * k)[0]
            _, after = _varint(page, cell)
            rowid, _ = _varint(page, after)
            out.append(rowid - (1 << 64) if rowid >= 1 << 63 else rowid)
        return out
    except (struct.error, IndexError):
        return None


@dataclass
class PageDiff:
    """Rowids of the pages compared so far, and the pages whose rows cannot be told."""

    page_size: int
    old_count: int
    new_count: int
    old_free: set[int]
    rowids: set[int] = field(default_factory=set)
    unknown_new: set[int] = field(default_factory=set)  # changed, not b-tree pages in the newer version
    damaged: bool = False

    def compare(self, first_page: int, old: bytes | None, new: bytes | None) -> None:
        """Compare a run of pages starting at page number ``first_page`` (1-based): ``old`` and
        ``new`` are the two versions' bytes (None or short where a version ends)."""
        size = self.page_size
        length = max(len(old or b""), len(new or b""))
        for k in range(0, length, size):
            p = first_page + k // size
            a = old[k : k + size] if old is not None and p <= self.old_count else b""
            b = new[k : k + size] if new is not None and p <= self.new_count else b""
            if len(a) < size:
                a = b""
            if len(b) < size:
                b = b""
            if a == b:
                continue
            if b:
                if is_btree(b, p, self.new_count):
                    self._add(leaf_rowids(b, p))
                else:
                    self.unknown_new.add(p)
            if a and p not in self.old_free and is_btree(a, p, self.old_count):
                self._add(leaf_rowids(a, p))

    def _add(self, rowids: list[int] | None) -> None:
        if rowids is None:
            self.damaged = True
        else:
            self.rowids.update(rowids)

    def result(self, new_free: set[int] | None) -> set[int] | None:
        """The candidate rowids, or None when some change cannot be pinned to rows."""
        if self.damaged or new_free is None or not self.unknown_new <= new_free:
            return None
        return self.rowids
