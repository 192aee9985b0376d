"""`ibsync devices` run as a user runs it: a separate process finding the simulated device
through usbmuxd (USBMUXD_SOCKET_ADDRESS), with pymobiledevice3's own discovery and lockdown."""

from __future__ import annotations

import json
import os

from ibsync.testing.device import SimDevice, run_sim_usbmuxd
from ibsync.testing.generator import generate_content

from conftest import one_line_error, run_subprocess


def _device(seed: int, **kw) -> SimDevice:
    return SimDevice.from_content(generate_content(seed=seed, size_bytes=256 << 10), **kw)


def test_devices_lists_paired_unpaired_and_encrypting_devices(tmp_path):
    plain = _device(1, name="Alice's iPhone")
    locked = _device(2, name="Bob's iPad", encrypted=True, password="1234")
    with run_sim_usbmuxd([plain, locked], tmp_path / "mux") as mux:
        env = {**os.environ, **mux.env(home=tmp_path / "home")}
        r = run_subprocess(["devices", "--json"], env)
        assert r.returncode == 0, r.stderr
        listed = {d["udid"]: d for d in json.loads(r.stdout)}
        assert set(listed) == {plain.udid, locked.udid}
        assert listed[plain.udid]["name"] == "Alice's iPhone" and listed[plain.udid]["paired"] is True
        assert listed[plain.udid]["encrypts_backups"] is False
        assert listed[locked.udid]["encrypts_backups"] is True
        assert listed[plain.udid]["ios"] == plain.product_version
        r = run_subprocess(["devices"], env)
        assert r.returncode == 0 and "Alice's iPhone" in r.stdout and "Encrypted backups" in r.stdout
    with run_sim_usbmuxd([plain], tmp_path / "unpaired", paired=False) as mux:
        r = run_subprocess(["devices", "--json"], {**os.environ, **mux.env(home=tmp_path / "home2")})
        assert r.returncode == 0, r.stderr
        [d] = json.loads(r.stdout)
        assert d["paired"] is False and d["encrypts_backups"] is None  # listing never pairs


def test_devices_without_usbmuxd_is_one_line(tmp_path):
    r = run_subprocess(["devices"], {**os.environ, "USBMUXD_SOCKET_ADDRESS": str(tmp_path / "none")})
    assert r.returncode == 7
    one_line_error(r.stderr, "cannot reach usbmuxd")
