"""The floor of a next-day import: the true change between day 1 and day 2, compressed.

No deduplicating tool can store day 2 in fewer bytes than what actually changed, so the next-day bytes a
tool adds are judged by what they *exceed* this floor by (new photos make raw ratios meaningless):

* a file new on day 2: its zstd-3 size (each file compressed on its own, as every tool compresses per blob);
* a file present on both days whose size or mtime differs: the zstd-3 size of the 4 KiB pages that differ
  between the two versions (pages past the old end count as differing), compressed together per file. For a
  rewritten small file that is the whole file; for a sqlite database edited in place (Manifest.db included)
  it is the pages sqlite rewrote;
* a deleted file: nothing.

Unchanged files are recognised by inode (a day 2 made with ``cp -al``) or by size and mtime (``cp -a``), and
are never read, so this costs two stats per file plus reading the changed ones, in constant memory.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zstandard

PAGE = 4096
LEVEL = 3


@dataclass
class Floor:
    new_files: int = 0
    new_raw_bytes: int = 0
    new_zstd_bytes: int = 0
    changed_files: int = 0
    changed_pages: int = 0
    changed_page_zstd_bytes: int = 0
    deleted_files: int = 0
    manifest_db_pages: int = 0
    manifest_db_pages_total: int = 0
    manifest_db_zstd_bytes: int = 0
    per_file_top: list = field(default_factory=list)  # the 10 largest contributions, for reading the number

    @property
    def bytes(self) -> int:
        return self.new_zstd_bytes + self.changed_page_zstd_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "floor_bytes": self.bytes, "method": __doc__.split("\n\n")[1].strip()}


def _walk(root: Path):
    """Relative path and lstat of every file below ``root``, one at a time (a million files: no dict)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            yield os.path.relpath(p, root), os.lstat(p)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _changed_pages(a: Path, b: Path) -> tuple[int, int, bytes]:
    """(pages of b that differ from a, pages of b, those pages concatenated); reads 1 MiB at a time, since
    Manifest.db reaches a gigabyte at a million files."""
    chunk = 256 * PAGE
    n = total = 0
    diff = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            old, new = fa.read(chunk), fb.read(chunk)
            if not new:
                return n, total, b"".join(diff)
            for o in range(0, len(new), PAGE):
                total += 1
                page = new[o : o + PAGE]
                if old[o : o + PAGE] != page:
                    n += 1
                    diff.append(page)


def next_day_floor(day1: Path, day2: Path) -> Floor:
    """The floor of importing ``day2`` (a device folder) after ``day1`` (its previous day)."""
    cctx = zstandard.ZstdCompressor(level=LEVEL)
    fl = Floor(deleted_files=sum(1 for rel, _ in _walk(day1) if _lstat(day2 / rel) is None))
    contributions = []
    for rel, st in _walk(day2):
        old = _lstat(day1 / rel)
        if old is not None and (
            (old.st_ino == st.st_ino and old.st_dev == st.st_dev)
            or (old.st_size == st.st_size and old.st_mtime_ns == st.st_mtime_ns)
        ):
            continue
        if old is None:
            data = (day2 / rel).read_bytes()
            z = len(cctx.compress(data))
            fl.new_files += 1
            fl.new_raw_bytes += len(data)
            fl.new_zstd_bytes += z
        else:
            n, total, pages = _changed_pages(day1 / rel, day2 / rel)
            z = len(cctx.compress(pages)) if pages else 0
            fl.changed_files += 1
            fl.changed_pages += n
            fl.changed_page_zstd_bytes += z
            if rel == "Manifest.db":
                fl.manifest_db_pages, fl.manifest_db_pages_total, fl.manifest_db_zstd_bytes = n, total, z
        contributions.append((z, rel))
    fl.per_file_top = [[rel, z] for z, rel in sorted(contributions, reverse=True)[:10]]
    return fl
