"""The simulated device (ibsync.testing.device) against pymobiledevice3's own, unmodified host code."""

from __future__ import annotations

import asyncio
import logging
import plistlib
import sqlite3
from pathlib import Path

import pytest
from pyiosbackup import Backup
from pymobiledevice3.exceptions import (
    AfcException,
    ConnectionTerminatedError,
    NotEnoughDiskSpaceError,
    PyMobileDevice3Exception,
)
from pymobiledevice3.services.afc import AFC_LOCK_EX, AfcService
from pymobiledevice3.services.installation_proxy import InstallationProxyService
from pymobiledevice3.services.mobilebackup2 import Mobilebackup2Service
from pymobiledevice3.services.springboard import SpringBoardServicesService

from ibsync.source.backup_folder import read_backup_folder
from ibsync.testing.device import (
    LegacyMessage,
    Misbehaviour,
    PasscodePrompt,
    SimDevice,
    SimLockdown,
    file_id,
)
from ibsync.testing.generator import FLAG_FILE, generate, generate_content

from simdevice_fixtures import FAST_ROUNDS, connect  # noqa: F401  (pytest fixtures)

SEED = 5
SIZE = 1 << 20  # the generator's floor: about 300 files, 3.6 MB of payloads, 740 Manifest.db rows
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def content():
    return generate_content(seed=SEED, size_bytes=SIZE)


@pytest.fixture
def device(content) -> SimDevice:
    return SimDevice.from_content(content)


async def _backup(lockdown: SimLockdown, parent: Path, full: bool) -> None:
    async with Mobilebackup2Service(lockdown) as service:  # closes the connection backup() leaves open
        await service.backup(full=full, backup_directory=parent)


def backup(lockdown: SimLockdown, parent: Path, *, full: bool) -> Path:
    asyncio.run(_backup(lockdown, parent, full))
    return parent / lockdown.udid


def restore(lockdown: SimLockdown, parent: Path, source: str, password: str = "") -> None:
    async def run() -> None:
        async with Mobilebackup2Service(lockdown) as service:
            await service.restore(backup_directory=parent, source=source, password=password)

    asyncio.run(run())


def folder_rows(device_dir: Path) -> dict[str, tuple[str, str, int]]:
    con = sqlite3.connect(f"file:{device_dir / 'Manifest.db'}?mode=ro&immutable=1", uri=True)
    try:
        return {
            fid: (d, p, fl) for fid, d, p, fl in con.execute("SELECT fileID, domain, relativePath, flags FROM Files")
        }
    finally:
        con.close()


def assert_folder_matches(device_dir: Path, device: SimDevice) -> None:
    """ibsync's validator accepts the folder; Manifest.db lists exactly the device's rows; every payload,
    found through Manifest.db (fileID -> xx/fileID), holds the device's bytes; nothing else is there."""
    info = read_backup_folder(device_dir)
    assert info.snapshot_state == "finished" and info.device.udid.lower() == device.udid.lower()
    rows = folder_rows(device_dir)
    assert rows == {fid: (f.domain, f.relative_path, f.flags) for fid, f in device.files.items()}
    payloads = {fid: (device_dir / fid[:2] / fid).read_bytes() for fid, (_, _, fl) in rows.items() if fl == FLAG_FILE}
    assert payloads == device.payloads()
    on_disk = {p.name for d in device_dir.iterdir() if d.is_dir() for p in d.iterdir()}
    assert on_disk == set(payloads), "stray or missing files in the payload folders"
    assert not (device_dir / "Snapshot").exists()


def change_add_delete(device: SimDevice) -> tuple[str, str, str]:
    files = sorted((f for f in device.files.values() if f.flags == FLAG_FILE), key=lambda f: f.file_id)
    changed = device.write_file(files[0].domain, files[0].relative_path, b"changed on the device")
    added = device.write_file("HomeDomain", "Library/Notes/ibsync-new.txt", b"a new note")
    device.delete(files[1].domain, files[1].relative_path)
    return changed.file_id, added.file_id, files[1].file_id


# ---- backups ------------------------------------------------------------------------------------------------


def test_full_backup_writes_a_valid_folder_matching_the_device(device, connect, tmp_path):
    lockdown = connect(device)
    device_dir = backup(lockdown, tmp_path, full=True)
    assert_folder_matches(device_dir, device)
    log = lockdown.log
    assert log.backups == ["full"] and log.operations == [("Hello", 0), ("Backup", 0)]
    assert sorted(log.uploaded_payloads()) == sorted(device.payloads())
    assert log.downloaded == [[f"{device.udid}/Status.plist"]]  # pmd3's Status.plist asks for a full one
    # staged under Snapshot/, then one MoveItems per file, then the metadata, then Snapshot goes
    assert all(name.startswith(f"{device.udid}/Snapshot/") for name in log.uploaded)
    assert log.sent.count("DLMessageMoveItems") == len(device.payloads()) + 1
    assert log.removed[-1] == f"{device.udid}/Snapshot"
    assert log.host_notifications[:3] == [
        "com.apple.itunes-mobdev.syncWillStart",
        "com.apple.itunes-mobdev.syncLockRequest",
        "com.apple.itunes-mobdev.syncDidStart",
    ]
    info = plistlib.loads((device_dir / "Info.plist").read_bytes())
    assert info["Installed Applications"] == device.installed_apps()
    assert set(info["Applications"]) == set(device.installed_apps())


def test_incremental_backup_sends_only_what_changed(device, connect, tmp_path):
    lockdown = connect(device)
    backup(lockdown, tmp_path, full=True)
    changed, added, deleted = change_add_delete(device)
    lockdown.log.clear()
    device_dir = backup(lockdown, tmp_path, full=False)
    log = lockdown.log
    assert log.backups == ["incremental"]
    assert log.downloaded == [
        [f"{device.udid}/Status.plist"],
        [f"{device.udid}/Manifest.plist", f"{device.udid}/Manifest.db"],
    ]
    assert sorted(log.uploaded_payloads()) == sorted([changed, added])
    assert f"{device.udid}/{deleted[:2]}/{deleted}" in log.removed
    assert_folder_matches(device_dir, device)


def test_next_day_incremental(device, connect, tmp_path):
    lockdown = connect(device)
    backup(lockdown, tmp_path, full=True)
    before = {fid: f for fid, f in device.files.items()}
    device.next_day(seed=SEED)
    changed = {fid for fid, f in device.files.items() if f.flags == FLAG_FILE and before.get(fid) != f}
    lockdown.log.clear()
    device_dir = backup(lockdown, tmp_path, full=False)
    assert lockdown.log.backups == ["incremental"]
    assert set(lockdown.log.uploaded_payloads()) == changed and len(changed) > 5
    assert_folder_matches(device_dir, device)


def test_full_backup_removes_payloads_the_device_no_longer_has(device, connect, tmp_path):
    lockdown = connect(device)
    backup(lockdown, tmp_path, full=True)
    _, _, deleted = change_add_delete(device)
    device_dir = backup(lockdown, tmp_path, full=True)
    assert f"{device.udid}/{deleted[:2]}/{deleted}" in lockdown.log.removed
    assert_folder_matches(device_dir, device)


def test_device_from_a_generated_folder(content, tmp_path):
    device = SimDevice.from_backup_folder(generate(tmp_path, seed=SEED, size_bytes=SIZE))
    assert device.udid == content.udid
    assert device.files == {f.file_id: f for f in content.files}


# ---- restore ------------------------------------------------------------------------------------------------


def test_restore_onto_a_blank_device(device, connect, tmp_path):
    backup(connect(device), tmp_path, full=True)
    blank = SimDevice(udid="0" * 40)
    lockdown = connect(blank)
    restore(lockdown, tmp_path, source=device.udid)
    assert blank.files == device.files
    assert lockdown.log.operations[-1] == ("Restore", 0)
    info = plistlib.loads((tmp_path / device.udid / "Info.plist").read_bytes())
    assert blank.media["/iTunesRestore/RestoreApplications.plist"] == plistlib.dumps(info["Applications"])


# ---- encrypted backups --------------------------------------------------------------------------------------


def assert_decrypts(device_dir: Path, device: SimDevice) -> None:
    """pyiosbackup (independent of ibsync and of the simulator) reads every file back."""
    read = {e.file_id: e.read_bytes() for e in Backup.from_path(device_dir, PASSWORD).iter_files()}
    assert read == device.payloads()


def test_encrypted_backup_incremental_and_restore(device, connect, tmp_path):
    device.encrypted, device.password, device.keybag_rounds = True, PASSWORD, FAST_ROUNDS
    lockdown = connect(device)
    device_dir = backup(lockdown, tmp_path, full=True)
    info = read_backup_folder(device_dir)
    assert info.ios_encrypted and info.manifest_rows is None
    fid = next(iter(device.payloads()))
    assert (device_dir / fid[:2] / fid).read_bytes() != device.files[fid].data  # the payloads are ciphertext
    assert_decrypts(device_dir, device)

    changed, added, _ = change_add_delete(device)
    lockdown.log.clear()
    backup(lockdown, tmp_path, full=False)
    assert lockdown.log.backups == ["incremental"]
    assert sorted(lockdown.log.uploaded_payloads()) == sorted([changed, added])
    assert_decrypts(device_dir, device)

    blank = SimDevice(udid="0" * 40)
    with pytest.raises(PyMobileDevice3Exception, match="password is wrong"):
        restore(connect(blank), tmp_path, source=device.udid, password="not it")
    restore(connect(blank), tmp_path, source=device.udid, password=PASSWORD)
    assert blank.files == device.files and blank.encrypted and blank.password == PASSWORD


# ---- misbehaviours ------------------------------------------------------------------------------------------


def test_failed_read_leaves_an_empty_payload(device, connect, tmp_path):
    bad = sorted(device.payloads())[7]
    device.misbehave = Misbehaviour(fail_read=frozenset({bad}))
    lockdown = connect(device)
    with pytest.warns(UserWarning, match="Failed to fully upload"):
        device_dir = backup(lockdown, tmp_path, full=True)
    # what real hosts are left with (pymobiledevice3 #507): the row, and a 0-byte payload moved into place
    assert (device_dir / bad[:2] / bad).read_bytes() == b""
    assert bad in folder_rows(device_dir)
    assert lockdown.log.failed_uploads == [f"{device.udid}/Snapshot/{bad[:2]}/{bad}"]


def test_connection_dropped_mid_upload_then_next_backup_recovers(device, connect, tmp_path):
    device.misbehave = Misbehaviour(drop_during_upload=3)
    lockdown = connect(device)
    with pytest.raises(ConnectionTerminatedError):
        backup(lockdown, tmp_path, full=True)
    device_dir = tmp_path / device.udid
    assert (device_dir / "Snapshot").is_dir()
    # pymobiledevice3 wrote Status.plist as "finished" before the backup: the cut-short folder looks finished
    assert plistlib.loads((device_dir / "Status.plist").read_bytes())["SnapshotState"] == "finished"

    device.misbehave = Misbehaviour()
    lockdown.log.clear()
    backup(lockdown, tmp_path, full=False)  # pymobiledevice3 promotes it to full: Manifest.plist is empty
    assert lockdown.log.removed[0] == f"{device.udid}/Snapshot"  # the stale staging folder goes first
    assert_folder_matches(device_dir, device)


def test_host_with_too_little_space(device, connect, tmp_path):
    device.misbehave = Misbehaviour(required_free_space=1 << 62)
    lockdown = connect(device)
    with pytest.raises(NotEnoughDiskSpaceError):
        backup(lockdown, tmp_path, full=True)
    assert "DLMessagePurgeDiskSpace" in lockdown.log.sent
    assert "DLMessageUploadFiles" not in lockdown.log.sent
    assert lockdown.log.operations[-1] == ("Backup", 105)


@pytest.mark.parametrize("legacy", list(LegacyMessage), ids=lambda m: m.value)
def test_legacy_messages_break_pymobiledevice3(device, connect, tmp_path, legacy):
    """pymobiledevice3 11.45.0's dl_loop has no handler for these (libimobiledevice has): a KeyError."""
    device.misbehave = Misbehaviour(legacy_messages=frozenset({legacy}))
    with pytest.raises(KeyError, match=legacy.value):
        backup(connect(device), tmp_path, full=True)


def test_non_zero_error_code(device, connect, tmp_path):
    device.misbehave = Misbehaviour(final_error=(207, "simulated failure"))
    with pytest.raises(PyMobileDevice3Exception, match="207"):
        backup(connect(device), tmp_path, full=True)


def test_unreadable_manifest_plist_on_an_incremental_request(device, connect, tmp_path):
    """A host that offers an incremental base without a Manifest.plist gets ErrorCode 205 (observed on
    devices; pymobiledevice3's backup() avoids it by promoting to full, so its DeviceLink is driven here)."""
    device_dir = tmp_path / device.udid
    device_dir.mkdir()
    (device_dir / "Status.plist").write_bytes(plistlib.dumps({"SnapshotState": "finished", "IsFullBackup": False}))
    (device_dir / "Manifest.plist").touch()

    async def request_backup() -> None:
        async with Mobilebackup2Service(connect(device)) as service, service.device_link(tmp_path) as dl:
            await dl.send_process_message({"MessageName": "Backup", "TargetIdentifier": device.udid})
            await dl.dl_loop()

    with pytest.raises(PyMobileDevice3Exception, match="205"):
        asyncio.run(request_backup())


def test_passcode_prompt_holds_the_backup_until_entered(device, connect, tmp_path, caplog):
    device.misbehave = Misbehaviour(passcode_prompt=PasscodePrompt())
    lockdown = connect(device)

    async def scenario() -> None:
        task = asyncio.create_task(_backup(lockdown, tmp_path, full=True))
        assert await asyncio.to_thread(lockdown.runtime.passcode_prompt_shown.wait, 10)
        await asyncio.sleep(0.3)
        assert not task.done()
        assert "DLMessageUploadFiles" not in lockdown.log.sent
        lockdown.enter_passcode()
        await asyncio.wait_for(task, 30)

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert "Please enter the device passcode" in caplog.text  # pymobiledevice3 saw the notification
    assert lockdown.log.relayed == [
        "com.apple.LocalAuthentication.ui.presented",
        "com.apple.LocalAuthentication.ui.dismissed",
    ]
    assert_folder_matches(tmp_path / device.udid, device)


# ---- the helper services, through pymobiledevice3's own clients -----------------------------------------------


def test_helper_services(device, connect):
    device.media["/iTunes_Control/iTunes/iTunesPrefs"] = b"prefs"
    lockdown = connect(device)

    async def scenario() -> None:
        async with AfcService(lockdown) as afc, AfcService(lockdown) as other:
            assert await afc.get_file_contents("/iTunes_Control/iTunes/iTunesPrefs") == b"prefs"
            await afc.makedirs("/a/b")
            await afc.set_file_contents("/a/b/c.txt", b"hello")
            assert await afc.get_file_contents("/a/b/c.txt") == b"hello"
            assert await afc.listdir("/a") == ["b"]
            assert (await afc.stat("/a/b/c.txt"))["st_size"] == 5
            mine = await afc.fopen("/com.apple.itunes.lock_sync", "r+")
            theirs = await other.fopen("/com.apple.itunes.lock_sync", "r+")
            await afc.lock(mine, AFC_LOCK_EX)
            with pytest.raises(AfcException):  # OP_WOULD_BLOCK: the sync lock keeps a second host out
                await other.lock(theirs, AFC_LOCK_EX)
        async with InstallationProxyService(lockdown) as ip:
            apps = await ip.browse(options={"ApplicationType": "User"}, attributes=["CFBundleIdentifier"])
            assert [a["CFBundleIdentifier"] for a in apps] == device.installed_apps()
        async with SpringBoardServicesService(lockdown) as sb:
            assert (await sb.get_icon_pngdata("com.example.app")).startswith(b"\x89PNG\r\n\x1a\n")
        assert await Mobilebackup2Service(lockdown).get_will_encrypt() is False  # a lockdown value: no connection

    asyncio.run(scenario())
    assert file_id("HomeDomain", "Library/SMS/sms.db") == "3d0d7e5fb2ce288813306e4d4636395e047a3d28"


def test_change_password_turns_encryption_on_and_off(device, connect, tmp_path):
    lockdown = connect(device)

    async def change(**passwords: str) -> None:
        async with Mobilebackup2Service(lockdown) as service:
            await service.change_password(tmp_path, **passwords)

    asyncio.run(change(new=PASSWORD))
    assert device.encrypted and device.password == PASSWORD
    assert asyncio.run(Mobilebackup2Service(lockdown).get_will_encrypt()) is True
    with pytest.raises(PyMobileDevice3Exception, match="old backup password is wrong"):
        asyncio.run(change(old="not it"))
    asyncio.run(change(old=PASSWORD))
    assert not device.encrypted
