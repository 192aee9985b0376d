"""The device's side of a mobilebackup2 ``Restore`` request.

The device pulls the backup from the host with ``DLMessageDownloadFiles``: Status.plist (a restore
needs ``SnapshotState: finished``), then Manifest.plist and Manifest.db, then the payloads by their
``<source>/xx/<fileID>`` paths in batches, and replaces its data with the backup's rows. Inferred
details: the order of the requests, the batch size, and that files the backup does not have are
kept unless ``RemoveItemsNotRestored`` is set; system domains are restored whatever
``RestoreSystemFiles`` says (the simulator has no notion of them).
"""

from __future__ import annotations

from ...source.backup_folder import plist_dict
from ..generator import FLAG_FILE, BackupFile
from . import errors
from .crypto import UnlockedBackup, WrongPassword
from .devicelink import DeviceLinkEndpoint
from .errors import Refusal
from .metadata import SQLITE_MAGIC, read_manifest_db
from .runtime import DeviceRuntime


class RestoreOperation:
    def __init__(self, link: DeviceLinkEndpoint, runtime: DeviceRuntime, request: dict) -> None:
        self.link = link
        self.runtime = runtime
        self.device = runtime.device
        self.source = str(request.get("SourceIdentifier") or request.get("TargetIdentifier") or self.device.udid)
        self.options = request.get("Options") or {}

    def run(self) -> None:
        """Restore, then answer the request (a :class:`Refusal` on the way is answered by the caller)."""
        self._restore()
        self.link.process_message({"ErrorCode": 0})

    def _fetch(self, paths: list[str], progress: float) -> dict[str, bytes]:
        got, _ = self.link.download_files(paths, progress)
        missing = [p for p in paths if got.get(p) is None]
        if missing:
            raise Refusal(errors.BAD_BACKUP, f"the host could not send {', '.join(missing[:3])}")
        return {p: got[p] for p in paths}

    def _restore(self) -> None:
        root = self.source
        status = self._fetch([f"{root}/Status.plist"], 0.0)[f"{root}/Status.plist"]
        state = (plist_dict(status) or {}).get("SnapshotState")
        if state != "finished":
            raise Refusal(errors.BAD_BACKUP, f"the backup is not finished (SnapshotState {state!r})")
        meta = self._fetch([f"{root}/Manifest.plist", f"{root}/Manifest.db"], 0.0)
        manifest = plist_dict(meta[f"{root}/Manifest.plist"])
        if manifest is None:
            raise Refusal(errors.BAD_BACKUP, "Manifest.plist is unreadable")
        image = meta[f"{root}/Manifest.db"]
        unlocked = None
        password = self.options.get("Password") or ""
        if manifest.get("IsEncrypted"):
            try:
                unlocked = UnlockedBackup.open(manifest, password)
            except WrongPassword:
                raise Refusal(errors.WRONG_PASSWORD, "the backup password is wrong") from None
            image = unlocked.decrypt_manifest_db(image)
        if not image.startswith(SQLITE_MAGIC):
            raise Refusal(errors.BAD_BACKUP, "Manifest.db is not a database")
        rows = read_manifest_db(image)
        payload_rows = [r for r in rows if r.flags == FLAG_FILE]
        batch = self.device.transfer.download_batch_files
        # each payload becomes its row as it arrives (the device keeps no second copy, and a
        # device of generated files keeps none of those it could make itself)
        restored: dict[str, BackupFile] = {}
        for i in range(0, len(payload_rows), batch):
            part = payload_rows[i : i + batch]
            got = self._fetch([f"{root}/{r.file_id[:2]}/{r.file_id}" for r in part], 100.0 * i / len(payload_rows))
            for r in part:
                raw = got[f"{root}/{r.file_id[:2]}/{r.file_id}"]
                data = raw if unlocked is None else unlocked.decrypt_file(raw, r.encryption_key, r.size)
                restored[r.file_id] = self.device.kept(r.to_backup_file(None), data)
            del got
        if self.device.misbehave.before_finish is not None:
            self.device.misbehave.before_finish(self.link, root)  # a test's own requests, last
        for r in rows:
            if r.file_id not in restored:
                restored[r.file_id] = r.to_backup_file(None)
        if not self.options.get("RemoveItemsNotRestored"):
            restored = {**self.device.files, **restored}
        self.device.files = restored
        if unlocked is not None:
            # a device restored from an encrypted backup keeps encrypting its backups with that password
            self.device.encrypted, self.device.password = True, password
