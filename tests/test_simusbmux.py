"""The simulated usbmuxd + lockdownd (ibsync.testing.device.usbmuxd) against pymobiledevice3's own,
unmodified discovery, pairing, session and service code, in this process and from a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymobiledevice3 import usbmux
from pymobiledevice3.exceptions import (
    BadDevError,
    ConnectionFailedError,
    NotPairedError,
)
from pymobiledevice3.lockdown import create_using_usbmux
from pymobiledevice3.services.mobilebackup2 import Mobilebackup2Service
from pymobiledevice3.services.notification_proxy import NotificationProxyService

from ibsync.testing.device import SimDevice
from ibsync.testing.device.lockdownd import (
    LOCKDOWN_PORT,
    PUBLIC_KEYS,
    device_public_key_pem,
    make_pair_record,
    wifi_address,
)
from ibsync.testing.device.usbmuxd import ENV_VAR, SimUsbmuxd, run_sim_usbmuxd
from ibsync.testing.generator import generate_content

from test_simdevice import SEED, SIZE, assert_folder_matches

# UDIDs of the two shapes (old 40 hex digits from the generator, new "<chip>-<ecid>"); no real device has them,
# which matters because pymobiledevice3 also reads /var/lib/lockdown/<udid>.plist.
SECOND_UDID = "00008120-5111D0000000C0DE"


@pytest.fixture(scope="module")
def content():
    return generate_content(seed=SEED, size_bytes=SIZE)


@pytest.fixture
def device(content) -> SimDevice:
    return SimDevice.from_content(content)


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    """Pair records made once per module (two RSA keys and three certificates each). The device keys they
    were made for live per process, so they stay valid for every SimUsbmuxd here."""
    return {}


def record_for(records: dict[str, dict[str, Any]], device: SimDevice) -> dict[str, Any]:
    if device.udid not in records:
        # SystemBUID is the first mux's; pymobiledevice3 sends it back in StartSession and the device does
        # not check it, as real devices (as far as is known) do not either.
        records[device.udid] = make_pair_record(device, system_buid="SIM-BUID")
    return records[device.udid]


@pytest.fixture
def mux(device, tmp_path, monkeypatch) -> Iterator[SimUsbmuxd]:
    """A running SimUsbmuxd with ``device`` attached (not paired), found through USBMUXD_SOCKET_ADDRESS; the
    test fails if anything on the device side crashed."""
    with SimUsbmuxd(tmp_path / "mux", [device], tcp=True) as m:
        monkeypatch.setenv(ENV_VAR, m.address)
        yield m
        errors = m.all_errors()
    assert errors == [], "\n".join(errors)


def wait_for(probe: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def expected_values(device: SimDevice) -> dict[str, Any]:
    return {
        **device.lockdown_values(),
        "DevicePublicKey": device_public_key_pem(device.udid),
        "WiFiAddress": wifi_address(device.udid),
        "ProtocolVersion": "2",
    }


# ---- discovery ----------------------------------------------------------------------------------------------


def test_list_devices_over_unix_and_tcp(mux, device):
    mux.attach(SimDevice(udid=SECOND_UDID), "Network")
    for address in (None, mux.tcp_address):  # None: the environment variable (the UNIX socket)
        found = asyncio.run(usbmux.list_devices(usbmux_address=address))
        assert [(d.serial, d.connection_type) for d in found] == [(device.udid, "USB"), (SECOND_UDID, "Network")]
    assert ":" not in mux.address and mux.tcp_address.startswith("127.0.0.1:")


def test_listen_reports_attach_and_detach(mux, device):
    async def run() -> list[list[str]]:
        seen = []
        async with await usbmux.create_mux() as conn:
            await conn.listen()
            await conn.receive_device_state_update()  # the devices already there are replayed
            seen.append([d.serial for d in conn.devices])
            mux.attach(SimDevice(udid=SECOND_UDID))
            await conn.receive_device_state_update()
            seen.append([d.serial for d in conn.devices])
            mux.detach(device.udid)
            await conn.receive_device_state_update()
            seen.append([d.serial for d in conn.devices])
        return seen

    assert asyncio.run(run()) == [[device.udid], [device.udid, SECOND_UDID], [SECOND_UDID]]


def test_connect_refuses_unknown_devices_and_ports(mux, device):
    async def connect(devid: int, port: int) -> None:
        sock = await usbmux.MuxDevice(devid, device.udid, "USB").connect(port)
        sock.close()

    with pytest.raises(BadDevError):
        asyncio.run(connect(99, LOCKDOWN_PORT))
    with pytest.raises(ConnectionFailedError):
        asyncio.run(connect(1, 49999))  # no StartService handed this port out


# ---- pairing and lockdown -----------------------------------------------------------------------------------


def test_autopair_then_the_usbmuxd_record_is_enough(mux, device, tmp_path):
    async def run() -> None:
        lockdown = await create_using_usbmux(
            serial=device.udid, autopair=True, pairing_records_cache_folder=tmp_path / "cache"
        )
        async with lockdown:
            assert lockdown.paired and lockdown.udid == device.udid
            assert lockdown.all_values == expected_values(device)
            assert await lockdown.get_value("com.apple.mobile.backup", "WillEncrypt") is False
        # pymobiledevice3 kept the record in its cache and gave it to usbmuxd (SavePairRecord)
        saved = mux.records.load(device.udid)
        assert saved is not None and saved["HostID"] in mux.attachment(device.udid).lockdownd.trusted_hosts()
        assert (tmp_path / "cache" / f"{device.udid}.plist").exists()
        # a second client with an empty cache finds usbmuxd's record (ReadPairRecord) and needs no Pair
        async with await create_using_usbmux(
            serial=device.udid, autopair=False, pairing_records_cache_folder=tmp_path / "empty"
        ) as again:
            assert again.paired and again.all_values == expected_values(device)

    asyncio.run(run())
    requests = mux.attachment(device.udid).lockdownd.requests
    assert requests.count("Pair") == 1 and requests[:4] == ["QueryType", "GetValue", "GetValue", "Pair"]


def test_unpaired_device_shows_only_public_values(mux, device, tmp_path):
    async def run() -> None:
        async with await create_using_usbmux(
            serial=device.udid, autopair=False, pairing_records_cache_folder=tmp_path / "cache"
        ) as lockdown:
            assert not lockdown.paired
            assert lockdown.all_values == {k: v for k, v in expected_values(device).items() if k in PUBLIC_KEYS}
            with pytest.raises(NotPairedError):
                await lockdown.start_lockdown_service("com.apple.afc")

    asyncio.run(run())
    assert mux.attachment(device.udid).lockdownd.requests == ["QueryType", "GetValue"]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")  # pymobiledevice3 offers SSLv3..TLSv1 to iOS 4
@pytest.mark.parametrize("version, tls", [("4.3.5", "TLSv1"), ("6.1.6", "TLSv1.3")])
def test_old_ios_and_the_other_lockdown_requests(version, tls, tmp_path, monkeypatch):
    """iOS < 5 gets TLSv1, iOS < 7 ValidatePair; SetValue/RemoveValue, a service without TLS, StopSession and
    Unpair are answered as pymobiledevice3 expects."""
    device = SimDevice(udid=SECOND_UDID, product_version=version)
    with SimUsbmuxd(tmp_path / "mux", [device]) as mux:
        monkeypatch.setenv(ENV_VAR, mux.address)

        async def run() -> None:
            async with await create_using_usbmux(
                serial=device.udid, autopair=True, pairing_records_cache_folder=tmp_path / "cache"
            ) as lockdown:
                assert lockdown.service.writer.get_extra_info("ssl_object").version() == tls
                await lockdown.set_value("on", "com.example.sim", "Switch")
                assert await lockdown.get_value("com.example.sim") == {"Switch": "on"}
                await lockdown.remove_value("com.example.sim", "Switch")
                assert await lockdown.get_value("com.example.sim") == {}
                async with NotificationProxyService(lockdown, insecure=True) as proxy:
                    await proxy.notify_post("com.example.sim.hello")
                assert (await lockdown.stop_session())["Result"] == "Success"
                await lockdown.unpair()

        asyncio.run(run())
        lockdownd = mux.attachment(device.udid).lockdownd
        assert "ValidatePair" in lockdownd.requests and lockdownd.requests[-2:] == ["StopSession", "Unpair"]
        assert lockdownd.granted == [("com.apple.mobile.insecure_notification_proxy", False)]
        assert lockdownd.trusted_hosts() == []
        # the host closed the proxy without waiting for the device to read the notification: give it time
        log = mux.attachment(device.udid).log
        assert wait_for(lambda: log.host_notifications) == ["com.example.sim.hello"]
        assert mux.all_errors() == []


# ---- a backup over the whole stack --------------------------------------------------------------------------


def test_mobilebackup2_backup_over_usbmuxd(mux, device, records, tmp_path):
    mux.pair(device.udid, record_for(records, device))

    async def run() -> None:
        lockdown = await create_using_usbmux(
            serial=device.udid, autopair=False, pairing_records_cache_folder=tmp_path / "cache"
        )
        async with lockdown, Mobilebackup2Service(lockdown) as service:
            assert lockdown.paired
            await service.backup(full=True, backup_directory=tmp_path / "backup")

    asyncio.run(run())
    assert_folder_matches(tmp_path / "backup" / device.udid, device)
    attachment = mux.attachment(device.udid)
    granted = attachment.lockdownd.granted
    assert {name for name, _ in granted} >= {
        "com.apple.mobilebackup2",
        "com.apple.afc",
        "com.apple.mobile.notification_proxy",
    }
    assert all(tls for _, tls in granted), "every service ran over TLS (EnableServiceSSL)"
    assert sorted(attachment.log.services) == sorted(name for name, _ in granted)
    assert attachment.log.backups == ["full"]


# ---- another process ----------------------------------------------------------------------------------------


def test_pymobiledevice3_cli_finds_the_device_through_the_environment(device, records, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "PYMOBILEDEVICE3_USBMUX", "PYMOBILEDEVICE3_UDID")}
    with run_sim_usbmuxd([device], tmp_path / "mux", pair_records={device.udid: record_for(records, device)}) as mux:
        env.update(mux.env(home=tmp_path / "home"))
        commands = {"list": ["usbmux", "list"], "info": ["lockdown", "info"]}
        procs = {
            k: subprocess.Popen(
                [sys.executable, "-m", "pymobiledevice3", *args],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for k, args in commands.items()
        }
        outs = {k: p.communicate(timeout=60) + (p.returncode,) for k, p in procs.items()}
    for name, (out, err, rc) in outs.items():
        assert rc == 0, f"pymobiledevice3 {' '.join(commands[name])} exited {rc}\n{out}\n{err}"
    listed = json.loads(outs["list"][0])
    assert [(d["UniqueDeviceID"], d["ConnectionType"], d["DeviceName"]) for d in listed] == [
        (device.udid, "USB", device.name)
    ]
    info = json.loads(outs["info"][0])
    assert info["UniqueDeviceID"] == device.udid and info["SerialNumber"] == device.serial_number
    # paired through usbmuxd's record: nothing was written into the (redirected) home folder
    assert not list((tmp_path / "home").rglob("*.plist"))


def test_a_long_folder_still_gets_a_short_socket_path(device, tmp_path):
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    with SimUsbmuxd(deep, [device]) as mux:
        assert len(mux.address) < 100 and not Path(mux.address).is_relative_to(deep)
        found = asyncio.run(usbmux.list_devices(usbmux_address=mux.address))
        assert [d.serial for d in found] == [device.udid]
    assert not Path(mux.address).exists()
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):  # and nothing listens there any more
        s.connect(mux.address)
