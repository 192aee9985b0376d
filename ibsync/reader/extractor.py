"""Writing Manifest.db rows' files below an output folder, one row failing alone.

``plan_extract`` turns the selected rows into one job per output file: a row whose path cannot
name a file below OUT, whose payload is missing, that names a file another row already writes,
or that names a file where other rows need a folder is a failure with its reason, decided
before anything is written, so the outcome does not depend on thread order. ``write_file``
then creates each file below OUT without following a symbolic link: each folder on the way is
opened relative to its parent with O_NOFOLLOW, and the file is written to a temporary name of
its own (never shared by two writers) and renamed into place, replacing a link rather than
writing through it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..model import Node
from .mbfile import ManifestEntry
from .paths import BadName, output_parts

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Job:
    entry: ManifestEntry
    node: Node
    parts: tuple[str, ...]  # (domain, folders..., file name) below OUT


@dataclass(frozen=True)
class Failure:
    path: str  # Domain/relative/path as the row spells it (raw: escape before printing)
    file_id: str
    reason: str


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)


class Refused(OSError):
    """Something in OUT is in the way (a symlink, a file where a folder is needed)."""


def plan_extract(entries: Iterable[ManifestEntry], payload) -> Plan:
    """One job per output file from ``entries`` (in their order: the first row naming a file
    wins, deterministically); ``payload(file_id)`` gives a row's stored node or None."""
    plan = Plan()
    by_parts: dict[tuple[str, ...], Job] = {}
    for e in entries:
        try:
            parts = output_parts(e.domain, e.relative_path)
        except BadName as err:
            plan.failed.append(Failure(e.path, e.file_id, str(err)))
            continue
        first = by_parts.get(parts)
        if first is not None:
            plan.failed.append(
                Failure(
                    e.path,
                    e.file_id,
                    f"another row (fileID {first.entry.file_id}) names the same "
                    f"file and was extracted; this row (fileID {e.file_id}) was not",
                )
            )
            continue
        node = payload(e.file_id)
        if node is None:
            plan.failed.append(
                Failure(
                    e.path, e.file_id, f"the backup holds no payload for it ({e.file_id[:2]}/{e.file_id} is missing)"
                )
            )
            continue
        by_parts[parts] = Job(e, node, parts)
    folders = {job.parts[:i] for job in by_parts.values() for i in range(1, len(job.parts))}
    for parts, job in by_parts.items():
        if parts in folders:  # a file row and rows below it: the folder and its files win
            plan.failed.append(
                Failure(job.entry.path, job.entry.file_id, "other rows need a folder of this name for their files")
            )
        else:
            plan.jobs.append(job)
    return plan


def exists_below(out: str, parts: tuple[str, ...]) -> bool:
    """Whether something (a link included) is already at ``out/parts``; a path the system
    cannot even look up is left for ``write_file`` to report."""
    try:
        os.lstat(os.path.join(out, *parts))
        return True
    except (OSError, ValueError):
        return False


def open_folder(out_fd: int, folders: tuple[str, ...], shown: str) -> int:
    """A descriptor of ``folders`` below the folder ``out_fd``, created as needed, no link
    followed. ``shown`` names OUT in errors."""
    fd = os.dup(out_fd)
    try:
        for i, name in enumerate(folders):
            try:
                os.mkdir(name, 0o777, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise
                where = os.path.join(shown, *folders[: i + 1])
                if stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
                    raise Refused(e.errno, f"{where} is a symlink; not followed") from None
                raise Refused(e.errno, f"{where} is not a folder") from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_file(out_fd: int, shown: str, parts: tuple[str, ...], chunks: Iterable[bytes], mtime: int, advance) -> int:
    """Write ``chunks`` to ``out/parts`` (replacing what is there, a link included, never
    writing through one) with modification time ``mtime``; the number of bytes written.
    Nothing is left behind when it fails."""
    folder = open_folder(out_fd, parts[:-1], shown)
    tmp = f".ibsync-tmp-{secrets.token_hex(8)}"  # unique: two writers never share a temporary name
    try:
        fd = os.open(tmp, _FILE_FLAGS, 0o666, dir_fd=folder)
        written = 0
        try:
            with os.fdopen(fd, "wb", closefd=True) as f:
                for chunk in chunks:
                    f.write(chunk)
                    written += len(chunk)
                    advance(len(chunk))
                f.flush()
                os.utime(f.fileno(), (mtime, mtime))
            os.replace(tmp, parts[-1], src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=folder)
            except OSError:
                pass
            raise
        return written
    finally:
        os.close(folder)
