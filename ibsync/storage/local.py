"""A repository on a filesystem of this machine: an internal or external drive, or a mounted share.

Writes go to a temporary file in the target folder, are synced (F_FULLFSYNC on macOS), then
renamed into place and the folder is synced, so a kill or power loss at any instant leaves
either the whole object or no object (plus, at worst, a ``.tmp-*`` file that listings ignore
and ``remove_stale_temporary`` removes). fsspec's local transactions stage in the system temp
folder and move across devices, which is neither atomic nor durable, hence this backend.

Nothing below the root is followed if it is a link, and only regular files are objects
(folders.py says why and how); the root itself is resolved once, when the storage is made.
"""

from __future__ import annotations

import builtins
import errno
import os
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AlreadyExists, NotFound, StorageError
from .base import (
    FANNED_OUT,
    TEMP_PREFIX,
    Kind,
    ObjectInfo,
    Properties,
    check_name,
    is_fan_out_folder,
    is_ignored,
    leaves_room_for_init,
    object_at,
    object_path,
    pieces_of,
)
from .folders import DIR_FD_SUPPORTED, Entry, FdFolder, Folder, PathFolder, Refused, child_rel, refused, sync_file

__all__ = ["LocalStorage", "TEMP_PREFIX"]

# link() refusals of filesystems without hard links (exFAT, FAT, some SMB mounts)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS})


def _parts(kind: Kind, name: str) -> tuple[tuple[str, ...], str]:
    """The folders below the root that hold an object, and its file name there."""
    if kind is Kind.CONFIG:
        return (), "config"
    if kind in FANNED_OUT:
        return (kind.value, name[:2]), name
    return (kind.value,), name


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _seek_and_read(fd: int, n: int, offset: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


_pread = getattr(os, "pread", _seek_and_read)  # Windows has no pread


def _read_at(fd: int, offset: int, length: int | None) -> bytes:
    """``length`` bytes from ``offset`` (all to the end if None); fewer only at the end of the
    file. Restore reads packs by range: one pread for the exact range, where a buffered file
    adds an fstat, an ioctl, two seeks and reads in 4 KiB steps."""
    if length is None:
        length = max(0, os.fstat(fd).st_size - offset)
    pieces = []
    while length > 0:
        piece = _pread(fd, length, offset)
        if not piece:
            break  # the end of the file: the caller reports the short read
        pieces.append(piece)
        offset += len(piece)
        length -= len(piece)
    return b"".join(pieces)


def _remove_quietly(folder: Folder, name: str) -> None:
    try:
        folder.unlink(name)
    except OSError:
        pass


class _LocalStaged:
    """A temporary file in the kind's folder, renamed into place by commit: same filesystem,
    so the rename is atomic."""

    def __init__(self, storage: LocalStorage, kind: Kind) -> None:
        self.storage = storage
        self.kind = kind
        self.name = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            self.folder: Folder | None = storage._open((kind.value,), create=True)  # held until commit or abort
        except OSError as e:
            raise StorageError(f"cannot write {storage.url}/{kind.value}: {e.strerror or e}") from e
        try:
            self.fd: int | None = self.folder.create_new(self.name)
        except OSError as e:
            self._close()
            raise StorageError(f"cannot write {storage.url}/{kind.value}/{self.name}: {e.strerror or e}") from e

    def write(self, data: bytes | memoryview) -> None:
        assert self.fd is not None
        try:
            _write_all(self.fd, data)
        except OSError as e:
            self.abort()
            raise StorageError(f"cannot write {self.kind.value}/{self.name}: {e.strerror or e}") from e

    def commit(self, name: str) -> None:
        check_name(self.kind, name)
        assert self.fd is not None and self.folder is not None
        parts, leaf = _parts(self.kind, name)
        try:
            sync_file(self.fd)
            os.close(self.fd)
            self.fd = None
            with self.storage._folder(parts[1:], create=True, base=self.folder) as final:
                self.folder.move(self.name, final, leaf)
                final.sync()
            if parts[1:]:
                self.folder.sync()  # the temporary name is gone from here too
        except (OSError, StorageError) as e:
            self.abort()
            if isinstance(e, StorageError):
                raise
            raise StorageError(
                f"cannot write {self.storage.url}/{object_path(self.kind, name)}: {e.strerror or e}"
            ) from e
        finally:
            self._close()

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.folder is not None:
            _remove_quietly(self.folder, self.name)
        self._close()

    def _close(self) -> None:
        if self.folder is not None:
            self.folder.close()
            self.folder = None


class LocalStorage:
    """``dir_fd=False`` forces the lstat-per-component fallback (the only one on Windows)."""

    def __init__(self, root: str | os.PathLike[str], *, dir_fd: bool | None = None) -> None:
        given = Path(root).expanduser().absolute()
        self.url = str(given)
        # Resolved once: a link the user chose (/Volumes/X, ~/Backups -> /mnt/disk) is followed
        # here; anything below the root never is.
        self.root = Path(os.path.realpath(given))
        self.properties = Properties(connections=2, local=True)
        self._use_fd = DIR_FD_SUPPORTED if dir_fd is None else (dir_fd and DIR_FD_SUPPORTED)
        self._root_folder: Folder | None = None
        self._root_lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None

    # -- folders -------------------------------------------------------------------------------

    def _root(self, *, create: bool) -> Folder:
        """The root, held open for the storage's life (one descriptor), so a root replaced by a
        link after opening does not redirect later operations."""
        with self._root_lock:
            if self._root_folder is None:
                opener = FdFolder.open_root if self._use_fd else PathFolder.open_root
                try:
                    folder = opener(str(self.root), self.url)
                except FileNotFoundError:
                    if not create:
                        raise
                    self.root.mkdir(parents=True, exist_ok=True)
                    PathFolder(str(self.root.parent), "").sync()  # the new root's entry, durably
                    folder = opener(str(self.root), self.url)
                except NotADirectoryError:
                    raise StorageError(f"{self.url} is not a folder") from None
                if isinstance(folder, FdFolder):
                    folder._owned = False
                    self._finalizer = weakref.finalize(self, os.close, folder.fd)
                self._root_folder = folder
            return self._root_folder

    def _open(self, parts: Sequence[str], *, create: bool, base: Folder | None = None) -> Folder:
        """The folder at ``parts`` below ``base`` (the root), opened without following links;
        the caller closes it. FileNotFoundError if absent, Refused if a link or a file."""
        folder = base if base is not None else self._root(create=create)
        for part in parts:
            try:
                child = folder.sub(part, create=create)
            finally:
                if folder is not base and folder is not self._root_folder:
                    folder.close()  # one descriptor at a time besides the root
            folder = child
        return folder

    @contextmanager
    def _folder(self, parts: Sequence[str], *, create: bool, base: Folder | None = None) -> Iterator[Folder]:
        folder = self._open(parts, create=create, base=base)
        try:
            yield folder
        finally:
            if folder is not base and folder is not self._root_folder:
                folder.close()

    # -- the Storage interface -----------------------------------------------------------------

    def put(self, kind: Kind, name: str, data: bytes | Sequence[bytes], *, exclusive: bool = False) -> None:
        check_name(kind, name)
        parts, leaf = _parts(kind, name)
        try:
            with self._folder(parts, create=True) as folder:
                tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
                fd = folder.create_new(tmp)
                try:
                    try:
                        for piece in pieces_of(data):
                            _write_all(fd, piece)
                        sync_file(fd)
                    finally:
                        os.close(fd)
                    self._place(folder, tmp, leaf, exclusive, object_path(kind, name))
                finally:
                    _remove_quietly(folder, tmp)  # still there if the link or rename failed
                folder.sync()
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"cannot write {self.url}/{object_path(kind, name)}: {e.strerror or e}") from e

    @staticmethod
    def _place(folder: Folder, tmp: str, leaf: str, exclusive: bool, rel: str) -> None:
        if not exclusive:
            folder.move(tmp, folder, leaf)
            return
        # link() fails if the name exists: an atomic create-if-absent on POSIX filesystems,
        # where rename() would silently replace.
        try:
            folder.link(tmp, leaf)
            return
        except FileExistsError:
            raise AlreadyExists(f"{rel} already exists") from None
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        # no hard links: check, then rename (not atomic against a racing writer)
        try:
            folder.lstat(leaf)
        except FileNotFoundError:
            folder.move(tmp, folder, leaf)
            return
        raise AlreadyExists(f"{rel} already exists")

    def stage(self, kind: Kind) -> _LocalStaged:
        return _LocalStaged(self, kind)

    def get(self, kind: Kind, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(kind, name)
        parts, leaf = _parts(kind, name)
        try:
            with self._folder(parts, create=False) as folder:
                fd = folder.open_regular(leaf)
            try:
                data = _read_at(fd, offset, length)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise NotFound(f"{object_path(kind, name)} does not exist") from None
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"cannot read {self.url}/{object_path(kind, name)}: {e.strerror or e}") from e
        if length is not None and len(data) != length:
            raise StorageError(f"short read of {object_path(kind, name)}: {len(data)} of {length} bytes at {offset}")
        return data

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        check_name(kind, name)
        parts, leaf = _parts(kind, name)
        try:
            with self._folder(parts, create=False) as folder:
                st = _lstat_regular(folder, leaf)
        except FileNotFoundError:
            raise NotFound(f"{object_path(kind, name)} does not exist") from None
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"cannot stat {object_path(kind, name)}: {e.strerror or e}") from e
        return ObjectInfo(name, st.st_size)

    def _scan(self, kind: Kind) -> _Scan:
        """Every entry of the kind's folder and (packs) of its fan-out folders, links not followed."""
        scan = _Scan()
        try:
            folder = self._open((kind.value,), create=False)
        except FileNotFoundError:
            return scan
        except Refused as e:
            (scan.links if e.is_link else scan.odd).append(kind.value)
            return scan
        except OSError as e:
            raise StorageError(f"cannot list {self.url}/{kind.value}: {e.strerror or e}") from e
        try:
            top = folder.entries()
            scan.folders.append(("", top))
            if kind in FANNED_OUT:
                for entry in sorted(top, key=lambda entry: entry.name):
                    if not is_fan_out_folder(entry.name):
                        continue
                    if entry.is_link:
                        scan.links.append(f"{kind.value}/{entry.name}")
                    elif entry.is_dir:
                        with self._folder((entry.name,), create=False, base=folder) as sub:
                            scan.folders.append((entry.name, sub.entries()))
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"cannot list {self.url}/{kind.value}: {e.strerror or e}") from e
        finally:
            folder.close()
        return scan

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        scan = self._scan(kind)
        if scan.links:
            # the objects behind a link would be missing from the listing, and prune or repair
            # index would act on a wrong picture of the repository: stop instead
            raise Refused(
                f"{self.url}/{scan.links[0]} is a symbolic link; ibsync never follows links inside a repository "
                "(move the real folder there)",
                is_link=True,
            )
        found = [
            ObjectInfo(e.name, e.size) for sub, entries in scan.folders for e in entries if _is_object(kind, sub, e)
        ]
        yield from found

    def strays(self, kind: Kind) -> builtins.list[str]:
        if kind is Kind.CONFIG:
            return self._config_strays()
        scan = self._scan(kind)
        out = scan.links + scan.odd
        fanned = kind in FANNED_OUT
        for sub, entries in scan.folders:
            prefix = f"{kind.value}/{sub}/" if sub else f"{kind.value}/"
            for e in entries:
                if _is_ignored_entry(e):
                    continue
                if _is_object(kind, sub, e):
                    continue
                if fanned and sub == "" and (e.is_dir or e.is_link) and is_fan_out_folder(e.name):
                    continue  # scanned, or (a link) already in scan.links
                out.append(prefix + e.name)
        return sorted(out)

    def _config_strays(self) -> builtins.list[str]:
        try:
            _lstat_regular(self._root(create=False), "config")
        except FileNotFoundError:
            return []
        except Refused:
            return ["config"]
        except OSError as e:
            raise StorageError(f"cannot stat {self.url}/config: {e.strerror or e}") from e
        return []

    def delete(self, kind: Kind, name: str) -> None:
        check_name(kind, name)
        parts, leaf = _parts(kind, name)
        try:
            with self._folder(parts, create=False) as folder:
                _lstat_regular(folder, leaf)  # only objects: never a link, FIFO or folder planted there
                folder.unlink(leaf)
                folder.sync()
        except FileNotFoundError:
            raise NotFound(f"{object_path(kind, name)} does not exist") from None
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"cannot delete {self.url}/{object_path(kind, name)}: {e.strerror or e}") from e

    def remove_stale_temporary(self, older_than_s: float) -> int:
        """``.tmp-*`` regular files in the root, the kind folders and the fan-out folders, last
        written more than ``older_than_s`` ago (a write in progress rewrites its file often; a
        killed one never again). Links are neither followed nor removed."""
        cutoff = time.time() - older_than_s
        removed = 0
        try:
            root = self._root(create=False)
        except FileNotFoundError:
            return 0
        try:
            removed += _remove_stale_in(root, cutoff)
            for kind in Kind:
                if kind is Kind.CONFIG:
                    continue
                try:
                    with self._folder((kind.value,), create=False) as folder:
                        removed += _remove_stale_in(folder, cutoff)
                        if kind in FANNED_OUT:
                            for e in folder.entries():
                                if e.is_dir and is_fan_out_folder(e.name):
                                    with self._folder((e.name,), create=False, base=folder) as sub:
                                        removed += _remove_stale_in(sub, cutoff)
                except (FileNotFoundError, Refused):
                    continue  # absent, or a link `strays` reports: nothing of ours behind it
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"cannot remove temporary files in {self.url}: {e.strerror or e}") from e
        return removed

    def exists(self) -> bool:
        try:
            _lstat_regular(self._root(create=False), "config")
        except (FileNotFoundError, Refused):
            return False
        except OSError as e:
            raise StorageError(f"cannot stat {self.url}/config: {e.strerror or e}") from e
        return True

    def is_empty(self) -> bool:
        try:
            if not self._root(create=False).entries():
                return True
            return leaves_room_for_init(_describe(self.root))
        except FileNotFoundError:
            return True
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"cannot list {self.url}: {e.strerror or e}") from e

    def close(self) -> None:
        with self._root_lock:
            if self._finalizer is not None:
                self._finalizer()  # closes the root's descriptor once
            self._root_folder = None
            self._finalizer = None


@dataclass
class _Scan:
    """What a kind's folder holds: (fan-out folder or "", its entries), and the links and
    odd entries found where folders should be."""

    folders: list[tuple[str, list[Entry]]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    odd: list[str] = field(default_factory=list)


def _is_object(kind: Kind, sub: str, e: Entry) -> bool:
    """Whether entry ``e`` of fan-out folder ``sub`` ("" for the kind's folder) is an object."""
    return e.is_file and object_at(kind, f"{sub}/{e.name}" if sub else e.name) is not None


def _is_ignored_entry(e: Entry) -> bool:
    # a dot file that is not a regular file is odd enough to report (a '.tmp-x' link or FIFO)
    return is_ignored(e.name) and (e.is_file or e.is_dir)


def _lstat_regular(folder: Folder, leaf: str) -> os.stat_result:
    st = folder.lstat(leaf)
    if not stat.S_ISREG(st.st_mode):
        raise refused(child_rel(folder.rel, leaf), st)
    return st


def _remove_stale_in(folder: Folder, cutoff: float) -> int:
    removed = 0
    for e in folder.entries():
        if e.is_file and e.name.startswith(TEMP_PREFIX) and e.mtime < cutoff:
            try:
                folder.unlink(e.name)
            except FileNotFoundError:
                continue  # another prune got there first
            removed += 1
    if removed:
        folder.sync()
    return removed


def _describe(root: Path) -> list[tuple[str, bool, list[tuple[str, bool, int]]]]:
    """What ``leaves_room_for_init`` needs to know of a root (read-only; links are not followed)."""
    out = []
    for e in os.scandir(root):
        is_dir = e.is_dir(follow_symlinks=False)
        contents = []
        if is_dir:
            for sub in os.scandir(e.path):
                sub_dir = sub.is_dir(follow_symlinks=False)
                contents.append((sub.name, sub_dir, sum(1 for _ in os.scandir(sub.path)) if sub_dir else 1))
        out.append((e.name, is_dir, contents))
    return out
