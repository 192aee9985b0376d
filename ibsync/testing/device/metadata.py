"""The metadata files a device uploads with a backup (Manifest.db, Manifest.plist, Status.plist), and
reading back the Manifest.db a host hands it for an incremental backup or a restore.

Manifest.db is the generator's (:func:`ibsync.testing.generator.build_manifest_db`: same schema, page
size and MBFile blobs as real ones); for an encrypted backup each file row's blob is replaced by one
carrying the file's wrapped key.
"""

from __future__ import annotations

import hashlib
import plistlib
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ...reader.mbfile import mbfile_fields
from ..generator import FLAG_FILE, BackupFile, build_manifest_db
from .crypto import DeviceKeys

if TYPE_CHECKING:
    from .model import SimDevice

SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class ManifestRow:
    """One Files row of a Manifest.db, its MBFile decoded."""

    file_id: str
    domain: str
    relative_path: str
    flags: int
    mtime: int
    mode: int
    size: int
    target: str | None = None
    encryption_key: bytes | None = None  # u32le class || wrapped key (encrypted backups, files only)

    def to_backup_file(self, data: bytes | None) -> BackupFile:
        return BackupFile(
            self.domain,
            self.relative_path,
            self.flags,
            self.mtime,
            self.mode,
            self.size,
            data if self.flags == FLAG_FILE else None,
            self.target,
        )

    def describes(self, f: BackupFile) -> bool:
        """Whether this row still describes ``f``: the device's test for "unchanged since the last
        backup" (inferred: it compares what the row records, it does not read the host's payload)."""
        return (self.flags, self.mtime, self.mode, self.size, self.target) == (
            f.flags,
            f.mtime,
            f.mode,
            f.size,
            f.target,
        )


def _decode_mbfile(blob: bytes) -> tuple[int, int, int, str | None, bytes | None]:
    """(LastModified, Mode, Size, Target, EncryptionKey) of an MBFile NSKeyedArchiver blob."""
    mb = mbfile_fields(blob)
    target = mb.get("Target")
    return (
        int(mb["LastModified"]),
        int(mb["Mode"]),
        int(mb["Size"]),
        target if isinstance(target, str) else None,
        mb["EncryptionKey"],
    )


def read_manifest_db(image: bytes) -> list[ManifestRow]:
    """Every Files row of an (unencrypted) Manifest.db image."""
    con = sqlite3.connect(":memory:")
    try:
        con.deserialize(image)
        rows = con.execute("SELECT fileID, domain, relativePath, flags, file FROM Files").fetchall()
    finally:
        con.close()
    return [ManifestRow(fid, domain, path, flags, *_decode_mbfile(blob)) for fid, domain, path, flags, blob in rows]


def manifest_db(files: Iterable[BackupFile], keys: DeviceKeys) -> bytes:
    """The plaintext Manifest.db image for ``files`` (encrypt it with ``keys`` afterwards if needed)."""
    rows = sorted(files, key=lambda f: (f.domain, f.relative_path))
    image = build_manifest_db(rows)
    if not keys.encrypts:
        return image
    con = sqlite3.connect(":memory:", isolation_level=None)
    try:
        con.deserialize(image)
        con.execute("BEGIN")
        con.executemany(
            "UPDATE Files SET file = ? WHERE fileID = ?",
            [(keys.mbfile_blob(f), f.file_id) for f in rows if f.flags == FLAG_FILE],
        )
        con.execute("COMMIT")
        return con.serialize()
    finally:
        con.close()


def _naive_utc(d: datetime) -> datetime:
    # plistlib writes naive datetimes as UTC
    return d.astimezone(UTC).replace(tzinfo=None) if d.tzinfo else d


def _app_path(udid: str, bundle: str) -> str:
    h = hashlib.sha1(f"simdevice-app:{udid}:{bundle}".encode()).hexdigest().upper()
    return (
        f"/private/var/containers/Bundle/Application/{h[:8]}-{h[8:12]}-4{h[13:16]}-A{h[17:20]}-{h[20:32]}/"
        f"{bundle.rsplit('.', 1)[-1]}.app"
    )


def manifest_plist(device: SimDevice, keys: DeviceKeys, date: datetime) -> bytes:
    """Manifest.plist as a device uploads it (binary)."""
    plist = {
        "Applications": {
            b: {
                "CFBundleIdentifier": b,
                "CFBundleVersion": "1.0",
                "ContainerContentClass": "Data/Application",
                "Path": _app_path(device.udid, b),
            }
            for b in device.installed_apps()
        },
        "BackupKeyBag": keys.keybag,
        "Date": _naive_utc(date),
        "IsEncrypted": keys.encrypts,
        "Lockdown": {
            "BuildVersion": device.build_version,
            "DeviceName": device.name,
            "ProductType": device.product_type,
            "ProductVersion": device.product_version,
            "SerialNumber": device.serial_number,
            "UniqueDeviceID": device.udid,
        },
        "SystemDomainsVersion": "24.0",
        "Version": "10.0",
        "WasPasscodeSet": True,
    }
    if keys.encrypts:
        plist["ManifestKey"] = keys.manifest_key
    return plistlib.dumps(plist, fmt=plistlib.FMT_BINARY)


def status_plist(*, date: datetime, snapshot_id: str) -> bytes:
    """Status.plist of a finished backup (binary). ``SnapshotState: finished`` is what hosts (and
    idevicebackup2 before a restore) check. ``IsFullBackup`` is false in the folders devices leave, full
    backup or not (the generator's model of real folders; inferred): a host that writes ``true`` asks
    for the next backup to be full."""
    return plistlib.dumps(
        {
            "BackupState": "new",
            "Date": _naive_utc(date),
            "IsFullBackup": False,
            "SnapshotState": "finished",
            "UUID": snapshot_id,
            "Version": "3.3",
        },
        fmt=plistlib.FMT_BINARY,
    )
