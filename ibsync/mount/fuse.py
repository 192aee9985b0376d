"""The tree as a read-only FUSE file system (mfusepy over the system's libfuse).

``mount`` runs in the calling (main) thread until the file system is unmounted: by SIGINT,
SIGTERM or SIGHUP, which libfuse catches and answers by leaving its loop and unmounting, or by
``fusermount3 -u`` / ``umount`` from outside. libfuse installs its handlers only where a
signal's handler is the default one, so ``mount`` sets them to the default for its duration.
"""

from __future__ import annotations

import ctypes.util
import errno
import itertools
import logging
import os
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import IbsyncError, NotFound, UserError
from ..ui.text import printable
from .tree import Entry, MountTree, NotADirectory

log = logging.getLogger("ibsync")

INSTALL_HINT = "install fuse3 (Debian/Ubuntu: apt install fuse3; Fedora: dnf install fuse3; macOS: macFUSE)"
# FUSE's own attribute and name caches: a snapshot never changes, so the kernel may keep what
# it was told for a while instead of asking again for every `ls -l`
CACHE_SECONDS = 60
HANDLED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
FUSE_DEVICE = "/dev/fuse"


def load_mfusepy():
    """The mfusepy module, bound to libfuse3 where there is one (mfusepy looks for libfuse 2
    first on Linux). A one-line error when there is no libfuse at all."""
    if (
        sys.platform.startswith("linux")
        and "FUSE_LIBRARY_PATH" not in os.environ
        and "FUSE_LIBRARY_NAME" not in os.environ
        and ctypes.util.find_library("fuse3")
    ):
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # read once, by mfusepy's import below
    try:
        import mfusepy
    except ImportError:
        raise UserError("the mfusepy package is missing: pip install mfusepy") from None
    except (OSError, AttributeError) as e:
        raise UserError(f"libfuse is missing or unusable ({e}): {INSTALL_HINT}") from None
    return mfusepy


def check_mountpoint(mountpoint: Path) -> Path:
    """The mountpoint, checked before libfuse gets it, so that each problem is one line."""
    if sys.platform.startswith("linux") and not os.path.exists(FUSE_DEVICE):
        raise UserError(
            f"{FUSE_DEVICE} does not exist: the fuse kernel module is not loaded (modprobe fuse), or {INSTALL_HINT}"
        )
    if (
        sys.platform.startswith("linux")
        and os.geteuid() != 0
        and not (shutil.which("fusermount3") or shutil.which("fusermount"))
    ):
        raise UserError(f"fusermount3 is missing: {INSTALL_HINT}")
    try:
        st = mountpoint.stat()
    except FileNotFoundError:
        raise UserError(f"mountpoint {printable(mountpoint)} does not exist: create an empty folder first") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UserError(
                f"{printable(mountpoint)} is a mount left behind by a program that ended: "
                f"run 'fusermount3 -u {printable(mountpoint)}' first"
            ) from None
        raise UserError(f"cannot use mountpoint {printable(mountpoint)} ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"mountpoint {printable(mountpoint)} is not a folder")
    try:
        if os.path.ismount(mountpoint):
            next(os.scandir(mountpoint), None)  # a dead FUSE mount answers stat from its cache, not this
            raise UserError(f"{printable(mountpoint)} is already a mountpoint: unmount it or choose another folder")
        if any(os.scandir(mountpoint)):
            raise UserError(f"mountpoint {printable(mountpoint)} is not empty")
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UserError(
                f"{printable(mountpoint)} is a mount left behind by a program that ended: "
                f"run 'fusermount3 -u {printable(mountpoint)}' first"
            ) from None
        raise UserError(f"cannot read mountpoint {printable(mountpoint)} ({e.strerror})") from None
    return mountpoint.resolve()


def _errno_of(e: BaseException) -> int:
    if isinstance(e, NotADirectory):
        return errno.ENOTDIR
    if isinstance(e, NotFound):
        return errno.ENOENT
    if isinstance(e, UserError):
        return errno.EACCES if "password" in str(e) else errno.EINVAL
    return errno.EIO


_KIND_BITS = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}


class _DirCursor:
    """Where the reading of one open folder is: the kernel asks for a folder a buffer at a
    time, each time from the offset of the last entry it took. Going on from where the last
    request stopped reads the folder in a few growing pages; starting over at every request
    would ask the view for a page at a deeper offset each time (quadratic on a million files)."""

    def __init__(self, tree: MountTree, path: str) -> None:
        self._tree = tree
        self._path = path
        self._it: Iterator[Entry] | None = None  # the folder's entries, from child number self._next on
        self._next = 0
        self._last: tuple[int, Entry] | None = None  # given last: the kernel may not have had room for it

    def entries_from(self, start: int):
        if self._last is not None and self._last[0] == start:
            yield self._last
            start += 1
        if self._it is None or self._next != start:
            self._it = self._tree.iter_list(self._path, start=start)
            self._next = start
        try:
            for entry in self._it:  # not "yield from": the iterator outlives this request
                self._last = (self._next, entry)
                self._next += 1
                yield self._last
        except Exception:  # the next request starts over rather than meeting a dead iterator
            self._it = self._last = None
            raise


def make_operations(tree: MountTree, mfusepy):
    """The mfusepy Operations object serving ``tree``."""
    FuseOSError = mfusepy.FuseOSError
    uid, gid = os.getuid(), os.getgid()

    def fail(e: BaseException, what: str, path: str):
        code = _errno_of(e)
        if code != errno.ENOENT:  # a damaged blob, a wrong iOS backup password: say which file
            log.warning(f"{what} {printable(path.lstrip('/'))}: {printable(e)}")
        return FuseOSError(code)

    def attrs(e: Entry) -> dict:
        t = e.mtime * 10**9
        return {
            "st_mode": _KIND_BITS[e.kind] | e.mode,
            "st_nlink": 2 if e.kind == "dir" else 1,
            "st_size": e.size,
            "st_mtime": t,
            "st_ctime": t,
            "st_atime": t,
            "st_uid": uid,
            "st_gid": gid,
            "st_blocks": (e.size + 511) // 512,
            "st_blksize": 128 * 1024,
        }

    class Operations(mfusepy.Operations):
        use_ns = True

        def __init__(self) -> None:
            self._files: dict[int, object] = {}
            self._dirs: dict[int, str] = {}
            self._next = itertools.count(1)
            self._lock = threading.Lock()

        def getattr(self, path, fh=None):
            try:
                entry = tree.stat(path)
            except IbsyncError as e:
                raise fail(e, "cannot look up", path) from None
            if entry is None:
                raise FuseOSError(errno.ENOENT)
            return attrs(entry)

        def readlink(self, path):
            try:
                return tree.readlink(path)
            except IbsyncError as e:
                raise fail(e, "cannot read the link", path) from None

        def opendir(self, path):
            entry = self.getattr(path)
            if not stat.S_ISDIR(entry["st_mode"]):
                raise FuseOSError(errno.ENOTDIR)
            with self._lock:
                fh = next(self._next)
                self._dirs[fh] = _DirCursor(tree, path)
            return fh

        def releasedir(self, path, fh):
            with self._lock:
                self._dirs.pop(fh, None)
            return 0

        def readdir(self, path, fh):  # mfusepy prefers readdir_with_offset; kept for completeness
            return [".", ".."] + [e.name for e in tree.iter_list(path)]

        def readdir_with_offset(self, path, offset, fh):
            """Entries from the kernel's ``offset`` on, each with its own offset (1 and 2 for
            "." and "..", 3 + i for child i): libfuse passes them straight to the kernel, which
            asks again from the last one it took, so a folder is never held whole."""
            cursor = self._dirs.get(fh) or _DirCursor(tree, path)
            if offset < 1:
                yield ".", stat.S_IFDIR, 1
            if offset < 2:
                yield "..", stat.S_IFDIR, 2
            try:
                for i, e in cursor.entries_from(max(offset - 2, 0)):
                    yield e.name, _KIND_BITS[e.kind], 3 + i
            except IbsyncError as err:
                raise fail(err, "cannot list", path) from None

        def open(self, path, flags):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC):
                raise FuseOSError(errno.EROFS)
            try:
                f = tree.open(path)
            except IbsyncError as e:
                raise fail(e, "cannot open", path) from None
            with self._lock:
                fh = next(self._next)
                self._files[fh] = f
            return fh

        def read(self, path, size, offset, fh):
            f = self._files.get(fh)
            if f is None:
                raise FuseOSError(errno.EBADF)
            try:
                return f.read(offset, size)
            except (IbsyncError, OSError, ValueError) as e:
                raise fail(e, "cannot read", path) from None

        def release(self, path, fh):
            with self._lock:
                f = self._files.pop(fh, None)
            if f is not None:
                f.close()
            return 0

        def statfs(self, path):
            return {
                "f_bsize": 4096,
                "f_frsize": 4096,
                "f_blocks": 0,
                "f_bfree": 0,
                "f_bavail": 0,
                "f_files": 0,
                "f_ffree": 0,
                "f_favail": 0,
                "f_namemax": 255,
            }

        def destroy(self, path):
            with self._lock:
                files, self._files = list(self._files.values()), {}
            for f in files:
                f.close()

        # ---- read-only: every change is refused ------------------------------------------

        def _refuse(self, *args, **kwargs):
            raise FuseOSError(errno.EROFS)

        chmod = chown = create = link = mkdir = mknod = rename = rmdir = symlink = _refuse
        truncate = unlink = utimens = write = setxattr = removexattr = fallocate = _refuse

    return Operations()


def mount(tree: MountTree, mountpoint: Path, *, ready=None, debug: bool = False) -> None:
    """Serve ``tree`` at ``mountpoint`` until it is unmounted (see the module docstring).
    ``ready``: called once the mount is there, to tell the user."""
    mfusepy = load_mfusepy()
    ops = make_operations(tree, mfusepy)
    mounted, done = threading.Event(), threading.Event()
    _announce_when_mounted(mountpoint, mounted, done, ready)
    saved = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    for sig in HANDLED_SIGNALS:  # so that libfuse installs its own: they end the loop and unmount
        signal.signal(sig, signal.SIG_DFL)
    try:
        mfusepy.FUSE(
            ops,
            str(mountpoint),
            foreground=True,
            ro=True,
            debug=debug,
            fsname="ibsync",
            subtype="ibsync",
            default_permissions=False,
            attr_timeout=CACHE_SECONDS,
            entry_timeout=CACHE_SECONDS,
            negative_timeout=CACHE_SECONDS,
            kernel_cache=True,
        )
    except RuntimeError as e:
        # libfuse 3's fuse_main fails (8) when its loop was ended by a signal, as asked: once
        # mounted, the end of the loop is the end asked for (it has unmounted)
        if not (mounted.is_set() and not os.path.ismount(mountpoint)):
            raise IbsyncError(f"could not mount at {printable(mountpoint)} (libfuse error {e})") from None
    finally:
        done.set()
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _announce_when_mounted(mountpoint: Path, mounted: threading.Event, done: threading.Event, ready) -> None:
    """Set ``mounted`` and call ``ready`` from a watcher thread once the mountpoint is a
    mountpoint (libfuse's loop runs in the main thread and says nothing when it starts)."""

    def watch() -> None:
        while not done.wait(0.05):
            if os.path.ismount(mountpoint):
                mounted.set()
                if ready is not None:
                    ready()
                return

    # started with the handled signals blocked, so that it never receives one meant for libfuse
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        threading.Thread(target=watch, name="ibsync-mount-ready", daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
