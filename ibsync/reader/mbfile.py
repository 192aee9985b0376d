"""Manifest.db rows: the NSKeyedArchiver ``MBFile`` each row carries (size, times, mode and,
in encrypted backups, the file's wrapped key), decoded fast for the fields browsing needs."""

from __future__ import annotations

import plistlib
import stat
import struct
from dataclasses import dataclass

from ..errors import InvalidData
from .paths import entry_path

FLAG_FILE, FLAG_DIR, FLAG_SYMLINK = 1, 2, 4
_KIND_OF_FLAGS = {FLAG_FILE: "file", FLAG_DIR: "dir", FLAG_SYMLINK: "symlink"}


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
_WANTED_TEXT = frozenset(("$objects", "$top", "root", "Size", "LastModified", "Mode", "EncryptionKey", "NS.data"))
_WANTED_LONGEST = max(map(len, _WANTED_TEXT))
_K_SIZE, _K_MTIME, _K_MODE, _K_ENCKEY, _K_NSDATA = (
    _key("Size"),
    _key("LastModified"),
    _key("Mode"),
    _key("EncryptionKey"),
    _key("NS.data"),
)


class _Unexpected(Exception):
    pass


# What the fast path may give up with: any of these means "not the usual layout", and plistlib
# (which reads the whole archive) decides. Nothing else may escape it.
FAST_PATH_GIVES_UP = (_Unexpected, IndexError, KeyError, ValueError, TypeError, OverflowError, struct.error)

# Bounds a row's fields must keep for the rest of ibsync to use them (a file's length, a time
# datetime and os.utime accept, a mode the stat macros accept). Anything outside is hostile or
# damaged, and the row is reported rather than crashing whoever formats it.
_MAX_SIZE = 2**63 - 1
_MTIME_RANGE = (-62_135_596_800 + 86_400, 253_402_300_799 - 86_400)  # years 1..9999, a day inside
_MAX_MODE = 0o177777


def decode_mbfile(blob: bytes) -> tuple[int, int, int, bytes | None]:
    """``(Size, LastModified, Mode, EncryptionKey or None)`` of a Manifest.db ``file`` column.

    Reads only those fields straight from the binary plist (about 13 µs a row here, against
    46 µs for ``plistlib.loads``); anything unusual falls back to plistlib. Raises InvalidData,
    and nothing else, when the blob is not an MBFile or its fields are missing their type or
    range (a field that is absent reads as 0)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InvalidData(f"its file metadata (MBFile) is unreadable: a {type(blob).__name__}, not an archive")
    blob = bytes(blob)
    try:
        fields = _decode_mbfile_fast(blob)
    except FAST_PATH_GIVES_UP:
        fields = _decode_mbfile_plistlib(blob)
    return checked_fields(*fields)


def checked_fields(size: int, mtime: int, mode: int, key: bytes | None) -> tuple[int, int, int, bytes | None]:
    """The decoded fields, or InvalidData naming the first one out of range."""
    if not 0 <= size <= _MAX_SIZE:
        raise InvalidData(f"its MBFile Size is out of range ({size})")
    if not _MTIME_RANGE[0] <= mtime <= _MTIME_RANGE[1]:
        raise InvalidData(f"its MBFile LastModified is out of range ({mtime})")
    if not 0 <= mode <= _MAX_MODE:
        raise InvalidData(f"its MBFile Mode is out of range ({mode})")
    return size, mtime, mode, key


def _decode_mbfile_fast(blob: bytes) -> tuple[int, int, int, bytes | None]:
    if blob[:8] != b"bplist00":
        raise _Unexpected
    off_size, ref_size, n, top, table = _TRAILER.unpack_from(blob, len(blob) - 32)
    if n > len(blob) or table > len(blob):  # counts are checked before anything that size is built
        raise _Unexpected
    offsets = struct.unpack_from(f">{n}{_INT_FORMAT[off_size]}", blob, table)
    ref_format = _INT_FORMAT[ref_size]

    def container(i: int, typ: int) -> tuple[int, int]:  # (count, start of its references)
        o = offsets[i]
        if blob[o] >> 4 != typ:
            raise _Unexpected
        k, s = _count(blob, o)
        if k > len(blob):
            raise _Unexpected
        return k, s

    def dict_refs(i: int, *wanted: bytes) -> list[int | None]:
        k, s = container(i, 0xD)
        refs = struct.unpack_from(f">{2 * k}{ref_format}", blob, s)
        found = {}
        for j in range(k):
            o = offsets[refs[j]]
            m = blob[o]
            if m >> 4 == 0x5 and m & 0xF != 0xF:  # a short ASCII string: the usual key
                found[blob[o : o + 1 + (m & 0xF)]] = refs[k + j]
            elif m >> 4 in (0x5, 0x6):  # a long or UTF-16 key might spell a wanted one another way
                # the length first: real archives spell LastStatusChange and ProtectionClass
                # the long way, and a key longer than every wanted one is not worth decoding
                if _count(blob, o)[0] <= _WANTED_LONGEST and _string_at(blob, o) in _WANTED_TEXT:
                    raise _Unexpected
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


def _count(blob: bytes, o: int) -> tuple[int, int]:
    """The count of the object at offset ``o`` (elements, characters or bytes) and where its
    body starts: the marker's low nibble, or the integer after it when that nibble is 0xF."""
    k = blob[o] & 0xF
    if k != 0xF:
        return k, o + 1
    nb = 1 << (blob[o + 1] & 0xF)
    return int.from_bytes(blob[o + 2 : o + 2 + nb], "big"), o + 2 + nb


def _string_at(blob: bytes, o: int) -> str:
    """The ASCII (0x5) or UTF-16 (0x6) string object at offset ``o``, long lengths included."""
    k, s = _count(blob, o)
    if blob[o] >> 4 == 0x5:
        return blob[s : s + k].decode("latin-1")
    return blob[s : s + 2 * k].decode("utf-16-be", "replace")


def mbfile_fields(blob: bytes, names: tuple[str, ...] | None = None) -> dict:
    """Every field of an MBFile NSKeyedArchiver blob, or only ``names`` (the others are not
    looked at, so a dangling reference elsewhere does not matter), references resolved
    (``EncryptionKey`` as bytes, ``Target`` as str where present); plistlib's errors pass through."""
    archive = plistlib.loads(blob)
    objects = archive["$objects"]

    def deref(v):
        return objects[v.data] if isinstance(v, plistlib.UID) else v

    root = deref(archive["$top"]["root"])
    fields = {k: deref(root[k]) for k in (root if names is None else names) if k in root}
    key = fields.get("EncryptionKey")
    if isinstance(key, dict):
        key = deref(key.get("NS.data"))
    fields["EncryptionKey"] = bytes(key) if isinstance(key, (bytes, bytearray)) else None
    return fields


def _decode_mbfile_plistlib(blob: bytes) -> tuple[int, int, int, bytes | None]:
    """The reference reading: plistlib parses the archive and the four fields are resolved as
    NSKeyedUnarchiver would (a field may sit behind a UID); each an integer or absent."""
    try:
        mb = mbfile_fields(blob, ("Size", "LastModified", "Mode", "EncryptionKey"))
    except Exception as e:  # plistlib raises what it meets (ValueError, TypeError, RecursionError...)
        raise InvalidData(
            f"its file metadata (MBFile) is unreadable ({e.__class__.__name__}: {str(e)[:200]})"
        ) from None
    return _integer(mb, "Size"), _integer(mb, "LastModified"), _integer(mb, "Mode"), mb["EncryptionKey"]


def _integer(fields: dict, name: str) -> int:
    value = fields.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidData(f"its MBFile {name} is a {type(value).__name__}, not an integer")
    return value
