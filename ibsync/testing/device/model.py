"""What a simulated iOS device holds and how it is told to misbehave.

The device's data is modelled the way a backup sees it, not as a filesystem: one
:class:`~ibsync.testing.generator.BackupFile` per Manifest.db row (domain, relative path, flags,
mtime, mode, size, payload, symlink target), keyed by its file id ``sha1(domain-relativePath)``.
That is the generator's row type, so a generated :class:`~ibsync.testing.generator.DeviceContent`
becomes a device without conversion and the Manifest.db the device uploads is built by the
generator's own helpers.
"""

from __future__ import annotations

import enum
import hashlib
import plistlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..generator import (
    FLAG_DIR,
    FLAG_FILE,
    MODE_DIR,
    MODE_FILE,
    BackupFile,
    DeviceContent,
    files_signature,
    mutate_content,
)
from .crypto import UnlockedBackup
from .metadata import read_manifest_db

KIB = 1 << 10
MIB = 1 << 20


def file_id(domain: str, relative_path: str) -> str:
    """The name a backup gives a file: ``sha1(f"{domain}-{relative_path}")``."""
    return hashlib.sha1(f"{domain}-{relative_path}".encode()).hexdigest()


class LegacyMessage(enum.Enum):
    """DeviceLink messages pymobiledevice3 11.45.0 has no handler for (its ``dl_loop`` raises
    ``KeyError``). libimobiledevice treats MoveFiles/RemoveFiles like the Items messages and ends its
    loop on Disconnect."""

    MOVE_FILES = "DLMessageMoveFiles"  # sent instead of DLMessageMoveItems
    REMOVE_FILES = "DLMessageRemoveFiles"  # sent instead of DLMessageRemoveItems
    PING = "DLMessagePing"  # sent once when a backup starts; the device expects no answer (inferred)
    DISCONNECT = "DLMessageDisconnect"  # ends the backup instead of the final DLMessageProcessMessage


@dataclass(frozen=True)
class PasscodePrompt:
    """iOS 16.1+ asks for the passcode on the device when a backup starts, and the backup waits.

    The device relays ``com.apple.LocalAuthentication.ui.presented`` to every notification_proxy
    connection observing it, waits until :meth:`SimLockdown.enter_passcode` is called (or
    ``auto_enter_after`` seconds have passed), then relays ``...ui.dismissed`` and goes on.

    ``give_up_after``: if nobody enters the passcode within this many seconds, the device takes
    the prompt down (``...ui.dismissed``) and ends the backup with ErrorCode 208, "Device locked
    (MBErrorDomain/208)", as iOS does after about 180 s (libimobiledevice #1380). ``None``: it
    waits for ever. When both are set, whichever comes first decides."""

    auto_enter_after: float | None = None
    give_up_after: float | None = None


#: What iOS waits for the passcode before it ends a backup with ErrorCode 208 (about 3 minutes).
IOS_PASSCODE_GIVE_UP = 180.0


@dataclass
class Battery:
    """What lockdown's ``com.apple.mobile.battery`` domain answers (the keys BBackupp reads).
    A field set to ``None`` is left out of the domain, as some devices and states leave keys
    out. Change ``SimDevice.battery`` (or its fields) while the device runs: every later
    GetValue sees it."""

    level: int | None = 80  # BatteryCurrentCapacity, percent
    charging: bool | None = False  # BatteryIsCharging
    external: bool | None = False  # ExternalConnected: on a charger or a powered port

    def domain(self) -> dict[str, Any]:
        values: dict[str, Any] = {"HasBattery": True}
        if self.level is not None:
            values["BatteryCurrentCapacity"] = self.level
        if self.charging is not None:
            values["BatteryIsCharging"] = self.charging
        if self.external is not None:
            values["ExternalConnected"] = self.external
            values["ExternalChargeCapable"] = self.external
            if self.level is not None:
                values["FullyCharged"] = bool(self.external and self.level >= 100)
        return values


class Then(enum.Enum):
    """What a hostile device does after its :class:`HostileStep`."""

    CONTINUE = "continue"  # read the host's answer, if it gives one, and go on with the backup
    HANG = "hang"  # send nothing more, and hold the connection open until the host closes it
    DROP = "drop"  # close the connection at once


@dataclass(frozen=True)
class HostileStep:
    """Something a malicious or broken device sends in the middle of a backup (right after it
    lists the backup folder), instead of what a device sends. Give one of the forms:

    * ``message``: a DeviceLink message (the items of the plist array; missing or mistyped
      arguments, an unknown or out-of-order name);
    * ``raw_message``: bytes sent as one length-framed message (not a plist, a plist that is
      not an array, ...);
    * ``announce_length``: a message length prefix alone (e.g. 0xFFFFFFFF), with no message;
    * ``upload_names``: one DLMessageUploadFiles whose file carries these raw (device-side,
      host-side) names, e.g. bytes that are not UTF-8 or a path out of the backup folder; its
      data is ``upload_data``;
    * ``upload_frame``: one DLMessageUploadFiles of a file whose data frame announces
      ``upload_frame[0]`` bytes and carries ``upload_frame[1]`` (from a small repeated buffer:
      the device holds none of it);
    * none of them: nothing is sent (with ``then=HANG``: the device simply goes silent).

    ``then`` says what follows (:class:`Then`)."""

    message: tuple | None = None
    raw_message: bytes | None = None
    announce_length: int | None = None
    upload_names: tuple[bytes, bytes] | None = None
    upload_data: bytes = b"hostile payload"
    upload_frame: tuple[int, int] | None = None
    then: Then = Then.CONTINUE


@dataclass(frozen=True)
class Misbehaviour:
    """Ways the device departs from a clean run. The default is a well-behaved device."""

    #: File ids whose read fails on the device: the upload of each carries CODE_ERROR_REMOTE instead of
    #: its data (as iOS 17 betas did for backup_manifest.db). The row stays in Manifest.db, so the host
    #: is left with an empty payload for it, as real hosts are.
    fail_read: frozenset[str] = frozenset()
    #: The device closes the connection halfway through sending the payload with this index (0-based,
    #: in upload order) of a backup.
    drop_during_upload: int | None = None
    #: Free bytes the device demands on the host before uploading, instead of its usual
    #: ``upload size + 128 MiB``: set it above what the host has and the host "reports too little",
    #: the device asks it to purge and then ends with ErrorCode 105.
    required_free_space: int | None = None
    legacy_messages: frozenset[LegacyMessage] = frozenset()
    #: End every backup with this (ErrorCode, ErrorDescription) instead of ErrorCode 0, after the data
    #: has been sent.
    final_error: tuple[int, str] | None = None
    passcode_prompt: PasscodePrompt | None = None
    #: A hostile step right after the device lists the backup folder (see :class:`HostileStep`).
    hostile: HostileStep | None = None
    #: Called as ``before_finish(link, root)`` after the device has moved its files into place (a
    #: backup) or pulled them (a restore), before its final ProcessMessage: a test's own DeviceLink
    #: requests at the end of the operation.
    before_finish: Callable[[Any, str], None] | None = None


@dataclass(frozen=True)
class TransferSettings:
    """How the device paces uploads. Plausible values, not captured from BackupAgent2."""

    frame_size: int = 32 * KIB  # data frame of an upload; the size Apple's DeviceLink uses for downloads
    batch_files: int = 128  # files per DLMessageUploadFiles
    batch_bytes: int = 16 * MIB  # payload bytes per DLMessageUploadFiles
    download_batch_files: int = 128  # payloads per DLMessageDownloadFiles during a restore


_WORDS = b"the quick brown fox jumps over a lazy dog while messages sync and photos wait ".split()
#: The text half of generated payloads is a slice of this (a fixed page of words, made once)
_TEXT = b" ".join(random.Random(20240917).choice(_WORDS) for _ in range(16 << 10))


@dataclass(frozen=True)
class GeneratedPayloads:
    """Payloads made on demand instead of held: a row's bytes are a function of this seed and the
    row's file id, size and mtime, so a device of a million files holds only their rows, and a file
    the device "changes" (new mtime or size) gets new bytes. Each payload is half random bytes,
    half text (about 2:1 compressible, like many small app files).

    A row whose ``data`` is ``None`` is generated; one with bytes (written by a test, restored
    with other bytes) keeps them. A restore onto a device with the same generator keeps ``None``
    for every payload that arrives exactly as generated, so a byte-identical restore of a large
    device holds nothing either, and any byte that differs leaves the row holding what came."""

    seed: int

    def __call__(self, f: BackupFile) -> bytes:
        n = f.size
        key = hashlib.blake2b(f"{self.seed}:{f.file_id}:{f.mtime}:{n}".encode(), digest_size=8).digest()
        half = n // 2
        head = random.Random(int.from_bytes(key, "big")).randbytes(half)
        start = int.from_bytes(key[:2], "big") % (len(_TEXT) // 2)
        tail = _TEXT[start : start + n - half]
        while len(tail) < n - half:  # only for payloads larger than about 128 KiB
            tail += _TEXT[: n - half - len(tail)]
        return head + tail


def _serial_of(udid: str) -> str:
    alphabet = "0123456789CDFGHJKLMNPQRTVWXY"
    h = int(hashlib.sha1(f"simdevice-serial:{udid}".encode()).hexdigest(), 16)
    out = []
    for _ in range(10):
        h, r = divmod(h, len(alphabet))
        out.append(alphabet[r])
    return "F" + "".join(out) + "X"


@dataclass
class SimDevice:
    """A simulated iPhone: identity, backup-visible data, backup encryption and misbehaviours.

    ``files`` maps file id -> row; directory rows (``flags == 2``) and symlinks (``4``) are kept too,
    since a device's Manifest.db lists them. ``media`` is what AFC shows (``/iTunes_Control/...``,
    ``/Books/...``): absolute path -> bytes."""

    udid: str
    name: str = "Simulated iPhone"
    product_type: str = "iPhone15,2"
    product_version: str = "17.5.1"
    build_version: str = "21F90"
    serial_number: str = ""
    files: dict[str, BackupFile] = field(default_factory=dict, repr=False)
    media: dict[str, bytes] = field(default_factory=dict, repr=False)
    encrypted: bool = False
    password: str = ""
    #: PBKDF2-SHA256 rounds of the backup keybag (DPIC). Real devices use 10,000,000 (about 2 s here);
    #: tests pass a small number, which decryptors read from the keybag like any other value.
    keybag_rounds: int = 10_000_000
    misbehave: Misbehaviour = field(default_factory=Misbehaviour)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    #: Where payloads of rows without ``data`` come from (None: such rows are empty files)
    generated: GeneratedPayloads | None = None
    #: The battery as lockdown reports it (``None``: the domain is empty, as on a device without one)
    battery: Battery | None = field(default_factory=Battery)

    def __post_init__(self) -> None:
        if not self.serial_number:
            self.serial_number = _serial_of(self.udid)
        if self.encrypted and not self.password:
            raise ValueError("an encrypted device needs its backup password")

    # ---- building -------------------------------------------------------------------------------------------

    @classmethod
    def from_content(cls, content: DeviceContent, **kwargs) -> SimDevice:
        """The phone a generator :class:`DeviceContent` describes (its rows must carry payloads)."""
        missing = [f.relative_path for f in content.files if f.flags == FLAG_FILE and f.data is None]
        if missing:
            raise ValueError(f"{len(missing)} files of the content have no payload (e.g. {missing[0]})")
        identity = dict(
            udid=content.udid,
            name=content.device_name,
            product_type=content.product_type,
            product_version=content.product_version,
            build_version=content.build_version,
            serial_number=content.serial_number,
        )
        return cls(files={f.file_id: f for f in content.files}, **{**identity, **kwargs})  # kwargs override

    @classmethod
    def from_backup_folder(cls, device_dir: Path, *, password: str = "", **kwargs) -> SimDevice:
        """The phone an existing backup folder (``<udid>/`` with Manifest.db) was taken from.

        Encrypted folders need ``password``; the device then keeps backing up encrypted with it."""
        device_dir = Path(device_dir)
        manifest = plistlib.loads((device_dir / "Manifest.plist").read_bytes())
        image = (device_dir / "Manifest.db").read_bytes()
        unlocked = None
        if manifest.get("IsEncrypted"):
            if not password:
                raise ValueError(f"{device_dir} is an encrypted backup: its password is needed")
            unlocked = UnlockedBackup.open(manifest, password)
            image = unlocked.decrypt_manifest_db(image)
        files = {}
        for row in read_manifest_db(image):
            data = None
            if row.flags == FLAG_FILE:
                data = (device_dir / row.file_id[:2] / row.file_id).read_bytes()
                if unlocked is not None:
                    data = unlocked.decrypt_file(data, row.encryption_key, row.size)
            files[row.file_id] = row.to_backup_file(data)
        lock = manifest.get("Lockdown", {})
        identity = {
            "udid": lock.get("UniqueDeviceID", device_dir.name),
            "name": lock.get("DeviceName", "iPhone"),
            "product_type": lock.get("ProductType", "iPhone15,2"),
            "product_version": lock.get("ProductVersion", "17.5.1"),
            "build_version": lock.get("BuildVersion", ""),
            "serial_number": lock.get("SerialNumber", ""),
        }
        if unlocked is not None:
            identity.update(encrypted=True, password=password)
        identity.update(kwargs)
        return cls(files=files, **identity)

    # ---- looking ----------------------------------------------------------------------------------------------

    def file(self, domain: str, relative_path: str) -> BackupFile | None:
        return self.files.get(file_id(domain, relative_path))

    def payload(self, f: BackupFile) -> bytes:
        """The bytes of a regular file's row: its ``data``, or made by ``generated``."""
        if f.data is not None:
            return f.data
        return self.generated(f) if self.generated is not None else b""

    def payloads(self) -> dict[str, bytes]:
        """File id -> bytes of every regular file: what a backup folder's ``xx/<fileID>`` must hold
        (decrypted). Holds every payload: for a device of generated files, use :meth:`payload`."""
        return {fid: self.payload(f) for fid, f in self.files.items() if f.flags == FLAG_FILE}

    def kept(self, row: BackupFile, data: bytes) -> BackupFile:
        """``row`` holding ``data`` as this device stores it: without bytes when ``generated``
        makes exactly these (a restore of generated files holds nothing)."""
        if self.generated is not None and row.flags == FLAG_FILE and len(data) == row.size:
            plain = BackupFile(
                row.domain, row.relative_path, row.flags, row.mtime, row.mode, row.size, None, row.target
            )
            if self.generated(plain) == data:
                return plain
        return BackupFile(
            row.domain,
            row.relative_path,
            row.flags,
            row.mtime,
            row.mode,
            row.size,
            data if row.flags == FLAG_FILE else None,
            row.target,
        )

    def signature(self) -> str:
        """A digest of every row's metadata (not the payloads): equal signatures, equal Manifest.db rows."""
        return files_signature(self.files.values())

    def installed_apps(self) -> list[str]:
        """Bundle ids of the user apps: those with an ``AppDomain-<bundle id>`` domain."""
        return sorted({f.domain[len("AppDomain-") :] for f in self.files.values() if f.domain.startswith("AppDomain-")})

    def lockdown_values(self) -> dict:
        """lockdownd's GetValue without a domain: what pymobiledevice3 keeps as ``all_values``."""
        h = hashlib.sha1(f"simdevice-ecid:{self.udid}".encode()).digest()
        return {
            "BuildVersion": self.build_version,
            "DeviceClass": "iPad" if self.product_type.startswith("iPad") else "iPhone",
            "DeviceName": self.name,
            "HardwareModel": "D74AP",
            "ProductName": "iPhone OS",
            "ProductType": self.product_type,
            "ProductVersion": self.product_version,
            "SerialNumber": self.serial_number,
            "UniqueChipID": int.from_bytes(h[:7], "big"),
            "UniqueDeviceID": self.udid,
        }

    def to_content(self, backup_date: datetime | None = None) -> DeviceContent:
        """The generator's view of this device (to write a folder directly, or to mutate it)."""
        files = sorted(self.files.values(), key=lambda f: (f.domain, f.relative_path))
        return DeviceContent(
            udid=self.udid,
            device_name=self.name,
            product_type=self.product_type,
            product_version=self.product_version,
            build_version=self.build_version,
            serial_number=self.serial_number,
            files=files,
            backup_date=backup_date or datetime.now(UTC),
        )

    # ---- changing ---------------------------------------------------------------------------------------------

    def write_file(
        self, domain: str, relative_path: str, data: bytes, *, mtime: int | None = None, mode: int = MODE_FILE
    ) -> BackupFile:
        """Create or change a regular file, with a row for each missing parent directory.

        A changed file's mtime moves forward by at least a second: the device (like a real one, as far
        as is known) notices changes by their metadata, not by reading every file."""
        old = self.file(domain, relative_path)
        if mtime is None:
            mtime = int(time.time())
            if old is not None:
                mtime = max(mtime, old.mtime + 1)
        row = BackupFile(domain, relative_path, FLAG_FILE, mtime, mode, len(data), bytes(data))
        self.files[row.file_id] = row
        self._add_parents(row)
        return row

    def delete(self, domain: str, relative_path: str) -> list[BackupFile]:
        """Remove a file, symlink or directory (with everything below it); returns the rows removed."""
        prefix = relative_path + "/" if relative_path else ""
        gone = [
            f
            for f in self.files.values()
            if f.domain == domain and (f.relative_path == relative_path or f.relative_path.startswith(prefix))
        ]
        if not gone:
            raise KeyError(f"{domain}-{relative_path}: no such file on the device")
        for f in gone:
            del self.files[f.file_id]
        return gone

    def add_generated_files(
        self,
        count: int,
        *,
        seed: int,
        min_size: int = 4 * KIB,
        max_size: int = 16 * KIB,
        apps: int = 50,
        per_folder: int = 200,
        mtime: int = 1_700_000_000,
    ) -> list[BackupFile]:
        """Add ``count`` regular files whose payloads ``generated`` makes (none is held), laid
        out as app caches: ``AppDomain-com.example.appNNN/Library/Caches/cNNNN/fNNNNNNN.dat``,
        ``per_folder`` files a folder, spread over ``apps`` app domains; sizes uniform in
        [min_size, max_size]. Returns the new rows."""
        if self.generated is None:
            raise ValueError("a device of generated files needs its GeneratedPayloads (generated=...)")
        rnd = random.Random(seed)
        added = []
        for i in range(count):
            folder = i // per_folder
            domain = f"AppDomain-com.example.app{folder % apps:03d}"
            row = BackupFile(
                domain,
                f"Library/Caches/c{folder:05d}/f{i:07d}.dat",
                FLAG_FILE,
                mtime + i % 86_400,
                MODE_FILE,
                rnd.randint(min_size, max_size),
            )
            self.files[row.file_id] = row
            if i % per_folder == 0:
                self._add_parents(row)
            added.append(row)
        return added

    def change_generated(self, fraction: float = 0.005, *, seed: int, day: int = 1) -> dict[str, int]:
        """A next day for a device of generated files: ``fraction`` of its generated regular files
        are touched, spread over the whole device (and so over all 256 fileID folders): 80 % are
        rewritten (a later mtime, often another size: new bytes), 10 % deleted, and as many new
        files appear beside the rest. Returns how many of each."""
        generated = sorted(fid for fid, f in self.files.items() if f.flags == FLAG_FILE and f.data is None)
        rnd = random.Random(seed * 1_000_003 + day)
        touched = rnd.sample(generated, min(len(generated), max(1, round(len(generated) * fraction))))
        counts = {"changed": 0, "deleted": 0, "added": 0}
        for k, fid in enumerate(touched):
            f = self.files[fid]
            if k % 10 == 9:
                del self.files[fid]
                counts["deleted"] += 1
                continue
            size = f.size if k % 2 else max(1, f.size + rnd.randint(-512, 512))
            self.files[fid] = BackupFile(f.domain, f.relative_path, FLAG_FILE, f.mtime + day * 86_400, f.mode, size)
            counts["changed"] += 1
            if k % 10 == 8:
                parent = f.relative_path.rsplit("/", 1)[0]
                new = BackupFile(
                    f.domain,
                    f"{parent}/new-day{day}-{k:06d}.dat",
                    FLAG_FILE,
                    f.mtime + day * 86_400,
                    f.mode,
                    rnd.randint(1 * KIB, 16 * KIB),
                )
                self.files[new.file_id] = new
                counts["added"] += 1
        return counts

    def next_day(self, *, seed: int = 1) -> None:
        """Apply the generator's "next day" (rewritten, deleted and new files, edited databases)."""
        content = mutate_content(self.to_content(), seed=seed)
        self.files = {f.file_id: f for f in content.files}

    def _add_parents(self, row: BackupFile) -> None:
        parts = row.relative_path.split("/")
        for k in range(len(parts)):
            parent = "/".join(parts[:k])
            fid = file_id(row.domain, parent)
            if fid not in self.files:
                self.files[fid] = BackupFile(row.domain, parent, FLAG_DIR, row.mtime, MODE_DIR, 0)
