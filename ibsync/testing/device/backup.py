"""The device's side of a mobilebackup2 ``Backup`` request.

Sequence (the shape comes from idevicebackup2 logs, pymobiledevice3's code and issue threads; the
order of the steps and the batch sizes are plausible, not captured from BackupAgent2):

1. passcode prompt (iOS 16.1+, when configured), legacy ``DLMessagePing`` (when configured);
2. ``DLContentsOfDirectory <udid>``; a ``Snapshot`` left by a backup cut short is removed;
3. ``DLMessageDownloadFiles [<udid>/Status.plist]``, then, unless that asks for or implies a full
   backup, ``DLMessageDownloadFiles [<udid>/Manifest.plist, <udid>/Manifest.db]`` (see
   :func:`wants_full_backup` and :func:`previous_rows`);
4. ``DLMessageGetFreeDiskSpace``; too little -> ``DLMessagePurgeDiskSpace`` -> ErrorCode 105;
5. ``DLMessageCreateDirectory <udid>/Snapshot`` and each ``Snapshot/xx``, ``DLMessageUploadFiles`` in
   batches into ``<udid>/Snapshot/xx/<fileID>``, then Manifest.plist, Manifest.db and Status.plist into
   ``Snapshot/``;
6. one ``DLMessageMoveItems`` per uploaded payload (``Snapshot/xx/<id>`` -> ``xx/<id>``, as devices do:
   pymobiledevice3 #1833), ``DLMessageRemoveItems`` for payloads of deleted files, one MoveItems for the
   three metadata files, ``DLMessageRemoveItems [<udid>/Snapshot]``;
7. ``DLMessageProcessMessage {ErrorCode: 0}``.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from ...source.backup_folder import plist_dict
from ..generator import FLAG_FILE, BackupFile
from . import errors, hostile
from .crypto import DeviceKeys
from .devicelink import EMPTY, DeviceLinkEndpoint, DroppedByDevice, Status, Upload
from .errors import Refusal
from .metadata import (
    SQLITE_MAGIC,
    ManifestRow,
    manifest_db,
    manifest_plist,
    read_manifest_db,
    status_plist,
)
from .model import LegacyMessage, SimDevice
from .runtime import DeviceRuntime

#: BackupAgent2 proceeds only when the host has more than upload size + 128 MiB free, and asks for 2 GiB
#: more than it lacks when it asks the host to purge (pymobiledevice3's purge_disk_space(), iOS 26).
FREE_SPACE_HEADROOM = 128 << 20
PURGE_OVERSHOOT = 2 << 30


@dataclass(frozen=True)
class BackupPlan:
    full: bool
    uploads: list[BackupFile]  # file rows whose payloads are sent
    removals: list[str]  # file ids whose payloads the host must delete (incremental backups)
    rows: list[BackupFile]  # everything the new Manifest.db lists


def wants_full_backup(status: bytes | None) -> bool:
    """Whether the host's Status.plist leaves only a full backup (inferred rule, reference §4): it is
    missing or unreadable, says the last backup did not finish, or has ``IsFullBackup`` set
    (pymobiledevice3 writes that to ask for a full backup; devices themselves write ``false``)."""
    st = plist_dict(status)
    return st is None or st.get("SnapshotState") != "finished" or bool(st.get("IsFullBackup", True))


def previous_rows(
    device: SimDevice, keys: DeviceKeys, manifest: bytes | None, database: bytes | None
) -> dict[str, ManifestRow] | None:
    """The rows of the host's previous backup, to build an incremental one on; ``None``: back up in full.

    A Manifest.plist that is missing, empty or unreadable ends the request with ErrorCode 205, as
    devices do (observed, pymobiledevice3 #1709). A Manifest.db that is missing, unreadable, of another
    device or encrypted differently from what the device does now gives a full backup (inferred)."""
    props = plist_dict(manifest)
    if props is None:
        raise Refusal(errors.BAD_BACKUP_PROPERTIES, f"Error reading backup properties for {device.udid}")
    if props.get("Lockdown", {}).get("UniqueDeviceID", device.udid) != device.udid:
        return None
    if not database or bool(props.get("IsEncrypted")) != keys.encrypts:
        return None
    try:
        image = keys.decrypt_manifest_db(database) if keys.encrypts else database
        if not image.startswith(SQLITE_MAGIC):
            return None
        return {row.file_id: row for row in read_manifest_db(image)}
    except (ValueError, KeyError, sqlite3.DatabaseError):  # damaged: start afresh, as for no database
        return None


def plan_backup(files: dict[str, BackupFile], previous: dict[str, ManifestRow] | None) -> BackupPlan:
    rows = sorted(files.values(), key=lambda f: (f.domain, f.relative_path))
    if previous is None:
        return BackupPlan(True, [f for f in rows if f.flags == FLAG_FILE], [], rows)
    uploads = [
        f for f in rows if f.flags == FLAG_FILE and (f.file_id not in previous or not previous[f.file_id].describes(f))
    ]
    removals = sorted(
        fid
        for fid, row in previous.items()
        if row.flags == FLAG_FILE and (fid not in files or files[fid].flags != FLAG_FILE)
    )
    return BackupPlan(False, uploads, removals, rows)


def _payload(root: str, fid: str, staged: bool) -> str:
    return f"{root}/Snapshot/{fid[:2]}/{fid}" if staged else f"{root}/{fid[:2]}/{fid}"


def _is_hex_dir(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


class BackupOperation:
    """One Backup request, start to final ProcessMessage."""

    def __init__(self, link: DeviceLinkEndpoint, runtime: DeviceRuntime, request: dict) -> None:
        self.link = link
        self.runtime = runtime
        self.device = runtime.device
        self.misbehave = self.device.misbehave
        self.keys = runtime.keys()
        # the host names the folder; pymobiledevice3 and idevicebackup2 use the UDID
        self.root = str(request.get("TargetIdentifier") or self.device.udid)

    def _legacy(self, message: LegacyMessage, modern: str) -> str:
        return message.value if message in self.misbehave.legacy_messages else modern

    def _check(self, status: Status, what: str) -> Status:
        if not status.ok:
            raise Refusal(errors.HOST_FAILED, f"the host failed to {what}: {status.code} {status.description}")
        return status

    def run(self) -> None:
        """Back up, then answer the request (a :class:`Refusal` on the way is answered by the caller)."""
        self._backup()
        if self.misbehave.before_finish is not None:
            self.misbehave.before_finish(self.link, self.root)
        if LegacyMessage.DISCONNECT in self.misbehave.legacy_messages:
            self.link.send("DLMessageDisconnect", EMPTY)
            self.link.wire.close()
            raise DroppedByDevice("ended the backup with DLMessageDisconnect")
        if self.misbehave.final_error is not None:
            raise Refusal(*self.misbehave.final_error)
        self.link.process_message({"ErrorCode": 0})

    def _backup(self) -> None:
        prompt = self.misbehave.passcode_prompt
        if prompt is not None and not self.runtime.ask_for_passcode(prompt.auto_enter_after, prompt.give_up_after):
            raise Refusal(errors.DEVICE_LOCKED, errors.DEVICE_LOCKED_DESCRIPTION)
        if LegacyMessage.PING in self.misbehave.legacy_messages:
            self.link.send("DLMessagePing", EMPTY)  # inferred: a ping wants no answer, so none is awaited
        listing = self._check(self.link.contents_of_directory(self.root), "list the backup folder").value or {}
        if self.misbehave.hostile is not None:
            hostile.act(self.link, self.misbehave.hostile)
        if "Snapshot" in listing:  # a backup cut short left its staging folder
            remove = self._legacy(LegacyMessage.REMOVE_FILES, "DLMessageRemoveItems")
            self._check(self.link.remove_items([f"{self.root}/Snapshot"], 0.0, remove), "remove a stale Snapshot")
        previous = self._previous_backup()
        plan = plan_backup(self.device.files, previous)
        self.runtime.log.backups.append("full" if plan.full else "incremental")
        date = datetime.now(UTC)
        image = manifest_db(plan.rows, self.keys)
        database = self.keys.encrypt_manifest_db(image) if self.keys.encrypts else image
        self._ensure_free_space(sum(f.size for f in plan.uploads) + len(database))
        self._check(self.link.create_directory(f"{self.root}/Snapshot"), "create the Snapshot folder")
        self._upload_payloads(plan)
        meta = {
            "Manifest.plist": manifest_plist(self.device, self.keys, date),
            "Manifest.db": database,
            "Status.plist": status_plist(date=date, snapshot_id=str(uuid.uuid4()).upper()),
        }
        self._check(
            self.link.upload_files(
                [Upload(name, f"{self.root}/Snapshot/{name}", data) for name, data in meta.items()], 100.0
            ),
            "receive the metadata",
        )
        self._finalize(plan, listing)

    def _previous_backup(self) -> dict[str, ManifestRow] | None:
        status = f"{self.root}/Status.plist"
        got, _ = self.link.download_files([status], 0.0)
        if wants_full_backup(got.get(status)):
            return None
        paths = [f"{self.root}/Manifest.plist", f"{self.root}/Manifest.db"]
        got, _ = self.link.download_files(paths, 0.0)
        return previous_rows(self.device, self.keys, got.get(paths[0]), got.get(paths[1]))

    def _ensure_free_space(self, upload_size: int) -> None:
        required = self.misbehave.required_free_space
        if required is None:
            required = upload_size + FREE_SPACE_HEADROOM
        free = int(self._check(self.link.free_disk_space(), "report its free space").value)
        if free > required:
            return
        if self.link.purge_disk_space(required - free + PURGE_OVERSHOOT).ok:
            free = int(self._check(self.link.free_disk_space(), "report its free space").value)
            if free > required:
                return
        raise Refusal(
            errors.NOT_ENOUGH_SPACE,
            f"Not enough free disk space on the target ({required} bytes required, {free} available)",
        )

    def _batches(self, files: list[BackupFile]) -> Iterator[list[BackupFile]]:
        t = self.device.transfer
        batch: list[BackupFile] = []
        size = 0
        for f in files:
            if batch and (len(batch) >= t.batch_files or size + f.size > t.batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append(f)
            size += f.size
        if batch:
            yield batch

    def _upload_payloads(self, plan: BackupPlan) -> None:
        total = sum(f.size for f in plan.uploads) or 1
        done = 0
        index = 0
        created: set[str] = set()
        for batch in self._batches(plan.uploads):
            for f in batch:
                xx = f.file_id[:2]
                if xx not in created:
                    created.add(xx)
                    self._check(self.link.create_directory(f"{self.root}/Snapshot/{xx}"), "create a folder")
            uploads = []
            for f in batch:
                uploads.append(self._upload_of(f, index))
                index += 1
            self._check(self.link.upload_files(uploads, 100.0 * done / total), "receive files")
            done += sum(f.size for f in batch)

    def _upload_of(self, f: BackupFile, index: int) -> Upload:
        fid = f.file_id
        device_name = f"{f.domain}-{f.relative_path}"
        target = _payload(self.root, fid, staged=True)
        if fid in self.misbehave.fail_read:
            return Upload(device_name, target, b"", error=f"Failed to read {device_name}: Operation not permitted")
        data = self.device.payload(f)
        if self.keys.encrypts:
            data = self.keys.encrypt_file(fid, data)
        return Upload(device_name, target, data, drop_midway=index == self.misbehave.drop_during_upload)

    def _finalize(self, plan: BackupPlan, listing: dict) -> None:
        move = self._legacy(LegacyMessage.MOVE_FILES, "DLMessageMoveItems")
        remove = self._legacy(LegacyMessage.REMOVE_FILES, "DLMessageRemoveItems")
        existing = {name for name in listing if _is_hex_dir(name)}
        n = len(plan.uploads) or 1
        for i, f in enumerate(plan.uploads):
            xx = f.file_id[:2]
            if xx not in existing:
                existing.add(xx)
                self._check(self.link.create_directory(f"{self.root}/{xx}"), "create a folder")
            src, dst = _payload(self.root, f.file_id, staged=True), _payload(self.root, f.file_id, staged=False)
            self._check(self.link.move_items({src: dst}, 100.0 * i / n, move), "move a file into place")
        gone = [_payload(self.root, fid, staged=False) for fid in plan.removals]
        if plan.full:
            gone += self._stale_payloads(listing)
        if gone:
            self._check(self.link.remove_items(gone, 100.0, remove), "remove deleted files")
        staged = {
            f"{self.root}/Snapshot/{name}": f"{self.root}/{name}"
            for name in ("Manifest.db", "Manifest.plist", "Status.plist")
        }
        self._check(self.link.move_items(staged, 100.0, move), "move the metadata into place")
        self._check(self.link.remove_items([f"{self.root}/Snapshot"], 100.0, remove), "remove the Snapshot folder")

    def _stale_payloads(self, listing: dict) -> list[str]:
        """A full backup into a folder that already holds payloads: those of files the device no longer
        has go (inferred: the device can only learn them by listing, which is what it does here)."""
        keep = {fid for fid, f in self.device.files.items() if f.flags == FLAG_FILE}
        stale = []
        for xx in sorted(name for name in listing if _is_hex_dir(name)):
            entries = self._check(self.link.contents_of_directory(f"{self.root}/{xx}"), "list a folder").value or {}
            stale += [f"{self.root}/{xx}/{name}" for name in sorted(entries) if name not in keep]
        return stale
