"""A write session: dedup -> compress -> encrypt -> pack -> upload -> index.

Threads call ``save_blob`` concurrently. Each thread fills its own pack, so one file's chunks
stay together and no lock is held while compressing or encrypting. A pack is written to a
staged object as it fills (a temporary file beside the repository's packs, or a local
temporary file for remote storage), so memory does not grow with the pack size; full packs
go to a small uploader pool bounded in flight, which also bounds the local disk used. After every few
uploaded packs an index object is written, so a run killed at any instant keeps all but the
last few packs it uploaded. Leaving the session flushes the open packs, then the index: the
order restic's design calls for (packs, then index, then - by the caller - the snapshot).

``flush`` may run while other threads call ``save_blob`` (capture flushes from the event loop
while its storing thread works): each open pack is handed over under its own lock, so a blob
goes either into a pack that flush ships or into a new one, never into a pack being finished.
Every ``save_blob`` that returned before ``flush`` was called is uploaded and indexed when
``flush`` returns; blobs saved meanwhile go to the next flush.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import IbsyncError, StorageError
from ..format.index import PackIndex
from ..format.pack import BlobType, PackWriter
from ..storage import Kind
from .trees import Reuse

if TYPE_CHECKING:  # the repository makes sessions (Repository.write_session); this module never needs it at run time
    from ..storage.base import Staged
    from .repository import Repository

INDEX_EVERY_PACKS = 8
INDEX_EVERY_SECONDS = 60.0


@dataclass
class SessionStats:
    blobs_added: int = 0
    raw_bytes_added: int = 0
    stored_bytes_added: int = 0  # packs and index objects written
    packs_written: int = 0
    index_objects_written: int = 0


@dataclass(eq=False)
class _OpenPack:
    """A thread's open pack. Its owner adds to it and ``flush`` (or the owner, once it is full)
    takes it, each under ``lock``; once ``shipped`` it takes no more blobs. The lock is the
    owner's alone except at a hand-over, so it costs nothing on the hot path."""

    writer: PackWriter[Staged]
    lock: threading.Lock = field(default_factory=threading.Lock)
    shipped: bool = False

    def take(self) -> bool:
        """Mark it shipped; False if someone already did."""
        with self.lock:
            if self.shipped:
                return False
            self.shipped = True
            return True


class WriteSession:
    def __init__(self, repo: Repository, *, rewrite: bool = False) -> None:
        self.repo = repo
        self.rewrite = rewrite  # store blobs even when indexed (prune moving them to new packs)
        self.stats = SessionStats()
        self._lock = threading.Lock()
        self._pending: set[bytes] = set()  # claimed by a thread, not yet in an uploaded pack
        self._local = threading.local()
        self._open: set[_OpenPack] = set()  # every thread's open pack, for flush
        self._uploader = ThreadPoolExecutor(
            max_workers=max(1, repo.storage.properties.connections), thread_name_prefix="ibsync-upload"
        )
        self._inflight = threading.BoundedSemaphore(repo.storage.properties.connections + 1)
        self._futures: list[Future] = []
        self._unindexed: list[PackIndex] = []
        self._last_index = time.monotonic()
        self._error: BaseException | None = None

    def __enter__(self) -> WriteSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
            else:
                # Interrupted: keep what is already uploaded by indexing it; open packs are dropped.
                self._abort()
        finally:
            self._uploader.shutdown(wait=True, cancel_futures=True)

    # ---- the hot path ----------------------------------------------------------------------

    def _claim(self, blob_id: bytes) -> bool:
        with self._lock:
            if blob_id in self._pending or (not self.rewrite and self.repo.index.has(blob_id)):
                return False
            self._pending.add(blob_id)
            return True

    def _open_pack(self, type: BlobType) -> _OpenPack:
        """This thread's open pack for ``type`` (a new one if flush shipped the last)."""
        packs: dict[BlobType, _OpenPack] | None = getattr(self._local, "packs", None)
        if packs is None:
            packs = self._local.packs = {}
        p = packs.get(type)
        if p is None or p.shipped:
            p = packs[type] = _OpenPack(PackWriter(self.repo.storage.stage(Kind.PACKS)))
            with self._lock:
                self._open.add(p)
        return p

    def save_blob(self, type: BlobType, data: bytes | memoryview, *, compress: bool = True) -> tuple[bytes, bool]:
        """Store a blob unless the repository has it; returns its id and whether it was new."""
        blob_id, new, _ = self.save_blob_ex(type, data, compress=compress)
        return blob_id, new

    def save_blob_ex(
        self, type: BlobType, data: bytes | memoryview, *, compress: bool = True
    ) -> tuple[bytes, bool, bool]:
        """As save_blob, and also whether zstd was used for it."""
        if self._error is not None:
            raise self._error
        blob_id = self.repo.blob_id(data)
        if not self._claim(blob_id):
            return blob_id, False, False
        sealed, compressed = self.repo.encode_blob(blob_id, data, compress)
        self._append(type, [(blob_id, sealed, len(data), compressed)])
        return blob_id, True, compressed

    def save_blobs(self, type: BlobType, chunks: Sequence[bytes | memoryview]) -> list[bytes]:
        """As save_blob for many blobs (compressed when it pays), returning their ids: the
        small-file path, where one lock round per blob cost as much as hashing it. A chunk
        whose id is already stored or claimed (or repeats one earlier in ``chunks``) is not
        stored again."""
        if self._error is not None:
            raise self._error
        blob_id = self.repo.blob_id
        ids = [blob_id(c) for c in chunks]
        has = self.repo.index.has
        new = []
        with self._lock:
            pending = self._pending
            for i, b in enumerate(ids):
                if b in pending or (not self.rewrite and has(b)):
                    continue
                pending.add(b)
                new.append(i)
        if new:
            encode = self.repo.encode_blob
            items = []
            for i in new:
                sealed, compressed = encode(ids[i], chunks[i], True)
                items.append((ids[i], sealed, len(chunks[i]), compressed))
            self._append(type, items)
        return ids

    def _append(self, type: BlobType, items: list[tuple[bytes, tuple[bytes | memoryview, ...], int, bool]]) -> None:
        """Add sealed blobs (id, stored pieces, raw length, compressed) to this thread's pack,
        shipping it whenever it fills."""
        pack_size = self.repo.pack_size
        i = 0
        while i < len(items):
            p = self._open_pack(type)
            with p.lock:
                if p.shipped:
                    continue  # flush took it after we looked it up: the next lookup opens a new one
                writer = p.writer
                while i < len(items):
                    blob_id, sealed, raw_length, compressed = items[i]
                    writer.add(type, blob_id, sealed, raw_length, compressed)
                    i += 1
                    if writer.size >= pack_size:
                        # queued under the lock: a flush that finds this pack taken waits here,
                        # so its wait for uploads includes this one
                        p.shipped = True
                        self._ship(p)
                        break
        with self._lock:
            self.stats.blobs_added += len(items)
            self.stats.raw_bytes_added += sum(item[2] for item in items)

    # ---- packs and index -------------------------------------------------------------------

    def _ship(self, p: _OpenPack) -> None:
        """Upload a pack that was taken (``shipped`` set by whoever took it)."""
        assert p.shipped
        with self._lock:
            self._open.discard(p)
        packer = p.writer
        if not len(packer):
            packer.sink.abort()
            return
        self._inflight.acquire()
        try:
            fut = self._uploader.submit(self._upload, packer)
        except BaseException:
            self._inflight.release()
            raise
        with self._lock:
            self._futures.append(fut)

    def _upload(self, packer: PackWriter[Staged]) -> None:
        try:
            name = packer.finish(self.repo.cipher)
            packer.sink.commit(name)
            pack_id = bytes.fromhex(name)
            self.repo.index.add_pack(pack_id, packer.blobs)
            with self._lock:
                for b in packer.blobs:
                    self._pending.discard(b.id)
                self._unindexed.append(PackIndex(pack_id, packer.blobs))
                self.stats.packs_written += 1
                self.stats.stored_bytes_added += packer.size
                due = len(self._unindexed) >= INDEX_EVERY_PACKS or (
                    time.monotonic() - self._last_index >= INDEX_EVERY_SECONDS
                )
            if due:
                self._write_index()
        except BaseException as e:
            self._error = e if isinstance(e, IbsyncError) else StorageError(f"writing a pack failed: {e}")
            raise
        finally:
            self._inflight.release()

    def _write_index(self) -> None:
        with self._lock:
            packs, self._unindexed = self._unindexed, []
            self._last_index = time.monotonic()
        if not packs:
            return
        _, size = self.repo.save_index(packs)
        with self._lock:
            self.stats.index_objects_written += 1
            self.stats.stored_bytes_added += size

    def _wait_uploads(self) -> None:
        with self._lock:
            futures, self._futures = self._futures, []
        for fut in futures:
            fut.result()

    def flush(self) -> None:
        """Upload every open pack and write the index for everything uploaded: each blob saved
        before this call is then in an uploaded, indexed pack."""
        with self._lock:
            open_packs = list(self._open)
        for p in open_packs:
            if p.take():  # else its owner found it full and has queued its upload
                self._ship(p)
        try:
            self._wait_uploads()
        finally:
            self._write_index()
        if self._error is not None:
            raise self._error

    def _abort(self) -> None:
        """Best effort on the way out of an error: never mask the error that got us here."""
        with self._lock:
            open_packs, self._open = self._open, set()
        for p in open_packs:
            if p.take():
                p.writer.sink.abort()
        for fut in list(self._futures):
            try:
                fut.result()
            except BaseException:
                pass
        try:
            self._write_index()
        except Exception:
            pass  # the packs stay; `check` reports them and prune reclaims them

    # ---- trees -----------------------------------------------------------------------------

    def save_tree(self, entries: list[dict], reuse: Reuse | None = None) -> bytes:
        """Store one folder's tree (entries in ``Node.to_dict`` form, any order) and return its
        id: the id of its top node blob. Every writer of trees calls this (design §10): a
        repository of format version 1 gets a format-1 JSON tree, others format-2 nodes.
        ``reuse`` (what ``Repository.load_folder`` returned for the folder's previous version)
        lets entries that came back unchanged be packed as they were stored: the same tree."""
        built = self.repo.build_tree(entries, reuse)
        for data in built.blobs.values():  # children first: a node is stored after what it names
            self.save_blob(BlobType.TREE, data)
        return built.id
