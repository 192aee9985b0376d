"""Deterministic synthetic iOS backup folders (MobileSync format, iOS 10+ with Manifest.db).

The content of a phone is a model, :class:`DeviceContent` (a list of :class:`BackupFile` rows with their
payloads), that :func:`write_backup_folder` materialises as the folder Finder, iTunes, idevicebackup2 and
pymobiledevice3 write::

    <parent>/<udid>/Info.plist  Manifest.plist  Status.plist  Manifest.db  00/ ... ff/<fileID>

:func:`mutate_content` and :func:`mutate_folder` apply "the next day" to the model or, in place, to a folder,
the way a device's incremental backup does, and give the same bytes for the same seed: 2 % of the small files
rewritten with new content of the same kind, 0.1 % deleted, a sixth as many new photos as there are (1-4 MiB,
each with a thumbnail), each large sqlite db edited through sqlite (DB_UPDATES + DB_INSERTS rows, about 20-30
of its 4 KiB pages change), Manifest.db edited through sqlite (rows updated, inserted, deleted), the three
plists rewritten with the date one day later. Changed files get their previous mtime + 1 day.

Everything comes from ``random.Random`` instances seeded from the ``seed`` argument (never from the clock or
from ``hash()``), so the same seed and size give byte-identical folders, sqlite files included (for a given
sqlite library version), with fixed mtimes (day 1 is 2024-01-01).

Proportions at 2 GiB (scaled linearly with the size; at least a few hundred small files):

* about 20k small files, about 31 % of the bytes: XML plists (25 % of them), small sqlite dbs of 20-64 KiB
  (12.5 %), text logs and JSON lines (12.5 %), incompressible files with a JPEG header or none (50 %,
  thumbnails and caches);
* about 300 photos (HEIC header + random bytes, 115 KiB-5 MiB), about 35 %;
* 4 large real sqlite dbs (sms.db, Photos.sqlite, ChatStorage.sqlite, Envelope Index), about 15 %;
* a few videos (.MOV, ftyp qt header + random bytes), about 17 %;
* a directory row for every parent directory, and two symlinks.

Run ``python -m ibsync.testing.generator --help``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import os
import plistlib
import random
import re
import shutil
import sqlite3
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

__all__ = [
    "BackupFile",
    "DeviceContent",
    "generate_content",
    "mutate_content",
    "write_backup_folder",
    "generate",
    "mutate_folder",
    "mbfile_blob",
    "build_manifest_db",
    "default_udid",
    "generate_many_files",
    "mutate_many_files",
    "FLAG_FILE",
    "FLAG_DIR",
    "FLAG_SYMLINK",
]

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
DAY = 86_400
PAGE = 4096

FLAG_FILE, FLAG_DIR, FLAG_SYMLINK = 1, 2, 4
MODE_FILE, MODE_DIR, MODE_SYMLINK = 0o100644, 0o40755, 0o120755
MOBILE_UID = MOBILE_GID = 501

#: The day-1 backup date. File mtimes are this minus a random age.
DAY1 = datetime(2024, 1, 1, 3, 0, 0, tzinfo=UTC)

# ---- proportions (at REFERENCE_SIZE; counts scale linearly with the size) -----------------------------------
REFERENCE_SIZE = 2 * GIB
SMALL_FILES_AT_REF = 20_000
MIN_SMALL_FILES = 300
PHOTOS_AT_REF = 300
VIDEOS_AT_REF = 6
#: Share of the payload bytes per class (Manifest.db, about 1 % more, comes on top).
BYTE_SHARE = {"small": 0.315, "photo": 0.355, "bigdb": 0.155, "video": 0.175}
SMALL_KIND_SHARE = {"plist": 0.25, "sqlite": 0.125, "text": 0.125, "random": 0.50}
#: Of the incompressible small files, this share are photo thumbnails (one per photo or video).
THUMBNAIL_SHARE = 0.35
#: Large sqlite dbs never get smaller than this, however small the folder.
MIN_BIGDB = 512 * KIB
MIN_VIDEO = 256 * KIB
MIN_PHOTO = 16 * KIB

# ---- the next day -------------------------------------------------------------------------------------------
REWRITE_FRACTION = 0.02  # of the small files
DELETE_FRACTION = 0.001  # of the small files
NEW_PHOTOS_PER_PHOTO = 1 / 6  # 50 new photos a day for 300 (at 2 GiB)
NEW_PHOTO_SIZE = (1 * MIB, 4 * MIB)
#: Row edits per large sqlite db and day: UPDATEs of non-indexed columns and INSERTs. Together they change
#: about 20-30 of the db's 4 KiB pages.
DB_UPDATES = 8
DB_INSERTS = 6

#: generate() holds at most about this many payload bytes that are not written yet.
WRITE_AHEAD = 256 * MIB


# ============================================================================================================
# The model
# ============================================================================================================


@dataclass(frozen=True)
class BackupFile:
    """One Manifest.db row, with its payload when it is a file."""

    domain: str  # e.g. "HomeDomain", "CameraRollDomain", "AppDomain-com.apple.mobilenotes"
    relative_path: str  # e.g. "Library/SMS/sms.db"
    flags: int  # 1 file, 2 directory, 4 symlink
    mtime: int  # unix seconds
    mode: int  # 0o100644 file, 0o40755 dir, 0o120755 symlink
    size: int
    data: bytes | None = field(default=None, repr=False)  # payload for flags == 1 (None for dirs/symlinks)
    target: str | None = None  # symlink target

    @property
    def file_id(self) -> str:
        return hashlib.sha1(f"{self.domain}-{self.relative_path}".encode()).hexdigest()

    @property
    def is_file(self) -> bool:
        return self.flags == FLAG_FILE

    @property
    def is_dir(self) -> bool:
        return self.flags == FLAG_DIR

    @property
    def is_symlink(self) -> bool:
        return self.flags == FLAG_SYMLINK


@dataclass
class DeviceContent:
    """What a phone holds, as a backup would record it."""

    udid: str
    device_name: str
    product_type: str  # e.g. "iPhone15,2"
    product_version: str  # e.g. "17.5.1"
    build_version: str
    serial_number: str
    files: list[BackupFile]  # files, directories and symlinks
    backup_date: datetime  # used for Status.plist / Manifest.plist Date (timezone-aware, UTC)
    #: The Manifest.db image that goes with ``files``, as the device keeps it (it edits it in place from one
    #: backup to the next). ``None``, or an image whose ``manifest_signature`` no longer matches ``files``,
    #: means "build a fresh one from ``files``".
    manifest_db: bytes | None = field(default=None, repr=False, compare=False)
    manifest_signature: str | None = field(default=None, repr=False, compare=False)

    def manifest_db_bytes(self) -> bytes:
        """The Manifest.db image for ``files``: the kept one when it still matches, else a fresh one."""
        if self.manifest_db is not None and self.manifest_signature == files_signature(self.files):
            return self.manifest_db
        return build_manifest_db(self.files)

    @property
    def total_payload_bytes(self) -> int:
        return sum(f.size for f in self.files if f.flags == FLAG_FILE)


def default_udid(seed: int) -> str:
    return hashlib.sha1(f"ibsync-synthetic-udid-{seed}".encode()).hexdigest()


def files_signature(files: Iterable[BackupFile]) -> str:
    """A digest of everything in ``files`` that Manifest.db records (not the payloads)."""
    rows = sorted(f"{f.domain}\0{f.relative_path}\0{f.flags}\0{f.mtime}\0{f.mode}\0{f.size}\0{f.target}" for f in files)
    return hashlib.sha1("\n".join(rows).encode()).hexdigest()


def _sorted_files(files: Iterable[BackupFile]) -> list[BackupFile]:
    return sorted(files, key=lambda f: (f.domain, f.relative_path))


# ============================================================================================================
# MBFile blobs (binary NSKeyedArchiver plists, byte-identical to the ones CoreFoundation writes)
# ============================================================================================================


def _derived_meta(f: BackupFile) -> tuple[int, int, int]:
    """(InodeNumber, Birth, ProtectionClass), derived from the row so the model needs no extra fields."""
    h = hashlib.sha1(f"{f.domain}-{f.relative_path}:{f.mtime}".encode()).digest()
    inode = 10_000_000 + int.from_bytes(h[:4], "big") % 90_000_000
    birth = f.mtime - int.from_bytes(h[4:8], "big") % (400 * DAY)
    protection = 3 if f.flags == FLAG_FILE else 0
    return inode, birth, protection


def _bp_int(v: int) -> bytes:
    if v < 0:
        return b"\x13" + v.to_bytes(8, "big", signed=True)
    if v < 1 << 8:
        return bytes((0x10, v))
    if v < 1 << 16:
        return b"\x11" + v.to_bytes(2, "big")
    if v < 1 << 32:
        return b"\x12" + v.to_bytes(4, "big")
    if v < 1 << 63:
        return b"\x13" + v.to_bytes(8, "big")
    raise OverflowError(v)


def _bp_size(token: int, n: int) -> bytes:
    if n < 15:
        return bytes((token | n,))
    if n < 1 << 8:
        return bytes((token | 0xF, 0x10, n))
    if n < 1 << 16:
        return bytes((token | 0xF, 0x11)) + n.to_bytes(2, "big")
    if n < 1 << 32:
        return bytes((token | 0xF, 0x12)) + n.to_bytes(4, "big")
    return bytes((token | 0xF, 0x13)) + n.to_bytes(8, "big")


def _bp_str(s: str) -> bytes:
    try:
        b = s.encode("ascii")
        return _bp_size(0x50, len(b)) + b
    except UnicodeEncodeError:
        b = s.encode("utf-16be")
        return _bp_size(0x60, len(b) // 2) + b


def _count_to_size(n: int) -> int:
    return 1 if n < 1 << 8 else 2 if n < 1 << 16 else 4 if n < 1 << 32 else 8


_MB_KEYS = (
    "LastModified",
    "Flags",
    "GroupID",
    "$class",
    "LastStatusChange",
    "RelativePath",
    "Birth",
    "Size",
    "InodeNumber",
    "Mode",
    "UserID",
    "ProtectionClass",
)
_MB_KEYS_SYMLINK = _MB_KEYS[:3] + ("Target",) + _MB_KEYS[3:]


def _mbfile_objects(f: BackupFile) -> tuple[list, int]:
    """The flattened object table of the archive, in the order plistlib/CoreFoundation number objects:
    encoded scalars as bytes, containers as (token, refs); returns (objects, top ref)."""
    inode, birth, protection = _derived_meta(f)
    symlink = f.target is not None
    objs: list = [None]  # 0: the top dict
    strs: dict[str, int] = {}
    ints: dict[int, int] = {}

    def s(v: str) -> int:
        r = strs.get(v)
        if r is None:
            r = strs[v] = len(objs)
            objs.append(_bp_str(v))
        return r

    def i(v: int) -> int:
        r = ints.get(v)
        if r is None:
            r = ints[v] = len(objs)
            objs.append(_bp_int(v))
        return r

    def uid(v: int) -> int:
        objs.append(bytes((0x80, v)))
        return len(objs) - 1

    top_keys = [s("$version"), s("$archiver"), s("$top"), s("$objects")]
    top_vals = [i(100000), s("NSKeyedArchiver"), len(objs)]
    objs.append(None)  # the $top dict
    objs[top_vals[2]] = (0xD0, [s("root"), uid(1)])
    arr = len(objs)
    top_vals.append(arr)
    objs.append(None)  # the $objects array
    items = [s("$null"), len(objs)]
    mb = len(objs)
    objs.append(None)  # the MBFile dict
    mb_refs = [s(k) for k in (_MB_KEYS_SYMLINK if symlink else _MB_KEYS)]
    mb_refs += [i(f.mtime), i(0), i(MOBILE_GID)]
    if symlink:
        mb_refs.append(uid(3))
    mb_refs += [uid(4 if symlink else 3), i(f.mtime), uid(2), i(birth)]
    objs.append(_bp_int(f.size))  # Size: its own object, never shared with an equal int
    mb_refs.append(len(objs) - 1)
    mb_refs += [i(inode), i(f.mode), i(MOBILE_UID), i(protection)]
    objs[mb] = (0xD0, mb_refs)
    items.append(s(f.relative_path))
    if symlink:
        items.append(s(f.target))
    cls = len(objs)
    items.append(cls)
    objs.append(None)
    cls_refs = [s("$classname"), s("$classes"), s("MBFile"), len(objs)]
    objs.append(None)
    objs[cls_refs[3]] = (0xA0, [s("MBFile"), s("NSObject")])
    objs[cls] = (0xD0, cls_refs)
    objs[arr] = (0xA0, items)
    objs[0] = (0xD0, top_keys + top_vals)
    return objs, 0


def mbfile_blob(f: BackupFile) -> bytes:
    """The ``file`` column of a Manifest.db row: an NSKeyedArchiver binary plist of an ``MBFile``.

    The layout is the one of real backups, byte for byte: same keys in the same order, same object table (ints
    shared, ``Size`` a separate object as CoreFoundation writes it); ``plistlib.dumps(mbfile_archive(f),
    fmt=FMT_BINARY, sort_keys=False)`` gives the same bytes, only slower.
    """
    objs, top = _mbfile_objects(f)
    n = len(objs)
    ref_size = _count_to_size(n)
    out = bytearray(b"bplist00")
    offsets = []
    for o in objs:
        offsets.append(len(out))
        if o.__class__ is bytes:
            out += o
        else:
            token, refs = o
            out += _bp_size(token, len(refs) // 2 if token == 0xD0 else len(refs))
            if ref_size == 1:
                out += bytes(refs)
            else:
                out += struct.pack(f">{len(refs)}{'BHIQ'[(1, 2, 4, 8).index(ref_size)]}", *refs)
    table_offset = len(out)
    off_size = _count_to_size(table_offset)
    out += struct.pack(f">{n}{'BHIQ'[(1, 2, 4, 8).index(off_size)]}", *offsets)
    out += struct.pack(">5xBBBQQQ", 0, off_size, ref_size, n, top, table_offset)
    return bytes(out)


class _Int64(int):
    """An int that plistlib does not share with equal plain ints (CoreFoundation keeps ``Size`` apart)."""


def mbfile_archive(f: BackupFile) -> dict:
    """The decoded form of :func:`mbfile_blob`, for ``plistlib.dumps(..., sort_keys=False)`` (reference)."""
    inode, birth, protection = _derived_meta(f)
    d: dict = {"LastModified": f.mtime, "Flags": 0, "GroupID": MOBILE_GID}
    objects: list = ["$null", d, f.relative_path]
    if f.target is not None:
        d["Target"] = plistlib.UID(3)
        objects.append(f.target)
    d["$class"] = plistlib.UID(len(objects))
    d.update(
        {
            "LastStatusChange": f.mtime,
            "RelativePath": plistlib.UID(2),
            "Birth": birth,
            "Size": _Int64(f.size),
            "InodeNumber": inode,
            "Mode": f.mode,
            "UserID": MOBILE_UID,
            "ProtectionClass": protection,
        }
    )
    objects.append({"$classname": "MBFile", "$classes": ["MBFile", "NSObject"]})
    return {"$version": 100000, "$archiver": "NSKeyedArchiver", "$top": {"root": plistlib.UID(1)}, "$objects": objects}


# ============================================================================================================
# Manifest.db
# ============================================================================================================

_MANIFEST_SCHEMA = (
    "CREATE TABLE Files (fileID TEXT PRIMARY KEY, domain TEXT, relativePath TEXT, flags INTEGER, file BLOB)",
    "CREATE TABLE Properties (key TEXT PRIMARY KEY, value BLOB)",
    "CREATE INDEX FilesDomainIdx ON Files(domain)",
    "CREATE INDEX FilesRelativePathIdx ON Files(relativePath)",
    "CREATE INDEX FilesFlagsIdx ON Files(flags)",
)


def _manifest_row(f: BackupFile) -> tuple:
    return (f.file_id, f.domain, f.relative_path, f.flags, mbfile_blob(f))


def build_manifest_db(files: Iterable[BackupFile]) -> bytes:
    """A fresh Manifest.db image (4 KiB pages, incremental auto-vacuum and user_version 2 as in real ones;
    rollback journal rather than WAL so that readers leave no -wal/-shm files beside it)."""
    con = sqlite3.connect(":memory:", isolation_level=None)
    try:
        con.execute(f"PRAGMA page_size={PAGE}")
        con.execute("PRAGMA auto_vacuum=INCREMENTAL")
        con.execute("BEGIN")
        for sql in _MANIFEST_SCHEMA:
            con.execute(sql)
        con.execute("PRAGMA user_version=2")
        con.executemany("INSERT INTO Files VALUES (?, ?, ?, ?, ?)", [_manifest_row(f) for f in files])
        con.execute("COMMIT")
        return con.serialize()
    finally:
        con.close()


def _apply_manifest_changes(
    con: sqlite3.Connection, deleted: list[BackupFile], updated: list[BackupFile], inserted: list[BackupFile]
) -> None:
    con.execute("BEGIN")
    con.executemany("DELETE FROM Files WHERE fileID = ?", sorted((f.file_id,) for f in deleted))
    con.executemany(
        "UPDATE Files SET domain = ?, relativePath = ?, flags = ?, file = ? WHERE fileID = ?",
        sorted(((f.domain, f.relative_path, f.flags, mbfile_blob(f), f.file_id) for f in updated), key=lambda r: r[-1]),
    )
    con.executemany("INSERT INTO Files VALUES (?, ?, ?, ?, ?)", [_manifest_row(f) for f in _sorted_files(inserted)])
    con.execute("COMMIT")


# ============================================================================================================
# Content generators
# ============================================================================================================

_SYLLABLES = (
    "ka ri to na mi lo sa te vu pe da ko ra ne li mo ta shi ru be ga zo ha fi no ye wa ku ze ma "
    "ti po lu de se bo ni re ja mu so ve ke la di gu pa ho fu na ce ly xa qu ro ine ant el ar on "
    "us or en is al"
).split()


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[list[str], list[float]]:
    """5,000 pseudo-words with Zipf cumulative weights (the same for every seed)."""
    rnd = random.Random("ibsync-generator-vocabulary")
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < 5000:
        w = "".join(rnd.choices(_SYLLABLES, k=rnd.choice((1, 2, 2, 2, 3, 3, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    cum, acc = [], 0.0
    for rank in range(len(words)):
        acc += 1.0 / (rank + 1) ** 1.07
        cum.append(acc)
    return words, cum


class _Lexicon:
    """Sentences and key names drawn from the shared vocabulary; a pool per seed keeps generation fast."""

    N_KEYS = 1499  # a prime: key i of a dict is keys[(start + i * step) % N_KEYS], unique for i < N_KEYS

    def __init__(self, rnd: random.Random, n_sentences: int = 20_000):
        words, cum = _vocabulary()
        self.words = words
        self.sentences = []
        for _ in range(n_sentences):
            ws = rnd.choices(words, cum_weights=cum, k=rnd.randint(3, 16))
            ws[0] = ws[0].capitalize()
            self.sentences.append(" ".join(ws) + rnd.choice((".", ".", ".", "", "?", "!")))
        keys: dict[str, None] = {}
        while len(keys) < self.N_KEYS:
            ws = rnd.choices(words[:1500], k=rnd.randint(1, 3))
            style = rnd.random()
            camel = "".join(w.capitalize() for w in ws)
            key = ("k" + camel + "Key") if style < 0.3 else (camel[0].lower() + camel[1:]) if style < 0.8 else camel
            keys[key] = None
        self.keys = list(keys)
        self.camel = [
            "".join(w.capitalize() for w in rnd.choices(words[:800], k=rnd.randint(1, 2))) for _ in range(400)
        ]

    def text(self, rnd: random.Random, k: int) -> str:
        return " ".join(rnd.choices(self.sentences, k=k))


@functools.lru_cache(maxsize=4)
def _lexicon(tag: str) -> _Lexicon:
    return _Lexicon(random.Random(f"ibsync-generator-lexicon:{tag}"))


def _rand_bytes(rnd: random.Random, n: int) -> bytes:
    """``n`` incompressible bytes determined by ``rnd`` (SHAKE-128 for big ones: 2.5x faster than randbytes)."""
    if n <= 0:
        return b""
    if n <= 4096:
        return rnd.randbytes(n)
    return hashlib.shake_128(rnd.randbytes(16)).digest(n)


def _uuid_str(rnd: random.Random) -> str:
    h = rnd.randbytes(16).hex().upper()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


_PLIST_HEAD = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" '
    '"http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n<plist version="1.0">\n<dict>\n'
)
_PLIST_TAIL = "</dict>\n</plist>\n"
_INT_BITS = (4, 8, 16, 32, 40)

# The generators below draw with ``rnd.random()`` and arithmetic rather than randrange/choice: same
# determinism, several times faster.


def _plist_value(rnd: random.Random, lex: _Lexicon, ind: str, t0: int, depth: int) -> str:
    rand = rnd.random
    r = rand()
    if r < 0.38:
        sents = lex.sentences
        text = sents[int(rand() * len(sents))]
        if r < 0.12:
            text += " " + sents[int(rand() * len(sents))]
        return f"{ind}<string>{text}</string>\n"
    if r < 0.58:
        return f"{ind}<integer>{int(rand() * (1 << _INT_BITS[int(rand() * 5)]))}</integer>\n"
    if r < 0.68:
        return f"{ind}<date>{_iso(t0 - int(rand() * 400 * DAY))}</date>\n"
    if r < 0.78:
        return f"{ind}<data>{base64.b64encode(rnd.randbytes(8 + int(rand() * 88))).decode()}</data>\n"
    if r < 0.84:
        return f"{ind}<true/>\n" if r < 0.81 else f"{ind}<false/>\n"
    if r < 0.88:
        return f"{ind}<real>{rand() * 1000:.6f}</real>\n"
    if depth >= 3:
        return f"{ind}<string>{lex.keys[int(rand() * len(lex.keys))]}</string>\n"
    inner = ind + "\t"
    if r < 0.94:
        return (
            f"{ind}<array>\n"
            + "".join([_plist_value(rnd, lex, inner, t0, depth + 1) for _ in range(1 + int(rand() * 6))])
            + f"{ind}</array>\n"
        )
    return f"{ind}<dict>\n" + _plist_entries(rnd, lex, inner, t0, depth + 1, 2 + int(rand() * 7)) + f"{ind}</dict>\n"


def _plist_entries(rnd: random.Random, lex: _Lexicon, ind: str, t0: int, depth: int, n: int) -> str:
    keys, nk = lex.keys, _Lexicon.N_KEYS
    start, step = int(rnd.random() * nk), 1 + int(rnd.random() * (nk - 1))
    return "".join(
        [
            f"{ind}<key>{keys[(start + i * step) % nk]}</key>\n" + _plist_value(rnd, lex, ind, t0, depth)
            for i in range(n)
        ]
    )


def make_plist(rnd: random.Random, lex: _Lexicon, size: int, t0: int) -> bytes:
    """An XML plist of about ``size`` bytes: word salad, ints, dates, base64 data, nested dicts and arrays."""
    keys, nk = lex.keys, _Lexicon.N_KEYS
    start, step = int(rnd.random() * nk), 1 + int(rnd.random() * (nk - 1))
    parts = [_PLIST_HEAD]
    n = len(_PLIST_HEAD) + len(_PLIST_TAIL)
    i = 0
    while n < size:
        key = keys[(start + i * step) % nk]
        if i >= nk:  # more top-level entries than distinct keys (only for huge plists)
            key += str(i // nk)
        entry = f"\t<key>{key}</key>\n" + _plist_value(rnd, lex, "\t", t0, 1)
        parts.append(entry)
        n += len(entry)
        i += 1
    parts.append(_PLIST_TAIL)
    return "".join(parts).encode()


_PROCS = (
    "SpringBoard",
    "locationd",
    "backboardd",
    "mediaserverd",
    "apsd",
    "wifid",
    "CommCenter",
    "bluetoothd",
    "itunesstored",
    "nsurlsessiond",
    "cloudd",
    "photoanalysisd",
    "assistantd",
    "healthd",
    "searchd",
    "mobileassetd",
    "identityservicesd",
    "imagent",
    "runningboardd",
    "dasd",
)
_LEVELS = ("Notice", "Notice", "Notice", "Error", "Debug", "Info", "Info", "Warning")
_LEVELS_LOWER = tuple(x.lower() for x in _LEVELS)


def make_text(rnd: random.Random, lex: _Lexicon, size: int, t0: int, json_lines: bool) -> bytes:
    """A syslog-like log or a JSON-lines log of about ``size`` bytes."""
    rand = rnd.random
    sents, keys = lex.sentences, lex.keys
    ns, nk = len(sents), len(keys)
    parts: list[str] = []
    n = 0
    t = t0 - int(rand() * 30 * DAY)
    if json_lines:
        cats = rnd.sample(keys, 8)
        while n < size:
            t += 1 + int(rand() * 90)
            line = (
                f'{{"timestamp":{t}.{int(rand() * 1000):03d},"level":"{_LEVELS_LOWER[int(rand() * 8)]}",'
                f'"category":"{cats[int(rand() * 8)]}","message":"{sents[int(rand() * ns)]}",'
                f'"count":{int(rand() * 100000)},"session":"{rnd.getrandbits(48):012x}"}}\n'
            )
            parts.append(line)
            n += len(line)
    else:
        procs = [f"{p}[{rnd.randrange(40, 9000)}]" for p in rnd.sample(_PROCS, 6)]
        stamp_t, stamp = -1, ""
        while n < size:
            t += int(rand() * 40)
            if t != stamp_t:
                stamp_t, stamp = t, time.strftime("%b %d %H:%M:%S", time.gmtime(t))
            line = (
                f"{stamp} iPhone {procs[int(rand() * 6)]} <{_LEVELS[int(rand() * 8)]}>: "
                f"{sents[int(rand() * ns)]} {keys[int(rand() * nk)]}={int(rand() * 10000)}\n"
            )
            parts.append(line)
            n += len(line)
    return "".join(parts).encode()


_JPEG_HEAD = bytes.fromhex("ffd8ffe000104a46494600010101004800480000ffe1") + b"\x00\x5eExif\x00\x00MM\x00*"
_HEIC_HEAD = (
    b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00\x00\x0b\x4emeta\x00\x00\x00\x00"
    b"\x00\x00\x00\x22hdlr\x00\x00\x00\x00\x00\x00\x00\x00pict\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00"
)
_MOV_HEAD = b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  \x00\x00\x00\x08wide"
_M4A_HEAD = b"\x00\x00\x00\x1cftypM4A \x00\x00\x00\x00M4A mp42isom\x00\x00\x00\x08wide"


def make_random(rnd: random.Random, size: int, head: bytes = b"") -> bytes:
    return head[:size] + _rand_bytes(rnd, size - len(head[:size]))


def make_photo(rnd: random.Random, size: int) -> bytes:
    return make_random(rnd, size, _HEIC_HEAD)


def make_video(rnd: random.Random, size: int) -> bytes:
    head = _MOV_HEAD + (size - len(_MOV_HEAD)).to_bytes(4, "big") + b"mdat"
    return make_random(rnd, size, head)


_SMALL_DB_SCHEMAS = (
    (
        "CREATE TABLE ZRECORD (Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZIDENTIFIER VARCHAR, "
        "ZTIMESTAMP TIMESTAMP, ZTEXT VARCHAR, ZFLAGS INTEGER)",
        "CREATE INDEX ZRECORD_ZIDENTIFIER_INDEX ON ZRECORD (ZIDENTIFIER)",
        "CREATE INDEX ZRECORD_ZTIMESTAMP_INDEX ON ZRECORD (ZTIMESTAMP)",
        "INSERT INTO ZRECORD (Z_ENT, Z_OPT, ZIDENTIFIER, ZTIMESTAMP, ZTEXT, ZFLAGS) "
        "VALUES (1, 1, ?, ? - 978307200, ?, ?)",
    ),
    (
        "CREATE TABLE cfurl_cache_response (entry_ID INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, version INTEGER, "
        "hash_value INTEGER, storage_policy INTEGER, request_key TEXT UNIQUE, time_stamp NOT NULL DEFAULT "
        "CURRENT_TIMESTAMP, partition TEXT)",
        "CREATE INDEX request_key_index ON cfurl_cache_response(request_key)",
        "CREATE INDEX time_stamp_index ON cfurl_cache_response(time_stamp)",
        "INSERT INTO cfurl_cache_response (version, request_key, time_stamp, partition, hash_value, storage_policy) "
        "VALUES (0, 'https://' || ?, ?, ?, ?, 0)",
    ),
    (
        "CREATE TABLE events (id INTEGER PRIMARY KEY, uuid TEXT NOT NULL, ts INTEGER, payload TEXT, state INTEGER)",
        "CREATE INDEX events_uuid ON events(uuid)",
        "CREATE INDEX events_ts ON events(ts)",
        "INSERT INTO events (uuid, ts, payload, state) VALUES (?, ?, ?, ?)",
    ),
)


def make_small_sqlite(rnd: random.Random, lex: _Lexicon, size: int, t0: int) -> bytes:
    """A real sqlite db (one table, two indexes, 4 KiB pages) of about ``size`` bytes (16 KiB at least)."""
    schema = rnd.choice(_SMALL_DB_SCHEMAS)
    con = sqlite3.connect(":memory:", isolation_level=None)
    try:
        con.execute(f"PRAGMA page_size={PAGE}")
        con.execute("BEGIN")
        for sql in schema[:3]:
            con.execute(sql)
        t = t0 - rnd.randrange(200 * DAY)
        rand, sents = rnd.random, lex.sentences
        ns = len(sents)
        pages = 4
        while pages * PAGE < size:
            batch = max(4, (size - pages * PAGE) // 400)
            rows = []
            for _ in range(batch):
                t += 1 + int(rand() * 4000)
                text = sents[int(rand() * ns)]
                if rand() < 0.5:
                    text += " " + sents[int(rand() * ns)]
                rows.append((_uuid_str(rnd), t, text, int(rand() * 65536)))
            con.executemany(schema[3], rows)
            pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute("COMMIT")
        return con.serialize()
    finally:
        con.close()


# ---- the four large sqlite dbs ------------------------------------------------------------------------------

_APPLE_EPOCH = 978_307_200  # 2001-01-01 in unix seconds


@dataclass(frozen=True)
class _BigDb:
    domain: str
    path: str
    schema: tuple[str, ...]
    #: Named parameters :uuid :text :date (converted with ``date_fn``) :a (1-400) :b :c (0/1) :blob :d (31 bits)
    #: :e (0-4999); no SQL random(), which is not seeded.
    insert_sql: str
    #: Parameters (value, date, pk): only non-indexed columns.
    update_sql: str
    max_pk_sql: str
    date_fn: Callable[[int], object]
    blob_head: bytes
    after_insert_sql: str | None = None


_BIG_DBS = (
    _BigDb(
        "HomeDomain",
        "Library/SMS/sms.db",
        (
            "CREATE TABLE _SqliteDatabaseProperties (key TEXT, value TEXT, UNIQUE(key))",
            "CREATE TABLE handle (ROWID INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, id TEXT NOT NULL, country TEXT, "
            "service TEXT NOT NULL, uncanonicalized_id TEXT, person_centric_id TEXT, UNIQUE (id, service))",
            "CREATE TABLE message (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, text TEXT, "
            "handle_id INTEGER DEFAULT 0, service TEXT, date INTEGER, date_read INTEGER, date_delivered INTEGER, "
            "is_from_me INTEGER DEFAULT 0, is_read INTEGER DEFAULT 0, attributedBody BLOB)",
            "CREATE INDEX message_idx_date ON message(date)",
            "INSERT INTO _SqliteDatabaseProperties VALUES ('_ClientVersion', '17004'), ('counter_in_all', '0')",
        ),
        "INSERT INTO message (guid, text, date, handle_id, is_from_me, is_read, attributedBody, service, date_read, "
        "date_delivered) VALUES (:uuid, :text, :date, :a, :b, :c, :blob, 'iMessage', 0, :date)",
        "UPDATE message SET is_read = ?, date_read = ? WHERE ROWID = ?",
        "SELECT max(ROWID) FROM message",
        lambda t: (t - _APPLE_EPOCH) * 1_000_000_000,
        b"\x04\x0bstreamtyped\x81\xe8\x03\x84\x01@\x84\x84\x84\x12NSAttributedString\x00\x84\x84\x08NSObject"
        b"\x00\x85\x92\x84\x84\x84\x08NSString\x01\x94\x84\x01+",
    ),
    _BigDb(
        "CameraRollDomain",
        "Media/PhotoData/Photos.sqlite",
        (
            "CREATE TABLE Z_PRIMARYKEY (Z_ENT INTEGER PRIMARY KEY, Z_NAME VARCHAR, Z_SUPER INTEGER, Z_MAX INTEGER)",
            "CREATE TABLE Z_METADATA (Z_VERSION INTEGER PRIMARY KEY, Z_UUID VARCHAR(255), Z_PLIST BLOB)",
            "CREATE TABLE ZASSET (Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZFAVORITE INTEGER, "
            "ZHIDDEN INTEGER, ZKIND INTEGER, ZWIDTH INTEGER, ZHEIGHT INTEGER, ZDATECREATED TIMESTAMP, "
            "ZMODIFICATIONDATE TIMESTAMP, ZDIRECTORY VARCHAR, ZFILENAME VARCHAR, ZUUID VARCHAR, ZTITLE VARCHAR, "
            "ZLOCATIONDATA BLOB)",
            "CREATE INDEX ZASSET_ZUUID ON ZASSET (ZUUID)",
            "CREATE INDEX ZASSET_ZDATECREATED ON ZASSET (ZDATECREATED)",
            "INSERT INTO Z_PRIMARYKEY VALUES (33, 'Asset', 0, 0)",
            "INSERT INTO Z_METADATA VALUES (1, '3B2A3E1C-5F49-4E29-9C8B-1E7C2D3F4A5B', NULL)",
        ),
        "INSERT INTO ZASSET (ZUUID, ZTITLE, ZDATECREATED, ZKIND, ZFAVORITE, ZHIDDEN, ZLOCATIONDATA, Z_ENT, Z_OPT, "
        "ZWIDTH, ZHEIGHT, ZMODIFICATIONDATE, ZDIRECTORY, ZFILENAME) VALUES (:uuid, :text, :date, :a % 2, :b, 0, "
        ":blob, 33, 1, 4032, 3024, :date, 'DCIM/100APPLE', 'IMG_' || (:d % 10000) || '.HEIC')",
        "UPDATE ZASSET SET ZFAVORITE = ?, ZMODIFICATIONDATE = ? WHERE Z_PK = ?",
        "SELECT max(Z_PK) FROM ZASSET",
        lambda t: float(t - _APPLE_EPOCH),
        b"bplist00\xd4\x01\x02\x03\x04\x05\x06\x07\x08_\x10\x0fCLLocationCoord",
        "UPDATE Z_PRIMARYKEY SET Z_MAX = (SELECT max(Z_PK) FROM ZASSET) WHERE Z_ENT = 33",
    ),
    _BigDb(
        "AppDomainGroup-group.net.whatsapp.WhatsApp.shared",
        "ChatStorage.sqlite",
        (
            "CREATE TABLE Z_PRIMARYKEY (Z_ENT INTEGER PRIMARY KEY, Z_NAME VARCHAR, Z_SUPER INTEGER, Z_MAX INTEGER)",
            "CREATE TABLE ZWAMESSAGE (Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZISFROMME INTEGER, "
            "ZMESSAGESTATUS INTEGER, ZMESSAGETYPE INTEGER, ZCHATSESSION INTEGER, ZMESSAGEDATE TIMESTAMP, "
            "ZSENTDATE TIMESTAMP, ZFROMJID VARCHAR, ZSTANZAID VARCHAR, ZTEXT VARCHAR, ZMETADATA BLOB)",
            "CREATE INDEX ZWAMESSAGE_ZSTANZAID_INDEX ON ZWAMESSAGE (ZSTANZAID)",
            "CREATE INDEX ZWAMESSAGE_ZMESSAGEDATE_INDEX ON ZWAMESSAGE (ZMESSAGEDATE)",
            "INSERT INTO Z_PRIMARYKEY VALUES (9, 'WAMessage', 0, 0)",
        ),
        "INSERT INTO ZWAMESSAGE (ZSTANZAID, ZTEXT, ZMESSAGEDATE, ZCHATSESSION, ZISFROMME, ZMESSAGESTATUS, ZMETADATA, "
        "Z_ENT, Z_OPT, ZMESSAGETYPE, ZSENTDATE, ZFROMJID) VALUES (:uuid, :text, :date, :a, :b, :c, :blob, 9, 1, 0, "
        ":date, '4915' || (:d % 100000000) || '@s.whatsapp.net')",
        "UPDATE ZWAMESSAGE SET ZMESSAGESTATUS = ?, ZSENTDATE = ? WHERE Z_PK = ?",
        "SELECT max(Z_PK) FROM ZWAMESSAGE",
        lambda t: float(t - _APPLE_EPOCH),
        b"\x0a\x12\x08\x01\x12\x0e\x0a\x0c",
        "UPDATE Z_PRIMARYKEY SET Z_MAX = (SELECT max(Z_PK) FROM ZWAMESSAGE) WHERE Z_ENT = 9",
    ),
    _BigDb(
        "HomeDomain",
        "Library/Mail/Envelope Index",
        (
            "CREATE TABLE properties (ROWID INTEGER PRIMARY KEY, key TEXT, value, UNIQUE(key))",
            "CREATE TABLE messages (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, message_id INTEGER NOT NULL DEFAULT 0, "
            "document_id TEXT, sender INTEGER, subject TEXT, date_sent INTEGER, date_received INTEGER, "
            "mailbox INTEGER, flags INTEGER, read INTEGER, size INTEGER, summary BLOB)",
            "CREATE INDEX messages_document_id_index ON messages(document_id)",
            "CREATE INDEX messages_date_received_index ON messages(date_received)",
            "INSERT INTO properties (key, value) VALUES ('version', 52), "
            "('uuid', 'A8E0F2C4-1B3D-4F5A-8C7E-9D0B1A2C3E4F')",
        ),
        "INSERT INTO messages (document_id, subject, date_received, mailbox, read, flags, summary, message_id, "
        "sender, date_sent, size) VALUES (:uuid, :text, :date, :a, :b, :c, :blob, :d, :e, :date, :d % 200000)",
        "UPDATE messages SET flags = ?, date_sent = ? WHERE ROWID = ?",
        "SELECT max(ROWID) FROM messages",
        lambda t: t,
        b'<html><head><meta charset="utf-8"></head><body>',
    ),
)
_BIG_DB_BY_KEY = {(d.domain, d.path): d for d in _BIG_DBS}


def _big_rows(
    spec: _BigDb, rnd: random.Random, lex: _Lexicon, n: int, t: int, noise: bytes | None, off: int = 0
) -> tuple[list, int, int]:
    """``n`` rows for ``spec.insert_sql`` starting at unix time ``t``; a row is about 1 KB of which about
    half is incompressible: the next bytes of ``noise`` from ``off`` on, or fresh random bytes when None.
    Returns (rows, last time, next offset)."""
    rows = []
    head = spec.blob_head
    rand = rnd.random
    sents = lex.sentences
    ns = len(sents)
    date_fn = spec.date_fn
    for _ in range(n):
        t += 5 + int(rand() * 600)
        r = rand()
        text = sents[int(rand() * ns)]
        if r < 0.6:
            text += " " + sents[int(rand() * ns)]
        if r < 0.25:
            text += " " + sents[int(rand() * ns)]
        k = 220 + int(rand() * 480)
        if noise is None:
            rb = rnd.randbytes(k)
        else:
            if off + k > len(noise):
                off = 0
            rb = noise[off : off + k]
            off += k
        blob = head + text.encode() + b"\x86\x84\x02iI\x01" + rb
        rows.append(
            {
                "uuid": _uuid_str(rnd),
                "text": text,
                "date": date_fn(t),
                "a": 1 + int(rand() * 400),
                "b": int(rand() * 2),
                "c": int(rand() * 2),
                "blob": blob,
                "d": int(rand() * 2**31),
                "e": int(rand() * 5000),
            }
        )
    return rows, t, off


def make_big_sqlite(spec: _BigDb, rnd: random.Random, lex: _Lexicon, size: int, t0: int) -> bytes:
    con = sqlite3.connect(":memory:", isolation_level=None)
    try:
        con.execute(f"PRAGMA page_size={PAGE}")
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute("BEGIN")
        for sql in spec.schema:
            con.execute(sql)
        # Incompressible bytes for the rows, consumed in order (more than the rows need: none repeats).
        noise = _rand_bytes(rnd, int(size * 0.6) + MIB)
        off = 0
        t = t0 - 3 * 365 * DAY
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        per_row = 1100  # first guess of bytes per row (data + indexes + page slack); refined below
        inserted = 0
        while pages * PAGE < size:
            batch = max(8, int((size - pages * PAGE) / per_row * 0.9))
            rows, t, off = _big_rows(spec, rnd, lex, batch, t, noise, off)
            con.executemany(spec.insert_sql, rows)
            inserted += batch
            pages = con.execute("PRAGMA page_count").fetchone()[0]
            per_row = pages * PAGE / inserted
        if spec.after_insert_sql:
            con.execute(spec.after_insert_sql)
        con.execute("COMMIT")
        return con.serialize()
    finally:
        con.close()


def _edit_big_db(con: sqlite3.Connection, spec: _BigDb, rnd: random.Random, t: int) -> None:
    """The day's edit of a large db: a few UPDATEs of non-indexed columns and a few INSERTs, in place."""
    lex = _lexicon("mutate")
    max_pk = con.execute(spec.max_pk_sql).fetchone()[0] or 1
    con.execute("BEGIN")
    for _ in range(DB_UPDATES):
        value, date, pk = rnd.randrange(1, 9), spec.date_fn(t - rnd.randrange(DAY)), rnd.randint(1, max_pk)
        con.execute(spec.update_sql, (value, date, pk))
    rows, _, _ = _big_rows(spec, rnd, lex, DB_INSERTS, t - DAY, None)
    con.executemany(spec.insert_sql, rows)
    if spec.after_insert_sql:
        con.execute(spec.after_insert_sql)
    con.execute("COMMIT")


def _open_for_edit(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), isolation_level=None)
    con.execute("PRAGMA journal_mode=MEMORY")
    con.execute("PRAGMA synchronous=OFF")
    return con


def _edit_image(image: bytes, fn: Callable[[sqlite3.Connection], None]) -> bytes:
    """Apply ``fn`` to a db image through sqlite (same pages written as an in-place edit of the file)."""
    con = sqlite3.connect(":memory:", isolation_level=None)
    try:
        con.deserialize(image)
        fn(con)
        return con.serialize()
    finally:
        con.close()


# ============================================================================================================
# Where files live
# ============================================================================================================

#: (bundle id, executable name, version). Their data lands in AppDomain-<bundle>.
_APPS = (
    ("net.whatsapp.WhatsApp", "WhatsApp", "24.10.79"),
    ("com.spotify.client", "Spotify", "8.9.38"),
    ("com.google.Maps", "GoogleMaps", "6.110.1"),
    ("com.burbn.instagram", "Instagram", "324.0.4"),
    ("com.facebook.Messenger", "Messenger", "448.0.0"),
    ("ph.telegra.Telegraph", "Telegram", "10.11.1"),
    ("com.getdropbox.Dropbox", "Dropbox", "387.2.2"),
    ("com.microsoft.Office.Outlook", "Outlook", "4.2413.0"),
    ("com.duolingo.DuolingoMobile", "Duolingo", "7.41.0"),
    ("com.netflix.Netflix", "Netflix", "16.26.0"),
    ("com.ubercab.UberClient", "Uber", "3.611.10000"),
    ("com.google.Translate", "Translate", "8.7.0"),
    ("org.whispersystems.signal", "Signal", "7.10.0"),
    ("com.toyopagroup.picaboo", "Snapchat", "12.90.0"),
    ("com.apple.Pages", "Pages", "14.0"),
    ("com.apple.mobilenotes", "MobileNotes", "4.11"),
)
_GROUPS = (
    "group.net.whatsapp.WhatsApp.shared",
    "group.net.whatsapp.WhatsApp.private",
    "group.com.apple.notes",
    "group.com.facebook.Messenger",
    "group.ph.telegra.Telegraph",
    "group.com.getdropbox.Dropbox",
    "group.com.spotify.client",
)
_PLUGINS = (
    "net.whatsapp.WhatsApp.ServiceExtension",
    "com.burbn.instagram.notificationcontentextension",
    "ph.telegra.Telegraph.Widget",
)
_SYS_CONTAINERS = (
    "com.apple.geod",
    "com.apple.siri.inference",
    "com.apple.Maps",
    "com.apple.news",
    "com.apple.weather",
    "com.apple.tipsd",
)
_SYS_SHARED = (
    "systemgroup.com.apple.configurationprofiles",
    "systemgroup.com.apple.mobilegestaltcache",
    "systemgroup.com.apple.sharedpclogging",
)
_APPLE_SUBSYSTEMS = (
    "com.apple.Maps",
    "com.apple.mobilesafari",
    "com.apple.Music",
    "com.apple.podcasts",
    "com.apple.news",
    "com.apple.weather",
    "com.apple.stocks",
    "com.apple.parsecd",
    "com.apple.AppStore",
    "com.apple.Health",
    "com.apple.mobilemail",
    "com.apple.mobilecal",
    "com.apple.reminders",
    "com.apple.iBooks",
    "com.apple.facetime",
    "com.apple.camera",
    "com.apple.mobileslideshow",
    "com.apple.Preferences",
    "com.apple.springboard",
    "com.apple.assistant",
    "com.apple.locationd",
    "com.apple.CallHistory",
    "com.apple.imagent",
    "com.apple.spotlight",
    "com.apple.keyboard",
    "com.apple.coreduetd",
    "com.apple.routined",
    "com.apple.ams",
)
_LOG_DIRS = (
    "CrashReporter",
    "AppleSupport",
    "MobileInstallation",
    "awdd",
    "com.apple.itunesstored",
    "BTAvrcp",
    "MobileContainerManager",
    "mobileactivationd",
)

#: Always present (when there are enough small files): (domain, path, kind).
_WELL_KNOWN = (
    ("KeychainDomain", "keychain-backup.plist", "plist"),
    ("HomeDomain", "Library/Preferences/.GlobalPreferences.plist", "plist"),
    ("HomeDomain", "Library/Preferences/com.apple.springboard.plist", "plist"),
    ("HomeDomain", "Library/AddressBook/AddressBook.sqlitedb", "sqlite"),
    ("HomeDomain", "Library/AddressBook/AddressBookImages.sqlitedb", "sqlite"),
    ("HomeDomain", "Library/CallHistoryDB/CallHistory.storedata", "sqlite"),
    ("HomeDomain", "Library/Calendar/Calendar.sqlitedb", "sqlite"),
    ("HomeDomain", "Library/Safari/Bookmarks.db", "sqlite"),
    ("HomeDomain", "Library/Safari/History.db", "sqlite"),
    ("HomeDomain", "Library/Voicemail/voicemail.db", "sqlite"),
    ("HomeDomain", "Library/Cookies/Cookies.binarycookies", "random"),
    ("AppDomainGroup-group.com.apple.notes", "NoteStore.sqlite", "sqlite"),
    ("HealthDomain", "Health/healthdb.sqlite", "sqlite"),
    ("HealthDomain", "Health/healthdb_secure.sqlite", "sqlite"),
    ("WirelessDomain", "Library/Databases/CellularUsage.db", "sqlite"),
    ("WirelessDomain", "Library/Preferences/com.apple.commcenter.plist", "plist"),
    ("SystemPreferencesDomain", "SystemConfiguration/preferences.plist", "plist"),
    ("SystemPreferencesDomain", "SystemConfiguration/com.apple.wifi.plist", "plist"),
    ("RootDomain", "Library/Preferences/com.apple.backupd.plist", "plist"),
    ("ManagedPreferencesDomain", "mobile/com.apple.webcontentfilter.plist", "plist"),
    ("HomeKitDomain", "Library/homed/datastore3.sqlite", "sqlite"),
    ("KeyboardDomain", "Library/Keyboard/en-dynamic.lm/dynamic-lexicon.dat", "random"),
    ("TonesDomain", "Library/Preferences/com.apple.ToneLibrary.plist", "plist"),
    ("InstallDomain", "Library/MobileInstallation/UninstalledApplications.plist", "plist"),
    (
        "SysSharedContainerDomain-systemgroup.com.apple.configurationprofiles",
        "Library/ConfigurationProfiles/CloudConfigurationDetails.plist",
        "plist",
    ),
)
_SYMLINKS = (
    ("DatabaseDomain", "timezone/localtime", "/var/db/timezone/zoneinfo/Europe/Berlin"),
    (
        "HomeDomain",
        "Library/Preferences/com.apple.PeoplePicker.plist",
        "../../Library/Preferences/com.apple.contacts.plist",
    ),
)

_TEXT_EXT = (".log", ".txt", ".jsonl", ".json", ".ips")
_SQLITE_EXT = (".sqlite", ".sqlitedb", ".db", ".storedata", ".sqlite3")
_PHOTO_RE = re.compile(r"^Media/DCIM/(\d{3})APPLE/IMG_(\d{4,5})\.(HEIC|MOV)$")
_THUMB_RE = re.compile(r"^Media/PhotoData/Thumbnails/V2/DCIM/(\d{3})APPLE/IMG_(\d{4,5})\.(HEIC|MOV)/5005\.JPG$")


def _category(domain: str, path: str) -> str:
    """What a file is, from its name: bigdb, photo, video, or a small kind (plist, sqlite, text, random)."""
    if (domain, path) in _BIG_DB_BY_KEY:
        return "bigdb"
    if domain == "CameraRollDomain":
        m = _PHOTO_RE.match(path)
        if m:
            return "video" if m.group(3) == "MOV" else "photo"
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(".plist"):
        return "plist"
    if name.endswith(_SQLITE_EXT):
        return "sqlite"
    if name.endswith(_TEXT_EXT):
        return "text"
    return "random"


def _small_data(kind: str, rnd: random.Random, lex: _Lexicon, size: int, path: str, t0: int) -> bytes:
    if kind == "plist":
        return make_plist(rnd, lex, size, t0)
    if kind == "sqlite":
        return make_small_sqlite(rnd, lex, size, t0)
    if kind == "text":
        return make_text(rnd, lex, size, t0, json_lines=path.endswith((".json", ".jsonl")))
    low = path.lower()
    head = _JPEG_HEAD if low.endswith((".jpg", ".jpeg")) else _M4A_HEAD if low.endswith(".m4a") else b""
    return make_random(rnd, size, head)


def _photo_dir(num: int) -> str:
    return f"{100 + num // 1000}APPLE"


def _photo_path(num: int, ext: str) -> str:
    return f"Media/DCIM/{_photo_dir(num)}/IMG_{num:04d}.{ext}"


def _thumb_path(num: int, ext: str) -> str:
    return f"Media/PhotoData/Thumbnails/V2/DCIM/{_photo_dir(num)}/IMG_{num:04d}.{ext}/5005.JPG"


class _Places:
    """Draws realistic (domain, path) pairs for small files of each kind."""

    def __init__(self, rnd: random.Random, lex: _Lexicon):
        self.rnd = rnd
        self.lex = lex
        self.app_dirs = {b: rnd.sample(lex.camel, 3) for b, _, _ in _APPS}
        self.cache_dirs = {b: [f"{b}/{c}" for c in rnd.sample(lex.camel, 2)] + [b] for b, _, _ in _APPS}
        self.used: set[tuple[str, str]] = set()
        self.sms_dirs = [f"{rnd.randrange(256):02x}/{rnd.randrange(16):02d}" for _ in range(64)]
        self.wa_chats = [f"49{rnd.randrange(10**9, 10**10)}@s.whatsapp.net" for _ in range(20)]

    def _w(self) -> str:
        return self.rnd.choice(self.lex.words[:2000])

    def _n(self) -> int:
        return self.rnd.randrange(1, 10000)

    def _app(self) -> str:
        return self.rnd.choice(_APPS)[0]

    def draw(self, kind: str) -> tuple[str, str]:
        for attempt in range(100):
            dp = self._draw(kind, unique=attempt > 10)
            if dp not in self.used and dp not in _BIG_DB_BY_KEY:
                self.used.add(dp)
                return dp
        raise RuntimeError("could not find a free path")  # pragma: no cover

    def _draw(self, kind: str, unique: bool) -> tuple[str, str]:
        rnd, w, n = self.rnd, self._w, self._n
        r = rnd.random()
        u = _uuid_str(rnd)
        if kind == "plist":
            if r < 0.10 and not unique:
                return "HomeDomain", f"Library/Preferences/{rnd.choice(_APPLE_SUBSYSTEMS)}.plist"
            if r < 0.15 and not unique:
                b = self._app()
                return f"AppDomain-{b}", f"Library/Preferences/{b}.plist"
            if r < 0.35:
                b = self._app()
                return f"AppDomain-{b}", f"Library/Caches/{rnd.choice(self.cache_dirs[b])}/{w()}-{n()}.plist"
            if r < 0.55:
                b = self._app()
                return f"AppDomain-{b}", f"Library/Application Support/{rnd.choice(self.app_dirs[b])}/{w()}{n()}.plist"
            if r < 0.75:
                return "HomeDomain", f"Library/Caches/{rnd.choice(_APPLE_SUBSYSTEMS)}/{u}.plist"
            if r < 0.82:
                return "HomeDomain", f"Library/Accounts/{rnd.choice(('Exchange', 'CloudKit', 'iCloud'))}/{u}.plist"
            if r < 0.88:
                c = rnd.choice(_SYS_CONTAINERS)
                return f"SysContainerDomain-{c}", f"Library/Caches/{w()}/{w()}-{n()}.plist"
            if r < 0.94:
                g = rnd.choice(_GROUPS)
                return f"AppDomainGroup-{g}", f"Library/Preferences/{w()}.{w()}.{n()}.plist"
            return f"AppDomainPlugin-{rnd.choice(_PLUGINS)}", f"Library/Preferences/{w()}{n()}.plist"
        if kind == "sqlite":
            if r < 0.3:
                b = self._app()
                return f"AppDomain-{b}", f"Library/Application Support/{rnd.choice(self.app_dirs[b])}/{w()}.sqlite"
            if r < 0.5:
                b = self._app()
                return f"AppDomain-{b}", f"Library/Caches/{rnd.choice(self.cache_dirs[b])}/{w()}{n()}/Cache.db"
            if r < 0.7:
                return "HomeDomain", f"Library/Caches/{rnd.choice(_APPLE_SUBSYSTEMS)}/{w()}{n()}.db"
            if r < 0.85:
                g = rnd.choice(_GROUPS)
                return f"AppDomainGroup-{g}", f"Library/Application Support/{w()}_{n()}.sqlite"
            c = rnd.choice(_SYS_CONTAINERS)
            return f"SysContainerDomain-{c}", f"Library/Caches/{w()}{n()}.sqlitedb"
        if kind == "text":
            if r < 0.35:
                d = rnd.choice(_LOG_DIRS)
                stamp = time.strftime("%Y-%m-%d-%H%M%S", time.gmtime(int(DAY1.timestamp()) - rnd.randrange(90 * DAY)))
                return "HomeDomain", f"Library/Logs/{d}/{w()}-{stamp}.log"
            if r < 0.55:
                b = self._app()
                return f"AppDomain-{b}", f"Library/Caches/Logs/{w()}-{n()}.log"
            if r < 0.75:
                b = self._app()
                return f"AppDomain-{b}", f"Documents/{w()}_{n()}.jsonl"
            if r < 0.9:
                b = self._app()
                return f"AppDomain-{b}", f"Library/Application Support/Analytics/{u}.json"
            return "RootDomain", f"Library/Logs/{rnd.choice(_LOG_DIRS)}/{w()}{n()}.txt"
        # random (thumbnails are placed separately)
        if r < 0.30:
            b = self._app()
            return f"AppDomain-{b}", f"Library/Caches/{b}/fsCachedData/{u}"
        if r < 0.55:
            name = f"IMG_{rnd.randrange(10000):04d}.jpeg"
            return "MediaDomain", f"Library/SMS/Attachments/{rnd.choice(self.sms_dirs)}/{u}/{name}"
        if r < 0.75:
            chat = rnd.choice(self.wa_chats)
            h = rnd.randbytes(2).hex()
            return (
                "AppDomainGroup-group.net.whatsapp.WhatsApp.shared",
                f"Message/Media/{chat}/{h[0]}/{h[1]}/{u.lower()}.jpg",
            )
        if r < 0.85:
            stamp = time.strftime("%Y%m%d %H%M%S", time.gmtime(1.6e9 + rnd.randrange(10**8)))
            return "MediaDomain", f"Media/Recordings/{stamp}.m4a"
        b = self._app()
        return f"AppDomain-{b}", f"Library/Caches/{rnd.choice(self.cache_dirs[b])}/{rnd.randbytes(20).hex()}"


def _with_directories(files: list[BackupFile], existing: set[tuple[str, str]] | None = None) -> list[BackupFile]:
    """Directory rows for every parent of ``files`` (per domain, including the domain root "") that is not in
    ``existing``; a directory's mtime is the newest mtime below it."""
    dirs: dict[tuple[str, str], int] = {}
    for f in files:
        parts = f.relative_path.split("/")
        for k in range(len(parts)):
            key = (f.domain, "/".join(parts[:k]))
            if existing is not None and key in existing:
                continue
            if dirs.get(key, -1) < f.mtime:
                dirs[key] = f.mtime
    return [BackupFile(d, p, FLAG_DIR, m, MODE_DIR, 0) for (d, p), m in sorted(dirs.items())]


# ============================================================================================================
# generate_content
# ============================================================================================================


def _age(rnd: random.Random, lo: float = 3600, hi: float = 2 * 365 * DAY) -> int:
    """A random file age: log-uniform between an hour and two years."""
    return int(lo * (hi / lo) ** rnd.random())


def _scaled_sizes(
    rnd: random.Random, n: int, lo: int, hi: int, budget: float, floor: int, ranges: list[tuple[int, int]] | None = None
) -> list[int]:
    """``n`` sizes drawn uniformly from [lo, hi] (or from ``ranges``, one per item), then scaled together so
    they add up to ``budget`` (none below ``floor``)."""
    sizes = [rnd.randint(a, b) for a, b in (ranges if ranges is not None else [(lo, hi)] * n)]
    total = sum(sizes)
    if total and budget > 0:
        f = budget / total
        sizes = [max(floor, int(s * f)) for s in sizes]
    return sizes


def generate_content(
    *, seed: int = 1, size_bytes: int = 64 * MIB, udid: str | None = None, device_name: str = "Test iPhone"
) -> DeviceContent:
    """A phone's content of about ``size_bytes`` bytes (payloads plus Manifest.db), determined by ``seed``."""
    return _generate_content(seed, size_bytes, udid, device_name, None)


def _generate_content(
    seed: int, size_bytes: int, udid: str | None, device_name: str, on_file: Callable[[BackupFile], BackupFile] | None
) -> DeviceContent:
    """:func:`generate_content`; ``on_file`` gets each file row with its payload as soon as it is made, and
    returns the row to keep in the content (the same, or one without its payload)."""
    rnd = random.Random(f"ibsync-generator:{seed}")
    lex = _lexicon(f"seed-{seed}")
    places = _Places(random.Random(f"ibsync-generator-places:{seed}"), lex)
    udid = udid or default_udid(seed)
    day1 = int(DAY1.timestamp())
    scale = size_bytes / REFERENCE_SIZE

    n_small = max(MIN_SMALL_FILES, round(SMALL_FILES_AT_REF * scale))
    n_photos = max(2, round(PHOTOS_AT_REF * scale))
    n_videos = max(1, round(VIDEOS_AT_REF * scale))
    manifest_estimate = int(n_small * 1.45 * 800)
    payload = max(size_bytes - manifest_estimate, size_bytes // 2)

    kinds = {k: round(n_small * v) for k, v in SMALL_KIND_SHARE.items()}
    kinds["random"] = n_small - kinds["plist"] - kinds["sqlite"] - kinds["text"]
    n_assets = max(round(kinds["random"] * THUMBNAIL_SHARE), n_photos + n_videos)
    kinds["random"] -= n_assets  # the thumbnails are small random files too

    files: list[BackupFile] = []

    def add(f: BackupFile) -> None:
        files.append(f if on_file is None else on_file(f))

    # -- small files: well-known ones first, then drawn places; sizes scaled to the small-file byte budget
    plan: list[tuple[str, str, str]] = []
    for domain, path, kind in _WELL_KNOWN:
        if kinds[kind] > 0:
            kinds[kind] -= 1
            places.used.add((domain, path))
            plan.append((domain, path, kind))
    for kind in ("plist", "sqlite", "text", "random"):
        for _ in range(kinds[kind]):
            plan.append((*places.draw(kind), kind))
    # the photo library: n_assets photos and videos, each with a thumbnail; only the newest n_photos +
    # n_videos originals are still on the phone (iCloud Photos keeps the older ones in the cloud)
    asset_ext = ["HEIC"] * n_assets
    local = list(range(n_assets - n_photos - n_videos, n_assets))
    for i in rnd.sample(local, n_videos):
        asset_ext[i] = "MOV"
    first_num = rnd.randrange(1, 2000)
    asset_mtime = [
        day1 - int((3 * 365 * DAY) * (1 - i / n_assets) ** 1.3) - rnd.randrange(3600) for i in range(n_assets)
    ]
    for i in range(n_assets):
        plan.append(("CameraRollDomain", _thumb_path(first_num + i, asset_ext[i]), "thumb"))

    ranges = [(20 * KIB, 64 * KIB) if kind == "sqlite" else (1 * KIB, 64 * KIB) for _, _, kind in plan]
    sizes = _scaled_sizes(rnd, len(plan), 0, 0, BYTE_SHARE["small"] * payload, 256, ranges)
    for (domain, path, kind), size, i in zip(plan, sizes, range(len(plan))):
        if kind == "thumb":
            a = i - (len(plan) - n_assets)
            mtime = asset_mtime[a] + rnd.randrange(60, 600)
            data = make_random(rnd, max(size, 1024), _JPEG_HEAD)
        else:
            mtime = day1 - _age(rnd)
            data = _small_data(kind, rnd, lex, size, path, mtime)
        add(BackupFile(domain, path, FLAG_FILE, mtime, MODE_FILE, len(data), data))

    # -- photos and videos
    photo_idx = [i for i in local if asset_ext[i] == "HEIC"]
    video_idx = [i for i in local if asset_ext[i] == "MOV"]
    for idx, sizes, maker in (
        (
            photo_idx,
            _scaled_sizes(rnd, len(photo_idx), 115 * KIB, 5 * MIB, BYTE_SHARE["photo"] * payload, MIN_PHOTO),
            make_photo,
        ),
        (
            video_idx,
            _scaled_sizes(rnd, len(video_idx), 20 * MIB, 200 * MIB, BYTE_SHARE["video"] * payload, MIN_VIDEO),
            make_video,
        ),
    ):
        for i, size in zip(idx, sizes):
            data = maker(rnd, size)
            add(
                BackupFile(
                    "CameraRollDomain",
                    _photo_path(first_num + i, asset_ext[i]),
                    FLAG_FILE,
                    asset_mtime[i],
                    MODE_FILE,
                    len(data),
                    data,
                )
            )

    # -- the four large sqlite dbs
    db_sizes = _scaled_sizes(rnd, len(_BIG_DBS), 20 * MIB, 200 * MIB, BYTE_SHARE["bigdb"] * payload, MIN_BIGDB)
    for spec, size in zip(_BIG_DBS, db_sizes):
        mtime = day1 - rnd.randrange(60, 6 * 3600)
        data = make_big_sqlite(spec, rnd, lex, size, mtime)
        add(BackupFile(spec.domain, spec.path, FLAG_FILE, mtime, MODE_FILE, len(data), data))

    # -- symlinks and directories
    for domain, path, target in _SYMLINKS:
        files.append(BackupFile(domain, path, FLAG_SYMLINK, day1 - _age(rnd, 30 * DAY), MODE_SYMLINK, 0, None, target))
    files += _with_directories(files)
    files = _sorted_files(files)

    manifest = build_manifest_db(files)
    return DeviceContent(
        udid=udid,
        device_name=device_name,
        product_type="iPhone15,2",
        product_version="17.5.1",
        build_version="21F90",
        serial_number=_serial(udid),
        files=files,
        backup_date=DAY1,
        manifest_db=manifest,
        manifest_signature=files_signature(files),
    )


def _serial(udid: str) -> str:
    alphabet = "0123456789CDFGHJKLMNPQRTVWXY"
    h = int(hashlib.sha1(f"serial:{udid}".encode()).hexdigest(), 16)
    chars = []
    for _ in range(10):
        h, r = divmod(h, len(alphabet))
        chars.append(alphabet[r])
    return "F" + "".join(chars) + "X"


# ============================================================================================================
# The three plists
# ============================================================================================================


def _naive(d: datetime) -> datetime:
    return d.astimezone(UTC).replace(tzinfo=None) if d.tzinfo else d


def _aware(d: datetime) -> datetime:
    return d.replace(tzinfo=UTC) if d.tzinfo is None else d


def _derived_bytes(tag: str, n: int) -> bytes:
    return hashlib.shake_128(tag.encode()).digest(n)


def _derived_uuid(tag: str) -> str:
    h = hashlib.sha1(tag.encode()).hexdigest().upper()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-A{h[17:20]}-{h[20:32]}"


def _keybag(udid: str) -> bytes:
    """A backup keybag in Apple's TLV layout (VERS, TYPE, UUID, HMCK, WRAP, SALT, ITER, then per class UUID,
    CLAS, WRAP, KTYP, WPKY) with made-up keys: an unencrypted backup never uses it."""

    def tlv(tag: bytes, value: bytes) -> bytes:
        return tag + len(value).to_bytes(4, "big") + value

    out = [
        tlv(b"VERS", (4).to_bytes(4, "big")),
        tlv(b"TYPE", (1).to_bytes(4, "big")),
        tlv(b"UUID", _derived_bytes(f"kb-uuid:{udid}", 16)),
        tlv(b"HMCK", _derived_bytes(f"kb-hmck:{udid}", 40)),
        tlv(b"WRAP", (1).to_bytes(4, "big")),
        tlv(b"SALT", _derived_bytes(f"kb-salt:{udid}", 20)),
        tlv(b"ITER", (10000).to_bytes(4, "big")),
    ]
    for cls in (1, 2, 3, 5, 6, 7, 8, 9, 10, 11):
        out += [
            tlv(b"UUID", _derived_bytes(f"kb-cls-uuid:{udid}:{cls}", 16)),
            tlv(b"CLAS", cls.to_bytes(4, "big")),
            tlv(b"WRAP", (3 if cls < 5 else 2).to_bytes(4, "big")),
            tlv(b"KTYP", (0).to_bytes(4, "big")),
            tlv(b"WPKY", _derived_bytes(f"kb-wpky:{udid}:{cls}", 40)),
        ]
    return b"".join(out)


def _app_bundles(domains: Iterable[str]) -> list[str]:
    return sorted({d[len("AppDomain-") :] for d in domains if d.startswith("AppDomain-")})


_APP_INFO = {b: (name, version) for b, name, version in _APPS}


@dataclass(frozen=True)
class _Device:
    udid: str
    device_name: str
    product_type: str
    product_version: str
    build_version: str
    serial_number: str


def _device_of(content: DeviceContent) -> _Device:
    return _Device(
        content.udid,
        content.device_name,
        content.product_type,
        content.product_version,
        content.build_version,
        content.serial_number,
    )


def _plists(dev: _Device, bundles: list[str], date: datetime) -> dict[str, bytes]:
    date = _naive(date)
    udid = dev.udid
    digits = str(int(hashlib.sha1(f"imei:{udid}".encode()).hexdigest(), 16))
    info = {
        "Applications": {},
        "Build Version": dev.build_version,
        "Device Name": dev.device_name,
        "Display Name": dev.device_name,
        "GUID": _derived_bytes(f"guid:{udid}", 16),
        "ICCID": "8949" + digits[:15],
        "IMEI": "35" + digits[15:28],
        "Installed Applications": bundles,
        "Last Backup Date": date,
        "Phone Number": f"+49 151 {digits[28:36]}",
        "Product Type": dev.product_type,
        "Product Version": dev.product_version,
        "Serial Number": dev.serial_number,
        "Target Identifier": udid,
        "Target Type": "Device",
        "Unique Identifier": udid.upper(),
        "iTunes Files": {},
        "iTunes Version": "10.0.1",
    }
    applications = {}
    for b in bundles:
        name, version = _APP_INFO.get(b, (b.rsplit(".", 1)[-1], "1.0"))
        applications[b] = {
            "CFBundleIdentifier": b,
            "CFBundleVersion": version,
            "ContainerContentClass": "Data/Application",
            "Path": f"/private/var/containers/Bundle/Application/{_derived_uuid(f'app:{udid}:{b}')}/{name}.app",
        }
    manifest = {
        "Applications": applications,
        "BackupKeyBag": _keybag(udid),
        "Date": date,
        "IsEncrypted": False,
        "Lockdown": {
            "BuildVersion": dev.build_version,
            "DeviceName": dev.device_name,
            "ProductType": dev.product_type,
            "ProductVersion": dev.product_version,
            "SerialNumber": dev.serial_number,
            "UniqueDeviceID": udid,
        },
        "SystemDomainsVersion": "24.0",
        "Version": "10.0",
        "WasPasscodeSet": True,
    }
    status = {
        "BackupState": "new",
        "Date": date,
        "IsFullBackup": False,
        "SnapshotState": "finished",
        "UUID": _derived_uuid(f"status:{udid}:{date.isoformat()}"),
        "Version": "3.3",
    }
    return {
        "Info.plist": plistlib.dumps(info),
        "Manifest.plist": plistlib.dumps(manifest, fmt=plistlib.FMT_BINARY),
        "Status.plist": plistlib.dumps(status, fmt=plistlib.FMT_BINARY),
    }


# ============================================================================================================
# Writing folders
# ============================================================================================================


def _payload_path(device_dir: Path, file_id: str) -> Path:
    return device_dir / file_id[:2] / file_id


def _write_file(path: Path, data: bytes, mtime: float, atomic: bool = False) -> None:
    tmp = path.with_name(path.name + ".ibsync-tmp") if atomic else path
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.utime(tmp, (mtime, mtime))
    if atomic:
        os.replace(tmp, path)


def _new_device_dir(parent: Path, udid: str) -> Path:
    device_dir = Path(parent) / udid
    if device_dir.exists() and any(device_dir.iterdir()):
        raise FileExistsError(f"{device_dir} exists and is not empty")
    device_dir.mkdir(parents=True, exist_ok=True)
    return device_dir


def _write_payload(device_dir: Path, f: BackupFile) -> None:
    fid = f.file_id
    (device_dir / fid[:2]).mkdir(exist_ok=True)
    _write_file(device_dir / fid[:2] / fid, f.data if f.data is not None else b"", f.mtime)


def write_backup_folder(content: DeviceContent, parent: Path) -> Path:
    """Write ``parent/<udid>/`` (payloads, Manifest.db, the three plists) and return that path.

    The folder must not exist yet or be empty. Payload mtimes are the rows' mtimes; the metadata files get
    the backup date.
    """
    device_dir = _new_device_dir(parent, content.udid)
    for f in content.files:
        if f.flags == FLAG_FILE:
            _write_payload(device_dir, f)
    _write_metadata(
        device_dir,
        _device_of(content),
        _app_bundles({f.domain for f in content.files}),
        content.backup_date,
        content.manifest_db_bytes(),
        atomic=False,
    )
    return device_dir


def _write_metadata(
    device_dir: Path, dev: _Device, bundles: list[str], date: datetime, manifest_db: bytes | None, atomic: bool
) -> None:
    ts = _aware(date).timestamp()
    if manifest_db is not None:
        _write_file(device_dir / "Manifest.db", manifest_db, ts, atomic)
    for name, data in _plists(dev, bundles, date).items():
        _write_file(device_dir / name, data, ts, atomic)


def generate(
    parent: Path,
    *,
    seed: int = 1,
    size_bytes: int = 64 * MIB,
    udid: str | None = None,
    device_name: str = "Test iPhone",
) -> Path:
    """:func:`generate_content` + :func:`write_backup_folder`; returns the device folder.

    Same bytes, but faster and lighter: a thread writes each payload while the next ones are being generated,
    and payloads are dropped once written (at most about WRITE_AHEAD bytes are held at a time)."""
    device_dir = _new_device_dir(parent, udid or default_udid(seed))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ibsync-generator-writer") as writer:
        pending: deque = deque()
        in_flight = 0

        def on_file(f: BackupFile) -> BackupFile:
            nonlocal in_flight
            pending.append((writer.submit(_write_payload, device_dir, f), f.size))
            in_flight += f.size
            while in_flight > WRITE_AHEAD and len(pending) > 1:
                fut, size = pending.popleft()
                fut.result()
                in_flight -= size
            return replace(f, data=None)

        content = _generate_content(seed, size_bytes, udid, device_name, on_file)
        for fut, _size in pending:
            fut.result()
    _write_metadata(
        device_dir,
        _device_of(content),
        _app_bundles({f.domain for f in content.files}),
        content.backup_date,
        content.manifest_db_bytes(),
        atomic=False,
    )
    return device_dir


# ============================================================================================================
# The next day
# ============================================================================================================


@dataclass
class _Plan:
    new_date: datetime
    rewritten: list[BackupFile]  # new versions, with data
    deleted: list[BackupFile]  # the old rows
    added: list[BackupFile]  # new files (with data) and their new directories
    db_edits: list[tuple[BackupFile, _BigDb, int]]  # old row, spec, edit seed


def _plan(
    entries: list[tuple[str, str, int]], meta: Callable[[str, str], BackupFile], backup_date: datetime, seed: int
) -> _Plan:
    """What the next day changes. ``entries`` are all (domain, path, flags) rows sorted by (domain, path);
    ``meta`` gives the full row (payload not needed) of the few that change. Pure: the model and the folder
    get the same plan."""
    rnd = random.Random(f"ibsync-mutate:{seed}")
    lex = _lexicon("mutate")
    new_date = _aware(backup_date) + timedelta(days=1)
    t_new = int(new_date.timestamp())
    small = [(d, p) for d, p, fl in entries if fl == FLAG_FILE and _category(d, p) not in ("bigdb", "photo", "video")]
    n_rewrite = max(2, round(len(small) * REWRITE_FRACTION))
    n_delete = max(1, round(len(small) * DELETE_FRACTION))
    picked = rnd.sample(range(len(small)), min(len(small), n_rewrite + n_delete))
    rewritten, deleted = [], []
    for i in sorted(picked[:n_rewrite]):
        old = meta(*small[i])
        kind = _category(old.domain, old.relative_path)
        size = max(256, int(old.size * rnd.uniform(0.8, 1.25)))
        mtime = old.mtime + DAY
        data = _small_data(kind, rnd, lex, size, old.relative_path, mtime)
        rewritten.append(BackupFile(old.domain, old.relative_path, FLAG_FILE, mtime, old.mode, len(data), data))
    for i in sorted(picked[n_rewrite:]):
        deleted.append(meta(*small[i]))

    # new photos (and their thumbnails), numbered after the newest asset
    nums = [0]
    n_photos = 0
    for d, p, _fl in entries:
        if d == "CameraRollDomain":
            m = _PHOTO_RE.match(p) or _THUMB_RE.match(p)
            if m:
                nums.append(int(m.group(2)))
                n_photos += m.re is _PHOTO_RE and m.group(3) == "HEIC"
    added: list[BackupFile] = []
    num = max(nums)
    n_new = max(2, round(n_photos * NEW_PHOTOS_PER_PHOTO))
    t = t_new - 12 * 3600
    for _ in range(n_new):
        num += 1
        t += rnd.randrange(1, max(2, 12 * 3600 // n_new))
        data = make_photo(rnd, rnd.randint(*NEW_PHOTO_SIZE))
        added.append(BackupFile("CameraRollDomain", _photo_path(num, "HEIC"), FLAG_FILE, t, MODE_FILE, len(data), data))
        thumb = make_random(rnd, rnd.randint(8 * KIB, 48 * KIB), _JPEG_HEAD)
        added.append(
            BackupFile(
                "CameraRollDomain",
                _thumb_path(num, "HEIC"),
                FLAG_FILE,
                t + rnd.randrange(5, 300),
                MODE_FILE,
                len(thumb),
                thumb,
            )
        )
    existing = {(d, p) for d, p, fl in entries if fl == FLAG_DIR}
    added += _with_directories(added, existing)

    db_edits = []
    present = {(d, p) for d, p, fl in entries if fl == FLAG_FILE}
    for spec in _BIG_DBS:
        if (spec.domain, spec.path) in present:
            db_edits.append((meta(spec.domain, spec.path), spec, rnd.getrandbits(64)))
    return _Plan(new_date, rewritten, deleted, added, db_edits)


def _edited_row(old: BackupFile, size: int) -> BackupFile:
    return BackupFile(old.domain, old.relative_path, old.flags, old.mtime + DAY, old.mode, size)


def _count_changed_pages(a: bytes, b: bytes) -> int:
    n = max(len(a), len(b))
    return sum(1 for off in range(0, n, PAGE) if a[off : off + PAGE] != b[off : off + PAGE])


def _summary(plan: _Plan, db_pages: dict[str, int], db_bytes: int) -> dict:
    new_files = [f for f in plan.added if f.flags == FLAG_FILE]
    return {
        "backup_date": plan.new_date.isoformat(),
        "rewritten_files": len(plan.rewritten),
        "rewritten_bytes": sum(f.size for f in plan.rewritten),
        "deleted_files": len(plan.deleted),
        "deleted_bytes": sum(f.size for f in plan.deleted),
        "new_files": len(new_files),
        "new_bytes": sum(f.size for f in new_files),
        "new_directories": len(plan.added) - len(new_files),
        "edited_dbs": len(plan.db_edits),
        "edited_db_bytes": db_bytes,
        "edited_db_pages_changed": db_pages,
        "manifest_rows_updated": len(plan.rewritten) + len(plan.db_edits),
        "manifest_rows_inserted": len(plan.added),
        "manifest_rows_deleted": len(plan.deleted),
    }


def mutate_content(content: DeviceContent, *, seed: int = 1) -> DeviceContent:
    """The next day of ``content`` as a new :class:`DeviceContent` (``content`` is left untouched)."""
    by_key = {(f.domain, f.relative_path): f for f in content.files}
    entries = sorted((f.domain, f.relative_path, f.flags) for f in content.files)
    plan = _plan(entries, lambda d, p: by_key[(d, p)], content.backup_date, seed)
    t_new = int(plan.new_date.timestamp())
    for f in plan.deleted:
        del by_key[(f.domain, f.relative_path)]
    for f in plan.rewritten + plan.added:
        by_key[(f.domain, f.relative_path)] = f
    edited = []
    for old, spec, eseed in plan.db_edits:
        data = _edit_image(
            old.data or b"", lambda con, spec=spec, eseed=eseed: _edit_big_db(con, spec, random.Random(eseed), t_new)
        )
        new = _edited_row(old, len(data))
        new = BackupFile(new.domain, new.relative_path, new.flags, new.mtime, new.mode, new.size, data)
        by_key[(new.domain, new.relative_path)] = new
        edited.append(new)
    image = _edit_image(
        content.manifest_db_bytes(),
        lambda con: _apply_manifest_changes(con, plan.deleted, plan.rewritten + edited, plan.added),
    )
    files = _sorted_files(by_key.values())
    return DeviceContent(
        udid=content.udid,
        device_name=content.device_name,
        product_type=content.product_type,
        product_version=content.product_version,
        build_version=content.build_version,
        serial_number=content.serial_number,
        files=files,
        backup_date=plan.new_date,
        manifest_db=image,
        manifest_signature=files_signature(files),
    )


def _decode_row(domain: str, path: str, flags: int, blob: bytes) -> BackupFile:
    arch = plistlib.loads(blob)
    objs = arch["$objects"]
    mb = objs[arch["$top"]["root"].data]
    target = objs[mb["Target"].data] if "Target" in mb else None
    return BackupFile(domain, path, flags, int(mb["LastModified"]), int(mb["Mode"]), int(mb["Size"]), None, target)


def mutate_folder(device_dir: Path, *, seed: int = 1) -> dict:
    """Apply the next day to a generated backup folder in place, the way a device's incremental backup does:
    changed and new payloads are written to a temporary file and renamed over (new inode), deleted ones are
    removed, unchanged ones are not touched; the large sqlite dbs and Manifest.db are edited through sqlite
    (on a copy that is then renamed over); the three plists are rewritten with the new date. Returns a summary.
    """
    device_dir = Path(device_dir)
    manifest_plist = plistlib.loads((device_dir / "Manifest.plist").read_bytes())
    status = plistlib.loads((device_dir / "Status.plist").read_bytes())
    lock = manifest_plist["Lockdown"]
    dev = _Device(
        lock["UniqueDeviceID"],
        lock["DeviceName"],
        lock["ProductType"],
        lock["ProductVersion"],
        lock["BuildVersion"],
        lock["SerialNumber"],
    )
    db_path = device_dir / "Manifest.db"
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        entries = sorted(con.execute("SELECT domain, relativePath, flags FROM Files"))

        def meta(domain: str, path: str) -> BackupFile:
            row = con.execute(
                "SELECT flags, file FROM Files WHERE domain = ? AND relativePath = ?", (domain, path)
            ).fetchone()
            return _decode_row(domain, path, row[0], row[1])

        plan = _plan(entries, meta, _aware(status["Date"]), seed)
    finally:
        con.close()
    t_new = int(plan.new_date.timestamp())

    # payloads, as the device uploads them
    for f in plan.rewritten + plan.added:
        if f.flags != FLAG_FILE:
            continue
        p = _payload_path(device_dir, f.file_id)
        p.parent.mkdir(exist_ok=True)
        _write_file(p, f.data or b"", f.mtime, atomic=True)
    for f in plan.deleted:
        _payload_path(device_dir, f.file_id).unlink(missing_ok=True)
    edited, pages, db_bytes = [], {}, 0
    for old, spec, eseed in plan.db_edits:
        p = _payload_path(device_dir, old.file_id)
        tmp = p.with_name(p.name + ".ibsync-tmp")
        shutil.copyfile(p, tmp)
        c = _open_for_edit(tmp)
        try:
            _edit_big_db(c, spec, random.Random(eseed), t_new)
        finally:
            c.close()
        new = _edited_row(old, tmp.stat().st_size)
        pages[spec.path] = _count_changed_pages_files(p, tmp)
        db_bytes += new.size
        os.utime(tmp, (new.mtime, new.mtime))
        os.replace(tmp, p)
        edited.append(new)

    # Manifest.db: the previous one, edited
    tmp = db_path.with_name("Manifest.db.ibsync-tmp")
    shutil.copyfile(db_path, tmp)
    c = _open_for_edit(tmp)
    try:
        _apply_manifest_changes(c, plan.deleted, plan.rewritten + edited, plan.added)
        domains = [d for (d,) in c.execute("SELECT DISTINCT domain FROM Files")]
    finally:
        c.close()
    os.utime(tmp, (t_new, t_new))
    os.replace(tmp, db_path)
    _write_metadata(device_dir, dev, _app_bundles(domains), plan.new_date, None, atomic=True)
    return _summary(plan, pages, db_bytes)


def _count_changed_pages_files(a: Path, b: Path) -> int:
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(PAGE * 256), fb.read(PAGE * 256)
            if not x and not y:
                return n
            if x != y:
                n += _count_changed_pages(x, y)


# ============================================================================================================
# CLI
# ============================================================================================================


# ============================================================================================================
# Other profiles
# ============================================================================================================

#: Profiles other than the default (sized by bytes): "many-files" is sized by file count
#: (ibsync/testing/many_files.py; its own module so that this one, and the data it makes, stay as they were).
PROFILES = ("default", "many-files")


def write_rows_folder(
    parent: Path,
    files: Iterable[BackupFile],
    *,
    udid: str | None = None,
    device_name: str = "Test iPhone",
    date: datetime = DAY1,
    password: str | None = None,
    directories: bool = True,
    rounds: int = 1_000,
) -> Path:
    """Write ``parent/<udid>/`` holding exactly ``files`` (rows given by hand: a test's own domains and
    names), plus a directory row for every parent folder when ``directories``; returns that path.

    With ``password`` the folder is an encrypted iOS backup as the simulated device writes one (its
    keybag, per-file keys and encrypted Manifest.db; ``rounds``: the keybag's PBKDF2-SHA256 rounds)."""
    from ibsync.testing.device.crypto import DeviceKeys  # imports this module: only when asked for

    udid = udid or default_udid(7)
    rows = _sorted_files(files)
    if directories:
        rows = _sorted_files(_with_directories(rows, {(f.domain, f.relative_path) for f in rows}) + rows)
    keys = DeviceKeys(udid, password, rounds) if password is not None else None
    device_dir = _new_device_dir(parent, udid)
    for f in rows:
        if f.flags == FLAG_FILE:
            data = f.data if f.data is not None else b""
            if keys is not None:
                data = keys.encrypt_file(f.file_id, data)
            (device_dir / f.file_id[:2]).mkdir(exist_ok=True)
            _write_file(device_dir / f.file_id[:2] / f.file_id, data, f.mtime)
    image = build_manifest_db(rows)
    if keys is not None:
        con = sqlite3.connect(":memory:", isolation_level=None)
        try:
            con.deserialize(image)
            con.execute("BEGIN")
            con.executemany(
                "UPDATE Files SET file = ? WHERE fileID = ?",
                [(keys.mbfile_blob(f), f.file_id) for f in rows if f.flags == FLAG_FILE],
            )
            con.execute("COMMIT")
            image = keys.encrypt_manifest_db(con.serialize())
        finally:
            con.close()
    dev = _Device(udid, device_name, "iPhone15,2", "17.5.1", "21F90", _serial(udid))
    _write_metadata(device_dir, dev, _app_bundles({f.domain for f in rows}), date, image, atomic=False)
    if keys is not None:
        manifest = plistlib.loads((device_dir / "Manifest.plist").read_bytes())
        manifest.update({"BackupKeyBag": keys.keybag, "ManifestKey": keys.manifest_key, "IsEncrypted": True})
        _write_file(
            device_dir / "Manifest.plist", plistlib.dumps(manifest, fmt=plistlib.FMT_BINARY), _aware(date).timestamp()
        )
    return device_dir


def generate_many_files(
    parent: Path, *, seed: int = 1, files: int = 50_000, udid: str | None = None, device_name: str = "Test iPhone"
) -> Path:
    """The "many files" profile: about ``files`` small files, streamed to disk and to Manifest.db."""
    from ibsync.testing import many_files  # imports this module: import it only when asked for

    return many_files.generate(parent, seed=seed, files=files, udid=udid, device_name=device_name)


def mutate_many_files(device_dir: Path, *, seed: int = 1) -> dict:
    """The next day of a "many files" folder, in place (0.5 % of the files touched); returns a summary."""
    from ibsync.testing import many_files

    return many_files.mutate(device_dir, seed=seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ibsync.testing.generator", description="Deterministic synthetic iOS backup folders."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write OUT_PARENT/<udid>/ and print its path")
    g.add_argument("out_parent", type=Path)
    g.add_argument(
        "--profile",
        choices=PROFILES,
        default="default",
        help="default: sized by --size-mib; many-files: sized by --files",
    )
    g.add_argument("--size-mib", type=float, help="size of the default profile")
    g.add_argument("--files", type=int, default=50_000, help="file count of the many-files profile (default 50000)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--udid", default=None)
    g.add_argument("--device-name", default="Test iPhone")
    m = sub.add_parser("mutate", help="apply the next day to DEVICE_DIR in place and print a JSON summary")
    m.add_argument("device_dir", type=Path)
    m.add_argument("--profile", choices=PROFILES, default="default")
    m.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.cmd == "generate" and args.profile == "many-files":
        print(
            generate_many_files(
                args.out_parent, seed=args.seed, files=args.files, udid=args.udid, device_name=args.device_name
            )
        )
    elif args.cmd == "generate":
        if args.size_mib is None:
            ap.error("--size-mib is required for the default profile")
        path = generate(
            args.out_parent,
            seed=args.seed,
            size_bytes=int(args.size_mib * MIB),
            udid=args.udid,
            device_name=args.device_name,
        )
        print(path)
    else:
        mutate = mutate_many_files if args.profile == "many-files" else mutate_folder
        print(json.dumps(mutate(args.device_dir, seed=args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
