"""The archiver walks a backup source folder by folder and stores it as a snapshot.

Files go to a small thread pool (reading, CDC, hashing, zstd and AES-GCM all release the GIL).
A folder's tree is written once all its files are stored; folders finish in post-order, so a
folder's sub-trees exist before it is written and memory holds only the folders in flight.
The previous snapshot of the same device serves as the files cache: a file whose size, mtime,
ctime and inode match it, and whose blobs are all indexed, is not read again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Protocol

from ..errors import IbsyncError, SourceError
from ..format.chunker import SQLITE_MAGIC
from ..format.pack import BlobType
from ..model import DeviceInfo, Node, Snapshot, Summary, encode_tree
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from ..source.folder import SourceEntry

# Outstanding files handed to workers; bounds memory while keeping both cores fed.
WINDOW = 256
# A first chunk at least this large that does not compress marks the file as incompressible
# (photo, video, encrypted payload): its other chunks skip zstd.
PROBE_MIN = 128 << 10


class Source(Protocol):
    origin: dict

    def scan(self, rel: str) -> list[SourceEntry]: ...

    def open_file(self, rel: str): ...

    def measure(self) -> tuple[int, int]: ...


@dataclass
class _Dir:
    rel: str
    nodes: list[Node] = field(default_factory=list)
    pending: list[tuple[Node, Future]] = field(default_factory=list)
    subdirs: list[tuple["_Dir", Node]] = field(default_factory=list)
    tree_id: bytes | None = None


class Cancelled(IbsyncError):
    pass


def _unchanged(old: Node | None, e: SourceEntry) -> bool:
    return (
        old is not None
        and old.type == "file"
        and old.size == e.size
        and old.mtime_ns == e.mtime_ns
        and old.ctime_ns == e.ctime_ns
        and old.inode == e.inode
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
        self._queue: deque[_Dir] = deque()
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
    ) -> tuple[Snapshot, bool]:
        """Store ``source``; returns the snapshot and whether it is new (False when the source
        is exactly the parent snapshot, in which case nothing is written)."""
        started = time.monotonic()
        if getattr(self.progress, "active", False):
            total, files = source.measure()
            self.progress.start(total, files)
        self.source = source
        session = self.repo.write_session()
        with session:
            self.session = session
            pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ibsync-ingest")
            try:
                root = self._walk("", parent.tree if parent else None, pool)
                self._drain(block=True)
            except BaseException:
                self._cancelled = True
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
        self.progress.finish()
        assert root.tree_id is not None
        stats = session.stats
        s = self.summary
        s.blobs_added = stats.blobs_added
        s.raw_bytes_added = stats.raw_bytes_added
        s.added_bytes = stats.stored_bytes_added
        s.duration_s = round(time.monotonic() - started, 3)
        snapshot = Snapshot(
            time=datetime.now(timezone.utc),
            tree=root.tree_id,
            device=device,
            backup_date=backup_date,
            ios_encrypted=ios_encrypted,
            source=source.origin,
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

    def _walk(self, rel: str, parent_tree: bytes | None, pool: ThreadPoolExecutor) -> _Dir:
        d = _Dir(rel)
        old_nodes = {n.name: n for n in self.repo.load_tree(parent_tree)} if parent_tree else {}
        for e in self.source.scan(rel):
            if self._failed is not None:
                self._failed.result()  # a worker failed: stop walking and raise its error
            child = f"{rel}/{e.name}" if rel else e.name
            old = old_nodes.get(e.name)
            if e.type == "dir":
                node = Node(e.name, "dir", e.mode, e.mtime_ns)
                sub = self._walk(child, old.subtree if old is not None and old.type == "dir" else None, pool)
                d.subdirs.append((sub, node))
                self.summary.dirs += 1
            elif e.type == "symlink":
                d.nodes.append(Node(e.name, "symlink", e.mode, e.mtime_ns, target=e.target))
            else:
                self.summary.files += 1
                self.summary.total_bytes += e.size
                node = Node(e.name, "file", e.mode, e.mtime_ns, e.size, e.inode, e.ctime_ns)
                if not self.force and _unchanged(old, e) and all(self.repo.index.has(c) for c in old.content):
                    node.content = old.content
                    d.nodes.append(node)
                    self.summary.files_unmodified += 1
                    self.progress.advance(e.size, files=1)
                    continue
                if old is None:
                    self.summary.files_new += 1
                else:
                    self.summary.files_changed += 1
                self._window.acquire()
                try:
                    fut = pool.submit(self._store_file, child, node)
                except BaseException:
                    self._window.release()
                    raise
                fut.add_done_callback(self._file_done)
                d.pending.append((node, fut))
        self._queue.append(d)
        self._drain(block=False)
        return d

    def _file_done(self, fut: Future) -> None:
        self._window.release()
        if not fut.cancelled() and fut.exception() is not None and self._failed is None:
            self._failed = fut
            self._cancelled = True

    def _drain(self, block: bool) -> None:
        while self._queue:
            d = self._queue[0]
            if not block and not all(f.done() for _, f in d.pending):
                return
            self._finish_dir(self._queue.popleft())

    def _finish_dir(self, d: _Dir) -> None:
        for node, fut in d.pending:
            node.content = fut.result()  # re-raises a worker's error here, in the main thread
            d.nodes.append(node)
        for sub, node in d.subdirs:
            assert sub.tree_id is not None, "post-order: sub-folders finish first"
            node.subtree = sub.tree_id
            d.nodes.append(node)
        d.tree_id, _ = self.session.save_blob(BlobType.TREE, encode_tree(d.nodes))
        d.pending = d.subdirs = d.nodes = []  # type: ignore[assignment]

    # ---- storing a file (worker threads) ---------------------------------------------------

    def _store_file(self, rel: str, node: Node) -> list[bytes]:
        content: list[bytes] = []
        read = 0
        compress = True
        with self.source.open_file(rel) as f:
            chunks = self.repo.chunker.split_file(f, node.size)
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
                self.progress.advance(len(chunk))
        if read != node.size:
            raise SourceError(f"{rel}: changed while being read ({node.size} bytes listed, {read} read)")
        with self._lock:
            self.summary.bytes_read += read
        self.progress.advance(files=1)
        return content
