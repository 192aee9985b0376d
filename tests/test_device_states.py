"""The states an unattended caller meets on a real phone, on the simulated one: a cable pulled
mid-backup, a passcode never entered (ErrorCode 208), a device listed but unreachable, the same
phone on USB and the network, the battery, a "Trust this computer?" dialog nobody answers, a
device that stalls. Each ends in one line for the CLI and a distinct exception for the library."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import ibsync
from ibsync.capture.backup import CaptureDisconnected, CaptureFailed, CapturePasscodeNotEntered
from ibsync.capture.battery import BatteryState, read_battery
from ibsync.capture.discovery import list_connected, open_lockdown
from ibsync.errors import DeviceDisconnected, DeviceUnreachable, PasscodeNotEntered, TrustNotAnswered
from ibsync.testing.device import (
    Battery,
    HostileStep,
    Misbehaviour,
    PasscodePrompt,
    Reach,
    SimDevice,
    SimUsbmuxd,
    Then,
    run_sim_usbmuxd,
)
from ibsync.testing.generator import generate_content

from conftest import one_line_error, run_subprocess
from simdevice_fixtures import connect, repo  # noqa: F401  (pytest fixtures)


def _device(seed: int, size: int = 256 << 10, **kw) -> SimDevice:
    return SimDevice.from_content(generate_content(seed=seed, size_bytes=size), **kw)


@pytest.fixture
def mux(tmp_path, monkeypatch):
    with SimUsbmuxd(tmp_path / "mux") as m:
        monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", m.address)
        monkeypatch.setenv("IBSYNC_WIFI_DEVICES", "")
        monkeypatch.setattr("pymobiledevice3.lockdown.get_home_folder", lambda: tmp_path / "pmd3-home")
        yield m
        assert m.all_errors() == []


def test_cable_pulled_mid_backup_prints_one_line(env, cli, tmp_path):
    cli("init")
    phone = _device(1, size=8 << 20)
    with run_sim_usbmuxd([phone], tmp_path / "mux") as m:
        e = {**os.environ, **m.env(home=tmp_path / "home")}
        for round_ in range(2):  # the traceback came on most pulls, not all: pull twice
            proc = subprocess.Popen(
                [sys.executable, "-m", "ibsync", "backup", "--full"],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            attachment = m.attachment(phone.udid)
            deadline = time.monotonic() + 60
            while len(attachment.log.uploaded) < 5 + 20 * round_:  # files are flowing
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "no upload started"
                time.sleep(0.005)
            m.detach(phone.udid)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 7
            assert "Future exception" not in err and "never retrieved" not in err, err
            one_line_error(err, "connection to the device was lost")
            m.attach(phone)
    out, _ = cli("snapshots", "--json")
    assert json.loads(out) == []


def test_cable_pulled_mid_restore_prints_one_line(env, cli, tmp_path):
    cli("init")
    phone, blank = _device(10, size=8 << 20), SimDevice(udid="3" * 40, name="Blank iPhone")
    with run_sim_usbmuxd([phone, blank], tmp_path / "mux") as m:
        e = {**os.environ, **m.env(home=tmp_path / "home")}
        r = run_subprocess(["backup", "--device", phone.udid], e)
        assert r.returncode == 0, r.stderr
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ibsync",
                "restore",
                "latest",
                "--device",
                phone.udid,
                "--to-device",
                blank.udid,
                "--no-reboot",
            ],
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        attachment = m.attachment(blank.udid)
        deadline = time.monotonic() + 60
        while sum(len(x) for x in attachment.log.downloaded) < 10:  # files are flowing to the device
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no download started"
            time.sleep(0.005)
        m.detach(blank.udid)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 7 and "Future exception" not in err, err
    one_line_error(err, "connection to the device was lost during the restore")


def test_disconnect_and_passcode_timeout_are_distinct_types(connect, repo):  # noqa: F811
    phone = _device(2)
    lockdown = connect(phone)
    phone.misbehave = Misbehaviour(drop_during_upload=1)
    with pytest.raises(CaptureDisconnected, match="connection to the device was lost") as lost:
        ibsync.backup_device(lockdown, repo)
    assert isinstance(lost.value, DeviceDisconnected) and isinstance(lost.value, CaptureFailed)
    said: list[str] = []
    phone.misbehave = Misbehaviour(passcode_prompt=PasscodePrompt(give_up_after=0.3))
    with pytest.raises(CapturePasscodeNotEntered, match=r"error 208: Device locked \(MBErrorDomain/208\)") as locked:
        ibsync.backup_device(lockdown, repo, notify=said.append)
    assert isinstance(locked.value, PasscodeNotEntered) and not isinstance(locked.value, DeviceDisconnected)
    assert said and "passcode" in said[0]
    assert lockdown.log.relayed[-2:] == [
        "com.apple.LocalAuthentication.ui.presented",
        "com.apple.LocalAuthentication.ui.dismissed",
    ]
    # answered in time (auto_enter_after first): the backup goes through
    phone.misbehave = Misbehaviour(passcode_prompt=PasscodePrompt(auto_enter_after=0.1, give_up_after=5))
    assert ibsync.backup_device(lockdown, repo).snapshot is not None
    # a stall is neither: the host gives up after its idle timeout and calls it a failure
    phone.misbehave = Misbehaviour(hostile=HostileStep(then=Then.HANG))
    os.environ["IBSYNC_DEVICE_IDLE_TIMEOUT"] = "0.5"
    try:
        with pytest.raises(CaptureFailed, match="sent nothing for 0.5 s") as stalled:
            ibsync.backup_device(lockdown, repo)
    finally:
        del os.environ["IBSYNC_DEVICE_IDLE_TIMEOUT"]
    assert not isinstance(stalled.value, (DeviceDisconnected, PasscodeNotEntered))


def test_passcode_never_entered_via_the_cli(env, cli, tmp_path):
    cli("init")
    phone = _device(3, misbehave=Misbehaviour(passcode_prompt=PasscodePrompt(give_up_after=0.3)))
    with run_sim_usbmuxd([phone], tmp_path / "mux") as m:
        r = run_subprocess(["backup"], {**os.environ, **m.env(home=tmp_path / "home")})
    assert r.returncode == 7
    lines = [line for line in r.stderr.splitlines() if line.startswith("ibsync: error:")]
    assert lines == [
        "ibsync: error: the device reported error 208: Device locked (MBErrorDomain/208); nothing was committed"
    ], r.stderr
    assert "Traceback" not in r.stderr


def test_battery_is_read_live_and_tolerates_missing_values(mux):
    phone = _device(4, battery=Battery(level=42, charging=True, external=True))
    mux.attach(phone)
    mux.pair(phone.udid)

    async def scenario() -> None:
        [d] = await list_connected()
        lockdown = await open_lockdown(d)
        try:
            assert await read_battery(lockdown) == BatteryState(charging=True, external_power=True, level=42)
            phone.battery.charging, phone.battery.external, phone.battery.level = False, False, 17  # unplugged
            state = await read_battery(lockdown)
            assert state == BatteryState(False, False, 17) and state.on_power is False
            phone.battery = Battery(level=None, charging=None, external=True)  # keys left out
            state = await read_battery(lockdown)
            assert state == BatteryState(None, True, None) and state.on_power is True
            phone.battery = None  # no battery domain at all
            assert await read_battery(lockdown) == BatteryState(None, None, None)
        finally:
            await lockdown.close()

    asyncio.run(scenario())


def test_listed_but_unreachable_devices(mux, tmp_path):
    good, refused, silent = _device(5, name="Good"), _device(6, name="Refused"), _device(7, name="Silent")
    mux.attach(good)
    mux.attach(refused, reach=Reach.REFUSED)
    mux.attach(silent, reach=Reach.SILENT)
    for d in (good, refused, silent):
        mux.pair(d.udid)

    async def scenario() -> None:
        started = time.monotonic()
        # 2 s: a good phone answers in milliseconds, but a loaded CI machine may take a second
        devices, unreachable = await list_connected(tolerant=True, connect_timeout=2)
        assert time.monotonic() - started < 10
        assert [d.udid for d in devices] == [good.udid]
        assert set(unreachable) == {refused.udid, silent.udid}
        assert "did not answer within 2 s" in unreachable[silent.udid]
        with pytest.raises(DeviceUnreachable):
            await list_connected(connect_timeout=2)  # the commands' default: one line naming it

    asyncio.run(scenario())
    env = {**os.environ, **mux.env(home=tmp_path / "home"), "IBSYNC_DEVICE_CONNECT_TIMEOUT": "5"}
    mux.detach(silent.udid)  # (the good phone must answer within the timeout even on a loaded machine)
    r = run_subprocess(["devices"], env)
    one_line_error(r.stderr, refused.udid, "lockdown refused")
    mux.attachment(refused.udid).reach = Reach.OK  # it woke up
    r = run_subprocess(["devices", "--json"], env)
    assert r.returncode == 0 and {d["udid"] for d in json.loads(r.stdout)} == {good.udid, refused.udid}


def test_same_phone_on_usb_and_network(mux, env, cli):
    cli("init")
    phone = _device(8)
    usb = mux.attach(phone, "USB")
    net = mux.attach(phone, "Network")
    mux.pair(phone.udid)
    assert mux.attachment(phone.udid, "Network") is net

    async def listed():
        return [(d.udid, d.connection) for d in await list_connected()]

    assert asyncio.run(listed()) == [(phone.udid, "USB")]  # once, by USB
    mux.detach(phone.udid, "USB")
    assert asyncio.run(listed()) == [(phone.udid, "Network")]  # the pairing holds on the other path

    async def backup() -> None:
        [d] = await list_connected()
        await ibsync.backup_device_async(lambda: open_lockdown(d), str(env))

    asyncio.run(backup())
    assert "com.apple.mobilebackup2" in net.log.services and "com.apple.mobilebackup2" not in usb.log.services


def test_trust_dialog_waits_for_the_user_and_times_out(mux):
    phone = _device(9)
    mux.attach(phone)
    mux.trust_store(phone.udid).confirm = True  # pairing shows "Trust this computer?"

    async def scenario() -> None:
        [d] = await list_connected()
        assert d.paired is False
        said: list[str] = []
        with pytest.raises(TrustNotAnswered, match="not answered"):
            await open_lockdown(d, pair_timeout=0.5, notify=said.append)
        assert said == [f"{phone.name} asks whether to trust this computer: unlock it and tap Trust"]
        store = mux.trust_store(phone.udid)

        def tap_trust() -> None:
            store.dialog_shown.wait(10)
            mux.attachment(phone.udid).accept_trust()

        threading.Thread(target=tap_trust, daemon=True).start()
        lockdown = await open_lockdown(d, pair_timeout=10, notify=said.append)
        try:
            assert lockdown.paired
        finally:
            await lockdown.close()
        [again] = await list_connected()
        assert again.paired is True  # the record was saved with usbmuxd

    asyncio.run(scenario())
