"""Repository: opens config and keys, loads the index, reads and writes blobs and snapshots."""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TypeGuard

from .._version import __version__
from ..errors import (
    AlreadyExists,
    InvalidData,
    NameNotFound,
    NotFound,
    RepoError,
    RepoNotFound,
    UnsupportedVersion,
    UserError,
    WrongPassword,
)
from ..format import index as index_format
from ..format.chunker import Chunker, ChunkingPolicy, default_policy
from ..format.compress import Compressor
from ..format.crypto import (
    MAX_KEY_FILE_SIZE,
    Cipher,
    IdHasher,
    KeyFile,
    MalformedKey,
    MasterKey,
    NullCipher,
    keyed_id_hasher,
    make_key_file,
    plain_id_hasher,
    storage_name,
)
from ..format.objects import open_object, seal_object
from ..format.pack import BlobType, PackedBlob, blob_aad, parse_header
from ..model import Node, Snapshot, Tree, decode_tree_entries, encode_tree, split_entries, utc_iso
from ..storage import Kind, Storage
from . import trees
from .cache import CACHED_KINDS, ObjectCache
from .index import BlobLocation, MasterIndex
from .known import KnownRepositories

log = logging.getLogger("ibsync")

FORMAT_NAME = "ibsync-repository"
# 2: trees are msgpack nodes (design §10); version 1 repositories stay readable, and writable
# with format-1 trees until 'ibsync upgrade'.
FORMAT_VERSION = 2
DEFAULT_PACK_SIZE = 20 << 20
MIN_PACK_SIZE = 4 << 20
MAX_PACK_SIZE = 128 << 20
DEFAULT_ZSTD_LEVEL = 3
# Readers fetch packs in ranges of at most this much: few requests, bounded memory.
READ_SPAN = 8 << 20
# Index objects written by prune and repair hold about this many blobs (a few MB each).
INDEX_ENTRIES_PER_OBJECT = 100_000

# Key files tried per open, as restic does since 0.14: planted key files must not multiply the
# cost of every command. Those the remembered key and the cheapest parameters come first.
MAX_KEYS_TRIED = 20
ENCRYPTIONS = {"aes-256-gcm": "blake3-keyed", "none": "blake3"}  # encryption -> its id hash
_REPO_ID = re.compile(r"[0-9a-f]{32}")

PasswordSource = Callable[[], str]


def _who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except Exception:
        user = ""
    return {"hostname": socket.gethostname(), "username": user}


# decoded tree entries kept in memory across folders (about 0.5 KB each)
TREE_CACHE_ENTRIES = 20_000


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
        self.index_damage: dict[str, str] = {}  # index objects load_index skipped -> why
        self.cache: ObjectCache | None = None  # for remote repositories (use_cache)
        self.lock = None  # the RepoLock this process holds on the repository, if any
        self._trees: OrderedDict[bytes, Tree] = OrderedDict()
        self._trees_entries = 0  # entries held by _trees, which bounds it (not the folder count)
        self._trees_lock = threading.Lock()
        self._tree_pack_lock = threading.Lock()

    # ---- creating and opening -------------------------------------------------------------

    @classmethod
    def init(
        cls, storage: Storage, password: str | None, *, kdf: dict | None = None, pack_size: int = DEFAULT_PACK_SIZE
    ) -> Repository:
        """Create a repository; ``password=None`` makes an unencrypted one."""
        if not MIN_PACK_SIZE <= pack_size <= MAX_PACK_SIZE:
            raise UserError(f"pack size must be between {MIN_PACK_SIZE >> 20} and {MAX_PACK_SIZE >> 20} MiB")
        if storage.exists():
            raise UserError(f"{storage.url} already holds an ibsync repository")
        if not storage.is_empty():
            raise UserError(f"{storage.url} is not empty; choose an empty or new folder")
        master = MasterKey.generate() if password is not None else None
        encryption = "aes-256-gcm" if master else "none"
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "id": os.urandom(16).hex(),
            "created": utc_iso(datetime.now(UTC)),
            "encryption": encryption,
            "id_hash": ENCRYPTIONS[encryption],
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
        except BaseException:
            # No config, no repository: a key file left behind would only make the next
            # 'init' refuse the folder as not empty.
            _discard_key(storage, key_name)
            raise
        # A server that ignores conditional writes lets two racing inits both "win"; the config
        # that stays decides, and the loser must not go on with a master key nobody can open.
        if storage.get(Kind.CONFIG, "config") != raw:
            if key_name is not None:
                storage.delete(Kind.KEYS, key_name)  # it opens a master key the config does not use
            raise UserError(f"{storage.url}: another 'ibsync init' created a repository here at the same time")
        return cls(storage, config, master, key_name)

    @classmethod
    def open(
        cls,
        storage: Storage,
        password: PasswordSource,
        *,
        password_given: bool = False,
        known: KnownRepositories | None = None,
    ) -> Repository:
        """Open a repository. ``password`` is asked only if the repository is encrypted.
        ``password_given``: the caller has a password configured (an option, a file, a command,
        the environment): an unencrypted repository is then refused as a likely downgrade.
        ``known``: what this user remembers of repositories (refuses a remembered encrypted
        repository that now claims not to be; tries the key that opened it last time first)."""
        config = _read_config(storage)
        repo_id = config["id"]
        if config["encryption"] == "none":
            _refuse_downgrade(storage, config, password_given, known)
            repo = cls._build(storage, config, None, None)
        else:
            hint = known.key_hint(repo_id) if known is not None else None
            master, key_name = _unlock(storage, config, password, hint)
            repo = cls._build(storage, config, master, key_name)
        if known is not None:
            known.remember(storage.url, repo_id, repo.encrypted, repo.key_name)
        return repo

    @classmethod
    def _build(cls, storage: Storage, config: dict, master: MasterKey | None, key_name: str | None) -> Repository:
        _check_settings(storage.url, config)  # after the MAC: a forged setting says "altered"
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
            if info.name in self.loaded_index or info.name in self.index_damage:
                continue
            try:
                self.add_index_object(info.name)
            except InvalidData as e:
                # One damaged object must not block every restore: what it listed is reported
                # as missing by whoever needs it, and 'repair index' rebuilds it from the packs.
                self.index_damage[info.name] = str(e)
                log.warning(f"index object {info.name[:12]} skipped: {e}; run 'ibsync repair index'")
        if self.cache is not None:  # tree packs that prune removed or repacked
            self.cache.retain(Kind.PACKS, {p.hex() for p in self.index.packs()})

    def check_lock(self) -> None:
        """Before a write others rely on or a deletion: is our lock still good?"""
        if self.lock is not None:
            self.lock.check()

    def add_index_object(self, name: str) -> None:
        # iter_index checks the whole object before the first pack: a bad object adds nothing
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

    @property
    def tree_format(self) -> int:
        """The tree format writers use: 1 (JSON, all an older ibsync reads) in a repository of
        format version 1, else 2 (msgpack nodes); readers take both (design §10)."""
        return 1 if self.config["version"] < 2 else 2

    def load_tree(self, tree_id: bytes) -> Tree:
        """One folder's whole tree (its usable entries, and the refused ones aside)."""
        with self._trees_lock:
            cached = self._trees.get(tree_id)
            if cached is not None:
                self._trees.move_to_end(tree_id)
                return cached
        folder = self.load_folder(tree_id)
        tree = Tree([Node.from_dict(d) for d in folder.good], folder.rejected, folder.parts)
        with self._trees_lock:
            if tree_id not in self._trees:
                self._trees[tree_id] = tree
                self._trees_entries += len(tree) + 1
            # bounded by entries: 64 folders of a real phone's fileID folders (~4,000 entries
            # each, ~500 bytes decoded) would alone be over 100 MB
            while self._trees_entries > TREE_CACHE_ENTRIES and len(self._trees) > 1:
                _, dropped = self._trees.popitem(last=False)
                self._trees_entries -= len(dropped) + 1
        return tree

    def load_tree_entries(self, tree_id: bytes) -> list[dict]:
        """A tree's stored entries as plain dicts (``Node.to_dict`` form; each checked by
        ``split_entries`` before use): what ingest compares against, cheaply."""
        return self._read_tree(tree_id)[0]

    def load_folder(self, tree_id: bytes) -> trees.Folder:
        """A folder's usable entries (dicts), its refused ones, its tree blobs, and what
        ``build_tree(entries, reuse=...)`` may pack again as stored: what the archiver compares
        a folder with, and rebuilds a changed folder from. Not cached (the caller holds it)."""
        data = self.load_blob(tree_id)
        if trees.is_node(data):
            return trees.read_folder_split(self, tree_id, data)
        good, rejected = split_entries(decode_tree_entries(data))
        return trees.Folder(good, rejected, [tree_id])

    def tree_parts(self, tree_id: bytes) -> list[bytes]:
        """The ids of every blob that makes up one folder's tree, its top node first (not its
        subfolders' trees, not file data): what prune keeps, check verifies and copy carries."""
        with self._trees_lock:
            cached = self._trees.get(tree_id)
        if cached is not None:
            return list(cached.parts)
        return self._read_tree(tree_id)[1]

    def build_tree(self, entries: list[dict], reuse: trees.Reuse | None = None) -> trees.BuiltTree:
        """One folder's tree blobs in this repository's tree format, computed, not stored
        (``WriteSession.save_tree`` stores them; a planner such as repair can store them later).
        ``reuse``: ``load_folder(...).reuse`` of an earlier version of the folder (faster for
        the entries passed back unchanged; the same result)."""
        if self.tree_format == 1:
            data = encode_tree(entries)
            tree_id = self.blob_id(data)
            return trees.BuiltTree(tree_id, {tree_id: data})
        return trees.build_tree(self.blob_id, entries, reuse)

    def _read_tree(self, tree_id: bytes) -> tuple[list, list[bytes]]:
        data = self.load_blob(tree_id)
        if trees.is_node(data):
            return trees.read_folder(self, tree_id, data)
        return decode_tree_entries(data), [tree_id]

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
        body = self.load_object(Kind.SNAPSHOTS, name)
        try:
            return Snapshot.from_json(body, id=name)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # authentic only in name in an unencrypted repository: anyone can write one
            raise InvalidData(f"snapshots/{name[:12]}: not a snapshot ({e.__class__.__name__})") from None

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot that loads, oldest backup first; each one that does not is named in
        a warning (one junk object must not hide all the others)."""
        snaps, damaged = self.snapshots_with_damage()
        for name, why in damaged.items():
            log.warning(f"snapshot object {name[:12]} skipped: {why}; 'ibsync repair snapshots' removes it")
        return snaps

    def snapshots_with_damage(self) -> tuple[list[Snapshot], dict[str, str]]:
        """The snapshots that load, sorted as snapshots() sorts them, and {object name: reason}
        for the snapshot objects that fail to load, authenticate or parse. A storage failure
        other than a vanished object still raises: it says nothing about the object."""
        listed = list(self.storage.list(Kind.SNAPSHOTS))
        if self.cache is not None:
            self.cache.retain(Kind.SNAPSHOTS, {info.name for info in listed})
        snaps: list[Snapshot] = []
        damaged: dict[str, str] = {}
        for info in listed:
            try:
                snaps.append(self.load_snapshot(info.name))
            except NotFound:
                continue  # forgotten since the listing
            except InvalidData as e:
                damaged[info.name] = str(e)
        return sorted(snaps, key=Snapshot.sort_key), damaged

    def find_snapshot(
        self, spec: str, device: str | None = None, snapshots: Iterable[Snapshot] | None = None
    ) -> Snapshot:
        """Resolve 'latest' or an id prefix; ``device`` (UDID or name) narrows 'latest'."""
        snaps = list(snapshots) if snapshots is not None else self.snapshots()
        if device:
            snaps = [s for s in snaps if s.of_device(device)]
            if not snaps:
                raise NameNotFound(f"no snapshot of a device '{device}'")
        if spec == "latest":
            if not snaps:
                raise NameNotFound("the repository has no snapshots yet")
            udids = {s.device.udid for s in snaps}
            if len(udids) > 1:
                raise UserError("'latest' is ambiguous: the repository holds several devices; add --device UDID|NAME")
            return snaps[-1]
        spec = spec.lower()
        matches = [s for s in snaps if s.id.startswith(spec)]
        if not matches:
            raise NameNotFound(f"no snapshot with id '{spec}'")
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


def upgrade_format(repo: Repository) -> int:
    """Rewrite the config of a format-1 repository as format version 2 (same id, keys and
    settings; the MAC recomputed); returns the version it had. From then on trees are written
    as format-2 nodes, and an ibsync that reads only format 1 refuses the repository. The
    caller holds the exclusive lock. The config is replaced in one put, which every storage
    makes atomic: a kill leaves the old config or the new one, each valid."""
    old = repo.config["version"]
    if old >= FORMAT_VERSION:
        return old
    config = {k: v for k, v in repo.config.items() if k != "mac"}
    config["version"] = FORMAT_VERSION
    if repo.master is not None:
        config["mac"] = repo.master.mac(_canonical(config))
    raw = json.dumps(config, indent=1).encode()
    repo.check_lock()
    repo.storage.put(Kind.CONFIG, "config", raw)
    if repo.storage.get(Kind.CONFIG, "config") != raw:
        raise RepoError(f"{repo.storage.url}: the upgraded config reads back differently; run 'ibsync upgrade' again")
    repo.config = config
    return old


def _canonical(config: dict) -> bytes:
    return json.dumps({k: v for k, v in config.items() if k != "mac"}, sort_keys=True, separators=(",", ":")).encode()


def _discard_key(storage: Storage, key_name: str | None) -> None:
    if key_name is None:
        return
    try:
        storage.delete(Kind.KEYS, key_name)
    except Exception as e:  # the error that stopped init is the one to report
        log.warning(f"could not remove key file keys/{key_name[:8]} of the failed init: {e}")


def _read_config(storage: Storage) -> dict:
    """The config, as far as it must be read before the key: a JSON object of our format, of a
    version we read, with a repository id and a known encryption. RepoError otherwise."""
    try:
        raw = storage.get(Kind.CONFIG, "config")
    except NotFound:
        raise RepoNotFound(f"{storage.url} is not an ibsync repository (no config); run 'ibsync init' first") from None
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise RepoError(f"{storage.url}: unreadable repository config (not JSON: {e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise RepoError(f"{storage.url}: unreadable repository config (not an ibsync config)")
    version = config.get("version")
    if type(version) is not int or version < 1:
        raise RepoError(f"{storage.url}: unreadable repository config (version is not a positive integer)")
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(
            f"{storage.url} has repository format {version}; this ibsync reads up to {FORMAT_VERSION}: upgrade ibsync"
        )
    if not isinstance(config.get("id"), str) or not _REPO_ID.fullmatch(config["id"]):
        raise RepoError(f"{storage.url}: unreadable repository config (id is not 32 hex digits)")
    if not isinstance(config.get("encryption"), str) or config["encryption"] not in ENCRYPTIONS:
        raise RepoError(f"{storage.url}: unreadable repository config (unknown encryption)")
    if "mac" in config and not isinstance(config["mac"], str):
        raise RepoError(f"{storage.url}: unreadable repository config (mac is not a string)")
    return config


def _check_settings(url: str, config: dict) -> None:
    """The settings a Repository is built from, each of the right type and within bounds."""
    problem = _settings_problem(config)
    if problem:
        raise RepoError(f"{url}: unreadable repository config ({problem})")


def _settings_problem(config: dict) -> str | None:
    if config.get("id_hash") != ENCRYPTIONS[config["encryption"]]:
        return "id_hash does not fit the encryption"
    compression = config.get("compression")
    if not isinstance(compression, dict) or compression.get("algorithm") != "zstd":
        return "compression is not zstd"
    if not _int_in(compression.get("level"), -7, 22):
        return "compression level is not an integer in -7..22"
    if not _int_in(config.get("pack_size"), MIN_PACK_SIZE, MAX_PACK_SIZE):
        return f"pack_size is not an integer in {MIN_PACK_SIZE}..{MAX_PACK_SIZE}"
    return _chunking_problem(config.get("chunking"))


def _chunking_problem(chunking: object) -> str | None:
    if not isinstance(chunking, dict) or chunking.get("algorithm") != "fastcdc2020":
        return "chunking is not fastcdc2020"
    profile = chunking.get("default")
    if not isinstance(profile, dict) or set(profile) != {"min_size", "avg_size", "max_size"}:
        return "chunking.default is not a chunk size profile"
    lo, avg, hi = profile["min_size"], profile["avg_size"], profile["max_size"]
    # pyfastcdc's own limits; chunks are held in memory, so no more than 64 MiB
    if not (
        _int_in(lo, 64, 64 << 20) and _int_in(avg, 256, 64 << 20) and _int_in(hi, 1024, 64 << 20) and lo <= avg <= hi
    ):
        return "chunk sizes out of range"
    block = chunking.get("sqlite_block")
    if not _int_in(block, 512, 16 << 20) or block & (block - 1):
        return "sqlite_block is not a power of two in 512..16 MiB"
    return None


def _int_in(value: object, lo: int, hi: int) -> TypeGuard[int]:
    return type(value) is int and lo <= value <= hi


def _refuse_downgrade(storage: Storage, config: dict, password_given: bool, known: KnownRepositories | None) -> None:
    """An unencrypted config is believed only if nothing says the repository was encrypted:
    no password was given for it, this user never saw it encrypted, and it has no key files."""
    if password_given:
        raise RepoError(
            f"{storage.url}: the repository claims to be unencrypted although a password is set; it may have been "
            "tampered with (for a repository made with 'init --no-encryption', give no password)"
        )
    if known is not None:
        known.check(storage.url, config["id"], encrypted=False)
    if any(True for _ in storage.list(Kind.KEYS)):
        # A config rewritten to "none" must not make us write plaintext into an encrypted repository.
        raise RepoError(f"{storage.url}: config says unencrypted but key files exist; the config was tampered with")


def _usable_keys(storage: Storage, hint: str | None) -> list[tuple[str, KeyFile]]:
    """Every key file that parses within the accepted bounds, in the order to try them: the
    one that opened the repository last time, then the cheapest to derive. Malformed ones are
    skipped with a warning: one junk file must not lock the owner out."""
    found: list[tuple[str, KeyFile]] = []
    for info in sorted(storage.list(Kind.KEYS), key=lambda i: i.name):
        try:
            if info.size > MAX_KEY_FILE_SIZE:
                raise MalformedKey(f"{info.size} bytes, more than a key file can be")
            found.append((info.name, KeyFile.parse(storage.get(Kind.KEYS, info.name))))
        except NotFound:
            continue  # removed since the listing
        except MalformedKey as e:
            log.warning(
                f"key file keys/{info.name[:8]} skipped: malformed ({e}); "
                f"'ibsync key remove {info.name[:8]}' removes it"
            )
    found.sort(key=lambda nk: (nk[0] != hint, nk[1].kdf.work, nk[0]))
    return found


def _unlock(storage: Storage, config: dict, password: PasswordSource, hint: str | None) -> tuple[MasterKey, str]:
    """The master key and the name of the key file that opened it; the key must also
    authenticate the config (a key left by a failed init opens a master key nobody uses)."""
    keys = _usable_keys(storage, hint)
    if not keys:
        raise RepoError(f"{storage.url}: encrypted repository without usable key files")
    pw = password()
    mismatch = False
    for name, key in keys[:MAX_KEYS_TRIED]:
        try:
            master = key.unwrap(pw)
        except WrongPassword:
            continue
        except MalformedKey as e:
            log.warning(f"key file keys/{name[:8]} skipped: {e}")
            continue
        if _config_mac_ok(config, master):
            return master, name
        mismatch = True
    if mismatch:
        raise RepoError(f"{storage.url}: the repository config does not match its key; it was altered")
    if len(keys) > MAX_KEYS_TRIED:
        raise WrongPassword(
            f"wrong password: none of the {MAX_KEYS_TRIED} key files tried opens with it (ibsync tries at most "
            f"{MAX_KEYS_TRIED}; this repository has {len(keys)}, more than anyone needs: check keys/ for planted files)"
        )
    raise WrongPassword("wrong password: no key in the repository opens with it")


def _config_mac_ok(config: dict, master: MasterKey) -> bool:
    return config.get("mac") == master.mac(_canonical(config))
