"""FolderSource: an existing backup folder as something ingest can walk and read."""

from __future__ import annotations

import os
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError
from .backup_folder import BackupFolderInfo, read_backup_folder


@dataclass(frozen=True)
class SourceEntry:
    name: str
    type: str  # "file" | "dir" | "symlink"
    mode: int
    mtime_ns: int
    size: int = 0
    target: str | None = None


class FolderSource:
    def __init__(self, info: BackupFolderInfo) -> None:
        self.info = info
        self.root = info.path

    @classmethod
    def open(cls, path: Path, *, allow_unfinished: bool = False) -> "FolderSource":
        return cls(read_backup_folder(path, allow_unfinished=allow_unfinished))

    @property
    def origin(self) -> dict:
        return {"kind": "folder", "path": str(self.root.absolute())}

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else str(self.root)

    def scan(self, rel: str) -> list[SourceEntry]:
        """The entries of one folder, in name order."""
        out = []
        try:
            with os.scandir(self._abs(rel)) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    if stat_mod.S_ISREG(st.st_mode):
                        kind = "file"
                    elif stat_mod.S_ISDIR(st.st_mode):
                        kind = "dir"
                    elif stat_mod.S_ISLNK(st.st_mode):
                        kind = "symlink"
                    else:
                        continue  # sockets and fifos have no place in a backup folder
                    target = os.readlink(e.path) if kind == "symlink" else None
                    out.append(
                        SourceEntry(e.name, kind, st.st_mode, st.st_mtime_ns, st.st_size, target)
                    )
        except OSError as e:
            raise SourceError(f"{self._abs(rel)}: cannot read folder ({e.strerror})") from e
        out.sort(key=lambda x: x.name)
        return out

    def open_file(self, rel: str) -> BinaryIO:
        try:
            return open(self._abs(rel), "rb", buffering=0)
        except OSError as e:
            raise SourceError(f"{self._abs(rel)}: cannot read ({e.strerror})") from e

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
