"""Rehydrate a snapshot into a backup folder, byte for byte.

Reads are planned by pack (restic's file restorer): each pack is read once, in ranged reads
spanning the blobs needed from it, and each blob is written to every place that needs it.
Files are created by the worker that first writes to them, and get their mode and time from
the worker that writes their last blob, so no pass over all files runs on one thread. Every
blob is verified against its id; a damaged or missing blob fails exactly the files that use
it, which are removed and named, never left looking valid.

Nothing is written outside ``target/<folder>``, whatever the snapshot or the target holds.
Anyone who can write a snapshot chooses its names, so entries that are not one path component
(or are stored twice in a folder) are refused by name (``walk``). And since ``--overwrite``
restores into a folder that may hold symlinks (planted, or restored from an earlier snapshot),
every file and folder is reached from a descriptor of ``target/<folder>`` one component at a
time, each opened with ``O_NOFOLLOW``: a symlink where the snapshot has a folder is replaced,
one where it has a file is replaced before the file is created, and modes and times are set on
descriptors, never through a path. setuid, setgid and sticky bits are never restored (an iOS
payload has none; a restore as root must not mint setuid-root files).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IbsyncError, RepoError, UserError
from ..format.pack import PackedBlob
from ..model import Node, Snapshot, name_problem
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from .walk import REFUSED, walk

Plan = dict[bytes, dict[bytes, tuple[PackedBlob, list[tuple[int, int]]]]]  # pack -> blob -> (blob, [(file, offset)])

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | _CLOEXEC
PERMISSIONS = 0o777  # what a restore sets of a mode: never setuid, setgid or sticky
DIR_FDS_PER_WORKER = 8  # folders a worker keeps open between files (files of a pack share few)


@dataclass
class _File:
    parent: int  # index of its folder in the restore's folder list (0: the device folder)
    name: str
    mode: int
    mtime_ns: int
    size: int
    blobs: int
    remaining: int  # blob writes still to come; the writer that brings it to 0 finishes the file


@dataclass
class RestoreResult:
    target: Path
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> reason (data lost, or refused)
    refused: int = 0  # of ``failed``: entries the snapshot holds that no folder may (unsafe or malformed)


def open_dir(root_fd: int, parts: tuple[str, ...]) -> int:
    """A new descriptor of the folder ``parts`` below ``root_fd``, reached one component at a
    time without following a symlink (ELOOP or ENOTDIR if one is in the way)."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class _DirFds:
    """A worker's few open folders (least recently used closed first), so most files of a
    pack cost one ``openat`` more than a plain open, and the descriptors held stay bounded."""

    def __init__(self, root_fd: int, folders: list[tuple[str, ...]], size: int = DIR_FDS_PER_WORKER) -> None:
        self.root_fd = root_fd
        self.folders = folders
        self.size = size
        self.open: OrderedDict[int, int] = OrderedDict()

    def get(self, index: int) -> int:
        if index == 0:
            return self.root_fd
        fd = self.open.get(index)
        if fd is not None:
            self.open.move_to_end(index)
            return fd
        fd = self.open[index] = open_dir(self.root_fd, self.folders[index])
        if len(self.open) > self.size:
            os.close(self.open.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()


def _finish(fd: int, mode: int, mtime_ns: int) -> None:
    os.fchmod(fd, mode & PERMISSIONS)
    os.utime(fd, ns=(mtime_ns, mtime_ns))


_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _why(e: OSError) -> str:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return "a symbolic link or a file is in the way of it in the target"
    return e.strerror or str(e)


def _remove(name: str, dir_fd: int) -> None:
    """Remove whatever ``name`` is in the folder ``dir_fd`` (a link itself, never its target)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError):  # Linux says EISDIR for a folder, macOS EPERM
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise
        shutil.rmtree(name, dir_fd=dir_fd)  # fd-based where it matters: never follows a link


def _make_dir(name: str, parent_fd: int, overwrite: bool, mode: int = 0o700) -> int:
    """The folder ``name`` in ``parent_fd``, created if missing, opened without following a
    link; with ``overwrite`` a symlink or file of that name is replaced by the folder."""
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
    except FileExistsError:
        if not stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            if not overwrite:
                raise NotADirectoryError(errno.ENOTDIR, "a symbolic link or a file is in the way", name) from None
            _remove(name, parent_fd)
            os.mkdir(name, mode, dir_fd=parent_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def _open_dest(target: Path, name: str, overwrite: bool) -> int:
    """``target/name`` opened; refused if not empty (unless ``overwrite``) or if it is a symlink
    or a file (``overwrite`` replaces it: a link there must not take the restore elsewhere)."""
    dest = target / name
    try:
        target.mkdir(parents=True, exist_ok=True)  # TARGET is the user's: a symlink there is their choice
        target_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError as e:
        raise UserError(f"cannot restore into {target}: {e.strerror or e}") from None
    try:
        try:
            kind = os.stat(name, dir_fd=target_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            kind = None
        if kind is not None and not overwrite:
            if not stat.S_ISDIR(kind):
                raise UserError(f"{dest} exists and is not a folder (a symbolic link or a file); restore elsewhere "
                                "or pass --overwrite to replace it")
            fd = os.open(name, _DIR_FLAGS, dir_fd=target_fd)
            if os.listdir(fd):
                os.close(fd)
                raise UserError(f"{dest} exists and is not empty; restore elsewhere or pass --overwrite")
            return fd
        return _make_dir(name, target_fd, overwrite=True, mode=0o777)  # the umask decides, if the snapshot does not
    except OSError as e:
        raise UserError(f"cannot restore into {dest}: {e.strerror or e}") from None
    finally:
        os.close(target_fd)


def check_folder_name(snapshot: Snapshot) -> str:
    """The snapshot's device folder name, refused unless it is one path component: it is the
    first name a restore joins to its target."""
    name = snapshot.folder_name
    problem = name_problem(name)
    if problem:
        raise RepoError(f"snapshot {snapshot.short_id}: refusing to restore: its device folder "
                        f"'{str(name)[:300]}' is unsafe ({problem})")
    return name


@dataclass
class _Layout:
    """What the walk found: folders (0: the device folder), files, links, and the reads."""

    folders: list[tuple[str, ...]] = field(default_factory=lambda: [()])
    folder_nodes: list[Node | None] = field(default_factory=lambda: [None])
    files: list[_File] = field(default_factory=list)
    rels: list[str] = field(default_factory=list)
    symlinks: list[tuple[int, str, Node]] = field(default_factory=list)
    plan: Plan = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # file index -> reason
    refused: dict[str, str] = field(default_factory=dict)  # relative path -> why the snapshot's entry is unusable
    errors: dict[str, str] = field(default_factory=dict)  # relative path -> why a folder or link could not be made
    total: int = 0


def _lay_out(repo: Repository, snapshot: Snapshot, dest_fd: int, overwrite: bool) -> _Layout:
    """Walk the snapshot: create its folders (each opened below its parent, no link followed),
    clear the way for files and links with ``overwrite``, and plan the reads by pack."""
    lay = _Layout()
    # the open folders down to the current one: (relative path, index, fd); depth-bounded
    stack: list[tuple[str, int, int]] = [("", 0, dest_fd)]
    skip = None  # a folder that could not be made: its contents are skipped with it
    try:
        def reject(rel: str, why: str) -> None:
            # refused entries are the snapshot's own doing; an unreadable folder is lost data
            (lay.refused if why.startswith(REFUSED) else lay.errors)[rel] = why

        for rel, node in walk(repo, snapshot.tree, on_reject=reject):
            if skip is not None and rel.startswith(skip):
                continue
            skip = None
            parent = rel.rpartition("/")[0]
            while len(stack) > 1 and stack[-1][0] != parent:
                os.close(stack.pop()[2])
            assert stack[-1][0] == parent, (rel, stack[-1][0])  # walk gives each folder before its contents
            parent_index, parent_fd = stack[-1][1], stack[-1][2]
            try:
                if node.type == "dir":
                    fd = _make_dir(node.name, parent_fd, overwrite)
                    stack.append((rel, len(lay.folders), fd))
                    lay.folders.append((*lay.folders[parent_index], node.name))
                    lay.folder_nodes.append(node)
                    continue
                if overwrite:
                    _remove(node.name, parent_fd)
            except OSError as e:
                lay.errors[rel] = f"cannot create it: {_why(e)}"
                skip = rel + "/"
                continue
            if node.type == "symlink":
                lay.symlinks.append((parent_index, node.name, node))
            else:
                _plan_file(repo, lay, parent_index, rel, node)
    finally:
        for _, _, fd in stack[1:]:
            os.close(fd)
    return lay


def _plan_file(repo: Repository, lay: _Layout, parent: int, rel: str, node: Node) -> None:
    i = len(lay.files)
    lay.files.append(_File(parent, node.name, node.mode, node.mtime_ns, node.size, len(node.content), len(node.content)))
    lay.rels.append(rel)
    lay.total += node.size
    offset = 0
    for blob_id in node.content:
        loc = repo.index.get(blob_id)
        if loc is None:
            lay.failed[i] = f"blob {blob_id.hex()[:12]} is missing from the repository"
            return
        entry = lay.plan.setdefault(loc.pack_id, {}).get(blob_id)
        if entry is None:
            entry = lay.plan[loc.pack_id][blob_id] = (loc.as_packed(blob_id), [])
        entry[1].append((i, offset))
        offset += loc.raw_length
    if offset != node.size:
        lay.failed[i] = f"its blobs hold {offset} bytes, the snapshot says {node.size}"


def restore_folder(
    repo: Repository,
    snapshot: Snapshot,
    target: Path,
    *,
    progress: Progress = NULL_PROGRESS,
    workers: int = 2,
    overwrite: bool = False,
) -> RestoreResult:
    """Write the snapshot's device folder to ``target/<folder name>`` (normally the UDID)."""
    name = check_folder_name(snapshot)  # before anything is created
    try:
        repo.load_tree(snapshot.tree)  # the top folder must read, or there is nothing to restore
    except IbsyncError as e:
        raise RepoError(
            f"snapshot {snapshot.short_id}: its top folder cannot be read ({e}); nothing was restored. "
            "'ibsync check' shows what is damaged ('ibsync repair index' rebuilds a damaged index)"
        ) from e
    dest_fd = _open_dest(target, name, overwrite)
    try:
        return _restore_into(repo, snapshot, target / name, dest_fd, progress, workers, overwrite)
    finally:
        os.close(dest_fd)


def _restore_into(repo: Repository, snapshot: Snapshot, dest: Path, dest_fd: int, progress: Progress,
                  workers: int, overwrite: bool) -> RestoreResult:
    result = RestoreResult(dest)
    lay = _lay_out(repo, snapshot, dest_fd, overwrite)
    files, failed = lay.files, lay.failed
    progress.start(lay.total, len(files))
    lock = threading.Lock()
    full = threading.Event()  # the target's drive is full: every further write would fail too

    def fail(i: int, why: str) -> None:
        with lock:
            failed.setdefault(i, why)

    def write_whole(i: int, data: bytes, dirs: _DirFds) -> None:
        f = files[i]
        fd = os.open(f.name, _FILE_FLAGS | os.O_TRUNC, 0o600, dir_fd=dirs.get(f.parent))
        try:
            os.write(fd, data)
            _finish(fd, f.mode, f.mtime_ns)
        finally:
            os.close(fd)
        progress.advance(len(data), files=1)

    def write_piece(i: int, offset: int, data: bytes, fds: dict[int, int], dirs: _DirFds) -> None:
        # Blobs of one file may come from packs handled by both workers, in any order: open
        # without truncating and write at the offset; the file reaches its size with its
        # last byte, wherever that lands.
        f = files[i]
        fd = fds.get(i)
        if fd is None:
            fd = fds[i] = os.open(f.name, _FILE_FLAGS, 0o600, dir_fd=dirs.get(f.parent))
        os.pwrite(fd, data, offset)
        with lock:
            f.remaining -= 1
            last = f.remaining == 0
        if last:
            _finish(fd, f.mode, f.mtime_ns)
        progress.advance(len(data), files=1 if last else 0)

    def restore_pack(pack_id: bytes, wanted: dict[bytes, tuple[PackedBlob, list[tuple[int, int]]]]) -> None:
        fds: dict[int, int] = {}  # files of several blobs stay open while this pack is read
        dirs = _DirFds(dest_fd, lay.folders)
        try:
            for blob, data, err in repo.read_pack_blobs(pack_id, [b for b, _ in wanted.values()]):
                if full.is_set():
                    return
                targets = wanted[blob.id][1]
                if err is not None or data is None:
                    for i, _ in targets:
                        fail(i, f"blob {blob.id.hex()[:12]} in pack {pack_id.hex()[:12]}: {err}")
                    continue
                for i, offset in targets:
                    if i in failed:
                        continue
                    try:
                        if files[i].blobs == 1:
                            write_whole(i, data, dirs)
                        else:
                            write_piece(i, offset, data, fds, dirs)
                    except OSError as e:
                        if e.errno in _FULL:
                            full.set()
                            return
                        fail(i, f"cannot write it: {_why(e)}")
        finally:
            for fd in fds.values():
                os.close(fd)
            dirs.close()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ibsync-restore") as pool:
        for fut in [pool.submit(restore_pack, pid, wanted) for pid, wanted in lay.plan.items()]:
            fut.result()
    if full.is_set():
        # one line, not one per file: nothing more can be written until space is freed
        raise IbsyncError(f"{dest}: no space left on its drive; the restore stopped and the folder is "
                          "incomplete. Free some space and run it again with --overwrite")

    dirs = _DirFds(dest_fd, lay.folders)
    try:
        _settle_files(lay, dirs, result)
        _make_symlinks(lay, dirs, result)
        _settle_folders(lay, dest_fd, snapshot, result)
    finally:
        dirs.close()
    result.failed.update(lay.errors)
    result.failed.update(lay.refused)
    result.refused = len(lay.refused)
    progress.finish()
    return result


def _settle_files(lay: _Layout, dirs: _DirFds, result: RestoreResult) -> None:
    """Failed files removed and named; empty files (no blob brought them into being) created."""
    for i, f in enumerate(lay.files):
        if i in lay.failed:
            result.failed[lay.rels[i]] = lay.failed[i]
            _remove_partial(f, dirs)
            continue
        if not f.blobs:
            try:
                fd = os.open(f.name, _FILE_FLAGS | os.O_TRUNC, 0o600, dir_fd=dirs.get(f.parent))
                try:
                    _finish(fd, f.mode, f.mtime_ns)
                finally:
                    os.close(fd)
            except OSError as e:
                result.failed[lay.rels[i]] = f"cannot write it: {_why(e)}"
                continue
        result.files += 1
        result.bytes += f.size


def _remove_partial(f: _File, dirs: _DirFds) -> None:
    """A failed file's partial bytes, never left looking valid (nothing but a regular file is removed)."""
    try:
        parent_fd = dirs.get(f.parent)
        if stat.S_ISREG(os.stat(f.name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            os.unlink(f.name, dir_fd=parent_fd)
    except OSError:
        pass  # never created, or its folder is gone: nothing left to remove


def _make_symlinks(lay: _Layout, dirs: _DirFds, result: RestoreResult) -> None:
    for parent, name, node in lay.symlinks:
        try:
            parent_fd = dirs.get(parent)
            os.symlink(node.target or "", name, dir_fd=parent_fd)
            os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
        except OSError as e:
            result.failed["/".join((*lay.folders[parent], name))] = f"cannot create the link: {_why(e)}"


def _settle_folders(lay: _Layout, dest_fd: int, snapshot: Snapshot, result: RestoreResult) -> None:
    # Folders last and deepest first: writing into a folder changes its mtime.
    for index in range(len(lay.folders) - 1, 0, -1):
        node = lay.folder_nodes[index]
        assert node is not None
        try:
            fd = open_dir(dest_fd, lay.folders[index])
        except OSError as e:
            result.failed["/".join(lay.folders[index])] = f"cannot set its mode and time: {_why(e)}"
            continue
        try:
            _finish(fd, node.mode, node.mtime_ns)
        finally:
            os.close(fd)
        result.dirs += 1
    if snapshot.folder_mtime_ns:
        _finish(dest_fd, snapshot.folder_mode, snapshot.folder_mtime_ns)
