"""Rehydrated Manifest.db files kept on this machine, and rebuilt from each other.

A snapshot's Manifest.db is stored as a list of blobs (fixed 32 KiB blocks: sqlite files are cut
that way, design §5). Browsing needs it as one file. Rehydrating it costs a read and a decryption
of every block; a year of daily snapshots of a 1.5 GB database is hundreds of GB. So:

- a rehydrated file is kept in ``<cache dir>/<repository id>/manifests/<key>.db``, its key the
  SHA-256 of its size and blob id list (blob ids are content hashes: equal keys, equal bytes),
  beside ``<key>.ids`` (that list and each blob's length), in a folder only this user can read
  (0700, files 0600);
- a file is built from the blobs of any cached one that it shares (by id, wherever they sit),
  and only the others are read from the repository, a pack range at a time;
- nothing is trusted blindly: every block of a cached file is checked against its id before the
  file is used or copied from (1.5 GB/s of BLAKE3); a block that fails is read again from the
  repository; files are written under a temporary name, flushed and renamed into place, so a
  killed process leaves at most a temporary file (removed after an hour) and never a short file
  under a real name;
- the folder is held to a size (``IBSYNC_MANIFEST_CACHE`` bytes, K/M/G suffixes; default twice
  the largest cached file, so two neighbouring snapshots fit), the least recently used files
  going first; ``IBSYNC_MANIFEST_CACHE=0`` or ``IBSYNC_NO_CACHE=1`` keeps nothing.

The cache holds the stored bytes: for an encrypted iOS backup that is the device's ciphertext,
as safe as the backup folder itself; the decrypted database is never written here (§20).
Two processes may share the folder: names are unique per writer, renames are atomic, and a file
another process is reading is only ever unlinked (the reader keeps its open copy), never changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import struct
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from ..errors import InvalidData, UserError
from ..repo.cache import cache_root
from ..repo.repository import Repository
from .files import read_blobs

LIMIT_ENV = "IBSYNC_MANIFEST_CACHE"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600
_IDS_MAGIC = b"ibsync manifest ids 1\n"
_KEY_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredFile:
    """A stored file as the repository holds it: its blob ids in order, their lengths, its size."""

    ids: tuple[bytes, ...]
    lengths: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, repo: Repository, content: list[bytes], size: int) -> StoredFile:
        """From a file node's blob list (lengths from the index: nothing is read)."""
        stored = cls(tuple(content), tuple(repo.locate(b).raw_length for b in content), size)
        if sum(stored.lengths) != size:
            raise InvalidData(f"Manifest.db: its blobs hold {sum(stored.lengths)} bytes, the snapshot says {size}")
        return stored

    @cached_property
    def key(self) -> str:
        h = hashlib.sha256(b"ibsync manifest v1\0" + self.size.to_bytes(8, "big"))
        for blob_id in self.ids:
            h.update(len(blob_id).to_bytes(1, "big") + blob_id)
        return h.hexdigest()

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out, at = [], 0
        for n in self.lengths:
            out.append(at)
            at += n
        return tuple(out)

    @cached_property
    def block(self) -> int | None:
        """The fixed block length when every blob but the last has it (sqlite's cut), else None."""
        if not self.lengths:
            return None
        first = self.lengths[0]
        if all(n == first for n in self.lengths[:-1]) and self.lengths[-1] <= first:
            return first
        return None

    def encode(self) -> bytes:
        parts = [_IDS_MAGIC, struct.pack(">QI", self.size, len(self.ids))]
        for blob_id, n in zip(self.ids, self.lengths):
            parts.append(struct.pack(">BI", len(blob_id), n) + blob_id)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> StoredFile | None:
        """The list written by ``encode``, None if it does not parse."""
        try:
            if not data.startswith(_IDS_MAGIC):
                return None
            at = len(_IDS_MAGIC)
            size, count = struct.unpack_from(">QI", data, at)
            at += 12
            ids, lengths = [], []
            for _ in range(count):
                n, length = struct.unpack_from(">BI", data, at)
                at += 5
                ids.append(data[at : at + n])
                lengths.append(length)
                at += n
            return cls(tuple(ids), tuple(lengths), size) if at == len(data) else None
        except struct.error:
            return None


@dataclass
class Rehydration:
    """What building files cost: blobs read from the repository and blobs copied locally."""

    blobs_read: int = 0
    bytes_read: int = 0
    blobs_local: int = 0
    bytes_local: int = 0
    files_built: int = 0
    cache_hits: int = 0
    blocks_failed: list[str] = field(default_factory=list)  # cached blocks that did not match

    def add(self, other: Rehydration) -> None:
        for k in ("blobs_read", "bytes_read", "blobs_local", "bytes_local", "files_built", "cache_hits"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.blocks_failed += other.blocks_failed


def write_stored(
    repo: Repository, stored: StoredFile, out_fd: int, bases: list[tuple[BinaryIO, StoredFile]], stats: Rehydration
) -> None:
    """Write ``stored``'s bytes to ``out_fd`` (from offset 0, truncated to its size). A blob found
    in one of ``bases`` (open files holding the stored files given with them) is copied from there
    once its hash matches its id; the others are read from the repository."""
    where: dict[bytes, tuple[BinaryIO, int, int]] = {}
    for f, s in bases:
        for blob_id, off, n in zip(s.ids, s.offsets, s.lengths):
            where.setdefault(blob_id, (f, off, n))
    targets: dict[bytes, list[int]] = {}
    for blob_id, off in zip(stored.ids, stored.offsets):
        targets.setdefault(blob_id, []).append(off)
    missing: list[bytes] = []
    for blob_id, offs in targets.items():
        data = _local_blob(repo, where.get(blob_id), blob_id)
        if data is None:
            missing.append(blob_id)
            continue
        stats.blobs_local += 1
        stats.bytes_local += len(data)
        for off in offs:
            os.pwrite(out_fd, data, off)
    for blob_id, data in read_blobs(repo, missing):
        stats.blobs_read += 1
        stats.bytes_read += len(data)
        for off in targets[blob_id]:
            os.pwrite(out_fd, data, off)
    os.ftruncate(out_fd, stored.size)
    stats.files_built += 1


def _local_blob(repo: Repository, at: tuple[BinaryIO, int, int] | None, blob_id: bytes) -> bytes | None:
    """A blob from a local file, only if it is whole and hashes to its id."""
    if at is None:
        return None
    f, off, n = at
    try:
        data = os.pread(f.fileno(), n, off)
    except OSError:
        return None
    if len(data) != n or repo.blob_id(data) != blob_id:
        return None
    return data


def bad_blocks(repo: Repository, path: Path | str, stored: StoredFile) -> list[int] | None:
    """Indexes of the blocks of a local file that do not hash to their ids; None when the file
    is missing or not of the stored size."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != stored.size:
                return None
            bad = []
            for i, (blob_id, off, n) in enumerate(zip(stored.ids, stored.offsets, stored.lengths)):
                data = os.pread(f.fileno(), n, off)
                if len(data) != n or repo.blob_id(data) != blob_id:
                    bad.append(i)
            return bad
    except OSError:
        return None


def parse_limit(text: str) -> int:
    """``IBSYNC_MANIFEST_CACHE``: bytes, with an optional K, M or G (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[iI]?[bB]?\s*", text)
    if not m:
        raise UserError(f"${LIMIT_ENV} must be a size such as 4G or 500M, not '{text}'")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


class ManifestCache:
    """The folder of rehydrated Manifest.db files of one repository (see the module text)."""

    def __init__(self, folder: Path, limit: int | None = None) -> None:
        self.folder = Path(folder)
        self.limit = limit  # None: twice the largest file
        self.stats = Rehydration()

    @classmethod
    def for_repository(cls, repo: Repository) -> ManifestCache | None:
        """The repository's cache, or None when caching is turned off."""
        if os.environ.get("IBSYNC_NO_CACHE"):
            return None
        text = os.environ.get(LIMIT_ENV)
        limit = parse_limit(text) if text else None
        if limit == 0:
            return None
        return cls(cache_root() / repo.id / "manifests", limit)

    # ---- the folder ------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Create the folder private to this user; tighten it if something loosened it."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = os.stat(self.folder, follow_symlinks=False)
        if not os.path.isdir(self.folder) or os.path.islink(self.folder):
            raise OSError(f"{self.folder} is not a folder")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise OSError(f"{self.folder} belongs to another user")
        if st.st_mode & 0o077:
            os.chmod(self.folder, 0o700)

    def path(self, stored: StoredFile) -> Path:
        return self.folder / f"{stored.key}.db"

    def _ids_path(self, key: str) -> Path:
        return self.folder / f"{key}.ids"

    def new_temp(self) -> tuple[int, Path]:
        """A new private file in the folder (same file system: it can be renamed into place)."""
        self._prepare()
        path = self.folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        return fd, path

    # ---- using and filling it --------------------------------------------------------------

    def open(self, repo: Repository, stored: StoredFile) -> Path:
        """A private link to a verified file holding ``stored``: the cached one, or one built now
        (from what the cache shares with it, the rest from the repository) and cached. The
        caller unlinks the returned path once it has the file open (``release``)."""
        self._prepare()
        final = self.path(stored)
        mine = self._link(final)
        if mine is not None:
            bad = bad_blocks(repo, mine, stored)
            if bad == []:
                self.stats.cache_hits += 1
                touch(final)
                return mine
            self.stats.blocks_failed += [f"{final.name}: block {i}" for i in (bad or [])]
            unlink_quietly(mine)
        fd, tmp = self.new_temp()
        try:
            bases = self._bases(stored)
            try:
                write_stored(repo, stored, fd, [(f, s) for f, s in bases], self.stats)
            finally:
                for f, _ in bases:
                    f.close()
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink_quietly(tmp)
            raise
        os.close(fd)
        mine = self._link(tmp)  # the caller's own name for it, whatever happens to the cache
        if mine is None:
            return tmp  # cannot link or copy: use the new file uncached
        self.store(tmp, stored)
        return mine

    def store(self, tmp: Path, stored: StoredFile) -> None:
        """Rename a complete, flushed private file holding ``stored`` into the cache (the list
        of ids first: a file is only used with it), then hold the cache to its size. Best
        effort: a cache that cannot be written costs only speed."""
        try:
            ids_tmp = self.folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
            fd = os.open(ids_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(stored.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(ids_tmp, self._ids_path(stored.key))
            final = self.path(stored)
            os.replace(tmp, final)
            touch(final)
        except OSError:
            return
        self.evict(keep={stored.key})

    def release(self, path: Path) -> None:
        """Drop the private link ``open`` returned (the open database keeps its data)."""
        if path.name.startswith(TEMP_PREFIX):
            unlink_quietly(path)

    def _link(self, final: Path) -> Path | None:
        """A private hard link to ``final``: the inode checked is the one opened, whatever
        another process renames or evicts meanwhile. Copied where links are not possible."""
        tmp = self.folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        try:
            os.link(final, tmp)
            return tmp
        except FileNotFoundError:
            return None
        except OSError:
            try:
                shutil.copyfile(final, tmp)
                os.chmod(tmp, 0o600)
                return tmp
            except OSError:
                unlink_quietly(tmp)
                return None

    def _bases(self, stored: StoredFile, most: int = 2) -> list[tuple[BinaryIO, StoredFile]]:
        """Up to ``most`` cached files sharing the most blobs with ``stored``, opened."""
        wanted = set(stored.ids)
        scored: list[tuple[int, str, StoredFile]] = []
        for key, other in self._entries():
            common = len(wanted.intersection(other.ids))
            if common:
                scored.append((common, key, other))
        scored.sort(key=lambda t: -t[0])
        out: list[tuple[BinaryIO, StoredFile]] = []
        for _, key, other in scored[:most]:
            try:
                out.append((open(self.folder / f"{key}.db", "rb"), other))
            except OSError:
                continue
        return out

    def _entries(self) -> list[tuple[str, StoredFile]]:
        """Cached files with their id lists; a list that does not match its name is dropped."""
        out: list[tuple[str, StoredFile]] = []
        try:
            names = os.listdir(self.folder)
        except OSError:
            return out
        for name in names:
            key, dot, ext = name.partition(".")
            if ext != "ids" or not _KEY_RE.fullmatch(key):
                continue
            try:
                other = StoredFile.decode(self._ids_path(key).read_bytes())
            except OSError:
                continue
            if other is None or other.key != key:
                unlink_quietly(self._ids_path(key))
                unlink_quietly(self.folder / f"{key}.db")
                continue
            out.append((key, other))
        return out

    def evict(self, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Least recently used files beyond the limit go; so do temporary files left by killed
        processes and files without their id list (or lists without their file)."""
        now = time.time()
        dbs: dict[str, os.stat_result] = {}
        ids: set[str] = set()
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.name.startswith(TEMP_PREFIX):
                if now - st.st_mtime > STALE_TEMP_SECONDS:
                    unlink_quietly(Path(e.path))
                continue
            key, _, ext = e.name.partition(".")
            if ext == "db":
                dbs[key] = st
            elif ext == "ids":
                ids.add(key)
        for key in ids - dbs.keys():
            try:  # a writer may be between its two renames: only old lists are orphans
                if now - os.stat(self._ids_path(key)).st_mtime > STALE_TEMP_SECONDS:
                    unlink_quietly(self._ids_path(key))
            except OSError:
                pass
        for key in dbs.keys() - ids:
            unlink_quietly(self.folder / f"{key}.db")
            del dbs[key]
        limit = self.limit if self.limit is not None else 2 * max((st.st_size for st in dbs.values()), default=0)
        total = sum(st.st_size for st in dbs.values())
        for key in sorted(dbs, key=lambda k: dbs[k].st_mtime):
            if total <= limit:
                break
            if key in keep:
                continue
            unlink_quietly(self.folder / f"{key}.db")
            unlink_quietly(self._ids_path(key))
            total -= dbs[key].st_size


def touch(path: Path) -> None:
    """Mark a cached file as just used (its mtime orders eviction); a file gone meanwhile is fine."""
    try:
        os.utime(path)
    except OSError:
        pass


def unlink_quietly(path: Path) -> None:
    """Remove a cached or temporary file; one already gone (another process evicted it) is fine."""
    try:
        os.unlink(path)
    except OSError:
        pass
