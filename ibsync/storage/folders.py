"""Folders of a local repository, opened so that nothing below the root is ever a symbolic link.

Whoever can write the repository's drive (a shared NAS mount, an external disk passed around)
could replace ``locks/`` or ``packs/ab`` by a link to the user's documents or to another
repository; a command that lists and deletes objects would then delete those files. So each
folder is opened relative to its parent's descriptor with O_NOFOLLOW (``openat``), and every
object is opened, listed, renamed and unlinked relative to its folder's descriptor: a link
swapped in between two calls cannot redirect anything (restic's and kopia's local backends
trust paths; this is the stricter model of openat-based tools such as rsync's --safe-links).

Where ``dir_fd`` is missing (Windows), ``PathFolder`` checks each component with lstat
instead: the same refusals, with a window between check and use that the descriptor version
does not have.

Objects are regular files only: a FIFO opened for reading blocks until a writer comes, a
device can be endless. Files are opened with O_NONBLOCK|O_NOFOLLOW and fstat'ed before use.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import StorageError

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation

# Windows reparse points (symlinks, junctions) are links too.
_REPARSE_POINT = getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0x400)

# os.open(dir_fd=) on a link with O_NOFOLLOW: ELOOP on Linux and macOS, EMLINK on FreeBSD,
# ENOTDIR for a file where a folder is expected with O_DIRECTORY.
_NOT_A_FOLDER_ERRNOS = frozenset({errno.ELOOP, errno.EMLINK, errno.ENOTDIR})


def choose_fsync(fcntl_module: Any | None) -> Callable[[int], None]:
    """The call that makes a file's bytes reach the disk. On macOS fsync only hands them to the
    drive's cache, which a power cut loses; F_FULLFSYNC flushes that cache too (Go's File.Sync,
    and so restic, does the same). Filesystems that refuse it (SMB mounts) get fsync, as in Go."""
    full = getattr(fcntl_module, "F_FULLFSYNC", None)
    if full is None or fcntl_module is None:  # the second test only tells mypy what the first implies
        return os.fsync

    def full_fsync(fd: int) -> None:
        try:
            fcntl_module.fcntl(fd, full)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.fsync(fd)

    return full_fsync


def _fcntl_module() -> Any | None:
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    return fcntl


sync_file = choose_fsync(_fcntl_module())

# Everything FdFolder needs; Linux, macOS and the BSDs have it all. os.replace is not asked
# for: it is renameat like os.rename, but CPython lists only "rename" in supports_dir_fd, so
# asking for it would make this False everywhere.
DIR_FD_SUPPORTED = {
    os.open,
    os.stat,
    os.mkdir,
    os.unlink,
    os.rename,
    os.link,
} <= os.supports_dir_fd and os.scandir in os.supports_fd


class Refused(StorageError):
    """What is at a path is not what ibsync writes there: a link, or not a regular file/folder."""

    def __init__(self, message: str, *, is_link: bool = False) -> None:
        super().__init__(message)
        self.is_link = is_link


def refused(rel: str, st: os.stat_result) -> Refused:
    return Refused(describe(rel, st), is_link=_is_link(st))


def _is_link(st: os.stat_result) -> bool:
    return stat.S_ISLNK(st.st_mode) or bool(getattr(st, "st_file_attributes", 0) & _REPARSE_POINT)


def describe(rel: str, st: os.stat_result) -> str:
    """Why what is at ``rel`` is refused, in the words of the one-line error."""
    if _is_link(st):
        return f"{rel} is a symbolic link; ibsync never follows links inside a repository (move the real folder or file there)"
    if stat.S_ISDIR(st.st_mode):
        return f"{rel} is a folder where a file should be"
    if stat.S_ISREG(st.st_mode):
        return f"{rel} is a file where a folder should be"
    return f"{rel} is not a regular file (a FIFO, socket or device); ibsync stores only regular files"


@dataclass(frozen=True)
class Entry:
    """One name in a folder, as lstat sees it."""

    name: str
    is_file: bool  # a regular file, not a link to one
    is_dir: bool  # a real folder, not a link to one
    is_link: bool
    size: int
    mtime: float


def _entry(e: os.DirEntry) -> Entry | None:
    try:
        st = e.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None  # deleted between the listing and the stat (another process's lock, say)
    return Entry(e.name, stat.S_ISREG(st.st_mode), stat.S_ISDIR(st.st_mode), _is_link(st), st.st_size, st.st_mtime)


def _entries(it: Iterator[os.DirEntry]) -> list[Entry]:
    return [entry for entry in map(_entry, it) if entry is not None]


class Folder(Protocol):
    rel: str  # for messages: the root's URL, then "/"-joined names

    def sub(self, name: str, *, create: bool) -> Folder:
        """A sub-folder; FileNotFoundError if absent (and not ``create``), Refused if a link or file."""

    def entries(self) -> list[Entry]: ...

    def open_regular(self, name: str) -> int:
        """A read descriptor of a regular file; Refused for anything else, at once."""

    def create_new(self, name: str) -> int:
        """A write descriptor of a new file; FileExistsError if the name is taken."""

    def lstat(self, name: str) -> os.stat_result: ...

    def link(self, src: str, dst: str) -> None: ...

    def move(self, src: str, dest: Folder, dst: str) -> None:
        """Rename ``src`` here to ``dst`` in ``dest``, replacing (atomic on one filesystem)."""

    def unlink(self, name: str) -> None: ...

    def sync(self) -> None:
        """Make the folder's entries durable (after a create, rename or unlink)."""

    def close(self) -> None: ...


def child_rel(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class FdFolder:
    """A folder held by its descriptor; names are resolved relative to it and never through a link."""

    def __init__(self, fd: int, rel: str, owned: bool = True) -> None:
        self.fd = fd
        self.rel = rel
        self._owned = owned  # the root's descriptor belongs to the storage, not to this handle

    @classmethod
    def open_root(cls, path: str, rel: str) -> FdFolder:
        # the root itself may be a link the user chose (/Volumes/X): it was resolved at open
        return cls(os.open(path, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC), rel)

    def _refused(self, name: str) -> Refused:
        return refused(child_rel(self.rel, name), self.lstat(name))

    def sub(self, name: str, *, create: bool) -> FdFolder:
        flags = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
        try:
            return FdFolder(os.open(name, flags, dir_fd=self.fd), child_rel(self.rel, name))
        except FileNotFoundError:
            if not create:
                raise
        except OSError as e:
            if e.errno in _NOT_A_FOLDER_ERRNOS:
                raise self._refused(name) from None
            raise
        try:
            os.mkdir(name, dir_fd=self.fd)
        except FileExistsError:
            pass  # another process or thread made it meanwhile
        else:
            self.sync()
        return self.sub(name, create=False)

    def entries(self) -> list[Entry]:
        with os.scandir(self.fd) as it:
            return _entries(it)

    def open_regular(self, name: str) -> int:
        try:
            fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EOPNOTSUPP):
                raise self._refused(name) from None  # a link, or a socket (ENXIO)
            raise
        return _only_regular(fd, child_rel(self.rel, name))

    def create_new(self, name: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC
        return os.open(name, flags, 0o666, dir_fd=self.fd)

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)

    def move(self, src: str, dest: Folder, dst: str) -> None:
        assert isinstance(dest, FdFolder)
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=dest.fd)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def sync(self) -> None:
        try:
            sync_file(self.fd)
        except OSError:
            pass  # some filesystems (SMB, FAT) refuse to sync a folder; their rename is what we get

    def close(self) -> None:
        if self._owned:
            os.close(self.fd)


class PathFolder:
    """The fallback without ``dir_fd``: a path whose components were each lstat'ed."""

    def __init__(self, path: str, rel: str) -> None:
        self.path = path
        self.rel = rel

    @classmethod
    def open_root(cls, path: str, rel: str) -> PathFolder:
        if not os.path.isdir(path):
            os.stat(path)  # FileNotFoundError for a missing root
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", path)
        return cls(path, rel)

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    def sub(self, name: str, *, create: bool) -> PathFolder:
        try:
            st = self.lstat(name)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(self._p(name))
            except FileExistsError:
                pass
            else:
                self.sync()
            st = self.lstat(name)
        if _is_link(st) or not stat.S_ISDIR(st.st_mode):
            raise refused(child_rel(self.rel, name), st)
        return PathFolder(self._p(name), child_rel(self.rel, name))

    def entries(self) -> list[Entry]:
        with os.scandir(self.path) as it:
            return _entries(it)

    def open_regular(self, name: str) -> int:
        st = self.lstat(name)
        if not stat.S_ISREG(st.st_mode) or _is_link(st):
            raise refused(child_rel(self.rel, name), st)
        fd = os.open(self._p(name), os.O_RDONLY | O_BINARY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        return _only_regular(fd, child_rel(self.rel, name))

    def create_new(self, name: str) -> int:
        return os.open(self._p(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY | O_NOFOLLOW | O_CLOEXEC, 0o666)

    def lstat(self, name: str) -> os.stat_result:
        return os.lstat(self._p(name))

    def link(self, src: str, dst: str) -> None:
        os.link(self._p(src), self._p(dst))

    def move(self, src: str, dest: Folder, dst: str) -> None:
        assert isinstance(dest, PathFolder)
        os.replace(self._p(src), dest._p(dst))

    def unlink(self, name: str) -> None:
        os.unlink(self._p(name))

    def sync(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | O_DIRECTORY)
        except OSError:
            return  # Windows cannot open a folder; NTFS journals its renames
        try:
            sync_file(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


def _only_regular(fd: int, rel: str) -> int:
    """``fd`` if it is a regular file, else close it and refuse (a FIFO opened non-blocking)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise refused(rel, st)
    return fd
