"""FolderSource: an existing backup folder as something ingest can walk and read."""

from __future__ import annotations

import logging
import os
import stat as stat_mod
import threading
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ..errors import SourceError
from .backup_folder import BackupFolderInfo, file_kind, open_regular, read_backup_folder, read_regular

log = logging.getLogger("ibsync")


class SourceEntry(NamedTuple):
    # a tuple, not a dataclass: a million of these are made per import of a large phone
    name: str
    type: str  # "file" | "dir" | "symlink"
    mode: int
    mtime_ns: int
    size: int = 0
    target: str | None = None
    # blob ids (hex) of a file whose content is already in the repository (captured from a
    # device): the archiver lists it without reading it
    content: list[str] | None = None


# Entries listed ahead by ``prefetch``; past this many, folders are listed when walked. Each
# costs about 300 bytes until the walk takes it (a million-file phone would otherwise hold
# the prefetched listing of a fifth of its files while the first import crawls through them).
PREFETCH_ENTRIES = 100_000


class FolderSource:
    def __init__(self, info: BackupFolderInfo) -> None:
        self.info = info
        self.root = info.path
        self._root = os.fspath(info.path)  # joined once per file: no Path on the hot path
        self._listed: dict[str, list[SourceEntry] | SourceError] = {}
        self._taken: set[str] = set()  # folders the walk has asked for: not worth prefetching
        self._lock = threading.Lock()
        self._prefetcher: threading.Thread | None = None
        # entries that are neither file, folder nor link (FIFOs, sockets, devices): not stored
        self.skipped: list[str] = []

    @classmethod
    def open(cls, path: Path, *, allow_unfinished: bool = False) -> FolderSource:
        return cls(read_backup_folder(path, allow_unfinished=allow_unfinished))

    @property
    def origin(self) -> dict:
        return {"kind": "folder", "path": str(self.root.absolute())}

    def _abs(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root

    def prefetch(self) -> None:
        """Start listing folders in the background, while the repository is being opened (the
        key derivation and index loading need no disk): an unchanged re-import is mostly this
        listing."""
        self._prefetcher = threading.Thread(target=self._prefetch, name="ibsync-prefetch", daemon=True)
        self._prefetcher.start()

    def _prefetch(self) -> None:
        queue, listed = [""], 0
        while queue and listed < PREFETCH_ENTRIES:
            rel = queue.pop(0)
            with self._lock:
                walking = bool(self._taken)
            if walking:
                # the walk has begun and lists ahead of itself (the archiver's listers):
                # listing further here would only hold entries in memory until it gets there
                return
            try:
                entries: list[SourceEntry] | SourceError = self._list(rel)
            except SourceError as e:
                entries = e
            with self._lock:
                if rel in self._taken:
                    continue
                self._listed[rel] = entries
            if isinstance(entries, list):
                listed += len(entries)
                queue.extend(f"{rel}/{e.name}" if rel else e.name for e in entries if e.type == "dir")

    def scan(self, rel: str) -> list[SourceEntry]:
        """The entries of one folder, in name order."""
        with self._lock:
            self._taken.add(rel)
            entries = self._listed.pop(rel, None)
        if entries is None:
            return self._list(rel)
        if isinstance(entries, SourceError):
            raise entries
        return entries

    def _list(self, rel: str) -> list[SourceEntry]:
        out = []
        try:
            with os.scandir(self._abs(rel)) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    fmt = stat_mod.S_IFMT(st.st_mode)
                    if fmt == stat_mod.S_IFREG:
                        out.append(SourceEntry(e.name, "file", st.st_mode, st.st_mtime_ns, st.st_size))
                    elif fmt == stat_mod.S_IFDIR:
                        out.append(SourceEntry(e.name, "dir", st.st_mode, st.st_mtime_ns))
                    elif fmt == stat_mod.S_IFLNK:
                        out.append(SourceEntry(e.name, "symlink", st.st_mode, st.st_mtime_ns, 0, os.readlink(e.path)))
                    else:
                        self._skip(f"{rel}/{e.name}" if rel else e.name, fmt)
        except OSError as e:
            raise SourceError(f"{self._abs(rel)}: cannot read folder ({e.strerror})") from e
        out.sort()  # by name: a folder's names are unique, so tuple order is name order
        return out

    def _skip(self, rel: str, fmt: int) -> None:
        # A device never writes these; reading one would block or never end. The snapshot will
        # lack a path Manifest.db may list, so say so rather than skip in silence.
        with self._lock:
            self.skipped.append(rel)
        log.warning(
            "%s: skipped, %s has no place in a backup folder (the snapshot will not hold it)",
            self._abs(rel),
            file_kind(fmt),
        )

    def open_file(self, rel: str) -> BinaryIO:
        # listed as a regular file, but it may have been replaced since: never block on a FIFO
        return open_regular(self._abs(rel))

    def read_file(self, rel: str, size: int) -> bytes:
        """The content of a small file listed with ``size`` bytes (longer if it grew since)."""
        return read_regular(self._abs(rel), size)

    def root_stat(self) -> tuple[int, int]:
        """Mode and mtime (ns) of the device folder itself."""
        st = os.stat(self.root)
        return st.st_mode, st.st_mtime_ns

    def measure(self) -> tuple[int, int]:
        """Total bytes and files, for progress bars."""
        total = files = 0
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                    files += 1
                except OSError:
                    pass
        return total, files
