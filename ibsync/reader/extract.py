"""``extract``: the files of a snapshot matching a pattern, written to OUT/<Domain>/<relative path>.

``extractor.plan_extract`` decides what is written where (and which rows fail) before anything is
written; ``write_jobs`` then writes the jobs on a few threads, each job failing alone and
leaving nothing behind.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IbsyncError, UserError
from ..model import Snapshot
from ..platforms import require_folder_writing
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from ..ui.text import printable
from .extractor import Failure, Job, exists_below, plan_extract, write_file
from .ios_crypto import BackupKeyring
from .manifest import SnapshotManifest
from .manifest_cache import ManifestCache
from .paths import PathPattern

EXTRACT_WORKERS = 4


@dataclass
class Written:
    files: int = 0
    bytes: int = 0
    failed: list[Failure] = field(default_factory=list)  # in the order the failures happened


@dataclass
class ExtractResult:
    snapshot: Snapshot
    pattern: str
    target: Path
    files: int  # written
    bytes: int  # written
    seconds: float  # from the first read to the last write
    failed: list[Failure]  # rows not extracted, by path and file id (unreadable, refused, failed)


def extract(
    repo: Repository,
    snap: Snapshot,
    pattern: str,
    out: Path,
    *,
    keyring: BackupKeyring | None = None,
    cache: ManifestCache | None = None,
    overwrite: bool = False,
    progress: Progress = NULL_PROGRESS,
    workers: int = EXTRACT_WORKERS,
) -> ExtractResult:
    """Write the files of ``snap`` matching ``pattern`` below ``out``. Without ``overwrite``,
    nothing is written when a file to write exists (UserError); a pattern matching no row is a
    UserError; every other problem fails only its own file and is listed in ``failed``."""
    require_folder_writing("extract")
    started = time.monotonic()
    with SnapshotManifest(repo, snap, keyring, cache=cache) as manifest:
        entries = list(manifest.entries(PathPattern(pattern)))
        failed = [Failure(b.path, b.file_id, b.reason) for b in manifest.bad_rows]
        if not entries and not failed:
            raise UserError(f"no file in snapshot {snap.short_id} matches '{printable(pattern)}'")
        plan = plan_extract(entries, manifest.payload)
        failed += plan.failed
        if not overwrite:
            refuse_existing(out, plan.jobs)
        written = write_jobs(manifest, plan.jobs, out, progress, workers)
        failed += written.failed
    elapsed = time.monotonic() - started
    failed.sort(key=lambda f: (f.path, f.file_id))
    return ExtractResult(snap, pattern, out, written.files, written.bytes, elapsed, failed)


def refuse_existing(out: Path, jobs: list[Job]) -> None:
    """Unless overwriting, nothing in OUT is replaced: refuse before writing anything."""
    existing = [job for job in jobs if exists_below(str(out), job.parts)]
    if existing:
        first = out.joinpath(*existing[0].parts)
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{printable(first)} exists{more}; extract elsewhere or pass --overwrite")


def write_jobs(
    manifest: SnapshotManifest,
    jobs: list[Job],
    out: Path,
    progress: Progress = NULL_PROGRESS,
    workers: int = EXTRACT_WORKERS,
) -> Written:
    """Write every job below ``out`` on ``workers`` threads. A job that fails leaves nothing
    behind and costs only itself; an unusable ``out`` is a UserError."""
    done = Written()
    if not jobs:
        return done
    try:
        out.mkdir(parents=True, exist_ok=True)
        out_fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise UserError(f"cannot use {printable(out)} as the output folder ({e.strerror})") from None
    progress.start(sum(job.entry.size for job in jobs), len(jobs))
    lock = threading.Lock()

    def extract_one(job: Job) -> None:
        try:
            n = write_file(
                out_fd, str(out), job.parts, manifest.read(job.entry, job.node), job.entry.mtime, progress.advance
            )
        except (IbsyncError, OSError, ValueError, OverflowError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            with lock:
                done.failed.append(Failure(job.entry.path, job.entry.file_id, reason))
            return
        progress.advance(0, files=1)
        with lock:
            done.files += 1
            done.bytes += n

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ibsync-extract")
    try:
        for fut in [pool.submit(extract_one, job) for job in jobs]:
            fut.result()
    finally:  # on Ctrl-C, files not started are dropped; those under way finish or are removed
        pool.shutdown(wait=True, cancel_futures=True)
        progress.finish()
        os.close(out_fd)
    return done
