"""The "many files" profile of the synthetic backup generator: a phone sized by file count, not bytes.

Real backups hold 100,000 to 1.3 million files, nearly all small (pymobiledevice3 issue #1857: 1.31 M
Manifest.db rows). This profile writes such a folder without holding it in memory: each domain's rows are
made, written to disk and streamed into an on-disk Manifest.db, then dropped. Memory is bounded by the
largest domain's row list (about 10 % of the files, a few hundred bytes each), not by the file count.

Content, by share of the payload files (sizes log-normal, clamped):

* app caches (fsCachedData-style responses: half JSON lines, half incompressible), 33 %, median 2.5 KiB;
* cached images and snapshots (JPEG header + random bytes), 15 %, median 8 KiB;
* XML plists, 20 %, median 1.2 KiB; logs and JSON, 12 %, median 3 KiB; tiny lock/state files, 12 %, 0-512 B;
* real sqlite databases: 4.5 % of one 32 KiB block (16-28 KiB), 1 % of 2-10 blocks (skewed to the small end);
* photo-library thumbnails, 2.5 %; one photo (1-4 MiB) per 5,000 files and one video (5-40 MiB) per 100,000,
  each with a thumbnail;

spread over about one app per 3,000 files (16 at least), their app groups and plugins, HomeDomain, MediaDomain,
CameraRollDomain, system containers, plus the well-known files of the default profile; a directory row for every
parent folder; two symlinks. At 50,000 files the payloads average 9.4 KB (median 3.0 KB, 99th percentile
60 KB) and Manifest.db takes about 900 bytes a row: 1 M files make about 10 GB.

The next day (:func:`mutate`) touches 0.5 % of the files, picked uniformly over Manifest.db rows and so spread
over all 256 fileID folders: sqlite files are edited through sqlite (rows updated and inserted), logs are
appended to, the rest is rewritten with new content of the same kind. 0.1 % new files land beside existing ones,
0.05 % are deleted, one new photo (and thumbnail) per 50 photos. Manifest.db is edited through sqlite
(UPDATE, INSERT, DELETE on the existing file, as the device does), and the three plists get the new date.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import plistlib
import random
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ibsync.testing import generator as g
from ibsync.testing.generator import DAY, FLAG_FILE, KIB, MIB, MODE_FILE, BackupFile

QUICK_FILES = 50_000
FULL_FILES = 1_000_000
BLOCK = 32 * KIB  # ibsync's sqlite block size: "multi-block" means more than one of these

KIND_SHARE = {
    "cache": 0.33,
    "image": 0.15,
    "plist": 0.20,
    "text": 0.12,
    "tiny": 0.12,
    "sqlite": 0.045,
    "sqlite_mb": 0.01,
    "thumb": 0.025,
}
#: (median bytes, sigma, min, max) of the log-normal sizes
SIZES = {
    "cache": (2560, 1.2, 64, 512 * KIB),
    "image": (8 * KIB, 0.8, 1 * KIB, 256 * KIB),
    "plist": (1230, 0.9, 300, 64 * KIB),
    "text": (3 * KIB, 1.0, 100, 128 * KIB),
}
FILES_PER_PHOTO = 5_000
FILES_PER_VIDEO = 100_000
FILES_PER_APP = 3_000
FILES_PER_FOLDER = 80

TOUCH_FRACTION = 0.005
ADD_FRACTION = 0.001
DELETE_FRACTION = 0.0005
NEW_PHOTOS_PER_PHOTO = 1 / 50

#: Share of the files per kind of domain; the rest (after the well-known files) goes to HomeDomain.
ARCHETYPE_SHARE = {"app": 0.50, "group": 0.10, "plugin": 0.02, "media": 0.08, "sys": 0.08, "sysshared": 0.03}
#: Which kinds each kind of domain holds (weights).
ARCHETYPE_KINDS = {
    "app": {"cache": 40, "image": 20, "plist": 14, "text": 11, "tiny": 9, "sqlite": 5, "sqlite_mb": 1.2},
    "group": {"cache": 30, "image": 25, "plist": 20, "text": 10, "tiny": 9, "sqlite": 5, "sqlite_mb": 1.5},
    "plugin": {"cache": 30, "plist": 40, "tiny": 20, "sqlite": 10},
    "home": {"cache": 35, "image": 5, "plist": 30, "text": 15, "tiny": 10, "sqlite": 4, "sqlite_mb": 1},
    "media": {"image": 85, "cache": 10, "plist": 5},
    "sys": {"cache": 45, "plist": 25, "text": 10, "tiny": 12, "sqlite": 6, "sqlite_mb": 1},
    "sysshared": {"cache": 30, "plist": 40, "tiny": 20, "sqlite": 8, "sqlite_mb": 1},
}
#: Folder templates per kind: {b} bundle, {C} a CamelCase word, {w} a word, {h} two hex digits, {u} a UUID.
FOLDERS = {
    "cache": (
        "Library/Caches/{b}/fsCachedData",
        "Library/Caches/{C}/{C}",
        "Library/Caches/{b}/{h}",
        "Library/Caches/{C}/com.apple.nsurlsessiond/{w}",
    ),
    "image": (
        "Library/Caches/com.hackemist.SDImageCache/default",
        "Library/SplashBoard/Snapshots/sceneID:{b}-default",
        "Documents/{C}/Media/{h}",
        "Library/Caches/{C}/Images",
    ),
    "plist": (
        "Library/Preferences",
        "Library/Application Support/{C}",
        "Library/Caches/{C}/{C}",
        "Library/Application Support/{C}/{C}",
    ),
    "text": ("Library/Caches/Logs", "Library/Application Support/Analytics", "Documents/{C}", "Library/Logs/{C}"),
    "tiny": ("tmp/{C}", "Library/Application Support/{C}", "Library/Caches/{C}/{u}"),
    "sqlite": ("Library/Application Support/{C}", "Library/Caches/{b}", "Documents/{C}/{C}", "Library/Caches/{C}/{w}"),
    "sqlite_mb": ("Library/Application Support/{C}", "Documents/{C}", "Library/Application Support/{C}/Stores"),
}
MEDIA_FOLDERS = ("Library/SMS/Attachments/{h}/{h2}/{u}", "Media/Recordings", "Library/SMS/StickerCache/{h}")
_SQLITE_EXT = (".sqlite", ".db", ".sqlitedb")
_TEXT_EXT = (".log", ".json", ".txt")
_TINY_EXT = (".lock", ".state")
_WORDS_FOR_NAMES = 2000


# ============================================================================================================
# Day 1
# ============================================================================================================


@dataclass(frozen=True)
class _DomainPlan:
    name: str
    archetype: str
    files: int
    bundle: str  # the app, group or container id the domain is named after ("" for system domains)


def _app_bundles_for(n_apps: int, rnd: random.Random, lex) -> list[str]:
    """The real apps of the default profile first, then made-up ones."""
    names = [b for b, _, _ in g._APPS]
    seen = set(names)
    while len(names) < n_apps:
        b = f"com.{rnd.choice(lex.words[:_WORDS_FOR_NAMES]).lower()}.{rnd.choice(lex.camel)}"
        if b not in seen:
            seen.add(b)
            names.append(b)
    return names[:n_apps]


def _zipf_counts(total: int, n: int) -> list[int]:
    """``total`` split over ``n`` items with weights 1/(rank+1): a few apps hold most of the cache files."""
    weights = [1 / (i + 1) for i in range(n)]
    return _apportion(total, weights)


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainder), summing to ``total``."""
    s = sum(weights)
    raw = [total * w / s for w in weights]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _domain_plans(n_small: int, seed: int, lex) -> list[_DomainPlan]:
    """Every domain and how many small files it gets (photos and thumbnails are planned apart)."""
    rnd = random.Random(f"ibsync-many-domains:{seed}")
    n_apps = max(16, n_small // FILES_PER_APP)
    apps = _app_bundles_for(n_apps, rnd, lex)
    groups = list(g._GROUPS) + [f"group.{b}" for b in apps[len(g._APPS) : len(g._APPS) + n_apps // 3]]
    plugins = list(g._PLUGINS) + [f"{b}.{rnd.choice(lex.camel)}Extension" for b in apps[: n_apps // 2]]
    sys_ids = list(g._SYS_CONTAINERS) + [s for s in g._APPLE_SUBSYSTEMS if s not in g._SYS_CONTAINERS]
    shared = list(g._SYS_SHARED) + [f"systemgroup.com.apple.{w.lower()}" for w in lex.camel[:7]]
    families = {
        "app": [(f"AppDomain-{b}", b) for b in apps],
        "group": [(f"AppDomainGroup-{x}", x) for x in groups],
        "plugin": [(f"AppDomainPlugin-{x}", x) for x in plugins],
        "media": [("MediaDomain", "")],
        "sys": [(f"SysContainerDomain-{x}", x) for x in sys_ids],
        "sysshared": [(f"SysSharedContainerDomain-{x}", x) for x in shared],
    }
    plans = []
    budget = n_small
    for arch, share in ARCHETYPE_SHARE.items():
        n = round(n_small * share)
        budget -= n
        for (name, bundle), count in zip(families[arch], _zipf_counts(n, len(families[arch]))):
            if count:
                plans.append(_DomainPlan(name, arch, count, bundle))
    plans.append(_DomainPlan("HomeDomain", "home", budget, ""))
    return plans


class _Namer:
    """Folders and unique file names inside one domain."""

    def __init__(self, rnd: random.Random, lex, bundle: str):
        self.rnd, self.lex, self.bundle = rnd, lex, bundle or "com.apple.mobile"
        self.used: set[str] = set()

    def folder(self, template: str) -> str:
        rnd = self.rnd
        return template.format(
            b=self.bundle,
            C=rnd.choice(self.lex.camel),
            w=self._w(),
            h=f"{rnd.randrange(256):02x}",
            h2=f"{rnd.randrange(16):02d}",
            u=g._uuid_str(rnd),
        )

    def _w(self) -> str:
        return self.rnd.choice(self.lex.words[:_WORDS_FOR_NAMES])

    def name(self, kind: str) -> str:
        rnd = self.rnd
        if kind == "cache":
            return g._uuid_str(rnd) if rnd.random() < 0.6 else rnd.randbytes(20).hex()
        if kind == "image":
            return rnd.randbytes(16).hex() + rnd.choice((".jpg", ".jpg", ".png", ".jpeg"))
        if kind == "plist":
            return (
                f"{self.bundle}.{self._w()}.plist"
                if rnd.random() < 0.3
                else f"{g._uuid_str(rnd)}.plist"
                if rnd.random() < 0.5
                else f"{self._w()}-{rnd.randrange(10000)}.plist"
            )
        if kind == "text":
            return f"{self._w()}-{rnd.randrange(100000)}{rnd.choice(_TEXT_EXT)}"
        if kind == "tiny":
            return f"{self._w()}{rnd.randrange(1000)}{rnd.choice(_TINY_EXT)}"
        return f"{self._w()}{rnd.randrange(100000)}{rnd.choice(_SQLITE_EXT)}"  # sqlite, sqlite_mb

    def unique(self, folder: str, kind: str) -> str:
        while True:
            path = f"{folder}/{self.name(kind)}"
            if path not in self.used:
                self.used.add(path)
                return path


def _domain_paths(plan: _DomainPlan, seed: int, lex) -> list[tuple[str, str]]:
    """(relative path, kind) of the domain's small files: each kind's files spread over a few folders
    (about FILES_PER_FOLDER each, Zipf-sized: one folder of a cache often holds thousands)."""
    rnd = random.Random(f"ibsync-many-paths:{seed}:{plan.name}")
    kinds = ARCHETYPE_KINDS[plan.archetype]
    counts = dict(zip(kinds, _apportion(plan.files, list(kinds.values()))))
    namer = _Namer(rnd, lex, plan.bundle)
    out = []
    for kind, count in counts.items():
        if not count:
            continue
        templates = MEDIA_FOLDERS if plan.archetype == "media" and kind == "image" else FOLDERS[kind]
        folders = [namer.folder(rnd.choice(templates)) for _ in range(max(1, math.ceil(count / FILES_PER_FOLDER)))]
        for folder, n in zip(folders, _zipf_counts(count, len(folders))):
            out += [(namer.unique(folder, kind), kind) for _ in range(n)]
    return out


def _size(kind: str, rnd: random.Random) -> int:
    if kind in SIZES:
        median, sigma, lo, hi = SIZES[kind]
        return max(lo, min(hi, int(rnd.lognormvariate(math.log(median), sigma))))
    if kind == "tiny":
        return 0 if rnd.random() < 0.4 else rnd.randint(2, 512)
    if kind == "sqlite":
        return rnd.randint(16 * KIB, 24 * KIB)  # make_small_sqlite lands on 16-28 KiB: one block
    if kind == "sqlite_mb":
        blocks = 2 + int(9 * rnd.random() ** 2)  # 2-10 blocks, mostly 2-4
        return blocks * BLOCK - 8 * KIB
    return rnd.randint(8 * KIB, 48 * KIB)  # thumb


def _payload(kind: str, rnd: random.Random, lex, size: int, path: str, t0: int) -> bytes:
    if kind in ("sqlite", "sqlite_mb"):
        return g.make_small_sqlite(rnd, lex, size, t0)
    if kind == "plist":
        return g.make_plist(rnd, lex, size, t0)
    if kind == "text":
        return g.make_text(rnd, lex, size, t0, json_lines=path.endswith(".json"))
    if kind == "tiny":
        return (
            b""
            if size == 0
            else json.dumps({"v": rnd.randrange(1 << 30), "s": rnd.randbytes(size // 2).hex()}).encode()
        )
    if kind == "cache" and rnd.random() < 0.5:  # an HTTP response body: JSON
        return g.make_text(rnd, lex, size, t0, json_lines=True)
    head = g._JPEG_HEAD if kind in ("image", "thumb") or path.endswith((".jpg", ".jpeg")) else b""
    return g.make_random(rnd, size, head)


def _kind_of(path: str, size: int) -> str:
    """The kind of a day-1 file from its name and size (the next day rewrites it as the same kind)."""
    low = path.lower()
    if low.endswith(_SQLITE_EXT):
        return "sqlite_mb" if size > BLOCK else "sqlite"
    if low.endswith(".plist"):
        return "plist"
    if low.endswith(_TEXT_EXT):
        return "text"
    if low.endswith(_TINY_EXT):
        return "tiny"
    if low.endswith("5005.jpg"):
        return "thumb"
    return "image" if low.endswith((".jpg", ".jpeg", ".png")) else "cache"


class _ManifestWriter:
    """Manifest.db on disk, filled in (domain, path) order as rows come: never all rows in memory."""

    BATCH = 5_000

    def __init__(self, path: Path):
        self.con = sqlite3.connect(str(path), isolation_level=None)
        self.con.execute(f"PRAGMA page_size={g.PAGE}")
        self.con.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self.con.execute("PRAGMA journal_mode=OFF")  # built once; a crash means generating again
        self.con.execute("PRAGMA synchronous=OFF")
        self.con.execute("PRAGMA cache_size=-65536")  # 64 MiB: the fileID index is filled in random order
        self.con.execute("BEGIN")
        for sql in g._MANIFEST_SCHEMA:
            self.con.execute(sql)
        self.con.execute("PRAGMA user_version=2")
        self.rows: list[tuple] = []

    def add(self, f: BackupFile) -> None:
        self.rows.append(g._manifest_row(f))
        if len(self.rows) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        self.con.executemany("INSERT INTO Files VALUES (?, ?, ?, ?, ?)", self.rows)
        self.rows = []

    def close(self) -> None:
        self.flush()
        self.con.execute("COMMIT")
        self.con.close()


def _write(device_dir: Path, f: BackupFile, data: bytes) -> None:
    fid = f.file_id
    folder = device_dir / fid[:2]
    try:
        fd = os.open(folder / fid, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / fid, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.utime(fd, (f.mtime, f.mtime))
    finally:
        os.close(fd)


def _domain_rows(
    plan: _DomainPlan | None, domain: str, extra: list[tuple[BackupFile, bytes | None]], seed: int, lex, day1: int
) -> Iterator[tuple[BackupFile, bytes | None]]:
    """The domain's rows in path order, directories included; files come with their payload, made only when
    their turn comes (``extra``: the few well-known rows, already made, merged in)."""
    rnd = random.Random(f"ibsync-many-content:{seed}:{domain}")
    metas = []
    for path, kind in sorted(_domain_paths(plan, seed, lex)) if plan else ():
        metas.append((path, kind, day1 - g._age(rnd), _size(kind, rnd)))
    have = {m[0] for m in metas}
    extra = [e for e in extra if e[0].relative_path not in have]
    stubs = [BackupFile(domain, p, FLAG_FILE, m, MODE_FILE, 0) for p, _, m, _ in metas] + [r for r, _ in extra]
    dirs = g._with_directories(stubs)
    items: list[tuple[str, object]] = [(d.relative_path, (d, None)) for d in dirs]
    items += [(r.relative_path, (r, data)) for r, data in extra] + [(m[0], m) for m in metas]
    items.sort(key=lambda x: x[0])
    for path, m in items:
        if isinstance(m[0], BackupFile):
            yield m
            continue
        _, kind, mtime, size = m
        data = _payload(kind, rnd, lex, size, path, mtime)
        yield BackupFile(domain, path, FLAG_FILE, mtime, MODE_FILE, len(data)), data


def _camera_rows(
    n_photos: int,
    n_videos: int,
    n_thumbs: int,
    seed: int,
    day1: int,
) -> Iterator[tuple[BackupFile, bytes | None]]:
    """CameraRollDomain: ``n_thumbs`` thumbnails of assets (the newest have their photo or video too)."""
    rnd = random.Random(f"ibsync-many-camera:{seed}")
    n_assets = max(n_thumbs, n_photos + n_videos)
    first = rnd.randrange(1, 2000)
    mtimes = [day1 - int((3 * 365 * DAY) * (1 - i / n_assets) ** 1.3) - rnd.randrange(3600) for i in range(n_assets)]
    local = range(n_assets - n_photos - n_videos, n_assets)
    videos = set(rnd.sample(list(local), n_videos))
    rows: list[tuple[BackupFile, str]] = []
    for i in range(n_assets):
        ext = "MOV" if i in videos else "HEIC"
        rows.append(
            (
                BackupFile(
                    "CameraRollDomain",
                    g._thumb_path(first + i, ext),
                    FLAG_FILE,
                    mtimes[i] + rnd.randrange(60, 600),
                    MODE_FILE,
                    0,
                ),
                "thumb",
            )
        )
        if i in local:
            rows.append(
                (
                    BackupFile("CameraRollDomain", g._photo_path(first + i, ext), FLAG_FILE, mtimes[i], MODE_FILE, 0),
                    "video" if ext == "MOV" else "photo",
                )
            )
    dirs = {d.relative_path: d for d in g._with_directories([r for r, _ in rows])}
    items = sorted([(p, None) for p in dirs] + [(r.relative_path, (r, k)) for r, k in rows], key=lambda x: x[0])
    for path, rk in items:
        if rk is None:
            yield dirs[path], None
            continue
        row, kind = rk
        if kind == "photo":
            data = g.make_photo(rnd, rnd.randint(*g.NEW_PHOTO_SIZE))
        elif kind == "video":
            data = g.make_video(rnd, rnd.randint(5 * MIB, 40 * MIB))
        else:
            data = g.make_random(rnd, _size("thumb", rnd), g._JPEG_HEAD)
        yield BackupFile(row.domain, path, FLAG_FILE, row.mtime, MODE_FILE, len(data)), data


def _well_known_rows(seed: int, lex, day1: int) -> dict[str, list[tuple[BackupFile, bytes | None]]]:
    """The default profile's well-known files (keychain, preferences, address book ...) and symlinks."""
    rnd = random.Random(f"ibsync-many-wellknown:{seed}")
    by_domain: dict[str, list] = {}
    for domain, path, kind in g._WELL_KNOWN:
        kind = {"random": "cache", "sqlite": "sqlite_mb"}.get(kind, kind)
        mtime = day1 - g._age(rnd)
        data = _payload(kind, rnd, lex, _size(kind, rnd), path, mtime)
        by_domain.setdefault(domain, []).append(
            (BackupFile(domain, path, FLAG_FILE, mtime, MODE_FILE, len(data)), data)
        )
    for domain, path, target in g._SYMLINKS:
        row = BackupFile(domain, path, g.FLAG_SYMLINK, day1 - g._age(rnd, 30 * DAY), g.MODE_SYMLINK, 0, None, target)
        by_domain.setdefault(domain, []).append((row, None))
    return by_domain


def generate(
    parent: Path, *, seed: int = 1, files: int = QUICK_FILES, udid: str | None = None, device_name: str = "Test iPhone"
) -> Path:
    """Write ``parent/<udid>/`` with about ``files`` payload files (plus directory rows in Manifest.db);
    returns the device folder. Deterministic for a given seed and count."""
    if files < 1_000:
        raise ValueError("the many-files profile needs at least 1,000 files")
    udid = udid or g.default_udid(seed)
    device_dir = g._new_device_dir(parent, udid)
    lex = g._lexicon(f"many-{seed}")
    day1 = int(g.DAY1.timestamp())
    n_photos = max(3, files // FILES_PER_PHOTO)
    n_videos = max(1, files // FILES_PER_VIDEO)
    n_thumbs = max(n_photos + n_videos, round(files * KIND_SHARE["thumb"]))
    known = _well_known_rows(seed, lex, day1)
    n_known = sum(1 for rows in known.values() for r, _ in rows if r.flags == FLAG_FILE)
    n_small = files - n_thumbs - n_photos - n_videos - n_known
    plans = {p.name: p for p in _domain_plans(n_small, seed, lex)}
    db = _ManifestWriter(device_dir / "Manifest.db")
    try:
        for domain in sorted(set(plans) | set(known) | {"CameraRollDomain"}):
            for row, data in _rows_of(
                domain, plans.get(domain), known.get(domain, []), seed, lex, day1, (n_photos, n_videos, n_thumbs)
            ):
                if data is not None:
                    _write(device_dir, row, data)
                db.add(row)
    finally:
        db.close()
    os.utime(device_dir / "Manifest.db", (g.DAY1.timestamp(), g.DAY1.timestamp()))
    bundles = g._app_bundles(plans)
    g._write_metadata(device_dir, _device(udid, device_name), bundles, g.DAY1, None, atomic=False)
    return device_dir


def _rows_of(
    domain: str, plan: _DomainPlan | None, known: list, seed: int, lex, day1: int, camera: tuple[int, int, int]
) -> Iterator[tuple[BackupFile, bytes | None]]:
    """All rows of one domain in path order: its planned and well-known files, or the camera roll."""
    if domain == "CameraRollDomain":
        return _camera_rows(*camera, seed, day1)
    return _domain_rows(plan, domain, known, seed, lex, day1)


def _device(udid: str, device_name: str) -> g._Device:
    return g._Device(udid, device_name, "iPhone15,2", "17.5.1", "21F90", g._serial(udid))


# ============================================================================================================
# The next day
# ============================================================================================================


@dataclass(frozen=True)
class _Row:
    file_id: str
    domain: str
    path: str
    old: BackupFile


def _sample_rows(con: sqlite3.Connection, rnd: random.Random, n: int, exclude: set[str]) -> list[_Row]:
    """``n`` distinct file rows picked uniformly by rowid (no full scan), never photos or videos."""
    max_rowid = con.execute("SELECT max(rowid) FROM Files").fetchone()[0] or 0
    out: dict[str, _Row] = {}
    tries = 0
    while len(out) < n and tries < 50 * n + 1000:
        tries += 1
        row = con.execute(
            "SELECT fileID, domain, relativePath, flags, file FROM Files WHERE rowid = ?", (rnd.randint(1, max_rowid),)
        ).fetchone()
        if row is None or row[3] != FLAG_FILE or row[0] in out or row[0] in exclude:
            continue
        if row[1] == "CameraRollDomain" and row[2].startswith("Media/DCIM/"):
            continue
        out[row[0]] = _Row(row[0], row[1], row[2], g._decode_row(row[1], row[2], row[3], row[4]))
    return sorted(out.values(), key=lambda r: r.file_id)


def _break_link(path: Path) -> None:
    """Give ``path`` its own inode (the cached day 2 starts as hard links to day 1)."""
    tmp = path.with_name(path.name + ".ibsync-tmp")
    shutil.copy2(path, tmp)
    os.replace(tmp, path)


def _edit_sqlite(path: Path, rnd: random.Random, lex, t: int) -> None:
    """A day's use of a small app database, through sqlite, in place: some rows updated, a few inserted."""
    con = g._open_for_edit(path)
    try:
        table = con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid LIMIT 1"
        ).fetchone()[0]
        schema = next(s for s in g._SMALL_DB_SCHEMAS if f"TABLE {table} " in s[0])
        max_rowid = con.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0] or 1
        int_col = {"ZRECORD": "ZFLAGS", "cfurl_cache_response": "hash_value", "events": "state"}[table]
        con.execute("BEGIN")
        for _ in range(rnd.randint(1, 6)):
            con.execute(
                f"UPDATE {table} SET {int_col} = ? WHERE rowid = ?", (rnd.randrange(65536), rnd.randint(1, max_rowid))
            )
        rows = [
            (
                g._uuid_str(rnd),
                t - rnd.randrange(DAY),
                lex.sentences[rnd.randrange(len(lex.sentences))],
                rnd.randrange(65536),
            )
            for _ in range(rnd.randint(1, 8))
        ]
        con.executemany(schema[3], rows)
        con.execute("COMMIT")
    finally:
        con.close()


def _append_text(path: Path, rnd: random.Random, lex, t: int, json_lines: bool) -> None:
    with open(path, "ab") as fh:
        fh.write(g.make_text(rnd, lex, rnd.randint(200, 2000), t, json_lines=json_lines))


def _touch(device_dir: Path, r: _Row, rnd: random.Random, lex, t_new: int) -> tuple[BackupFile, str]:
    """The day's change to one file; returns its new row and how it changed."""
    p = g._payload_path(device_dir, r.file_id)
    kind = _kind_of(r.path, r.old.size)
    mtime = t_new - rnd.randrange(12 * 3600)
    if kind in ("sqlite", "sqlite_mb"):
        _break_link(p)
        _edit_sqlite(p, rnd, lex, mtime)
        how = "edited"
    elif kind == "text" and rnd.random() < 0.5:
        _break_link(p)
        _append_text(p, rnd, lex, mtime, r.path.endswith(".json"))
        how = "appended"
    else:
        size = max(1 if kind != "tiny" else 0, int(r.old.size * rnd.uniform(0.8, 1.25)))
        g._write_file(p, _payload(kind, rnd, lex, size, r.path, mtime), mtime, atomic=True)
        how = "rewritten"
    os.utime(p, (mtime, mtime))
    size = p.stat().st_size
    return BackupFile(r.domain, r.path, FLAG_FILE, mtime, MODE_FILE, size), how


def _new_sibling(
    device_dir: Path, con: sqlite3.Connection, r: _Row, rnd: random.Random, lex, t_new: int, taken: set[str]
) -> BackupFile:
    """A new file beside an existing one, of the same kind (a new cache entry, a new log), under a name that
    no row has and no other new file took."""
    kind = _kind_of(r.path, r.old.size)
    folder = r.path.rsplit("/", 1)[0] if "/" in r.path else ""
    namer = _Namer(rnd, lex, "")
    while True:
        path = f"{folder}/{namer.name(kind)}".lstrip("/")
        fid = BackupFile(r.domain, path, FLAG_FILE, 0, 0, 0).file_id
        if fid not in taken and con.execute("SELECT 1 FROM Files WHERE fileID = ?", (fid,)).fetchone() is None:
            taken.add(fid)
            break
    mtime = t_new - rnd.randrange(12 * 3600)
    data = _payload(kind, rnd, lex, _size(kind, rnd), path, mtime)
    f = BackupFile(r.domain, path, FLAG_FILE, mtime, MODE_FILE, len(data))
    _write(device_dir, f, data)
    return f


def _new_photos(device_dir: Path, con: sqlite3.Connection, rnd: random.Random, t_new: int) -> list[BackupFile]:
    """New photos and their thumbnails, numbered after the newest asset."""
    nums, n_photos = [0], 0
    for (path,) in con.execute("SELECT relativePath FROM Files WHERE domain = 'CameraRollDomain' AND flags = 1"):
        m = g._PHOTO_RE.match(path) or g._THUMB_RE.match(path)
        if m:
            nums.append(int(m.group(2)))
            n_photos += m.re is g._PHOTO_RE
    num, out = max(nums), []
    for _ in range(max(2, round(n_photos * NEW_PHOTOS_PER_PHOTO))):
        num += 1
        t = t_new - rnd.randrange(12 * 3600)
        for path, data in (
            (g._photo_path(num, "HEIC"), g.make_photo(rnd, rnd.randint(*g.NEW_PHOTO_SIZE))),
            (g._thumb_path(num, "HEIC"), g.make_random(rnd, _size("thumb", rnd), g._JPEG_HEAD)),
        ):
            f = BackupFile("CameraRollDomain", path, FLAG_FILE, t, MODE_FILE, len(data))
            _write(device_dir, f, data)
            out.append(f)
    return out


def _missing_dirs(con: sqlite3.Connection, added: list[BackupFile]) -> list[BackupFile]:
    candidates = g._with_directories(added)
    have = (
        {
            fid
            for (fid,) in con.execute(
                f"SELECT fileID FROM Files WHERE fileID IN ({','.join('?' * len(candidates))})",
                [d.file_id for d in candidates],
            )
        }
        if candidates
        else set()
    )
    return [d for d in candidates if d.file_id not in have]


def mutate(device_dir: Path, *, seed: int = 1) -> dict:
    """Apply the next day to a many-files folder in place (see the module docstring); returns a summary.

    Unchanged payloads are not touched, so a day 2 made as hard links to day 1 (``cp -al``) stays one: every
    file this changes gets its own inode first."""
    device_dir = Path(device_dir)
    status = plistlib.loads((device_dir / "Status.plist").read_bytes())
    manifest_plist = plistlib.loads((device_dir / "Manifest.plist").read_bytes())
    lock = manifest_plist["Lockdown"]
    dev = g._Device(
        lock["UniqueDeviceID"],
        lock["DeviceName"],
        lock["ProductType"],
        lock["ProductVersion"],
        lock["BuildVersion"],
        lock["SerialNumber"],
    )
    new_date = g._aware(status["Date"]) + timedelta(days=1)
    t_new = int(new_date.timestamp())
    rnd = random.Random(f"ibsync-many-mutate:{seed}")
    lex = g._lexicon("mutate")
    db_path = device_dir / "Manifest.db"
    _break_link(db_path)
    con = g._open_for_edit(db_path)
    try:
        n_files = con.execute("SELECT count(*) FROM Files WHERE flags = 1").fetchone()[0]
        touched = _sample_rows(con, rnd, max(2, round(n_files * TOUCH_FRACTION)), set())
        deleted = _sample_rows(con, rnd, max(1, round(n_files * DELETE_FRACTION)), {r.file_id for r in touched})
        beside = _sample_rows(con, rnd, max(1, round(n_files * ADD_FRACTION)), set())
        changes = [_touch(device_dir, r, rnd, lex, t_new) for r in touched]
        taken: set[str] = set()
        added = [_new_sibling(device_dir, con, r, rnd, lex, t_new, taken) for r in beside]
        photos = _new_photos(device_dir, con, rnd, t_new)
        for r in deleted:
            g._payload_path(device_dir, r.file_id).unlink()
        new_rows = added + photos
        new_rows += _missing_dirs(con, new_rows)
        g._apply_manifest_changes(con, [r.old for r in deleted], [f for f, _ in changes], new_rows)
        domains = [d for (d,) in con.execute("SELECT DISTINCT domain FROM Files")]
    finally:
        con.close()
    os.utime(db_path, (t_new, t_new))
    g._write_metadata(device_dir, dev, g._app_bundles(domains), new_date, None, atomic=True)
    hows = [h for _, h in changes]
    folders = {r.file_id[:2] for r in touched + deleted} | {f.file_id[:2] for f in new_rows if f.flags == FLAG_FILE}
    return {
        "profile": "many-files",
        "backup_date": new_date.isoformat(),
        "files_before": n_files,
        "touched_files": len(touched),
        "touched_edited_sqlite": hows.count("edited"),
        "touched_appended": hows.count("appended"),
        "touched_rewritten": hows.count("rewritten"),
        "touched_bytes_after": sum(f.size for f, _ in changes),
        "new_files": len(added),
        "new_photos_and_thumbnails": len(photos),
        "new_bytes": sum(f.size for f in added + photos),
        "new_directories": len(new_rows) - len(added) - len(photos),
        "deleted_files": len(deleted),
        "fileid_folders_touched": len(folders),
        "manifest_rows_updated": len(changes),
        "manifest_rows_inserted": len(new_rows),
        "manifest_rows_deleted": len(deleted),
    }


def file_count(device_dir: Path) -> int:
    """Payload files listed in Manifest.db (what --files asked for, give or take a few)."""
    con = sqlite3.connect(f"file:{Path(device_dir) / 'Manifest.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM Files WHERE flags = 1").fetchone()[0]
    finally:
        con.close()


def digest(device_dir: Path) -> str:
    """sha256 over every payload and metadata file (name, mtime, bytes), for determinism checks."""
    h = hashlib.sha256()
    for root, dirs, names in os.walk(device_dir):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            h.update(f"{p.relative_to(device_dir)}\0{p.stat().st_mtime_ns}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()
