"""Rehydrate a snapshot into a backup folder, byte for byte.

Reads are planned by pack (restic's file restorer): each pack is read once, in ranged reads
spanning the blobs needed from it, and each blob is written to every place that needs it.
Files are created by the worker that first writes to them, and get their mode and time from
the worker that writes their last blob, so no pass over all files runs on one thread. Every
blob is verified against its id; a damaged or missing blob fails exactly the files that use
it, which are removed and named, never left looking valid.
"""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..format.pack import PackedBlob
from ..model import Node, Snapshot
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from .walk import walk

Plan = dict[bytes, dict[bytes, tuple[PackedBlob, list[tuple[int, int]]]]]  # pack -> blob -> (blob, [(file, offset)])


@dataclass
class _File:
    path: str
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
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> reason


def _finish(fd: int, f: _File) -> None:
    os.fchmod(fd, f.mode & 0o7777)
    os.utime(fd, ns=(f.mtime_ns, f.mtime_ns))


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
    dest = target / snapshot.folder_name
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise UserError(f"{dest} exists and is not empty; restore elsewhere or pass --overwrite")
    result = RestoreResult(dest)
    dest.mkdir(parents=True, exist_ok=True)

    files: list[_File] = []
    rels: list[str] = []
    dirs: list[tuple[Path, Node]] = []
    symlinks: list[tuple[Path, Node]] = []
    plan: Plan = {}
    failed: dict[int, str] = {}
    total = 0
    for rel, node in walk(repo, snapshot.tree):
        path = dest / rel
        if node.type == "dir":
            path.mkdir(exist_ok=True)
            dirs.append((path, node))
            continue
        if overwrite and (path.is_symlink() or path.exists()):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if node.type == "symlink":
            symlinks.append((path, node))
            continue
        i = len(files)
        files.append(_File(str(path), node.mode, node.mtime_ns, node.size, len(node.content), len(node.content)))
        rels.append(rel)
        total += node.size
        offset = 0
        for blob_id in node.content:
            loc = repo.index.get(blob_id)
            if loc is None:
                failed[i] = f"blob {blob_id.hex()[:12]} is missing from the repository"
                break
            entry = plan.setdefault(loc.pack_id, {}).get(blob_id)
            if entry is None:
                entry = plan[loc.pack_id][blob_id] = (loc.as_packed(blob_id), [])
            entry[1].append((i, offset))
            offset += loc.raw_length
        else:
            if offset != node.size:
                failed[i] = f"its blobs hold {offset} bytes, the snapshot says {node.size}"

    progress.start(total, len(files))
    lock = threading.Lock()

    def write_whole(i: int, data: bytes) -> None:
        f = files[i]
        fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            _finish(fd, f)
        finally:
            os.close(fd)
        progress.advance(len(data), files=1)

    def write_piece(i: int, offset: int, data: bytes, fds: dict[int, int]) -> None:
        # Blobs of one file may come from packs handled by both workers, in any order: open
        # without truncating and write at the offset; the file reaches its size with its
        # last byte, wherever that lands.
        f = files[i]
        fd = fds.get(i)
        if fd is None:
            fd = fds[i] = os.open(f.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.pwrite(fd, data, offset)
        with lock:
            f.remaining -= 1
            last = f.remaining == 0
        if last:
            _finish(fd, f)
        progress.advance(len(data), files=1 if last else 0)

    def restore_pack(pack_id: bytes, wanted: dict[bytes, tuple[PackedBlob, list[tuple[int, int]]]]) -> None:
        fds: dict[int, int] = {}  # files of several blobs stay open while this pack is read
        try:
            for blob, data, err in repo.read_pack_blobs(pack_id, [b for b, _ in wanted.values()]):
                targets = wanted[blob.id][1]
                if err is not None or data is None:
                    with lock:
                        for i, _ in targets:
                            failed.setdefault(i, f"blob {blob.id.hex()[:12]} in pack {pack_id.hex()[:12]}: {err}")
                    continue
                for i, offset in targets:
                    if i in failed:
                        continue
                    if files[i].blobs == 1:
                        write_whole(i, data)
                    else:
                        write_piece(i, offset, data, fds)
        finally:
            for fd in fds.values():
                os.close(fd)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ibsync-restore") as pool:
        for fut in [pool.submit(restore_pack, pid, wanted) for pid, wanted in plan.items()]:
            fut.result()

    for i, f in enumerate(files):
        if i in failed:
            result.failed[rels[i]] = failed[i]
            if os.path.exists(f.path):
                os.unlink(f.path)
            continue
        if not f.blobs:  # empty files have no blobs to bring them into being
            fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _finish(fd, f)
            finally:
                os.close(fd)
        result.files += 1
        result.bytes += f.size
    for path, node in symlinks:
        os.symlink(node.target or "", path)
        os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
    # Folders last and deepest first: writing into a folder changes its mtime.
    for path, node in reversed(dirs):
        os.chmod(path, node.mode & 0o7777)
        os.utime(path, ns=(node.mtime_ns, node.mtime_ns))
        result.dirs += 1
    if snapshot.folder_mtime_ns:
        os.chmod(dest, snapshot.folder_mode & 0o7777)
        os.utime(dest, ns=(snapshot.folder_mtime_ns, snapshot.folder_mtime_ns))
    progress.finish()
    return result
