"""Wi-Fi direct: paired phones reached over the LAN without usbmuxd (ibsync.capture.wifi).

The simulated phone's lockdownd listens on TCP 127.0.0.1 (SimUsbmuxd.join_wifi); its services are
further TCP connections to the ports StartService names, as pymobiledevice3's TcpLockdownClient
makes them. Bonjour's multicast is not exercised (tests send nothing off 127.0.0.1): the CLI gets
the phones through IBSYNC_WIFI_DEVICES, and the advert matching (MAC, authTag) runs in-process
on the adverts the simulated phones would publish.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from ibsync.capture import wifi
from ibsync.capture.discovery import ConnectedDevice, list_connected, open_lockdown
from ibsync.errors import DeviceUnreachable
from ibsync.testing.device import Reach, SimDevice, SimUsbmuxd, run_sim_usbmuxd
from ibsync.testing.device.lockdownd import make_pair_record
from ibsync.testing.generator import generate_content

from conftest import one_line_error, run_subprocess
from test_simdevice import assert_folder_matches


def _device(seed: int, **kw) -> SimDevice:
    return SimDevice.from_content(generate_content(seed=seed, size_bytes=256 << 10), **kw)


def _paired_wifi_only(mux: SimUsbmuxd, device: SimDevice):
    """Paired over USB once (the record stays with usbmuxd), then unplugged and on the LAN only."""
    mux.attach(device)
    mux.pair(device.udid)
    mux.detach(device.udid)
    return mux.join_wifi(device)


def test_devices_lists_wifi_phones_once_preferring_usb(tmp_path):
    both, lan = _device(1, name="Alice's iPhone"), _device(2, name="Bob's iPhone")
    with run_sim_usbmuxd([both], tmp_path / "mux") as mux:
        on_lan = _paired_wifi_only(mux, lan)
        mux.join_wifi(both)
        env = {**os.environ, **mux.env(home=tmp_path / "home")}
        r = run_subprocess(["devices", "--wifi", "--json"], env)
        assert r.returncode == 0, r.stderr
        listed = {d["udid"]: d for d in json.loads(r.stdout)}
        assert set(listed) == {both.udid, lan.udid}
        assert listed[both.udid]["connection"] == "USB" and "address" not in listed[both.udid]
        assert listed[lan.udid]["connection"] == "Wi-Fi" and listed[lan.udid]["paired"] is True
        assert listed[lan.udid]["address"] == on_lan.address and listed[lan.udid]["name"] == "Bob's iPhone"
        assert on_lan.lockdownd.requests.count("StartSession") >= 1  # reached over TCP, with the pair record
        r = run_subprocess(["devices", "--wifi"], env)
        assert r.returncode == 0 and "Wi-Fi" in r.stdout and "Bob's iPhone" in r.stdout, r.stderr
        r = run_subprocess(["devices", "--json"], env)  # without --wifi: usbmuxd's only
        assert [d["udid"] for d in json.loads(r.stdout)] == [both.udid]


def test_backup_over_wifi_when_only_reachable_there_then_incremental(env, cli, tmp_path):
    cli("init")
    phone = _device(3)
    with run_sim_usbmuxd([], tmp_path / "mux") as mux:
        on_lan = _paired_wifi_only(mux, phone)
        e = {**os.environ, **mux.env(home=tmp_path / "home")}
        r = run_subprocess(["backup", "--json"], e)  # no --wifi: usbmuxd has nothing, so Wi-Fi is tried
        assert r.returncode == 0, r.stderr
        [first] = json.loads(r.stdout)["snapshots"]
        assert first["mode"] == "full" and first["udid"] == phone.udid.upper()
        assert "com.apple.mobilebackup2" in on_lan.log.services  # the data came over the TCP path
        phone.write_file("HomeDomain", "Library/Notes/wifi.txt", b"sent over the air")
        r = run_subprocess(["backup", "--wifi", "--device", phone.udid[:8], "--json"], e)
        assert r.returncode == 0, r.stderr
        [second] = json.loads(r.stdout)["snapshots"]
        assert second["mode"] == "incremental" and second["parent"] == first["id"]
        r = run_subprocess(["backup", "--no-wifi"], e)
        one_line_error(r.stderr, "no device connected")
    cli("restore", "latest", tmp_path / "out")
    assert_folder_matches(tmp_path / "out" / phone.udid, phone)


def test_unpaired_refused_or_silent_wifi_phones_are_left_out_quickly(tmp_path):
    stranger, refused, silent = _device(4), _device(5), _device(6)
    with run_sim_usbmuxd([], tmp_path / "mux") as mux:
        mux.join_wifi(stranger)  # never paired with this computer: nothing to offer it
        _paired_wifi_only(mux, silent)
        mux.leave_wifi(silent.udid)
        mux.join_wifi(silent, reach=Reach.SILENT)  # accepts and never answers
        _paired_wifi_only(mux, refused)
        mux.leave_wifi(refused.udid)
        mux.join_wifi(refused, reach=Reach.REFUSED)
        env = {**os.environ, **mux.env(home=tmp_path / "home"), "IBSYNC_DEVICE_CONNECT_TIMEOUT": "1"}
        started = time.monotonic()
        r = run_subprocess(["devices", "--wifi", "--json"], env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == []
        assert time.monotonic() - started < 8  # the silent phone cost its connect timeout, no more
        r = run_subprocess(["devices", "--wifi"], {**env, "IBSYNC_WIFI_DEVICES": "not-a-list"})
        one_line_error(r.stderr, "IBSYNC_WIFI_DEVICES", "UDID=HOST:PORT")


def test_bonjour_adverts_are_matched_to_pair_records_before_any_connection(tmp_path, monkeypatch):
    """pymobiledevice3's matching, fed the adverts the simulated phones publish: ours by its
    Wi-Fi MAC, ours again under a private (random) MAC by its authTag, a stranger's never
    contacted. Only the multicast socket itself is left out."""
    ours, stranger = _device(7), _device(8)

    async def scenario(mux: SimUsbmuxd) -> None:
        ours_lan = mux.join_wifi(ours)
        theirs_lan = mux.join_wifi(stranger)
        # the stranger trusts another computer: its advert carries that host's authTag
        theirs_lan.lockdownd.trust(make_pair_record(stranger, system_buid="OTHER", host_id="OTHER-HOST-ID"))
        private = ours_lan.advert(identifier="rotated-id")
        private.instance = "12:34:56:78:9a:bc@fe80::2._apple-mobdev2._tcp.local."  # a private Wi-Fi address
        adverts = [theirs_lan.advert(), ours_lan.advert(), private]
        calls: list[float] = []

        async def browse(timeout: float):
            calls.append(timeout)
            for a in adverts:
                yield a

        found = [
            (ep, client)
            async for ep, client in wifi.find_paired(browse=browse, use_advert_port=True, environ={}, timeout=0.5)
        ]
        try:
            assert [ep.udid for ep, _ in found] == [ours.udid]  # the private-MAC advert is the same phone
            assert found[0][0].address == ours_lan.address and found[0][1].paired
        finally:
            for _, client in found:
                await client.close()
        assert calls == [0.5]
        assert theirs_lan.lockdownd.requests == []  # not ours: never contacted
        # the private-address advert alone is recognised by its authTag
        assert wifi.candidate_records(private, await wifi.known_pair_records(None))

    with SimUsbmuxd(tmp_path / "mux", [ours]) as mux:
        monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", mux.address)  # pair records come from usbmuxd
        mux.pair(ours.udid)
        asyncio.run(scenario(mux))
        assert mux.all_errors() == []


def test_no_pair_record_means_no_browse_and_a_lost_phone_is_unreachable(tmp_path, monkeypatch):
    async def browse(timeout: float):
        raise AssertionError("browsed with nothing paired")
        yield  # pragma: no cover

    async def scenario(mux: SimUsbmuxd, phone: SimDevice) -> None:
        assert [x async for x in wifi.find_paired(browse=browse, environ={})] == []
        on_lan = mux.join_wifi(phone)
        monkeypatch.setenv("IBSYNC_WIFI_DEVICES", on_lan.env_entry())
        mux.attach(phone)
        mux.pair(phone.udid)
        devices = await list_connected(wifi=True)  # the static list from the environment
        assert [(d.udid, d.connection) for d in devices] == [(phone.udid, "USB")]  # USB preferred
        mux.detach(phone.udid)
        [d] = await list_connected(wifi=True)
        assert d.connection == "Wi-Fi" and d.address == on_lan.address
        client = await open_lockdown(d)
        assert client.paired and client.udid == phone.udid
        await client.close()
        mux.leave_wifi(phone.udid)
        with pytest.raises(DeviceUnreachable, match="cannot reach it over Wi-Fi"):
            await open_lockdown(d, connect_timeout=1)
        gone = ConnectedDevice(phone.udid, None, None, None, "Wi-Fi", True, None, address="127.0.0.1:9")
        with pytest.raises(DeviceUnreachable):
            await open_lockdown(gone, connect_timeout=1)

    phone = _device(9)
    with SimUsbmuxd(tmp_path / "mux") as mux:
        monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", mux.address)
        monkeypatch.setenv("IBSYNC_WIFI_DEVICES", "")
        asyncio.run(scenario(mux, phone))


@pytest.fixture(autouse=True)
def own_pmd3_home(tmp_path, monkeypatch):
    """pymobiledevice3 looks for pair records in its home folder, fixed at import: this process's
    is the real user's, so in-process tests get a folder of their own."""
    folder = tmp_path / "pmd3-home"
    folder.mkdir()
    monkeypatch.setattr("pymobiledevice3.lockdown.get_home_folder", lambda: folder)


def test_static_list_parsing():
    eps = wifi.static_endpoints(" A=127.0.0.1:5000 , B=[::1]:62078,C=host.local ,")
    assert [(e.udid, e.host, e.port) for e in eps] == [
        ("A", "127.0.0.1", 5000),
        ("B", "::1", 62078),
        ("C", "host.local", 62078),
    ]
    assert eps[1].address == "[::1]:62078"
    for bad in ("A", "=1.2.3.4:1", "A=1.2.3.4:0", "A=1.2.3.4:x"):
        with pytest.raises(Exception, match="IBSYNC_WIFI_DEVICES"):
            wifi.static_endpoints(bad)
