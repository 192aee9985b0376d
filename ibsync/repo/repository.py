"""Repository: opens config and keys, loads the index, reads and writes blobs and snapshots."""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

from .. import __version__
from ..errors import AlreadyExists, InvalidData, NotFound, RepoError, UnsupportedVersion, UserError, WrongPassword
from ..format import index as index_format
from ..format.chunker import Chunker, ChunkingPolicy, default_policy
from ..format.compress import Compressor
from ..format.crypto import (
    Cipher,
    IdHasher,
    MasterKey,
    NullCipher,
    keyed_id_hasher,
    make_key_file,
    open_key_file,
    plain_id_hasher,
    storage_name,
)
from ..format.objects import open_object, seal_object
from ..format.pack import BlobType, PackedBlob, blob_aad, parse_header
from ..model import Node, Snapshot, decode_tree, decode_tree_entries, utc_iso
from ..storage import Kind, Storage
from .cache import CACHED_KINDS, ObjectCache
from .index import BlobLocation, MasterIndex

FORMAT_NAME = "ibsync-repository"
FORMAT_VERSION = 1
DEFAULT_PACK_SIZE = 20 << 20
MIN_PACK_SIZE = 4 << 20
MAX_PACK_SIZE = 128 << 20
DEFAULT_ZSTD_LEVEL = 3
# Readers fetch packs in ranges of at most this much: few requests, bounded memory.
READ_SPAN = 8 << 20
# Index objects written by prune and repair hold about this many blobs (a few MB each).
INDEX_ENTRIES_PER_OBJECT = 100_000

PasswordSource = Callable[[], str]


def _who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except Exception:
        user = ""
    return {"hostname": socket.gethostname(), "username": user}


class Repository:
    def __init__(self, storage: Storage, config: dict, master: MasterKey | None, key_name: str | None = None) -> None:
        self.storage = storage
        self.config = config
        self.id: str = config["id"]
        self.master = master  # None for an unencrypted repository
        self.key_name = key_name  # the key file the password opened
        self.encrypted = master is not None
        self.cipher: Cipher = master.cipher() if master else NullCipher()
        self.blob_id: IdHasher = keyed_id_hasher(master.id_key) if master else plain_id_hasher()
        seed = master.chunker_seed if master else 0
        self.chunker = Chunker(ChunkingPolicy.from_config(config["chunking"], seed))
        self.compressor = Compressor(int(config["compression"]["level"]))
        self.pack_size = int(config["pack_size"])
        self.index = MasterIndex()
        self.loaded_index: set[str] = set()
        self.cache = None  # an ObjectCache for remote repositories (use_cache)
        self.lock = None  # the RepoLock this process holds on the repository, if any
        self._trees: OrderedDict[bytes, list[Node]] = OrderedDict()
        self._trees_lock = threading.Lock()
        self._tree_pack_lock = threading.Lock()

    # ---- creating and opening -------------------------------------------------------------

    @classmethod
    def init(
        cls, storage: Storage, password: str | None, *, kdf: dict | None = None, pack_size: int = DEFAULT_PACK_SIZE
    ) -> "Repository":
        """Create a repository; ``password=None`` makes an unencrypted one."""
        if not MIN_PACK_SIZE <= pack_size <= MAX_PACK_SIZE:
            raise UserError(f"pack size must be between {MIN_PACK_SIZE >> 20} and {MAX_PACK_SIZE >> 20} MiB")
        if storage.exists():
            raise UserError(f"{storage.url} already holds an ibsync repository")
        if not storage.is_empty():
            raise UserError(f"{storage.url} is not empty; choose an empty or new folder")
        master = MasterKey.generate() if password is not None else None
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "id": os.urandom(16).hex(),
            "created": utc_iso(datetime.now(timezone.utc)),
            "encryption": "aes-256-gcm" if master else "none",
            "id_hash": "blake3-keyed" if master else "blake3",
            "compression": {"algorithm": "zstd", "level": DEFAULT_ZSTD_LEVEL},
            "chunking": default_policy(0).to_config(),
            "pack_size": pack_size,
        }
        key_name = None
        if master is not None:
            assert password is not None
            key = make_key_file(master, password, meta={"created": config["created"], **_who()}, kdf=kdf)
            key_name = storage_name(key)
            storage.put(Kind.KEYS, key_name, key, exclusive=True)
            config["mac"] = master.mac(_canonical(config))
        # The config is written last: a repository exists once its config does.
        raw = json.dumps(config, indent=1).encode()
        try:
            storage.put(Kind.CONFIG, "config", raw, exclusive=True)
        except AlreadyExists:
            pass  # ours, from an attempt whose answer was lost, or another init's: read it back
        # A server that ignores conditional writes lets two racing inits both "win"; the config
        # that stays decides, and the loser must not go on with a master key nobody can open.
        if storage.get(Kind.CONFIG, "config") != raw:
            if key_name is not None:
                storage.delete(Kind.KEYS, key_name)  # it opens a master key the config does not use
            raise UserError(f"{storage.url}: another 'ibsync init' created a repository here at the same time")
        return cls(storage, config, master, key_name)

    @classmethod
    def open(cls, storage: Storage, password: PasswordSource) -> "Repository":
        try:
            raw = storage.get(Kind.CONFIG, "config")
        except NotFound:
            raise RepoError(f"{storage.url} is not an ibsync repository (no config); run 'ibsync init' first") from None
        try:
            config = json.loads(raw)
            if config.get("format") != FORMAT_NAME:
                raise ValueError("not an ibsync config")
            version = int(config["version"])
        except (ValueError, KeyError, TypeError) as e:
            raise RepoError(f"{storage.url}: unreadable repository config ({e})") from e
        if version > FORMAT_VERSION:
            raise UnsupportedVersion(
                f"{storage.url} has repository format {version}; this ibsync reads up to {FORMAT_VERSION}: upgrade ibsync"
            )
        keys = list(storage.list(Kind.KEYS))
        if config.get("encryption") == "none":
            if keys:
                # A config rewritten to "none" must not make us write plaintext into an encrypted repository.
                raise RepoError(f"{storage.url}: config says unencrypted but key files exist; the config was tampered with")
            return cls(storage, config, None)
        if not keys:
            raise RepoError(f"{storage.url}: encrypted repository without key files")
        pw = password()
        master = None
        key_name = None
        for info in keys:
            try:
                master = open_key_file(storage.get(Kind.KEYS, info.name), pw)
                key_name = info.name
                break
            except WrongPassword:
                continue
        if master is None:
            raise WrongPassword("wrong password: no key in the repository opens with it")
        mac = config.pop("mac", None)
        if mac != master.mac(_canonical(config)):
            raise RepoError(f"{storage.url}: the repository config does not match its key; it was altered")
        config["mac"] = mac
        return cls(storage, config, master, key_name)

    # ---- unpacked objects ------------------------------------------------------------------

    def save_object(self, kind: Kind, body: bytes) -> tuple[str, int]:
        """Store an unpacked object; returns its name and stored size."""
        if kind in (Kind.INDEX, Kind.SNAPSHOTS):
            self.check_lock()  # what these reference must not have been pruned meanwhile
        stored = seal_object(body, kind.value, self.cipher, self.compressor)
        name = storage_name(stored)
        self.storage.put(kind, name, stored)
        if self.cache is not None and kind in CACHED_KINDS:
            self.cache.put(kind, name, stored)  # what we wrote we need not read back
        return name, len(stored)

    def use_cache(self, root) -> None:
        """Keep index and snapshot objects in a local cache folder (for remote storage)."""
        self.cache = ObjectCache(root, self.id)

    def load_object(self, kind: Kind, name: str) -> bytes:
        stored = self.cache.get(kind, name) if self.cache is not None and kind in CACHED_KINDS else None
        if stored is None:
            stored = self.storage.get(kind, name)
            if storage_name(stored) != name:
                raise InvalidData(f"{kind.value}/{name[:12]}: content does not match its name (damaged)")
            if self.cache is not None and kind in CACHED_KINDS:
                self.cache.put(kind, name, stored)
        return open_object(stored, kind.value, self.cipher, self.compressor)

    # ---- index -----------------------------------------------------------------------------

    def load_index(self) -> None:
        """Load every index object not loaded yet."""
        listed = list(self.storage.list(Kind.INDEX))
        if self.cache is not None:
            self.cache.retain(Kind.INDEX, {info.name for info in listed})
        for info in listed:
            if info.name in self.loaded_index:
                continue
            self.add_index_object(info.name)
        if self.cache is not None:  # tree packs that prune removed or repacked
            self.cache.retain(Kind.PACKS, {p.hex() for p in self.index.packs()})

    def check_lock(self) -> None:
        """Before a write others rely on or a deletion: is our lock still good?"""
        if self.lock is not None:
            self.lock.check()

    def add_index_object(self, name: str) -> None:
        for pack_id, records in index_format.iter_index(self.load_object(Kind.INDEX, name)):
            self.index.add_records(pack_id, records)
        self.loaded_index.add(name)

    def save_full_index(self, packs: Iterable[index_format.PackIndex]) -> None:
        """Write index objects for many packs, about INDEX_ENTRIES_PER_OBJECT blobs each (prune
        and repair rewrite the whole index this way)."""
        batch: list[index_format.PackIndex] = []
        count = 0
        for p in packs:
            batch.append(p)
            count += len(p.blobs)
            if count >= INDEX_ENTRIES_PER_OBJECT:
                self.save_index(batch)
                batch, count = [], 0
        if batch:
            self.save_index(batch)

    def save_index(self, packs: list[index_format.PackIndex]) -> tuple[str, int]:
        name, size = self.save_object(Kind.INDEX, index_format.encode_index(packs))
        self.loaded_index.add(name)
        return name, size

    # ---- blobs -----------------------------------------------------------------------------

    def encode_blob(
        self, blob_id: bytes, data: bytes | memoryview, compress: bool = True
    ) -> tuple[tuple[bytes | memoryview, ...], bool]:
        """Compress (when it pays) and seal one blob; returns the stored bytes as pieces and
        whether zstd was used."""
        packed = self.compressor.compress(data) if compress else None
        payload = packed if packed is not None else data
        return self.cipher.seal_parts(payload, blob_aad(blob_id)), packed is not None

    def decode_blob(self, blob: PackedBlob, stored: bytes | memoryview) -> bytes:
        """Open, decompress and verify one blob; InvalidData if anything does not match."""
        payload = self.cipher.open(stored, blob_aad(blob.id))
        data = self.compressor.decompress(payload, blob.raw_length) if blob.compressed else bytes(payload)
        if len(data) != blob.raw_length or self.blob_id(data) != blob.id:
            raise InvalidData(f"blob {blob.id.hex()[:12]} does not match its id")
        return data

    def locate(self, blob_id: bytes) -> BlobLocation:
        loc = self.index.get(blob_id)
        if loc is None:
            raise InvalidData(f"blob {blob_id.hex()[:12]} is not in the index")
        return loc

    def load_blob(self, blob_id: bytes) -> bytes:
        loc = self.locate(blob_id)
        if self.cache is not None and loc.type is BlobType.TREE:
            data = self._load_tree_blob_cached(blob_id, loc)
            if data is not None:
                return data
        stored = self.storage.get(Kind.PACKS, loc.pack_id.hex(), loc.offset, loc.length)
        return self.decode_blob(loc.as_packed(blob_id), stored)

    def _load_tree_blob_cached(self, blob_id: bytes, loc) -> bytes | None:
        """Remote repositories keep whole tree packs in the local cache (as restic does):
        walking a snapshot then costs one GET per tree pack, not one per folder. None if the
        cached copy fails to authenticate (it is dropped; the caller reads the blob remotely)."""
        assert self.cache is not None
        name = loc.pack_id.hex()
        stored = self.cache.read_range(Kind.PACKS, name, loc.offset, loc.length)
        if stored is None:
            with self._tree_pack_lock:  # one fetch per pack, however many threads want it
                stored = self.cache.read_range(Kind.PACKS, name, loc.offset, loc.length)
                if stored is None:
                    pack = self.storage.get(Kind.PACKS, name)
                    self.cache.put(Kind.PACKS, name, pack)
                    stored = pack[loc.offset : loc.offset + loc.length]
        try:
            return self.decode_blob(loc.as_packed(blob_id), stored)
        except InvalidData:
            self.cache.drop(Kind.PACKS, name)
            return None

    def read_pack_blobs(
        self, pack_id: bytes, blobs: list[PackedBlob], *, max_read: int = READ_SPAN
    ) -> Iterator[tuple[PackedBlob, bytes | None, Exception | None]]:
        """Read the given blobs of one pack, in ranged reads of up to ``max_read`` bytes (one
        per run of nearby blobs); yield each blob decoded, or the error that stopped it (a
        damaged blob does not hide the others)."""
        blobs = sorted(blobs, key=lambda b: b.offset)
        name = pack_id.hex()
        i = 0
        while i < len(blobs):
            start = blobs[i].offset
            j = i + 1
            while j < len(blobs) and blobs[j].offset + blobs[j].length - start <= max_read:
                j += 1
            group = blobs[i:j]
            i = j
            end = group[-1].offset + group[-1].length
            try:
                data = memoryview(self.storage.get(Kind.PACKS, name, start, end - start))
            except Exception as e:  # a missing or unreadable pack fails each of its blobs
                for b in group:
                    yield b, None, e
                continue
            for b in group:
                try:
                    yield b, self.decode_blob(b, data[b.offset - start : b.offset - start + b.length]), None
                except InvalidData as e:
                    yield b, None, e

    def pack_header(self, pack_data: bytes) -> list[PackedBlob]:
        return parse_header(pack_data, self.cipher)

    # ---- trees -----------------------------------------------------------------------------

    def load_tree(self, tree_id: bytes) -> list[Node]:
        with self._trees_lock:
            cached = self._trees.get(tree_id)
            if cached is not None:
                self._trees.move_to_end(tree_id)
                return cached
        nodes = decode_tree(self.load_blob(tree_id))
        with self._trees_lock:
            self._trees[tree_id] = nodes
            if len(self._trees) > 64:
                self._trees.popitem(last=False)
        return nodes

    def load_tree_entries(self, tree_id: bytes) -> list[dict]:
        """A tree as plain dicts (``Node.to_dict`` form): what ingest compares against, cheaply."""
        return decode_tree_entries(self.load_blob(tree_id))

    # ---- snapshots -------------------------------------------------------------------------

    def save_snapshot(self, snapshot: Snapshot) -> str:
        if not snapshot.program:
            snapshot.program = f"ibsync {__version__}"
        who = _who()
        snapshot.hostname = snapshot.hostname or who["hostname"]
        snapshot.username = snapshot.username or who["username"]
        snapshot.id, _ = self.save_object(Kind.SNAPSHOTS, snapshot.to_json())
        return snapshot.id

    def load_snapshot(self, name: str) -> Snapshot:
        return Snapshot.from_json(self.load_object(Kind.SNAPSHOTS, name), id=name)

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot, oldest backup first."""
        listed = list(self.storage.list(Kind.SNAPSHOTS))
        if self.cache is not None:
            self.cache.retain(Kind.SNAPSHOTS, {info.name for info in listed})
        snaps = [self.load_snapshot(info.name) for info in listed]
        return sorted(snaps, key=Snapshot.sort_key)

    def find_snapshot(self, spec: str, device: str | None = None, snapshots: Iterable[Snapshot] | None = None) -> Snapshot:
        """Resolve 'latest' or an id prefix; ``device`` (UDID or name) narrows 'latest'."""
        snaps = list(snapshots) if snapshots is not None else self.snapshots()
        if device:
            snaps = [s for s in snaps if s.of_device(device)]
            if not snaps:
                raise UserError(f"no snapshot of a device '{device}'")
        if spec == "latest":
            if not snaps:
                raise UserError("the repository has no snapshots yet")
            udids = {s.device.udid for s in snaps}
            if len(udids) > 1:
                raise UserError(
                    "'latest' is ambiguous: the repository holds several devices; add --device UDID|NAME"
                )
            return snaps[-1]
        spec = spec.lower()
        matches = [s for s in snaps if s.id.startswith(spec)]
        if not matches:
            raise UserError(f"no snapshot with id '{spec}'")
        if len(matches) > 1:
            raise UserError(f"snapshot id '{spec}' is ambiguous: {', '.join(s.short_id for s in matches)}")
        return matches[0]

    def latest_of_device(self, udid: str) -> Snapshot | None:
        # the case of a UDID differs between Info.plist, folder names and lockdown
        snaps = [s for s in self.snapshots() if s.device.udid.upper() == udid.upper()]
        return snaps[-1] if snaps else None

    def write_session(self, *, rewrite: bool = False):
        from .session import WriteSession

        return WriteSession(self, rewrite=rewrite)

    def close(self) -> None:
        self.storage.close()


def _canonical(config: dict) -> bytes:
    return json.dumps({k: v for k, v in config.items() if k != "mac"}, sort_keys=True, separators=(",", ":")).encode()
