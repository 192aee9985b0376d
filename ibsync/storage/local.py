"""A repository on a filesystem of this machine: an internal or external drive, or a mounted share.

Writes go to a temporary file in the target folder, are fsynced, then renamed into place and
the folder is fsynced, so a kill or power loss at any instant leaves either the whole object or
no object (plus, at worst, a ``.tmp-*`` file that listings ignore and prune removes). fsspec's
local transactions stage in the system temp folder and move across devices, which is neither
atomic nor durable, hence this backend.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import AlreadyExists, NotFound, StorageError
from .base import FANNED_OUT, Kind, ObjectInfo, Properties, object_path, pieces_of

TEMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some mounted filesystems refuse to open folders; their rename is what we get
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _LocalStaged:
    """A temporary file in the kind's folder, renamed into place by commit: same filesystem,
    so the rename is atomic."""

    def __init__(self, storage: "LocalStorage", kind: Kind) -> None:
        self.storage = storage
        self.kind = kind
        folder = storage.root / kind.value
        storage._ensure_dir(folder)
        self.path = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            self.file = open(self.path, "xb")
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {e.strerror or e}") from e

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            self.abort()
            raise StorageError(f"cannot write {self.path}: {e.strerror or e}") from e

    def commit(self, name: str) -> None:
        final = self.storage._path(self.kind, name)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.storage._ensure_dir(final.parent)
            os.replace(self.path, final)
        except OSError as e:
            self.abort()
            raise StorageError(f"cannot write {final}: {e.strerror or e}") from e
        _fsync_dir(final.parent)
        if final.parent != self.path.parent:
            _fsync_dir(self.path.parent)

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass


class LocalStorage:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self.properties = Properties(connections=2, local=True)
        self._made_dirs: set[Path] = set()

    def _path(self, kind: Kind, name: str) -> Path:
        return self.root / object_path(kind, name)

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._made_dirs:
            return
        missing = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                pass
            _fsync_dir(d.parent)
        self._made_dirs.add(folder)

    def put(self, kind: Kind, name: str, data: bytes | Sequence[bytes], *, exclusive: bool = False) -> None:
        final = self._path(kind, name)
        try:
            self._ensure_dir(final.parent)
            tmp = final.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
            with open(tmp, "xb") as f:
                for piece in pieces_of(data):
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
            try:
                if exclusive:
                    # link() fails if the name exists: an atomic create-if-absent on POSIX
                    # filesystems, where rename() would silently replace.
                    try:
                        os.link(tmp, final)
                    except FileExistsError:
                        raise AlreadyExists(f"{object_path(kind, name)} already exists") from None
                    except OSError as e:
                        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                            raise
                        # no hard links (exFAT, FAT, some SMB mounts): fall back to check + rename
                        if final.exists():
                            raise AlreadyExists(f"{object_path(kind, name)} already exists") from None
                        os.replace(tmp, final)
                else:
                    os.replace(tmp, final)
            finally:
                if tmp.exists():
                    tmp.unlink()
            _fsync_dir(final.parent)
        except AlreadyExists:
            raise
        except OSError as e:
            raise StorageError(f"cannot write {final}: {e.strerror or e}") from e

    def stage(self, kind: Kind) -> _LocalStaged:
        return _LocalStaged(self, kind)

    def get(self, kind: Kind, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(kind, name)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                data = f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise NotFound(f"{object_path(kind, name)} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
        if length is not None and len(data) != length:
            raise StorageError(f"short read of {object_path(kind, name)}: {len(data)} of {length} bytes at {offset}")
        return data

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        try:
            st = self._path(kind, name).stat()
        except FileNotFoundError:
            raise NotFound(f"{object_path(kind, name)} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot stat {object_path(kind, name)}: {e.strerror or e}") from e
        return ObjectInfo(name, st.st_size)

    def _scan(self, folder: Path) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(f"cannot list {folder}: {e.strerror or e}") from e
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            yield ObjectInfo(entry.name, entry.stat(follow_symlinks=False).st_size)

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        folder = self.root / kind.value
        if kind not in FANNED_OUT:
            yield from self._scan(folder)
            return
        try:
            subdirs = sorted(e.path for e in os.scandir(folder) if e.is_dir() and len(e.name) == 2)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(f"cannot list {folder}: {e.strerror or e}") from e
        for sub in subdirs:
            yield from self._scan(Path(sub))

    def delete(self, kind: Kind, name: str) -> None:
        path = self._path(kind, name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(f"{object_path(kind, name)} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot delete {path}: {e.strerror or e}") from e
        _fsync_dir(path.parent)

    def exists(self) -> bool:
        return (self.root / "config").is_file()

    def is_empty(self) -> bool:
        try:
            return not any(self.root.iterdir())
        except FileNotFoundError:
            return True
        except OSError as e:
            raise StorageError(f"cannot list {self.root}: {e.strerror or e}") from e

    def close(self) -> None:
        pass
