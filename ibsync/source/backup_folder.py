"""Knowledge of the MobileSync backup folder (iOS 10+) that Finder, iTunes, idevicebackup2 and
pymobiledevice3 write:

    <UDID>/Info.plist  Manifest.plist  Status.plist  Manifest.db  00/ ... ff/<fileID>
"""

from __future__ import annotations

import errno
import os
import plistlib
import sqlite3
import stat
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from ..errors import SourceError
from ..model import DeviceInfo

REQUIRED = ("Info.plist", "Manifest.plist", "Status.plist", "Manifest.db")
SQLITE_MAGIC = b"SQLite format 3\x00"
# A backup's plists are read whole into memory. Real ones are at most tens of MB (Info.plist and
# Manifest.plist list the installed apps, with icons); past this, the folder is not a backup.
MAX_PLIST_BYTES = 128 << 20


@dataclass(frozen=True)
class BackupFolderInfo:
    path: Path
    device: DeviceInfo
    backup_date: datetime | None
    ios_encrypted: bool
    snapshot_state: str | None
    manifest_rows: dict[str, int] | None  # Files rows by kind; None when Manifest.db is encrypted


def is_device_folder(path: Path) -> bool:
    return (path / "Manifest.plist").is_file() or (
        (path / "Info.plist").is_file() and (path / "Status.plist").is_file()
    )


def find_device_folders(path: Path) -> list[Path]:
    """A device folder, or the device folders directly inside ``path`` (MobileSync/Backup)."""
    if not path.exists():
        raise SourceError(f"{path}: no such folder")
    if not path.is_dir():
        raise SourceError(f"{path}: not a folder")
    if is_device_folder(path):
        return [path]
    try:
        found = sorted(p for p in path.iterdir() if p.is_dir() and is_device_folder(p))
    except PermissionError as e:
        raise SourceError(f"{path}: cannot list the folder ({e.strerror})") from e
    if not found:
        raise SourceError(
            f"{path}: not an iOS backup folder (no Manifest.plist, Info.plist or Status.plist here or one level below)"
        )
    return found


def plist_dict(data: bytes | None) -> dict | None:
    """A plist dictionary from bytes, or None when missing, empty, damaged or not a dictionary."""
    if not data:
        return None
    try:
        value = plistlib.loads(data)
    except Exception:  # plistlib raises whatever its XML or binary parser hits
        return None
    return value if isinstance(value, dict) else None


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _open_regular_fd(path: Path | str) -> tuple[int, int]:
    """A descriptor of a regular file and its size, refusing anything else: a symlink is stored
    as a link and never followed, and a FIFO or device would block the read or never end.
    O_NONBLOCK makes opening a FIFO return at once; regular files ignore it."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise SourceError(f"{path}: missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SourceError(f"{path}: is a symbolic link, not a file") from None
        raise SourceError(f"{path}: cannot read ({e.strerror})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SourceError(f"{path}: not a regular file ({file_kind(st.st_mode)})")
    return fd, st.st_size


def open_regular(path: Path | str) -> BinaryIO:
    """Open a file of a backup folder for reading (a regular file only, see _open_regular_fd)."""
    fd, _ = _open_regular_fd(path)
    return os.fdopen(fd, "rb", buffering=0)


def read_regular(path: str, size: int) -> bytes:
    """The whole content of a small regular file listed with ``size`` bytes, in as few system
    calls as possible (open, fstat, read, close: per-file cost dominates a phone of a million
    small files). Reads at most ``size + 1`` bytes, so a file that grew since it was listed
    comes back longer than ``size`` and the caller can tell."""
    fd, now = _open_regular_fd(path)
    try:
        data = os.read(fd, size + 1)
        if len(data) == size == now:
            return data  # all of it: fstat says so, no read for the end of the file needed
        parts = [data]
        got = len(data)
        while data and got <= size:
            data = os.read(fd, size + 1 - got)
            parts.append(data)
            got += len(data)
        return b"".join(parts)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from e
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    """What a mode (or its S_IFMT bits) says a file is, for messages: "a FIFO", "a folder"..."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "an unknown kind of file"


def _load_plist(path: Path) -> dict:
    try:
        with open_regular(path) as f:
            data = _read_at_most(f, MAX_PLIST_BYTES + 1)
        if len(data) > MAX_PLIST_BYTES:
            raise SourceError(f"{path}: larger than {MAX_PLIST_BYTES >> 20} MiB; not a backup's plist")
        value = plistlib.loads(data)
    except SourceError:
        raise
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from e
    except Exception as e:  # plistlib raises whatever its XML or binary parser hits
        raise SourceError(f"{path}: malformed plist ({e.__class__.__name__}: {e})") from e
    if not isinstance(value, dict):
        raise SourceError(f"{path}: malformed plist (not a dictionary)")
    return value


def _read_at_most(f: BinaryIO, limit: int) -> bytes:
    """Up to ``limit`` bytes of a file, in pieces: ``read(limit)`` would allocate ``limit``
    bytes up front (128 MiB for every plist of every import)."""
    parts, got = [], 0
    while got < limit:
        piece = f.read(min(limit - got, 1 << 20))
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _date(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def check_sqlite_file(path: Path) -> dict[str, int]:
    """Validate an unencrypted Manifest.db without writing next to it; count its Files rows."""
    try:
        size = path.stat().st_size
        with open_regular(path) as f:
            header = f.read(100)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from e
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise SourceError(f"{path}: not an SQLite database (damaged, or from an encrypted backup without IsEncrypted)")
    (page_size,) = struct.unpack_from(">H", header, 16)
    page_size = 65536 if page_size == 1 else page_size
    change_counter, page_count = struct.unpack_from(">II", header, 24)
    (valid_for,) = struct.unpack_from(">I", header, 92)
    if valid_for == change_counter and page_count and size < page_size * page_count:
        raise SourceError(f"{path}: truncated ({size} bytes, its header promises {page_size * page_count})")
    # immutable=1: never create -wal/-shm files or take locks in a folder we were asked only to read
    uri = f"file:{quote(str(path.absolute()))}?mode=ro&immutable=1"
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            rows = db.execute("SELECT flags, count(*) FROM Files GROUP BY flags").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise SourceError(f"{path}: damaged Manifest.db ({e})") from e
    names = {1: "files", 2: "directories", 4: "symlinks"}
    counts: dict[str, int] = {}
    for flags, n in rows:
        key = names.get(flags, "other")
        counts[key] = counts.get(key, 0) + n
    return counts


def describe_backup(
    info: dict, manifest: dict, status: dict, folder_name: str
) -> tuple[DeviceInfo, datetime | None, bool]:
    """The device, the backup's date and whether iOS encrypted it, from the three plists of a
    backup folder (an import reads them from disk, a capture from its virtual folder): each
    field from the first plist that has it."""
    lockdown = manifest.get("Lockdown")
    if not isinstance(lockdown, dict):
        lockdown = {}
    device = DeviceInfo(
        udid=str(
            info.get("Unique Identifier")
            or info.get("Target Identifier")
            or lockdown.get("UniqueDeviceID")
            or folder_name
        ),
        name=str(info.get("Device Name") or info.get("Display Name") or lockdown.get("DeviceName") or ""),
        product_type=str(info.get("Product Type") or lockdown.get("ProductType") or ""),
        ios_version=str(info.get("Product Version") or lockdown.get("ProductVersion") or ""),
        build_version=str(info.get("Build Version") or lockdown.get("BuildVersion") or ""),
        serial_number=str(info.get("Serial Number") or lockdown.get("SerialNumber") or ""),
    )
    backup_date = _date(status.get("Date")) or _date(manifest.get("Date")) or _date(info.get("Last Backup Date"))
    return device, backup_date, bool(manifest.get("IsEncrypted", False))


def read_backup_folder(path: Path, *, allow_unfinished: bool = False) -> BackupFolderInfo:
    """Read what a device folder says about itself; SourceError for anything not restorable."""
    if (path / "Manifest.mbdb").is_file() and not (path / "Manifest.db").is_file():
        raise SourceError(f"{path}: backup from iOS 9 or older (Manifest.mbdb); only iOS 10 and later are supported")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise SourceError(f"{path}: incomplete backup folder, missing {', '.join(missing)}")
    for name in REQUIRED:
        # Stored as a link, a linked Manifest.db could never be browsed or restored from the
        # snapshot: refuse now rather than keep a backup that only looks complete.
        if (path / name).is_symlink():
            raise SourceError(f"{path / name}: is a symbolic link; a backup folder must hold the file itself")
    info = _load_plist(path / "Info.plist")
    manifest = _load_plist(path / "Manifest.plist")
    status = _load_plist(path / "Status.plist")

    state = status.get("SnapshotState")
    if state != "finished" and not allow_unfinished:
        shown = f"SnapshotState = {state}" if state is not None else "no SnapshotState"
        raise SourceError(
            f"{path}: the backup is not finished (Status.plist says {shown}); "
            "a backup cut short cannot be restored. Use --allow-unfinished to store it anyway"
        )

    device, backup_date, encrypted = describe_backup(info, manifest, status, path.name)
    if backup_date is None:
        backup_date = datetime.fromtimestamp(os.stat(path / "Status.plist").st_mtime, UTC)

    db = path / "Manifest.db"
    if encrypted:
        size = db.stat().st_size
        if size == 0 or size % 16:
            raise SourceError(
                f"{db}: damaged (an encrypted Manifest.db is a non-empty multiple of 16 bytes, this one is {size})"
            )
        rows = None
    else:
        rows = check_sqlite_file(db)
    return BackupFolderInfo(path, device, backup_date, encrypted, state, rows)
