"""Rehydrate a snapshot into a backup folder, byte for byte.

Reads are planned by pack (restic's file restorer): each pack is read once, with one ranged
read spanning the blobs needed from it, and each blob is written to every place that needs it.
Every blob is verified against its id; a damaged or missing blob fails exactly the files that
use it, which are removed and named, never left looking valid.
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


@dataclass
class _File:
    path: Path
    node: Node
    single: bool  # one blob: written whole, no need to create it first


@dataclass
class RestoreResult:
    target: Path
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> reason


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
    dirs: list[tuple[Path, Node]] = []
    symlinks: list[tuple[Path, Node]] = []
    plan: dict[bytes, dict[bytes, tuple[PackedBlob, list[tuple[int, int]]]]] = {}
    failed: dict[int, str] = {}
    total = 0
    for rel, node in walk(repo, snapshot.tree):
        path = dest / rel
        if node.type == "dir":
            path.mkdir(exist_ok=True)
            dirs.append((path, node))
            continue
        if node.type == "symlink":
            symlinks.append((path, node))
            continue
        i = len(files)
        files.append(_File(path, node, len(node.content) == 1))
        total += node.size
        offset = 0
        for blob_id in node.content:
            loc = repo.index.get(blob_id)
            if loc is None:
                failed[i] = f"blob {blob_id.hex()[:12]} is missing from the repository"
                break
            per_pack = plan.setdefault(loc.pack_id, {})
            entry = per_pack.get(blob_id)
            if entry is None:
                entry = per_pack[blob_id] = (loc.as_packed(blob_id), [])
            entry[1].append((i, offset))
            offset += loc.raw_length
        else:
            if offset != node.size:
                failed[i] = f"its blobs hold {offset} bytes, the snapshot says {node.size}"

    progress.start(total, len(files))
    lock = threading.Lock()
    for i, f in enumerate(files):
        if overwrite and (f.path.exists() or f.path.is_symlink()):
            if f.path.is_dir() and not f.path.is_symlink():
                shutil.rmtree(f.path)
            else:
                f.path.unlink()
        if not f.single and i not in failed:
            # Multi-blob files are written piecewise at their offsets: create them at full size.
            with open(f.path, "wb") as fh:
                fh.truncate(f.node.size)
        elif f.node.size == 0:
            open(f.path, "wb").close()

    def restore_pack(pack_id: bytes, wanted: dict[bytes, tuple[PackedBlob, list[tuple[int, int]]]]) -> None:
        blobs = [b for b, _ in wanted.values()]
        for blob, data, err in repo.read_pack_blobs(pack_id, blobs):
            targets = wanted[blob.id][1]
            if err is not None or data is None:
                with lock:
                    for i, _ in targets:
                        failed.setdefault(i, f"blob {blob.id.hex()[:12]} in pack {pack_id.hex()[:12]}: {err}")
                continue
            for i, offset in targets:
                if i in failed:
                    continue
                f = files[i]
                if f.single:
                    with open(f.path, "wb") as fh:
                        fh.write(data)
                else:
                    fd = os.open(f.path, os.O_WRONLY)
                    try:
                        os.pwrite(fd, data, offset)
                    finally:
                        os.close(fd)
                progress.advance(len(data))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ibsync-restore") as pool:
        for fut in [pool.submit(restore_pack, pid, wanted) for pid, wanted in plan.items()]:
            fut.result()

    for i, f in enumerate(files):
        rel = str(f.path.relative_to(dest))
        if i in failed:
            result.failed[rel] = failed[i]
            if f.path.exists():
                f.path.unlink()
            continue
        os.chmod(f.path, f.node.mode & 0o7777)
        os.utime(f.path, ns=(f.node.mtime_ns, f.node.mtime_ns))
        result.files += 1
        result.bytes += f.node.size
        progress.advance(files=1)
    for path, node in symlinks:
        if overwrite and (path.exists() or path.is_symlink()):
            path.unlink()
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
