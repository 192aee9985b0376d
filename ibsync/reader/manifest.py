"""A snapshot's Manifest.db: iOS paths (``Domain/relative/path``) and where their payloads are.

A device folder names each file by ``fileID = sha1(domain + "-" + relativePath)`` and stores it
at ``<fileID[:2]>/<fileID>``; its Manifest.db ``Files`` table maps the ids back to domains and
paths, with an NSKeyedArchiver ``MBFile`` per row (size, times, mode and, in encrypted backups,
the file's wrapped key). :class:`SnapshotManifest` rehydrates a snapshot's Manifest.db into a
temporary file (decrypting it for an encrypted iOS backup), opens it read-only, and maps each
``fileID`` to the payload's node in the snapshot's ``xx/`` sub-trees.

Encrypted iOS backups: the keybag in Manifest.plist is unlocked with the backup password
(pyiosbackup's ``Keybag``: PBKDF2-SHA256 with DPIC rounds, then PBKDF2-SHA1, then AES key
unwrap of each class key; about 2 s), once per keybag and command (:class:`BackupKeyring`).
Manifest.db is AES-256-CBC (zero IV, no padding) under the key wrapped in ``ManifestKey``;
each payload is AES-256-CBC (zero IV, PKCS7) under the key wrapped in its ``EncryptionKey``.
The password is never stored.
"""

from __future__ import annotations

import hashlib
import os
import plistlib
import re
import sqlite3
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import InvalidData, UserError
from ..model import Node, Snapshot
from ..repo.repository import Repository
from .files import read_file, read_file_bytes

FLAG_FILE, FLAG_DIR, FLAG_SYMLINK = 1, 2, 4
_KIND_OF_FLAGS = {FLAG_FILE: "file", FLAG_DIR: "dir", FLAG_SYMLINK: "symlink"}
_AES_BLOCK = 16


class WrongBackupPassword(UserError):
    """The iOS backup password does not unlock the backup's keybag."""


# ---- paths and patterns -----------------------------------------------------------------------


def entry_path(domain: str, relative_path: str) -> str:
    return f"{domain}/{relative_path}" if relative_path else domain


_WILDCARDS = re.compile(r"[*?\[]")


class PathPattern:
    """A glob over ``Domain/relative/path``: ``*`` and ``?`` stay within one path component,
    ``**`` crosses ``/`` (``a/**/b`` also matches ``a/b``), ``[...]`` is a character class.

    A pattern matches a path and everything below it, so ``HomeDomain/Library/SMS`` selects
    that folder's files. A pattern without ``/`` and without wildcards is a file name that
    matches anywhere (``sms.db``)."""

    def __init__(self, pattern: str | None) -> None:
        text = (pattern or "").strip().strip("/")
        self.text = text
        if not text or text == "**":
            self.regex = None  # everything
            self.domain = None
            return
        anywhere = "/" not in text and not _WILDCARDS.search(text)
        body = ("(?:.*/)?" + re.escape(text)) if anywhere else translate_glob(text)
        self.regex = re.compile(f"(?:{body})(?:/.*)?", re.DOTALL)
        first = text.split("/", 1)[0]
        # the first component is the domain: a literal one narrows the query to an index lookup
        self.domain = first if "/" in text and not _WILDCARDS.search(first) else None

    def matches(self, domain: str, relative_path: str) -> bool:
        if self.regex is None:
            return True
        return self.regex.fullmatch(entry_path(domain, relative_path)) is not None

    def __str__(self) -> str:
        return self.text or "**"


def translate_glob(pattern: str) -> str:
    """A glob as a regular expression (unanchored; callers use ``fullmatch``)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                while i < n and pattern[i] == "*":
                    i += 1
                if i < n and pattern[i] == "/":  # "**/": any number of whole components, or none
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                out.append(re.escape(c))
            else:
                inner = pattern[i + 1 : j]
                negate = inner[:1] in ("!", "^")
                if negate:
                    inner = inner[1:]
                inner = inner.replace("\\", "\\\\")
                out.append(f"[^/{inner}]" if negate else f"[{inner}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


# ---- MBFile -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One Manifest.db row, with what its MBFile says."""

    domain: str
    relative_path: str
    file_id: str
    flags: int
    size: int  # MBFile Size: the file's length (plaintext length in encrypted backups)
    mtime: int  # MBFile LastModified, unix seconds
    mode: int
    encryption_key: bytes | None = None  # encrypted backups: u32le class || wrapped per-file key

    @property
    def path(self) -> str:
        return entry_path(self.domain, self.relative_path)

    @property
    def kind(self) -> str:
        return kind_of(self.flags, self.mode)


def kind_of(flags: int, mode: int) -> str:
    """'file', 'dir' or 'symlink': from the row's flags, or its mode when the flags say
    nothing (some backups write 0)."""
    kind = _KIND_OF_FLAGS.get(flags)
    if kind is not None:
        return kind
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "file"


_TRAILER = struct.Struct(">6xBBQQQ")
_INT_FORMAT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _key(name: str) -> bytes:  # a short ASCII string as a binary plist writes it
    raw = name.encode()
    return bytes((0x50 | len(raw),)) + raw


_K_OBJECTS, _K_TOP, _K_ROOT = _key("$objects"), _key("$top"), _key("root")
_K_SIZE, _K_MTIME, _K_MODE, _K_ENCKEY, _K_NSDATA = (
    _key("Size"), _key("LastModified"), _key("Mode"), _key("EncryptionKey"), _key("NS.data"))


class _Unexpected(Exception):
    pass


def decode_mbfile(blob: bytes) -> tuple[int, int, int, bytes | None]:
    """``(Size, LastModified, Mode, EncryptionKey or None)`` of a Manifest.db ``file`` column.

    Reads only those fields straight from the binary plist (about 13 µs a row here, against
    46 µs for ``plistlib.loads``); anything unusual falls back to plistlib."""
    try:
        return _decode_mbfile_fast(blob)
    except (_Unexpected, IndexError, KeyError, ValueError, TypeError, struct.error):
        return _decode_mbfile_plistlib(blob)


def _decode_mbfile_fast(blob: bytes) -> tuple[int, int, int, bytes | None]:
    if blob[:8] != b"bplist00":
        raise _Unexpected
    off_size, ref_size, n, top, table = _TRAILER.unpack_from(blob, len(blob) - 32)
    offsets = struct.unpack_from(f">{n}{_INT_FORMAT[off_size]}", blob, table)
    ref_format = _INT_FORMAT[ref_size]

    def container(i: int, typ: int) -> tuple[int, int]:  # (count, start of its references)
        o = offsets[i]
        m = blob[o]
        if m >> 4 != typ:
            raise _Unexpected
        k, s = m & 0xF, o + 1
        if k == 0xF:
            nb = 1 << (blob[s] & 0xF)
            k = int.from_bytes(blob[s + 1 : s + 1 + nb], "big")
            s += 1 + nb
        return k, s

    def dict_refs(i: int, *wanted: bytes) -> list[int | None]:
        k, s = container(i, 0xD)
        refs = struct.unpack_from(f">{2 * k}{ref_format}", blob, s)
        found = {}
        for j in range(k):
            o = offsets[refs[j]]
            found[blob[o : o + 1 + (blob[o] & 0xF)]] = refs[k + j]
        return [found.get(w) for w in wanted]

    def integer(i: int | None) -> int:
        if i is None:
            raise _Unexpected
        o = offsets[i]
        m = blob[o]
        if m >> 4 != 0x1:
            raise _Unexpected
        nb = 1 << (m & 0xF)
        return int.from_bytes(blob[o + 1 : o + 1 + nb], "big", signed=nb >= 8)

    def uid(i: int | None) -> int:
        if i is None:
            raise _Unexpected
        o = offsets[i]
        m = blob[o]
        if m >> 4 != 0x8:
            raise _Unexpected
        return int.from_bytes(blob[o + 1 : o + 2 + (m & 0xF)], "big")

    r_objects, r_top = dict_refs(top, _K_OBJECTS, _K_TOP)
    if r_objects is None or r_top is None:
        raise _Unexpected
    (r_root,) = dict_refs(r_top, _K_ROOT)
    k, s = container(r_objects, 0xA)
    objects = struct.unpack_from(f">{k}{ref_format}", blob, s)
    r_size, r_mtime, r_mode, r_key = dict_refs(objects[uid(r_root)], _K_SIZE, _K_MTIME, _K_MODE, _K_ENCKEY)
    size, mtime, mode = integer(r_size), integer(r_mtime), integer(r_mode)
    key = None
    if r_key is not None:
        (r_data,) = dict_refs(objects[uid(r_key)], _K_NSDATA)
        if r_data is None:
            raise _Unexpected
        if blob[offsets[r_data]] >> 4 == 0x8:
            r_data = objects[uid(r_data)]
        k, s = container(r_data, 0x4)
        key = blob[s : s + k]
    return size, mtime, mode, key


def _decode_mbfile_plistlib(blob: bytes) -> tuple[int, int, int, bytes | None]:
    try:
        archive = plistlib.loads(blob)
        objects = archive["$objects"]

        def deref(v):
            return objects[v.data] if isinstance(v, plistlib.UID) else v

        mb = deref(archive["$top"]["root"])
        key = deref(mb.get("EncryptionKey"))
        if isinstance(key, dict):
            key = deref(key.get("NS.data"))
        return (int(mb.get("Size", 0)), int(mb.get("LastModified", 0)), int(mb.get("Mode", 0)),
                bytes(key) if isinstance(key, (bytes, bytearray)) else None)
    except Exception as e:
        raise InvalidData(f"a Manifest.db row's file metadata is unreadable ({e.__class__.__name__}: {e})") from None


# ---- encrypted iOS backups --------------------------------------------------------------------


class BackupKeys:
    """The unlocked keybag of an encrypted iOS backup."""

    def __init__(self, keybag) -> None:
        self._keybag = keybag  # pyiosbackup.keybag.Keybag: class -> class key

    @classmethod
    def unlock(cls, manifest_plist: dict, password: str) -> "BackupKeys":
        from cryptography.hazmat.primitives.keywrap import InvalidUnwrap
        from pyiosbackup.keybag import Keybag
        from pyiosbackup.manifest_plist import ManifestPlist

        plist = dict(manifest_plist)
        lockdown = dict(plist.get("Lockdown") or {})
        # Manifest.db backups are iOS 10 or later; the version decides whether the keybag's
        # DPSL/DPIC stage applies, and every iOS 10.2+ keybag has it
        lockdown.setdefault("ProductVersion", "10.2.1")
        plist["Lockdown"] = lockdown
        if not plist.get("BackupKeyBag"):
            raise InvalidData("the encrypted backup's Manifest.plist has no BackupKeyBag")
        try:
            keybag = Keybag.from_manifest(ManifestPlist(plist), password)
        except InvalidUnwrap:
            raise WrongBackupPassword("wrong iOS backup password") from None
        except Exception as e:
            raise InvalidData(f"the backup's keybag is unreadable ({e.__class__.__name__}: {e})") from None
        return cls(keybag)

    def unwrap(self, wrapped: bytes) -> bytes:
        """A file's (or Manifest.db's) AES key from ``u32le class || wrapped key``."""
        from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

        if len(wrapped) < 4 + 24:
            raise InvalidData("a wrapped key is too short")
        (protection_class,) = struct.unpack_from("<I", wrapped)
        try:
            class_key = self._keybag.get_key(protection_class)
        except KeyError:
            raise InvalidData(f"the keybag has no key for protection class {protection_class}") from None
        try:
            return aes_key_unwrap(class_key, wrapped[4:])
        except InvalidUnwrap:
            raise InvalidData("a file key does not unwrap with the keybag (damaged metadata)") from None

    def decrypt_database(self, chunks: Iterable[bytes], manifest_key: bytes) -> Iterator[bytes]:
        """Manifest.db: AES-256-CBC, zero IV, no padding (sqlite pages are whole blocks)."""
        dec = _cbc_decryptor(self.unwrap(manifest_key))
        for chunk in chunks:
            out = dec.update(chunk)
            if out:
                yield out
        try:
            tail = dec.finalize()
        except ValueError:
            raise InvalidData("the encrypted Manifest.db is not a whole number of AES blocks") from None
        if tail:
            yield tail

    def decrypt_file(self, chunks: Iterable[bytes], wrapped_key: bytes, size: int) -> Iterator[bytes]:
        """A payload: AES-256-CBC, zero IV, PKCS7 padding (checked and removed), trimmed to the
        recorded ``size`` when it is shorter. Streams; holds back the last block only."""
        dec = _cbc_decryptor(self.unwrap(wrapped_key))
        held = b""
        emitted = 0

        def emit(data: bytes) -> bytes:
            nonlocal emitted
            if size > 0:
                data = data[: max(0, size - emitted)]
            emitted += len(data)
            return data

        for chunk in chunks:
            out = dec.update(chunk)
            if not out:
                continue
            buf = held + out if held else out
            held = buf[-_AES_BLOCK:]
            body = emit(buf[:-_AES_BLOCK])
            if body:
                yield body
        try:
            held += dec.finalize()
        except ValueError:
            raise InvalidData("the encrypted file is not a whole number of AES blocks") from None
        if not held:
            if size:
                raise InvalidData(f"the encrypted file is empty, its metadata says {size} bytes")
            return
        pad = held[-1]
        if not 1 <= pad <= _AES_BLOCK or held[-pad:] != bytes((pad,)) * pad:
            raise InvalidData("the file does not decrypt with its key (bad padding)")
        last = emit(held[:-pad])
        if last:
            yield last


def _cbc_decryptor(key: bytes):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.CBC(b"\0" * _AES_BLOCK)).decryptor()


class BackupKeyring:
    """Keybags unlocked during one command: the password is asked for once, when the first
    encrypted snapshot needs it, and each distinct keybag is unlocked once."""

    def __init__(self, password: Callable[[], str]) -> None:
        self._password_source = password
        self._password: str | None = None
        self._unlocked: dict[bytes, BackupKeys] = {}
        self._lock = threading.Lock()

    def keys_for(self, manifest_plist: dict) -> BackupKeys:
        bag = bytes(manifest_plist.get("BackupKeyBag") or b"")
        digest = hashlib.sha256(bag).digest()
        with self._lock:
            keys = self._unlocked.get(digest)
            if keys is None:
                if self._password is None:
                    self._password = self._password_source()
                keys = self._unlocked[digest] = BackupKeys.unlock(manifest_plist, self._password)
            return keys


# ---- a snapshot's manifest ------------------------------------------------------------------


@dataclass
class DomainStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0


class SnapshotManifest:
    """A snapshot's Manifest.db opened read-only, and its payloads by file id. Use as a context
    manager: the rehydrated database is a temporary file, removed on close."""

    def __init__(self, repo: Repository, snapshot: Snapshot, keyring: BackupKeyring | None = None) -> None:
        self.repo = repo
        self.snapshot = snapshot
        self.keys: BackupKeys | None = None
        self._con: sqlite3.Connection | None = None
        self._path: str | None = None
        root = repo.load_tree(snapshot.tree)
        self._root = {n.name: n for n in root}
        self._dirs = {n.name: n for n in root if n.type == "dir" and len(n.name) == 2}
        self._payloads: dict[str, dict[str, Node]] = {}
        db = self._root.get("Manifest.db")
        if db is None or db.type != "file":
            raise UserError(
                f"snapshot {snapshot.short_id} has no Manifest.db: browsing needs an iOS 10 or later backup"
            )
        chunks: Iterable[bytes] = read_file(repo, db)
        if snapshot.ios_encrypted:
            if keyring is None:
                raise UserError(f"snapshot {snapshot.short_id} is an encrypted iOS backup: its password is needed")
            plist_node = self._root.get("Manifest.plist")
            if plist_node is None or plist_node.type != "file":
                raise InvalidData(f"snapshot {snapshot.short_id} has no Manifest.plist")
            try:
                plist = plistlib.loads(read_file_bytes(repo, plist_node))
            except plistlib.InvalidFileException as e:
                raise InvalidData(f"snapshot {snapshot.short_id}: Manifest.plist does not parse ({e})") from None
            manifest_key = plist.get("ManifestKey")
            if not isinstance(manifest_key, bytes):
                raise InvalidData(f"snapshot {snapshot.short_id}: the encrypted backup's Manifest.plist has no ManifestKey")
            self.keys = keyring.keys_for(plist)
            chunks = self.keys.decrypt_database(chunks, manifest_key)
        fd, self._path = tempfile.mkstemp(prefix="ibsync-manifest-", suffix=".db")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            uri = Path(self._path).absolute().as_uri() + "?mode=ro&immutable=1"
            self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
            try:
                self._con.execute("SELECT fileID, domain, relativePath, flags, file FROM Files LIMIT 1").fetchall()
            except sqlite3.DatabaseError as e:
                what = "does not decrypt to a database" if snapshot.ios_encrypted else "is not a readable database"
                raise InvalidData(f"snapshot {snapshot.short_id}: Manifest.db {what} ({e})") from None
            try:  # the open connection keeps it readable; nothing is left behind if we are killed
                os.unlink(self._path)
                self._path = None
            except OSError:
                pass  # Windows: removed on close
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "SnapshotManifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path = None

    # ---- rows ------------------------------------------------------------------------------

    def _query(self, sql: str, pattern: PathPattern | None, extra: str = "") -> sqlite3.Cursor:
        assert self._con is not None, "manifest is closed"
        if pattern is not None and pattern.domain is not None:
            return self._con.execute(f"{sql} WHERE domain = ? {extra}", (pattern.domain,))
        return self._con.execute(f"{sql} {extra}")

    def entries(self, pattern: PathPattern | None = None, *, kinds: Iterable[str] | None = ("file",)) -> Iterator[ManifestEntry]:
        """Rows matching ``pattern`` of the given kinds (all kinds for None), ordered by
        domain and path; only these rows' MBFiles are decoded."""
        kinds = set(kinds) if kinds is not None else None
        cur = self._query("SELECT fileID, domain, relativePath, flags, file FROM Files", pattern,
                          "ORDER BY domain, relativePath")
        for file_id, domain, rel, flags, blob in cur:
            rel = rel or ""
            if pattern is not None and not pattern.matches(domain, rel):
                continue
            known = _KIND_OF_FLAGS.get(flags)
            if kinds is not None and known is not None and known not in kinds:
                continue
            size, mtime, mode, key = decode_mbfile(blob) if blob else (0, 0, 0, None)
            if kinds is not None and known is None and kind_of(flags, mode) not in kinds:
                continue
            yield ManifestEntry(domain, rel, file_id, flags, size, mtime, mode, key)

    def files_by_id(self) -> Iterator[tuple[str, str, str]]:
        """``(fileID, domain, relative path)`` of every file row, in fileID order (the primary
        key's index: two manifests merge in one pass, in constant memory). Rows whose flags
        say what they are are not decoded."""
        assert self._con is not None, "manifest is closed"
        for file_id, domain, rel, flags, blob in self._con.execute(
            "SELECT fileID, domain, relativePath, flags, CASE WHEN flags IN (1, 2, 4) THEN NULL ELSE file END "
            "FROM Files ORDER BY fileID"
        ):
            if flags == FLAG_FILE or (
                flags not in _KIND_OF_FLAGS and kind_of(flags, decode_mbfile(blob)[2] if blob else 0) == "file"
            ):
                yield file_id, domain, rel or ""

    def entry(self, file_id: str) -> ManifestEntry | None:
        assert self._con is not None, "manifest is closed"
        row = self._con.execute(
            "SELECT fileID, domain, relativePath, flags, file FROM Files WHERE fileID = ?", (file_id,)
        ).fetchone()
        if row is None:
            return None
        size, mtime, mode, key = decode_mbfile(row[4]) if row[4] else (0, 0, 0, None)
        return ManifestEntry(row[1], row[2] or "", row[0], row[3], size, mtime, mode, key)

    def domains(self) -> dict[str, DomainStats]:
        """Files, folders, symlinks and file bytes (MBFile sizes) per domain."""
        assert self._con is not None, "manifest is closed"
        out: dict[str, DomainStats] = {}
        for domain, flags, blob in self._con.execute(
            "SELECT domain, flags, CASE WHEN flags IN (2, 4) THEN NULL ELSE file END FROM Files"
        ):
            st = out.get(domain)
            if st is None:
                st = out[domain] = DomainStats()
            size, mode = 0, 0
            if blob:
                size, _, mode, _ = decode_mbfile(blob)
            kind = kind_of(flags, mode)
            if kind == "file":
                st.files += 1
                st.bytes += size
            elif kind == "dir":
                st.dirs += 1
            else:
                st.symlinks += 1
        return dict(sorted(out.items()))

    # ---- payloads --------------------------------------------------------------------------

    def payload(self, file_id: str) -> Node | None:
        """The stored payload ``<fileID[:2]>/<fileID>`` of a row, None when the backup has none."""
        prefix = file_id[:2]
        nodes = self._payloads.get(prefix)
        if nodes is None:
            d = self._dirs.get(prefix)
            nodes = {n.name: n for n in self.repo.load_tree(d.subtree)} if d is not None and d.subtree else {}
            self._payloads[prefix] = nodes
        node = nodes.get(file_id)
        if node is None:  # iOS < 10 kept payloads at the top level
            node = self._root.get(file_id)
        return node if node is not None and node.type == "file" else None

    def read(self, entry: ManifestEntry, node: Node) -> Iterator[bytes]:
        """A file's content as the device had it: the stored payload, decrypted for an
        encrypted iOS backup."""
        chunks = read_file(self.repo, node)
        if self.keys is not None and entry.encryption_key:
            return self.keys.decrypt_file(chunks, entry.encryption_key, entry.size)
        return chunks


def changed_payloads(a: SnapshotManifest, b: SnapshotManifest) -> set[str]:
    """File ids whose stored payload differs between two snapshots: other blobs, another size,
    or present in one only. Sub-trees are compared by id first, so the ``xx/`` folders two
    snapshots share are not even loaded; one pair of sub-trees is held at a time."""
    out: set[str] = set()
    for prefix in sorted(set(a._dirs) | set(b._dirs)):
        da, db = a._dirs.get(prefix), b._dirs.get(prefix)
        if da is not None and db is not None and da.subtree == db.subtree:
            continue
        na = {n.name: n for n in a.repo.load_tree(da.subtree)} if da is not None and da.subtree else {}
        nb = {n.name: n for n in b.repo.load_tree(db.subtree)} if db is not None and db.subtree else {}
        for name in na.keys() | nb.keys():
            x, y = na.get(name), nb.get(name)
            if x is None or y is None or x.content != y.content or x.size != y.size or x.type != y.type:
                out.add(name)
    # iOS < 10 layouts keep payloads at the top level
    for name in (a._root.keys() | b._root.keys()) - set(a._dirs) - set(b._dirs):
        x, y = a._root.get(name), b._root.get(name)
        if len(name) == 40 and (x is None or y is None or x.content != y.content or x.size != y.size):
            out.add(name)
    return out
