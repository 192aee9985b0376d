"""The backup folder a device sees during one capture, kept as an overlay on a snapshot.

mobilebackup2 has the host keep a backup folder (``<UDID>/Info.plist``, ``Manifest.db``,
``xx/<fileID>``, ...) that the device reads, lists, writes, moves and deletes in. Here there is
no such folder on disk: the folder starts as the previous snapshot of the device (or empty, for
a full backup) and every change of this session is an entry in an overlay:

* each folder is a :class:`VDir`: the previous snapshot's tree it starts as (``base``, loaded
  only when something looks inside it) plus ``changes`` (name -> new folder, new file entry,
  or ``None`` for removed). A phone has ~1M files in ~256 ``xx`` folders; an incremental
  backup touches a few of them, and nothing but the changes is held in memory;
* files are tree entries (``Node.to_dict`` form) whose ``content`` lists blob ids already in
  the repository: moving, copying or removing one never touches its bytes. Entries are never
  changed in place (a rename makes a new dict), so copies may share them;
* a file received in this session is held as one packed record (:data:`Record`: mtime, size
  and its raw 32-byte blob ids; the name is the key it is held under), turned into the entry
  form only when something reads it (a listing, ``file``, the archiver's scan of its folder).
  A full backup of a phone holds one per file until the snapshot is written: measured at
  20,000 files, the entry dict with its hex ids cost about 700 bytes a file, the record and
  its slot about 230. A name that is a fileID (40 lowercase hex digits, as nearly all of
  them are) is held as its 20 raw bytes (:func:`_key`; 64 bytes of memory instead of 96).

Reading a file's bytes (the device downloads the previous ``Status.plist``, ``Manifest.plist``
and ``Manifest.db``) streams its blobs from the repository.

:meth:`VirtualTree.source` gives the device folder as the archiver's ``Source``, so the same
Archiver that imports folders writes the snapshot: its files carry their blob ids
(``SourceEntry.content``) and are never read.

Paths are plain ``/``-separated strings relative to the backup root, as the device sends them
(``<UDID>/Snapshot/3d/3d0d7e...``); they are split, not resolved: nothing here touches the
local filesystem, so the only check needed is that no component is empty, ``.`` or ``..``.
The snapshot's own entries are held to the rule every reader applies (``model.split_entries``):
one whose name is not one path component, or that shares its name, is not part of the folder.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from ..model import Node, file_entry, split_entries
from ..reader.files import read_file
from ..repo import trees
from ..repo.repository import Repository
from ..source.folder import SourceEntry

Entry = dict[str, Any]  # a file or symlink, or a folder of the base tree, in tree-entry form
Record = bytes  # a file received in this session: _RECORD (mtime_ns, size), then its raw blob ids
_RECORD = struct.Struct("<qQ")
ID_SIZE = 32

DIR_MODE = 0o040755
FILE_MODE = 0o100644
# Base trees kept decoded for lookups (a device's moves and removals hit the same xx folders)
BASE_CACHE = 16
DIR_CACHE = 4096  # overlay folders remembered by path (a backup uses about 520: xx and Snapshot/xx)
_BAD_PARTS = frozenset({"", ".", ".."})


class VTreeError(OSError):
    """A path the device named does not work in the backup folder (errno as a filesystem
    would set it, so DeviceLink answers can map it to the device's error codes)."""

    def __init__(self, code: int, path: str) -> None:
        super().__init__(code, os.strerror(code), path)


@dataclass(eq=False)
class VDir:
    """A folder: a base tree (None: started empty) with this session's changes over it."""

    mode: int
    mtime_ns: int
    base: bytes | None = None
    # keyed by _key(name): go through get/put/pop/named_changes, never by a name directly
    changes: dict[str | bytes, VDir | Entry | Record | None] = field(default_factory=dict)

    def copy(self) -> VDir:
        return VDir(
            self.mode,
            self.mtime_ns,
            self.base,
            {k: v.copy() if isinstance(v, VDir) else v for k, v in self.changes.items()},
        )

    def get(self, name: str, default: Any = None) -> Any:
        return self.changes.get(_key(name), default)

    def put(self, name: str, node: VDir | Entry | Record | None) -> None:
        self.changes[_key(name)] = node

    def pop(self, name: str) -> None:
        self.changes.pop(_key(name), None)

    def named_changes(self) -> Iterator[tuple[str, VDir | Entry | Record | None]]:
        for k, node in self.changes.items():
            yield (k if isinstance(k, str) else k.hex()), node


def _key(name: str) -> str | bytes:
    """How a folder holds ``name``: a fileID (40 lowercase hex digits) as its 20 bytes, which
    ``hex()`` gives back exactly; any other name as it is."""
    if len(name) == 40:
        try:
            raw = bytes.fromhex(name)
        except ValueError:
            return name
        if raw.hex() == name:  # not upper case, no spaces (fromhex skips them)
            return raw
    return name


def _split(path: str) -> list[str]:
    parts = path.rstrip("/").split("/")
    for p in parts:
        if p in _BAD_PARTS or "\0" in p or "\\" in p:
            raise VTreeError(errno.EINVAL, path)
    return parts


def pack_record(mtime_ns: int, size: int, ids: bytes) -> Record:
    return _RECORD.pack(mtime_ns, size) + ids


def entry_of_record(name: str, record: Record) -> Entry:
    """The tree entry a received file's record stands for."""
    mtime_ns, size = _RECORD.unpack_from(record)
    ids = memoryview(record)[_RECORD.size :]
    return file_entry(
        name, FILE_MODE, mtime_ns, size, [ids[i : i + ID_SIZE].hex() for i in range(0, len(ids), ID_SIZE)]
    )


def raw_ids(content: bytes | list[str]) -> bytes:
    """Blob ids as one string of raw 32-byte ids (from a list of hex ids, as trees hold them)."""
    if isinstance(content, bytes):
        if len(content) % ID_SIZE:
            raise ValueError(f"blob ids of {len(content)} bytes, not a multiple of {ID_SIZE}")
        return content
    ids = b"".join(bytes.fromhex(h) for h in content)
    if len(ids) != ID_SIZE * len(content):
        raise ValueError("a blob id that is not 32 bytes")
    return ids


def _entry(name: str, node: Entry | Record) -> Entry:
    return entry_of_record(name, node) if isinstance(node, bytes) else node


def _dir_of_entry(e: Entry) -> VDir:
    sub = e.get("subtree")
    return VDir(e["mode"], e["mtime_ns"], bytes.fromhex(sub) if sub else None)


class VirtualTree:
    """The backup root: one folder per device (``folder``), as the device addresses it."""

    def __init__(
        self,
        repo: Repository,
        folder: str,
        base: bytes | None,
        *,
        before_read: Callable[[], None] | None = None,
        clock: Callable[[], int] = time.time_ns,
        lookups: bool = False,
    ) -> None:
        """``base``: the root tree of the snapshot the device folder starts as (None: empty).
        ``before_read`` is called before reading blobs that are not indexed yet (written in
        this session: the session must flush its open packs first). ``lookups``: find an entry
        below the device folder with ``trees.lookup`` (the nodes on its path) unless its folder
        is decoded already: a restore asks for every file once, in Manifest.db order, which
        jumps between the 256 fileID folders, and decoding a whole folder per file (the cache
        holds BASE_CACHE of them) cost time in proportion to files x folder size. The caller
        must have refused a snapshot with unusable entries first (restore does)."""
        self.repo = repo
        self._lookups = lookups
        self.folder = folder
        self._clock = clock
        self._before_read = before_read
        now = clock()
        self._root = VDir(DIR_MODE, now, None, {_key(folder): VDir(DIR_MODE, now, base)})
        self._bases: OrderedDict[bytes, dict[str, Entry]] = OrderedDict()
        self._bases_lock = threading.Lock()
        # Folders of the overlay by path, for the one-file-at-a-time traffic of a backup (a put
        # into Snapshot/xx, then a move into xx, per file). Every ancestor of a folder held here
        # is itself in the overlay, so only replacing or removing an overlay folder can make an
        # entry stale: _set clears the cache when that happens.
        self._dirs: dict[str, VDir] = {}

    @property
    def device(self) -> VDir:
        """The device folder (the device could remove and recreate it: looked up each time)."""
        node = self._root.get(self.folder)
        if not isinstance(node, VDir):
            raise VTreeError(errno.ENOENT, self.folder)
        return node

    # ---- looking up ------------------------------------------------------------------------

    def _base_entries(self, tree_id: bytes) -> dict[str, Entry]:
        with self._bases_lock:
            found = self._bases.get(tree_id)
            if found is not None:
                self._bases.move_to_end(tree_id)
                return found
        found = self._usable_entries(tree_id)
        with self._bases_lock:
            self._bases[tree_id] = found
            if len(self._bases) > BASE_CACHE:
                self._bases.popitem(last=False)
        return found

    def _usable_entries(self, tree_id: bytes) -> dict[str, Entry]:
        # Entries no folder may hold (unsafe or twice-stored names, malformed fields) are never
        # listed, served or carried into a new snapshot: restore() refuses a snapshot holding
        # any before the device asks, and a capture over such a base simply leaves them out.
        good, _ = split_entries(self.repo.load_tree_entries(tree_id))
        return {e["name"]: e for e in good}

    def _child(self, d: VDir, name: str) -> VDir | Entry | None:
        node = self._node(d, name)
        return entry_of_record(name, node) if isinstance(node, bytes) else node

    def _node(self, d: VDir, name: str) -> VDir | Entry | Record | None:
        """What ``d`` holds under ``name``, a received file as its record."""
        node = d.get(name, d)  # d: not changed in this session
        if node is not d:
            return node
        if d.base is None:
            return None
        if self._lookups and d is not self._root and d is not self._root.get(self.folder):
            with self._bases_lock:
                found = self._bases.get(d.base)
            if found is None:
                return trees.lookup(self.repo, d.base, name)
            return found.get(name)
        return self._base_entries(d.base).get(name)

    def _lookup(self, parts: list[str], path: str) -> VDir | Entry:
        """The node at ``parts`` (folders of the base come back as transient VDirs)."""
        node: VDir | Entry = self._root
        for name in parts:
            if not isinstance(node, VDir):
                raise VTreeError(errno.ENOTDIR, path)
            child = self._child(node, name)
            if child is None:
                raise VTreeError(errno.ENOENT, path)
            node = _dir_of_entry(child) if not isinstance(child, VDir) and child["type"] == "dir" else child
        return node

    def _writable_dir(self, parts: list[str], path: str, *, create: bool) -> VDir:
        """The folder at ``parts``, made part of the overlay (so changes inside it stick);
        missing folders are created when ``create`` (mkdir -p), else ENOENT."""
        d = self._root
        for name in parts:
            child = self._node(d, name)
            if isinstance(child, VDir):  # already part of the overlay
                d = child
                continue
            if child is None:
                if not create:
                    raise VTreeError(errno.ENOENT, path)
                new = VDir(DIR_MODE, self._clock())
                self._set(d, name, new)
            elif not isinstance(child, bytes) and child["type"] == "dir":
                new = _dir_of_entry(child)  # taken over from the base, unchanged until written in
                d.put(name, new)
            else:
                raise VTreeError(errno.ENOTDIR, path)
            d = new
        return d

    def _parent(self, path: str, *, create: bool) -> tuple[VDir, str]:
        """The overlay folder holding ``path`` (made as _writable_dir does) and its last name."""
        head, _, name = path.rpartition("/")
        d = self._dirs.get(head)
        if d is not None and name not in _BAD_PARTS and "\0" not in name and "\\" not in name:
            return d, name
        parts = _split(path)
        d = self._writable_dir(parts[:-1], path, create=create)
        if head == "/".join(parts[:-1]):  # not a path with a trailing "/"
            if len(self._dirs) >= DIR_CACHE:
                self._dirs.clear()
            self._dirs[head] = d
        return d, parts[-1]

    def _set(self, d: VDir, name: str, node: VDir | Entry | Record | None) -> None:
        key = _key(name)
        if isinstance(d.changes.get(key), VDir):
            self._dirs.clear()  # an overlay folder replaced or removed: cached paths may be under it
        if node is None and d.base is None:
            d.changes.pop(key, None)  # nothing below to hide
        else:
            d.changes[key] = node
        d.mtime_ns = self._clock()

    # ---- what the device does --------------------------------------------------------------

    def mkdir(self, path: str) -> None:
        """Create a folder and its missing parents; an existing folder is fine."""
        self._writable_dir(_split(path), path, create=True)

    def put_file(self, path: str, size: int, content: bytes | list[str]) -> None:
        """Place a file whose blobs are stored (replacing whatever is at ``path``); ``content``:
        its blob ids, raw and joined (as FileStore gives them) or a list of hex ids."""
        parent, name = self._parent(path, create=True)
        self._set(parent, name, pack_record(self._clock(), size, raw_ids(content)))

    def remove(self, path: str) -> bool:
        """Remove a file or a folder with everything in it; False if there was nothing."""
        parts = _split(path)
        try:
            parent = self._writable_dir(parts[:-1], path, create=False)
        except VTreeError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise
        if self._node(parent, parts[-1]) is None:
            return False
        self._set(parent, parts[-1], None)
        return True

    def move(self, src: str, dst: str) -> bool:
        """Rename ``src`` to ``dst``, replacing what ``dst`` was (as libimobiledevice does:
        remove the destination, then rename). Missing parents of ``dst`` are created. False,
        and nothing changes, when ``src`` does not exist (an upload the device failed)."""
        sparts, dparts = _split(src), _split(dst)
        if sparts == dparts:
            return True
        if dparts[: len(sparts)] == sparts:
            raise VTreeError(errno.EINVAL, dst)  # a folder into itself
        try:
            sparent, sname = self._parent(src, create=False)
        except VTreeError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        node = self._node(sparent, sname)
        if node is None:
            return False
        dparent, dname = self._parent(dst, create=True)
        self._set(sparent, sname, None)
        self._set(dparent, dname, self._renamed(node, dname))
        return True

    def copy(self, src: str, dst: str) -> None:
        """Copy a file or a folder (recursively) to ``dst``, replacing what was there."""
        sparts, dparts = _split(src), _split(dst)
        node = self._lookup(sparts, src)
        if dparts[: len(sparts)] == sparts:
            raise VTreeError(errno.EINVAL, dst)
        dparent = self._writable_dir(dparts[:-1], dst, create=True)
        self._set(dparent, dparts[-1], self._renamed(node.copy() if isinstance(node, VDir) else node, dparts[-1]))

    @staticmethod
    def _renamed(node: VDir | Entry | Record, name: str) -> VDir | Entry | Record:
        if isinstance(node, (VDir, bytes)):  # a record's name is the key it is held under
            return node
        if node["type"] == "dir":
            return _dir_of_entry(node)
        return node if node["name"] == name else {**node, "name": name}

    # ---- what the device reads -------------------------------------------------------------

    def listdir(self, path: str) -> dict[str, VDir | Entry]:
        """A folder's entries by name (folders of the base as entries with a ``subtree``)."""
        node = self._lookup(_split(path), path)
        if not isinstance(node, VDir):
            raise VTreeError(errno.ENOTDIR, path)
        return {name: n if isinstance(n, VDir) else _entry(name, n) for name, n in self._merged(node).items()}

    def _merged(self, d: VDir, *, cached: bool = True) -> dict[str, VDir | Entry | Record]:
        if d.base is None:
            out: dict[str, VDir | Entry | Record] = {}
        elif cached:
            out = dict(self._base_entries(d.base))
        else:  # the archiver's walk: each folder once, from several threads; no need to keep it
            out = cast("dict[str, VDir | Entry | Record]", self._usable_entries(d.base))  # not kept: no copy
        for name, node in d.named_changes():
            if node is None:
                out.pop(name, None)
            else:
                out[name] = node
        return out

    def file(self, path: str) -> Entry:
        """The entry of a regular file; ENOENT, or EISDIR for a folder."""
        node = self._lookup(_split(path), path)
        if isinstance(node, VDir):
            raise VTreeError(errno.EISDIR, path)
        if node["type"] != "file":
            raise VTreeError(errno.EINVAL, path)
        return node

    def read(self, entry: Entry) -> Iterator[bytes]:
        """A file's bytes, blob by blob, from the repository."""
        if self._before_read is not None and not self.repo.index.has_all_hex(entry["content"]):
            self._before_read()
        return read_file(self.repo, Node.from_dict(entry))

    def read_bytes(self, path: str) -> bytes | None:
        """A small file's whole content (the plists); None if there is no such file."""
        try:
            entry = self.file(path)
        except VTreeError:
            return None
        return b"".join(self.read(entry))

    def source(self, origin: dict) -> TreeSource:
        return TreeSource(self, origin)


class TreeSource:
    """The device folder of a :class:`VirtualTree` as the archiver's ``Source``."""

    def __init__(self, tree: VirtualTree, origin: dict) -> None:
        self.tree = tree
        self.origin = origin

    def _dir(self, rel: str) -> VDir:
        path = f"{self.tree.folder}/{rel}" if rel else self.tree.folder
        node = self.tree._lookup(_split(path), path)
        if not isinstance(node, VDir):
            raise VTreeError(errno.ENOTDIR, path)
        return node

    def scan(self, rel: str) -> list[SourceEntry]:
        out = []
        for name, node in sorted(self.tree._merged(self._dir(rel), cached=False).items()):
            if isinstance(node, VDir):
                out.append(SourceEntry(name, "dir", node.mode, node.mtime_ns))
            elif isinstance(node, bytes):
                e = entry_of_record(name, node)
                out.append(SourceEntry(name, "file", FILE_MODE, e["mtime_ns"], e["size"], None, e["content"]))
            elif node["type"] == "dir":
                out.append(SourceEntry(name, "dir", node["mode"], node["mtime_ns"]))
            elif node["type"] == "file":
                out.append(
                    SourceEntry(name, "file", node["mode"], node["mtime_ns"], node["size"], None, node["content"])
                )
            else:
                out.append(SourceEntry(name, node["type"], node["mode"], node["mtime_ns"], 0, node.get("target")))
        return out

    def open_file(self, rel: str) -> BinaryIO:
        # the archiver never needs this for a captured folder (every file carries its blobs);
        # here for the protocol's sake
        entry = self.tree.file(f"{self.tree.folder}/{rel}")
        return _BlobReader(lambda: self.tree.read(entry))  # type: ignore[return-value]

    def measure(self) -> tuple[int, int]:
        return 0, 0  # unknown without walking every base tree; capture reports its own progress

    def root_stat(self) -> tuple[int, int]:
        return self.tree.device.mode, self.tree.device.mtime_ns


class _BlobReader:
    """A file-like ``read`` over a stored file's blobs (for ``Source.open_file``); ``seek(0)``
    starts again (the chunker peeks at a large file's first bytes)."""

    def __init__(self, open_pieces: Callable[[], Iterator[bytes]]) -> None:
        self._open = open_pieces
        self._pieces = open_pieces()
        self._buf = b""

    def seek(self, pos: int) -> int:
        if pos != 0:
            raise OSError(errno.ESPIPE, "only seek(0) is supported")
        self._pieces = self._open()
        self._buf = b""
        return 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            out = self._buf + b"".join(self._pieces)
            self._buf = b""
            return out
        while len(self._buf) < n:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buf += piece
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def __enter__(self) -> _BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
