"""The archiver walks a backup source folder by folder and stores it as a snapshot.

Files go to a small thread pool (reading, CDC, hashing, zstd and AES-GCM all release the GIL).
A folder's tree is written once all its files are stored; folders finish in post-order, so a
folder's sub-trees exist before it is written and memory holds only the folders in flight.
The previous snapshot of the same device serves as the files cache: a file whose size, mtime
and mode match it, and whose blobs are all indexed, is not read again, and a folder
whose entries all match keeps the previous tree without serialising it again.

Tree entries are handled as plain dicts in ``Node.to_dict`` form, built by ``model.file_entry``
and its siblings: the files cache compares and reuses the previous snapshot's entries as they
were decoded, which keeps an unchanged re-import of a million files from building a million
objects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Protocol, TypeGuard

from ..errors import IbsyncError, SourceError
from ..format.chunker import SQLITE_MAGIC
from ..format.pack import BlobType
from ..model import DeviceInfo, Snapshot, Summary, dir_entry, file_entry, symlink_entry
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from ..repo.session import WriteSession
from ..repo.trees import Reuse
from ..source.folder import SourceEntry

# Outstanding tasks handed to workers; bounds memory while keeping both cores fed.
WINDOW = 64
# Small files go to workers in batches: per-task costs (a future, a semaphore, callbacks) held
# the GIL long enough to idle the second core when paid for each of 20,000 files.
BATCH_FILE_MAX = 1 << 20
BATCH_FILES = 32
BATCH_BYTES = 4 << 20
# Sub-folders listed (and their previous trees loaded) ahead of the walk, on their own threads:
# listing is stat() latency, which overlaps well on a cold disk or a network share.
LIST_AHEAD = 4
# A first chunk at least this large that does not compress marks the file as incompressible
# (photo, video, encrypted payload): its other chunks skip zstd.
PROBE_MIN = 128 << 10

Entry = dict[str, Any]


class Source(Protocol):
    @property
    def origin(self) -> dict: ...

    def scan(self, rel: str) -> list[SourceEntry]: ...

    def open_file(self, rel: str): ...

    def measure(self) -> tuple[int, int]: ...

    def root_stat(self) -> tuple[int, int]: ...


@dataclass
class _Dir:
    rel: str
    old_tree: bytes | None  # the parent snapshot's tree of this folder
    old_entries: list[Entry]
    reuse: Reuse = field(default_factory=dict)  # the parent's entries the tree builder may pack again as stored
    entries: list[Entry] = field(default_factory=list)
    pending: list[tuple[Future, list[Entry]]] = field(default_factory=list)  # a batch's task and its files' entries
    subdirs: list[tuple[_Dir, Entry]] = field(default_factory=list)
    tree_id: bytes | None = None

    def ready(self) -> bool:
        """Whether its tree can be written: its files are stored and its sub-folders done."""
        return all(f.done() for f, _ in self.pending) and all(sub.tree_id is not None for sub, _ in self.subdirs)


class Cancelled(IbsyncError):
    pass


def _unchanged(old: Entry | None, e: SourceEntry) -> TypeGuard[Entry]:
    # Size, mtime and mode, not inode or ctime: devices and backup tools write a changed file
    # anew and rename it into place (a new mtime), and a backup folder copied to another drive
    # with its times (cp -a, rsync -a, Finder) keeps matching.
    return (
        old is not None
        and old["type"] == "file"
        and old["size"] == e.size
        and old["mtime_ns"] == e.mtime_ns
        and old["mode"] == e.mode
    )


class Archiver:
    def __init__(
        self, repo: Repository, *, progress: Progress = NULL_PROGRESS, workers: int = 2, force: bool = False
    ) -> None:
        self.repo = repo
        self.progress = progress
        self.workers = workers
        self.force = force
        self.summary = Summary()
        self._lock = threading.Lock()
        self._window = threading.BoundedSemaphore(WINDOW)
        self._queue: list[_Dir] = []  # folders walked, tree not written yet; children before parents
        self._cancelled = False
        self._failed: Future | None = None

    def archive(
        self,
        source: Source,
        *,
        device: DeviceInfo,
        backup_date: datetime | None,
        ios_encrypted: bool,
        snapshot_state: str | None,
        parent: Snapshot | None,
        folder: str = "",
        session: WriteSession | None = None,
        started: float | None = None,
    ) -> tuple[Snapshot, bool]:
        """Store ``source``; returns the snapshot and whether it is new (False when the source
        is exactly the parent snapshot, in which case nothing is written).

        ``session``: a write session the caller opened and closes (capture stores the files
        through it before the walk); by default one of the archiver's own. ``started``: the
        monotonic time the summary's duration counts from (default: now)."""
        started = time.monotonic() if started is None else started
        folder_mode, folder_mtime_ns = source.root_stat()
        if self.progress.active:
            total, files = source.measure()
            self.progress.start(total, files)
        self.source = source
        own = session is None
        session = self.repo.write_session() if session is None else session
        with session if own else nullcontext(session):
            self.session = session
            pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ibsync-ingest")
            self._lister = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ibsync-list")
            try:
                root = self._walk("", parent.tree if parent else None, pool, None)
                self._drain(block=True)
            except BaseException:
                self._cancelled = True
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                self._lister.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True)
            if not own:
                session.flush()  # the snapshot may refer only to indexed blobs
        self.progress.finish()
        assert root.tree_id is not None
        stats = session.stats
        s = self.summary
        s.blobs_added = stats.blobs_added
        s.raw_bytes_added = stats.raw_bytes_added
        s.added_bytes = stats.stored_bytes_added
        s.duration_s = round(time.monotonic() - started, 3)
        snapshot = Snapshot(
            time=datetime.now(UTC),
            tree=root.tree_id,
            device=device,
            backup_date=backup_date,
            ios_encrypted=ios_encrypted,
            source=source.origin,
            folder=folder,
            folder_mode=folder_mode,
            folder_mtime_ns=folder_mtime_ns,
            parent=parent.id if parent else None,
            snapshot_state=snapshot_state or "",
            summary=s,
        )
        if parent is not None and parent.tree == root.tree_id and parent.backup_date == backup_date:
            snapshot.id = parent.id
            return snapshot, False
        self.repo.save_snapshot(snapshot)
        return snapshot, True

    # ---- walking ---------------------------------------------------------------------------

    def _list(self, rel: str, old_tree: bytes | None) -> tuple[list[SourceEntry], bytes | None, list[Entry], Reuse]:
        """A folder's entries, its previous tree's entries and what of them a rebuild reuses."""
        if old_tree is not None and not self.repo.index.has(old_tree):
            old_tree = None  # the previous tree is gone (damaged repository): read everything
        old_entries: list[Entry] = []
        reuse: Reuse = {}
        if old_tree is not None:
            old = self.repo.load_folder(old_tree)
            old_entries, reuse = old.good, old.reuse
            if old.rejected:
                # a crafted or damaged parent: use its good entries for the files cache, but
                # never keep its tree as it is (that would carry the refused entries along)
                old_tree = None
        return self.source.scan(rel), old_tree, old_entries, reuse

    def _walk(self, rel: str, old_tree: bytes | None, pool: ThreadPoolExecutor, listed: Future | None) -> _Dir:
        entries, old_tree, old_entries, reuse = listed.result() if listed is not None else self._list(rel, old_tree)
        d = _Dir(rel, old_tree, old_entries, reuse)
        old_by_name = {o["name"]: o for o in old_entries}
        has_all = self.repo.index.has_all_hex
        folders = []
        for e in entries:
            if e.type == "dir":
                old = old_by_name.get(e.name)
                old_sub = old.get("subtree") if old is not None and old["type"] == "dir" else None
                folders.append((f"{rel}/{e.name}" if rel else e.name, bytes.fromhex(old_sub) if old_sub else None))
        ahead: dict[str, Future] = {}
        next_folder = 0
        batch: list[tuple[str, int]] = []
        batch_entries: list[Entry] = []
        batch_bytes = 0
        # per-file counters stay local (a million attribute updates and progress calls cost
        # more than the files cache's whole comparison): added to the summary per folder
        unchanged = unchanged_bytes = 0
        append = d.entries.append
        prefix = f"{rel}/" if rel else ""
        use_cache = not self.force
        s = self.summary
        for e in entries:
            if self._failed is not None:
                self._failed.result()  # a worker failed: stop walking and raise its error
            old = old_by_name.get(e.name)
            if e.type == "dir":
                while next_folder < len(folders) and len(ahead) < LIST_AHEAD:
                    frel, ftree = folders[next_folder]
                    ahead[frel] = self._lister.submit(self._list, frel, ftree)
                    next_folder += 1
                entry: Entry = dir_entry(e.name, e.mode, e.mtime_ns, None)  # its tree id once it is written
                sub = self._walk(prefix + e.name, None, pool, ahead.pop(prefix + e.name))
                d.subdirs.append((sub, entry))
                s.dirs += 1
            elif e.type == "symlink":
                append(symlink_entry(e.name, e.mode, e.mtime_ns, e.target))
            else:
                if e.content is None and use_cache and _unchanged(old, e) and has_all(old["content"]):
                    append(old)
                    unchanged += 1
                    unchanged_bytes += e.size
                    continue
                s.files += 1
                s.total_bytes += e.size
                if e.content is not None:
                    append(self._stored_entry(rel, e, old))
                    continue
                if old is None:
                    s.files_new += 1
                else:
                    s.files_changed += 1
                entry = file_entry(e.name, e.mode, e.mtime_ns, e.size, None)  # its blob ids once stored
                if e.size > BATCH_FILE_MAX:
                    self._submit(pool, d, [(prefix + e.name, e.size)], [entry])
                    continue
                batch.append((prefix + e.name, e.size))
                batch_entries.append(entry)
                batch_bytes += e.size
                if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                    self._submit(pool, d, batch, batch_entries)
                    batch, batch_entries, batch_bytes = [], [], 0
        if batch:
            self._submit(pool, d, batch, batch_entries)
        s.files += unchanged
        s.total_bytes += unchanged_bytes
        s.files_unmodified += unchanged
        if unchanged:
            self.progress.advance(unchanged_bytes, files=unchanged)
        self._queue.append(d)
        self._drain(block=False)
        return d

    def _stored_entry(self, rel: str, e: SourceEntry, old: Entry | None) -> Entry:
        """The entry of a file whose blobs are already stored (``SourceEntry.content``): listed,
        never read. Same content as the parent's entry: that entry is kept as it was (its mtime
        too), so a folder whose files all came back unchanged keeps its tree."""
        content = e.content
        assert content is not None
        if not self.repo.index.has_all_hex(content):
            raise SourceError(f"{rel}/{e.name}: its data is missing from the repository")
        self.progress.advance(e.size, files=1)
        if old is not None and old["type"] == "file" and old["size"] == e.size and old["content"] == content:
            self.summary.files_unmodified += 1
            return old
        if old is None:
            self.summary.files_new += 1
        else:
            self.summary.files_changed += 1
        return file_entry(e.name, e.mode, e.mtime_ns, e.size, content)

    def _submit(self, pool: ThreadPoolExecutor, d: _Dir, files: list[tuple[str, int]], entries: list[Entry]) -> None:
        self._window.acquire()
        try:
            fut = pool.submit(self._store_files, files)
        except BaseException:
            self._window.release()
            raise
        fut.add_done_callback(self._file_done)
        d.pending.append((fut, entries))

    def _file_done(self, fut: Future) -> None:
        self._window.release()
        if not fut.cancelled() and fut.exception() is not None and self._failed is None:
            self._failed = fut
            self._cancelled = True

    def _drain(self, block: bool) -> None:
        """Write the trees of the folders whose files are stored (all of them with ``block``).

        Any ready folder, not only the oldest: a large file still being stored in one folder
        must not keep every folder walked after it (a next-day import races through unchanged
        folders) in memory with all its entries. Children come before their parents in the
        queue, so one pass finishes a parent whose last child just finished."""
        if block:
            for d in self._queue:
                self._finish_dir(d)
            self._queue = []
            return
        waiting = []
        for d in self._queue:
            if d.ready():
                self._finish_dir(d)
            else:
                waiting.append(d)
        self._queue = waiting

    def _finish_dir(self, d: _Dir) -> None:
        for fut, entries in d.pending:
            try:
                results = fut.result()  # a worker's error is raised here
            except Cancelled:
                # another worker failed first and stopped this one: its error is the one to tell
                # (a full disk, not "cancelled"), whichever folder's files are met first here
                failed = self._failed
                if failed is not None and failed is not fut:
                    failed.result()
                raise
            for entry, ids in zip(entries, results):
                entry["content"] = [c.hex() for c in ids]
                d.entries.append(entry)
        for sub, entry in d.subdirs:
            assert sub.tree_id is not None, "post-order: sub-folders finish first"
            entry["subtree"] = sub.tree_id.hex()
            d.entries.append(entry)
        if d.old_tree is not None and not d.pending and sorted(d.entries, key=_NAME) == d.old_entries:
            d.tree_id = d.old_tree  # nothing changed in this folder: the previous tree stands
        else:
            d.tree_id = self.session.save_tree(d.entries, d.reuse)
        d.pending = d.subdirs = d.entries = d.old_entries = []  # type: ignore[assignment]
        d.reuse = {}

    # ---- storing files (worker threads) ----------------------------------------------------

    def _store_files(self, files: list[tuple[str, int]]) -> list[list[bytes]]:
        """Store a batch of files; each file's blob ids. Files up to BATCH_FILE_MAX are read
        whole in one read, and their blobs (one per file, or a sqlite file's blocks) are stored
        with one ``save_blobs`` for the batch: small files are most of a phone, and their cost
        is what is paid per file and per blob, not per byte."""
        if len(files) == 1 and files[0][1] > BATCH_FILE_MAX:
            return [self._store_file(*files[0])]
        chunker = self.repo.chunker
        whole_max = chunker.policy.default.min_size  # a non-sqlite file up to this is one blob
        out: list[list[bytes]] = []
        batched: list[bytes | memoryview] = []
        spans: list[tuple[int, int, int]] = []  # (file in out, its first blob, after its last) in batched
        total = 0
        for rel, size in files:
            if self._cancelled:
                raise Cancelled("cancelled")
            data = self._read_whole(rel, size)
            if len(data) != size:
                raise SourceError(f"{rel}: changed while being read ({size} bytes listed, {len(data)} read)")
            total += size
            sqlite = data[:16] == SQLITE_MAGIC
            if size > whole_max and not sqlite:
                out.append(self._save_chunks(chunker.split(data))[0])  # CDC: the incompressible probe applies
                continue
            start = len(batched)
            if sqlite:
                batched.extend(chunker.split(data))
            elif size:
                batched.append(data)
            spans.append((len(out), start, len(batched)))
            out.append([])
        if batched:
            ids = self.session.save_blobs(BlobType.DATA, batched)
            for k, start, end in spans:
                out[k] = ids[start:end]
        with self._lock:
            self.summary.bytes_read += total
        self.progress.advance(total, files=len(files))
        return out

    def _read_whole(self, rel: str, size: int) -> bytes:
        """A small file's content in one go (the source's own fast read when it has one)."""
        read_file = getattr(self.source, "read_file", None)
        if read_file is not None:
            return read_file(rel, size)
        with self.source.open_file(rel) as f:
            return f.read()

    def _store_file(self, rel: str, size: int) -> list[bytes]:
        """A large file, streamed chunk by chunk."""
        with self.source.open_file(rel) as f:
            content, read = self._save_chunks(self.repo.chunker.split_file(f, size), progress=True)
        if read != size:
            raise SourceError(f"{rel}: changed while being read ({size} bytes listed, {read} read)")
        with self._lock:
            self.summary.bytes_read += read
        self.progress.advance(files=1)
        return content

    def _save_chunks(self, chunks: Iterable[memoryview], progress: bool = False) -> tuple[list[bytes], int]:
        """Store a file's chunks one by one; their ids and total size. A first chunk of at least
        PROBE_MIN bytes that does not compress (photo, video) spares the others zstd."""
        content: list[bytes] = []
        read = 0
        compress = True
        first = True
        for chunk in chunks:
            if self._cancelled:
                raise Cancelled("cancelled")
            blob_id, new, compressed = self.session.save_blob_ex(BlobType.DATA, chunk, compress=compress)
            if first and new and not compressed and len(chunk) >= PROBE_MIN and bytes(chunk[:16]) != SQLITE_MAGIC:
                compress = False
            first = False
            content.append(blob_id)
            read += len(chunk)
            if progress:
                self.progress.advance(len(chunk))
        return content, read


_NAME = itemgetter("name")
