"""`restore --to-device`: a snapshot pushed back onto a (simulated) device, its backup folder
served straight from the repository by ibsync's own DeviceLink host."""

from __future__ import annotations

import copy
import json
import os
import plistlib
import subprocess

import pytest

import ibsync
from ibsync.capture.restore import RestoreFailed, RestoreOutcome
from ibsync.testing.device import SimDevice, SimLockdown, run_sim_usbmuxd
from ibsync.testing.generator import generate_content

from conftest import one_line_error, open_repo, run_subprocess
from simdevice_fixtures import FAST_ROUNDS, connect, repo  # noqa: F401  (pytest fixtures)
from test_simdevice import change_add_delete

SIZE = 1 << 20
DEVICE_PASSWORD = "device backup password"


@pytest.fixture(scope="module")
def content():
    return generate_content(seed=11, size_bytes=SIZE)


@pytest.fixture
def device(content) -> SimDevice:
    return SimDevice.from_content(content)


def restored_onto(
    connect, repo: str, snapshot, udid: str = "0" * 40, **options
) -> tuple[SimDevice, SimLockdown, RestoreOutcome]:
    blank = SimDevice(udid=udid)
    lockdown = connect(blank)
    outcome = ibsync.restore_to_device(lockdown, repo, snapshot, **options)
    assert lockdown.log.operations[-1] == ("Restore", 0)
    return blank, lockdown, outcome


def test_restore_onto_blank_devices_of_another_and_the_same_udid(device, connect, repo, tmp_path):
    snap = ibsync.backup_device(SimLockdown(device), repo).snapshot
    before = os.listdir(tmp_path)

    other, lockdown, outcome = restored_onto(connect, repo, "latest")
    assert other.files == device.files
    assert outcome.source_udid == device.udid and outcome.target_udid == other.udid
    assert outcome.files_sent == len(device.payloads()) + 3  # the payloads, Status/Manifest.plist, Manifest.db
    # the device pulled the snapshot's folder, under the source device's UDID
    assert all(p.startswith(f"{device.udid}/") for batch in lockdown.log.downloaded for p in batch)
    info = plistlib.loads(_info_plist(tmp_path, snap))
    assert other.media["/iTunesRestore/RestoreApplications.plist"] == plistlib.dumps(info["Applications"])

    same, _, _ = restored_onto(connect, repo, snap, udid=device.udid, reboot=False, copy=False)
    assert same.files == device.files
    assert os.listdir(tmp_path) == before  # nothing rehydrated locally
    assert [s.id for s in open_repo(tmp_path / "repo").snapshots()] == [snap.id]  # the repository is untouched


def _info_plist(tmp_path, snap) -> bytes:
    from ibsync.capture.vtree import VirtualTree

    repo = open_repo(tmp_path / "repo")
    return VirtualTree(repo, snap.folder, snap.tree).read_bytes(f"{snap.folder}/Info.plist")


def test_the_second_snapshot_restores_the_mutated_device_and_remove_option(device, connect, repo):
    original = copy.deepcopy(device.files)
    first = ibsync.backup_device(SimLockdown(device), repo).snapshot
    changed, added, deleted = change_add_delete(device)
    second = ibsync.backup_device(SimLockdown(device), repo).snapshot
    assert second.parent == first.id

    now, _, _ = restored_onto(connect, repo, second.id[:12])
    assert now.files == device.files
    assert now.files[changed].data == b"changed on the device" and added in now.files and deleted not in now.files

    then, _, _ = restored_onto(connect, repo, first)
    assert then.files == original

    # onto a device that has other data: kept, unless remove (RemoveItemsNotRestored)
    busy = SimDevice(udid="1" * 40)
    extra = busy.write_file("HomeDomain", "Library/Notes/only-here.txt", b"only on this phone")
    ibsync.restore_to_device(connect(busy), repo, second)
    assert extra.file_id in busy.files and set(device.files) < set(busy.files)
    ibsync.restore_to_device(connect(busy), repo, second, remove=True)
    assert busy.files == device.files


def test_encrypted_snapshot_needs_its_password(device, connect, repo):
    device.encrypted, device.password, device.keybag_rounds = True, DEVICE_PASSWORD, FAST_ROUNDS
    snap = ibsync.backup_device(SimLockdown(device), repo).snapshot
    assert snap.ios_encrypted

    blank = SimDevice(udid="0" * 40)
    with pytest.raises(RestoreFailed, match="encrypted iOS backup: the restore needs its backup password") as e:
        ibsync.restore_to_device(connect(blank), repo, snap)
    assert "\n" not in str(e.value)
    lockdown = connect(blank)
    with pytest.raises(RestoreFailed, match="device refused the restore: error 4: .*password is wrong") as e:
        ibsync.restore_to_device(lockdown, repo, snap, backup_password="not it")
    assert "\n" not in str(e.value) and blank.files == {}
    assert lockdown.log.operations[-1] == ("Restore", 4)

    ibsync.restore_to_device(connect(blank), repo, snap, backup_password=DEVICE_PASSWORD)
    assert blank.files == device.files and blank.encrypted and blank.password == DEVICE_PASSWORD


def test_async_entry_point_and_running_loop_guard(device, connect, repo):
    import asyncio

    snap = ibsync.backup_device(SimLockdown(device), repo).snapshot
    blank = SimDevice(udid="0" * 40)

    async def scenario() -> None:
        with pytest.raises(ibsync.errors.UserError, match="running event loop"):
            ibsync.restore_to_device(SimLockdown(blank), repo, snap)

        async def make() -> SimLockdown:
            return connect(blank)

        outcome = await ibsync.restore_to_device_async(make, repo, snap.id)
        assert outcome.snapshot.id == snap.id

    asyncio.run(scenario())
    assert blank.files == device.files


def test_cli_restore_to_device_through_usbmuxd(env, cli, tmp_path):
    cli("init")
    phone = SimDevice.from_content(generate_content(seed=12, size_bytes=SIZE))
    blank = SimDevice(udid="2" * 40, name="Blank iPhone")
    with run_sim_usbmuxd([phone, blank], tmp_path / "mux") as mux:
        e = {**os.environ, **mux.env(home=tmp_path / "home")}
        r = run_subprocess(["backup", "--json", "--device", phone.udid], e)
        assert r.returncode == 0, r.stderr
        r = run_subprocess(["restore", "latest", "--to-device", blank.udid, "--json", "--no-reboot"], e)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["target_udid"] == blank.udid and out["source_udid"] == phone.udid
        assert blank.files == phone.files

        r = run_subprocess(["restore", "latest", "--to-device", "Blank iPhone", str(tmp_path / "out")], e)
        assert r.returncode == 2 and "not both" in r.stderr
        r = run_subprocess(["restore", "latest"], e)
        assert r.returncode == 2 and "--to-device" in r.stderr
        r = run_subprocess(["restore", "latest", "--to-device", "nobody"], e)
        assert r.returncode == 2
        one_line_error(r.stderr, "no single connected device matches 'nobody'")


def test_cli_encrypted_snapshot_without_password_is_one_line(env, cli, tmp_path):
    cli("init")
    phone = SimDevice.from_content(generate_content(seed=13, size_bytes=256 << 10))
    phone.encrypted, phone.password, phone.keybag_rounds = True, DEVICE_PASSWORD, FAST_ROUNDS
    blank = SimDevice(udid="3" * 40)
    ibsync.backup_device(SimLockdown(phone), str(env))
    with run_sim_usbmuxd([blank], tmp_path / "mux") as mux:
        e = {**os.environ, **mux.env(home=tmp_path / "home")}
        e.pop("IBSYNC_BACKUP_PASSWORD", None)
        r = run_subprocess(["restore", "latest", "--to-device", blank.udid], e, stdin=subprocess.DEVNULL)
        assert r.returncode == 2
        one_line_error(r.stderr, "encrypted iOS backup", "--backup-password-file")
        r = run_subprocess(["restore", "latest", "--to-device", blank.udid], {**e, "IBSYNC_BACKUP_PASSWORD": "wrong"})
        assert r.returncode == 7
        one_line_error(r.stderr, "device refused the restore", "password is wrong")
        pw = tmp_path / "pw"
        pw.write_text(DEVICE_PASSWORD + "\n")
        r = run_subprocess(["restore", "latest", "--to-device", blank.udid, "--backup-password-file", pw], e)
        assert r.returncode == 0, r.stderr
    assert blank.files == phone.files
