"""Rehydrate a snapshot into a backup folder, byte for byte.

Reads are planned by pack (restic's file restorer): each pack is read once per batch, in ranged
reads spanning the blobs needed from it, and each blob is written to every place that needs it.
Files are planned a batch at a time as the snapshot's trees are walked, so memory is bounded by
the batch, not by the number of files. Files are created by the worker that first writes to
them, and get their mode and time from the worker that writes their last blob. Every blob is
verified against its id; a damaged or missing blob fails exactly the files that use it, which
are removed and named, never left looking valid. Open files stay bounded: each worker keeps at
most a few files and folders open (least recently used closed first) and reopens a file,
without truncating it, when another of its blobs comes.

The restore fills a partial folder, ``target/.<folder>.ibsync-partial/<folder>``, which is
moved to ``target/<folder>`` only when every file is written and verified: an interrupted or
failed restore never leaves anything that looks like a finished backup where a backup goes.
The partial folder records the snapshot it is for; running the same restore again resumes it:
a file whose size, mode and time are the snapshot's was finished by a restore (its time is set
only after its last byte is written and verified), so it is not read again. That holds while
the machine has not restarted since (a kill of the process loses nothing the kernel has); after
a restart such files are verified by hashing their content instead.

Nothing is written outside ``target/<folder>`` and the partial folder, whatever the snapshot or
the target holds. Anyone who can write a snapshot chooses its names, so entries that are not one
path component (or are stored twice in a folder) are refused by name (``walk``). Every file and
folder is reached from a descriptor of the partial folder one component at a time, each opened
with ``O_NOFOLLOW``, and modes and times are set on descriptors, never through a path; what is
in the way in the partial folder (ibsync's own) is replaced, never followed, and so is whatever
``--overwrite`` replaces at ``target/<folder>``. setuid, setgid and sticky bits are never
restored (an iOS payload has none; a restore as root must not mint setuid-root files).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IbsyncError, RepoError, UserError
from ..format.pack import PackedBlob
from ..model import Node, Snapshot, name_problem
from ..platforms import require_folder_writing
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from .walk import REFUSED, walk

log = logging.getLogger("ibsync")

Plan = dict[bytes, dict[bytes, tuple[PackedBlob, list[tuple[int, int]]]]]  # pack -> blob -> (blob, [(file, offset)])

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | _CLOEXEC
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC
PERMISSIONS = 0o777  # what a restore sets of a mode: never setuid, setgid or sticky
DIR_FDS_PER_WORKER = 8  # folders a worker keeps open between files (files of a pack share few)
WRITERS_PER_WORKER = 8  # files of several blobs a worker keeps open (a file's blobs are mostly adjacent in a pack)
PARTIAL_SUFFIX = ".ibsync-partial"
REPLACED_SUFFIX = ".ibsync-replaced"  # what --overwrite replaces, for the instant between two renames
STATE_FILE = "restore.json"  # beside the folder being filled, never inside it (it is not the snapshot's)
STATE_VERSION = 1
NAME_MAX = 255


@dataclass(frozen=True)
class Batching:
    """How many files (and blob references) are planned at once: memory is bounded by this, not
    by the snapshot; larger batches read a pack shared by two batches fewer times."""

    files: int = 8192
    blobs: int = 32768


@dataclass(slots=True)
class _File:
    parent: int  # index of its folder in the restore's folder list (0: the device folder)
    name: str
    rel: str
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
    files_reused: int = 0  # of ``files``: found complete in the partial folder of an interrupted restore
    blobs_read: int = 0  # blobs fetched from the repository (each verified against its id)
    complete: bool = False  # moved into place at ``target``
    partial: Path | None = None  # where the restored files wait when not complete
    replaced: bool = False  # ``target`` was there before (with --overwrite): it is kept until the end


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
        return self.put(index, open_dir(self.root_fd, self.folders[index]))

    def put(self, index: int, fd: int) -> int:
        """Keep ``fd`` (just opened by the caller) as folder ``index``'s."""
        self.open[index] = fd
        if len(self.open) > self.size:
            os.close(self.open.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()


class _Writers:
    """A worker's open files of several blobs, least recently used closed first (restic's
    filesWriter): however many files a pack touches, a worker holds at most ``size``. A file is
    reopened without truncating it: its other blobs may be written already, by either worker."""

    def __init__(self, dirs: _DirFds, size: int = WRITERS_PER_WORKER) -> None:
        self.dirs = dirs
        self.size = size
        self.open: OrderedDict[int, int] = OrderedDict()

    def get(self, i: int, f: _File) -> int:
        fd = self.open.get(i)
        if fd is not None:
            self.open.move_to_end(i)
            return fd
        fd = self.open[i] = os.open(f.name, _FILE_FLAGS, 0o600, dir_fd=self.dirs.get(f.parent))
        if len(self.open) > self.size:
            os.close(self.open.popitem(last=False)[1])
        return fd

    def done(self, i: int) -> None:
        fd = self.open.pop(i, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()


def _finish(fd: int, mode: int, mtime_ns: int) -> None:
    # the time last: it is what tells a resumed restore that the file is complete
    os.fchmod(fd, mode & PERMISSIONS)
    os.utime(fd, ns=(mtime_ns, mtime_ns))


_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_FDS = frozenset({errno.EMFILE, errno.ENFILE})
_STOPPERS = _FULL | _NO_FDS  # every further write would fail too: one line, not one per file


def _why(e: OSError) -> str:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return "a symbolic link or a file is in the way of it in the target"
    return e.strerror or str(e)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(name: str, dir_fd: int) -> None:
    """Remove whatever ``name`` is in the folder ``dir_fd`` (a link itself, never its target)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError):  # Linux says EISDIR for a folder, macOS EPERM
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise
        _make_removable(name, dir_fd)
        shutil.rmtree(name, dir_fd=dir_fd)  # fd-based where it matters: never follows a link


def _make_removable(name: str, dir_fd: int) -> None:
    """Owner rwx on every folder below ``name``: a folder restored read-only (its mode is the
    snapshot's) cannot be emptied otherwise. Reached as rmtree reaches them: no link followed."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return
    try:
        _writable(fd)
        for entry in os.scandir(fd):
            if entry.is_dir(follow_symlinks=False):
                _make_removable(entry.name, fd)
    finally:
        os.close(fd)


def _writable(fd: int) -> None:
    """Owner rwx on an open folder of ours (a failed run may have given it the snapshot's mode)."""
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
        os.fchmod(fd, 0o700)


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


def _hidden_name(name: str, suffix: str) -> str:
    """``.<name><suffix>``, or a digest of ``name`` in its place where that is too long a name."""
    hidden = f".{name}{suffix}"
    if len(hidden.encode("utf-8", "surrogateescape")) <= NAME_MAX:
        return hidden
    return f".{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}{suffix}"


def partial_folder(target: Path, name: str) -> Path:
    """Where a restore of the device folder ``name`` into ``target`` holds its work until done."""
    return target / _hidden_name(name, PARTIAL_SUFFIX)


def check_folder_name(snapshot: Snapshot) -> str:
    """The snapshot's device folder name, refused unless it is one path component: it is the
    first name a restore joins to its target."""
    name = snapshot.folder_name
    problem = name_problem(name)
    if problem:
        raise RepoError(
            f"snapshot {snapshot.short_id}: refusing to restore: its device folder "
            f"'{str(name)[:300]}' is unsafe ({problem})"
        )
    return name


# ---- where the restore goes ------------------------------------------------------------------


def _open_target(target: Path) -> int:
    try:
        target.mkdir(parents=True, exist_ok=True)  # TARGET is the user's: a symlink there is their choice
        return os.open(target, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError as e:
        raise UserError(f"cannot restore into {target}: {e.strerror or e}") from None


def _settle_interrupted_swap(target_fd: int, name: str) -> None:
    """Finish what a restore killed while moving its result into place left: the replaced
    folder is removed once the new one is in place, or put back if the new one is not."""
    replaced = _hidden_name(name, REPLACED_SUFFIX)
    if _lstat(replaced, target_fd) is None:
        return
    if _lstat(name, target_fd) is None:
        os.rename(replaced, name, src_dir_fd=target_fd, dst_dir_fd=target_fd)
    else:
        _remove(replaced, target_fd)


def _check_destination(target_fd: int, dest: Path, name: str, overwrite: bool) -> bool:
    """Whether ``target/name`` exists; refused (before anything is created) if it is not an empty
    folder, unless ``overwrite``: it will be replaced, not written into, and only at the end."""
    st = _lstat(name, target_fd)
    if st is None:
        return False
    if overwrite:
        return True
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(
            f"{dest} exists and is not a folder (a symbolic link or a file); restore elsewhere "
            "or pass --overwrite to replace it"
        )
    fd = os.open(name, _DIR_FLAGS, dir_fd=target_fd)
    try:
        if os.listdir(fd):
            raise UserError(f"{dest} exists and is not empty; restore elsewhere or pass --overwrite")
    finally:
        os.close(fd)
    return True


def _boot_id() -> str | None:
    """Which boot of this machine is running, or None if that cannot be told."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "kern.boottime"], capture_output=True, text=True, timeout=5, check=False
            )
            return out.stdout.strip() or None if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


@dataclass
class _Stage:
    """The partial folder: ``target/.<name>.ibsync-partial`` holds the state file and the folder
    being filled, ``<name>``, which is moved to ``target/<name>`` when complete."""

    target: Path
    target_fd: int
    name: str
    holder: str
    holder_fd: int
    dest_fd: int
    resume: bool  # files found in it may be complete already
    trust_times: bool  # this boot wrote them: size, mode and time prove a file complete
    state: dict

    @property
    def path(self) -> Path:
        return self.target / self.holder / self.name

    def close(self) -> None:
        os.close(self.dest_fd)
        os.close(self.holder_fd)

    def save_state(self) -> None:
        """Write the state file whole or not at all (a kill leaves the old one or the new one)."""
        tmp = STATE_FILE + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | _CLOEXEC, 0o600, dir_fd=self.holder_fd)
        try:
            os.write(fd, json.dumps(self.state).encode())
        finally:
            os.close(fd)
        os.replace(tmp, STATE_FILE, src_dir_fd=self.holder_fd, dst_dir_fd=self.holder_fd)


def _read_state(holder_fd: int) -> dict | None:
    try:
        fd = os.open(STATE_FILE, _READ_FLAGS, dir_fd=holder_fd)
    except OSError:
        return None
    try:
        state = json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else None


def _open_stage(target_fd: int, target: Path, name: str, snapshot: Snapshot) -> _Stage:
    """The partial folder for ``snapshot``: resumed if it is this snapshot's, else started over."""
    holder = _hidden_name(name, PARTIAL_SUFFIX)
    holder_fd = _make_dir(holder, target_fd, overwrite=True)  # ibsync's own name: a link there is replaced
    try:
        _writable(holder_fd)
        state = _read_state(holder_fd)
        found = _lstat(name, holder_fd)
        mine = state is not None and state.get("snapshot") == snapshot.id and state.get("tree") == snapshot.tree.hex()
        resume = mine and found is not None and stat.S_ISDIR(found.st_mode)
        boot = _boot_id()
        if not resume:
            if found is not None:
                other = str(state.get("snapshot", ""))[:8] if state else "unknown"
                log.warning(
                    f"{target / holder} held an interrupted restore of snapshot {other}; "
                    f"starting over with snapshot {snapshot.short_id}"
                )
                _remove(name, holder_fd)
            state = {"version": STATE_VERSION, "snapshot": snapshot.id, "tree": snapshot.tree.hex(), "boot": boot}
        assert state is not None
        trust = resume and boot is not None and state.get("boot") == boot
        stage = _Stage(target, target_fd, name, holder, holder_fd, -1, resume, trust, state)
        # the state file before any file: a folder of files is never there without it
        stage.save_state()
        stage.dest_fd = _make_dir(name, holder_fd, overwrite=True)
        _writable(stage.dest_fd)
        return stage
    except BaseException:
        os.close(holder_fd)
        raise


def _move_into_place(stage: _Stage, snapshot: Snapshot, replacing: bool) -> None:
    """The complete folder to ``target/<name>``; what was there (--overwrite) is kept until then."""
    fd, name = stage.target_fd, stage.name
    replaced = _hidden_name(name, REPLACED_SUFFIX)
    if replacing:
        os.rename(name, replaced, src_dir_fd=fd, dst_dir_fd=fd)
    os.rename(name, name, src_dir_fd=stage.holder_fd, dst_dir_fd=fd)
    if snapshot.folder_mtime_ns:  # on the descriptor, after the move: nothing changes it any more
        _finish(stage.dest_fd, snapshot.folder_mode, snapshot.folder_mtime_ns)
    try:
        if replacing:
            _remove(replaced, fd)
        for leftover in (STATE_FILE, STATE_FILE + ".tmp"):
            _remove(leftover, stage.holder_fd)
        os.rmdir(stage.holder, dir_fd=fd)
    except OSError as e:  # the restore is complete; only ibsync's hidden leftovers remain
        log.warning(f"restored, but could not remove ibsync's leftovers in {stage.target}: {_why(e)}")


def restore_folder(
    repo: Repository,
    snapshot: Snapshot,
    target: Path,
    *,
    progress: Progress = NULL_PROGRESS,
    workers: int = 2,
    overwrite: bool = False,
    batching: Batching = Batching(),
) -> RestoreResult:
    """Write the snapshot's device folder to ``target/<folder name>`` (normally the UDID),
    through the partial folder; with failures it stays there (``result.partial``)."""
    require_folder_writing("restore to a folder")
    name = check_folder_name(snapshot)  # before anything is created
    try:
        repo.load_tree(snapshot.tree)  # the top folder must read, or there is nothing to restore
    except IbsyncError as e:
        raise RepoError(
            f"snapshot {snapshot.short_id}: its top folder cannot be read ({e}); nothing was restored. "
            "'ibsync check' shows what is damaged ('ibsync repair index' rebuilds a damaged index)"
        ) from e
    target_fd = _open_target(target)
    try:
        try:
            _settle_interrupted_swap(target_fd, name)
            replacing = _check_destination(target_fd, target / name, name, overwrite)
            stage = _open_stage(target_fd, target, name, snapshot)
        except OSError as e:
            raise UserError(f"cannot restore into {target / name}: {e.strerror or e}") from None
        try:
            result = _restore_into(repo, snapshot, stage, progress, workers, batching)
            result.replaced = replacing
            if result.failed:
                result.partial = stage.path
                if snapshot.folder_mtime_ns:  # as complete as it can be; a resumed run makes it writable again
                    _finish(stage.dest_fd, snapshot.folder_mode, snapshot.folder_mtime_ns)
                stage.state["boot"] = _boot_id()  # every file there is now verified or written in this boot
                stage.save_state()
            else:
                try:
                    _move_into_place(stage, snapshot, replacing)
                except OSError as e:
                    raise IbsyncError(
                        f"the restore is complete in {stage.path} but could not be moved to {target / name}: {_why(e)}"
                    ) from None
                result.complete = True
            return result
        finally:
            stage.close()
    finally:
        os.close(target_fd)


# ---- planning, a batch at a time ----------------------------------------------------------------


@dataclass
class _Folders:
    """Every folder of the restore (0: the device folder): the path of each from the device
    folder, and its mode and time, set last. Small: a phone's files sit in 256 folders."""

    paths: list[tuple[str, ...]] = field(default_factory=lambda: [()])
    times: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])  # (mode, mtime_ns)

    def add(self, parent: int, node: Node) -> int:
        self.paths.append((*self.paths[parent], node.name))
        self.times.append((node.mode, node.mtime_ns))
        return len(self.paths) - 1


@dataclass
class _Batch:
    files: list[_File] = field(default_factory=list)
    plan: Plan = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # file index -> reason
    symlinks: list[tuple[int, str, Node]] = field(default_factory=list)
    refs: int = 0  # blob references planned

    def full(self, limits: Batching) -> bool:
        return len(self.files) >= limits.files or self.refs >= limits.blobs

    def add_file(self, repo: Repository, parent: int, rel: str, node: Node) -> None:
        i = len(self.files)
        self.files.append(
            _File(parent, node.name, rel, node.mode, node.mtime_ns, node.size, len(node.content), len(node.content))
        )
        self.refs += len(node.content)
        offset = 0
        for blob_id in node.content:
            loc = repo.index.get(blob_id)
            if loc is None:
                self.failed[i] = f"blob {blob_id.hex()[:12]} is missing from the repository"
                return
            entry = self.plan.setdefault(loc.pack_id, {}).get(blob_id)
            if entry is None:
                entry = self.plan[loc.pack_id][blob_id] = (loc.as_packed(blob_id), [])
            entry[1].append((i, offset))
            offset += loc.raw_length
        if offset != node.size:
            self.failed[i] = f"its blobs hold {offset} bytes, the snapshot says {node.size}"


@dataclass
class _Walk:
    """What the walk found that outlives a batch."""

    folders: _Folders = field(default_factory=_Folders)
    refused: dict[str, str] = field(default_factory=dict)  # relative path -> why the snapshot's entry is unusable
    errors: dict[str, str] = field(default_factory=dict)  # relative path -> why a folder or link could not be made

    def reject(self, rel: str, why: str) -> None:
        # refused entries are the snapshot's own doing; an unreadable folder is lost data
        (self.refused if why.startswith(REFUSED) else self.errors)[rel] = why


def _batches(
    repo: Repository,
    snapshot: Snapshot,
    stage: _Stage,
    found: _Walk,
    dirs: _DirFds,
    limits: Batching,
    result: RestoreResult,
    progress: Progress,
) -> Iterator[_Batch]:
    """Walk the snapshot: create its folders (each opened below its parent, no link followed),
    skip the files an interrupted restore completed, clear the way for the others, and plan
    their reads by pack, ``limits`` files at a time."""
    stack: list[tuple[str, int]] = [("", 0)]  # (relative path, folder index) down to the current folder
    skip = None  # a folder that could not be made: its contents are skipped with it
    batch = _Batch()
    for rel, node in walk(repo, snapshot.tree, on_reject=found.reject):
        if skip is not None and rel.startswith(skip):
            continue
        skip = None
        parent = rel.rpartition("/")[0]
        while len(stack) > 1 and stack[-1][0] != parent:
            stack.pop()
        assert stack[-1][0] == parent, (rel, stack[-1][0])  # walk gives each folder before its contents
        parent_index = stack[-1][1]
        try:
            parent_fd = dirs.get(parent_index)
            if node.type == "dir":
                fd = _make_dir(node.name, parent_fd, overwrite=True)  # the partial folder is ibsync's own
                index = found.folders.add(parent_index, node)
                dirs.put(index, fd)
                if stage.resume:
                    _writable(fd)
                stack.append((rel, index))
                continue
            if stage.resume:
                if node.type == "file" and _already_restored(repo, parent_fd, node, stage.trust_times):
                    result.files += 1
                    result.files_reused += 1
                    result.bytes += node.size
                    progress.advance(node.size, files=1)
                    continue
                _remove(node.name, parent_fd)
        except OSError as e:
            found.errors[rel] = f"cannot create it: {_why(e)}"
            skip = rel + "/"
            continue
        if node.type == "symlink":
            batch.symlinks.append((parent_index, node.name, node))
        else:
            batch.add_file(repo, parent_index, rel, node)
            if batch.full(limits):
                yield batch
                batch = _Batch()
    if batch.files or batch.symlinks:
        yield batch


def _already_restored(repo: Repository, parent_fd: int, node: Node, trust_times: bool) -> bool:
    """Whether an interrupted restore completed this file. Restore sets a file's time only
    after its last byte is written and verified, so a regular file with the snapshot's size,
    mode and time (to the nanosecond) is complete; a kill before that leaves the time of the
    last write. Only within the boot that wrote it, though: after a crash of the machine the
    metadata may have reached the disk without the data, so the content is hashed instead."""
    st = _lstat(node.name, parent_fd)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != node.size:
        return False
    if st.st_mtime_ns != node.mtime_ns or stat.S_IMODE(st.st_mode) != node.mode & PERMISSIONS:
        return False
    return trust_times or _content_matches(repo, parent_fd, node)


def _content_matches(repo: Repository, parent_fd: int, node: Node) -> bool:
    """Whether the file holds exactly the node's blobs, each hashed as the repository does."""
    try:
        fd = os.open(node.name, _READ_FLAGS, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        offset = 0
        for blob_id in node.content:
            loc = repo.index.get(blob_id)
            if loc is None:
                return False
            data = os.pread(fd, loc.raw_length, offset)
            if len(data) != loc.raw_length or repo.blob_id(data) != blob_id:
                return False
            offset += loc.raw_length
        return offset == node.size
    finally:
        os.close(fd)


# ---- restoring a batch ---------------------------------------------------------------------------


def _restore_into(
    repo: Repository, snapshot: Snapshot, stage: _Stage, progress: Progress, workers: int, limits: Batching
) -> RestoreResult:
    result = RestoreResult(stage.target / stage.name)
    found = _Walk()
    summary = snapshot.summary  # totals for progress without a pass over the trees first
    progress.start(summary.total_bytes or None, summary.files or None)
    dirs = _DirFds(stage.dest_fd, found.folders.paths)
    try:
        for batch in _batches(repo, snapshot, stage, found, dirs, limits, result, progress):
            _restore_batch(repo, batch, found.folders.paths, stage, workers, progress, result)
            _settle_files(batch, dirs, result)
            _make_symlinks(batch, found.folders.paths, dirs, result)
        _settle_folders(found.folders, stage.dest_fd, result)
    finally:
        dirs.close()
    result.failed.update(found.errors)
    result.failed.update(found.refused)
    result.refused = len(found.refused)
    progress.finish()
    return result


def _restore_batch(
    repo: Repository,
    batch: _Batch,
    folders: list[tuple[str, ...]],
    stage: _Stage,
    workers: int,
    progress: Progress,
    result: RestoreResult,
) -> None:
    files, failed = batch.files, batch.failed
    lock = threading.Lock()
    stopped: list[int] = []  # the errno that stops every further write (a full drive, no descriptors left)
    stop = threading.Event()  # the command was interrupted: leave the rest to the next run
    read = [0]

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

    def write_piece(i: int, offset: int, data: bytes, writers: _Writers) -> None:
        # Blobs of one file may come from packs handled by both workers, in any order: write at
        # the offset; the file reaches its size with its last byte, wherever that lands.
        f = files[i]
        fd = writers.get(i, f)
        os.pwrite(fd, data, offset)
        with lock:
            f.remaining -= 1
            last = f.remaining == 0
        if last:
            _finish(fd, f.mode, f.mtime_ns)
            writers.done(i)
        progress.advance(len(data), files=1 if last else 0)

    def restore_pack(pack_id: bytes, wanted: dict[bytes, tuple[PackedBlob, list[tuple[int, int]]]]) -> None:
        dirs = _DirFds(stage.dest_fd, folders)
        writers = _Writers(dirs)
        n = 0
        try:
            for blob, data, err in repo.read_pack_blobs(pack_id, [b for b, _ in wanted.values()]):
                if stop.is_set():
                    return
                n += 1
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
                            write_piece(i, offset, data, writers)
                    except OSError as e:
                        if e.errno in _STOPPERS:
                            stopped.append(e.errno)
                            stop.set()
                            return
                        fail(i, f"cannot write it: {_why(e)}")
        finally:
            writers.close()
            dirs.close()
            with lock:
                read[0] += n

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ibsync-restore")
    try:
        for fut in [pool.submit(restore_pack, pid, wanted) for pid, wanted in batch.plan.items()]:
            fut.result()
    except BaseException:
        stop.set()  # Ctrl-C or a bug: the workers stop at their next blob; the partial folder stays
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    result.blobs_read += read[0]
    if stopped:
        raise IbsyncError(_stopped_by(stopped[0], stage, workers))


def _stopped_by(code: int, stage: _Stage, workers: int) -> str:
    """One line for what stops every write at once (not one per file), and how to go on."""
    resume = f"run the same restore again: it resumes from {stage.path}"
    if code in _FULL:
        return f"{stage.target / stage.name}: its drive is full (no space left); the restore stopped. Free some space and {resume}"
    need = workers * (WRITERS_PER_WORKER + DIR_FDS_PER_WORKER) + DIR_FDS_PER_WORKER + 16
    return (
        f"too many open files (the limit, 'ulimit -n', is {_fd_limit()}; a restore needs about {need}); "
        f"the restore stopped. Raise the limit and {resume}"
    )


def _fd_limit() -> str:
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return "unknown"


def _settle_files(batch: _Batch, dirs: _DirFds, result: RestoreResult) -> None:
    """Failed files removed and named; empty files (no blob brought them into being) created."""
    for i, f in enumerate(batch.files):
        if i in batch.failed:
            result.failed[f.rel] = batch.failed[i]
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
                result.failed[f.rel] = f"cannot write it: {_why(e)}"
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


def _make_symlinks(batch: _Batch, folders: list[tuple[str, ...]], dirs: _DirFds, result: RestoreResult) -> None:
    for parent, name, node in batch.symlinks:
        try:
            parent_fd = dirs.get(parent)
            os.symlink(node.target or "", name, dir_fd=parent_fd)
            os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
        except OSError as e:
            result.failed["/".join((*folders[parent], name))] = f"cannot create the link: {_why(e)}"


def _settle_folders(folders: _Folders, dest_fd: int, result: RestoreResult) -> None:
    # Folders last and deepest first: writing into a folder changes its mtime. (The device
    # folder's own mode and time are set once it is in place.)
    for index in range(len(folders.paths) - 1, 0, -1):
        mode, mtime_ns = folders.times[index]
        try:
            fd = open_dir(dest_fd, folders.paths[index])
        except OSError as e:
            result.failed["/".join(folders.paths[index])] = f"cannot set its mode and time: {_why(e)}"
            continue
        try:
            _finish(fd, mode, mtime_ns)
        finally:
            os.close(fd)
        result.dirs += 1
