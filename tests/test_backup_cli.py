"""`ibsync backup` as a user runs it: a separate process that finds the simulated device through
usbmuxd, pairs over pymobiledevice3's lockdown/TLS, and writes straight into the repository."""

from __future__ import annotations

import json
import os

from ibsync.testing.device import Misbehaviour, SimDevice, run_sim_usbmuxd
from ibsync.testing.generator import generate_content

from conftest import one_line_error, run_subprocess
from servers_fixture import configure, server_fixture
from test_simdevice import assert_folder_matches


def _device(seed: int, **kw) -> SimDevice:
    return SimDevice.from_content(generate_content(seed=seed, size_bytes=2 << 20), **kw)


def _backup(env, *args, expect=0):
    r = run_subprocess(["backup", "--json", *args], env)
    assert r.returncode == expect, r.stderr
    return json.loads(r.stdout) if expect == 0 else r


def test_backup_then_incremental_then_restore(env, cli, tmp_path):
    cli("init")
    phone = _device(3)
    with run_sim_usbmuxd([phone], tmp_path / "mux", paired=False) as mux:  # first contact pairs
        e = {**os.environ, **mux.env(home=tmp_path / "home")}
        [first] = _backup(e)["snapshots"]
        assert first["mode"] == "full" and first["udid"] == phone.udid.upper()
        sent_before = len(phone.files)
        phone.write_file("HomeDomain", "Library/Notes/today.txt", b"bought milk")
        [second] = _backup(e)["snapshots"]
        assert second["mode"] == "incremental" and second["parent"] == first["id"]
        # the new file and the device's three metadata files, not the whole phone again
        assert second["files_received"] <= 4 < sent_before
    cli("restore", first["id"][:10], tmp_path / "one")
    cli("restore", "latest", tmp_path / "two")
    assert_folder_matches(tmp_path / "two" / phone.udid, phone)
    out, _ = cli("snapshots", "--json")
    assert [s["id"] for s in json.loads(out)] == [first["id"], second["id"]]
    cli("check", "--read-data")


def test_several_devices_need_a_choice_or_all(env, cli, tmp_path):
    cli("init")
    a, b = _device(4, name="Alice's iPhone"), _device(5, name="Bob's iPad")
    with run_sim_usbmuxd([a, b], tmp_path / "mux") as mux:
        e = {**os.environ, **mux.env(home=tmp_path / "home")}
        r = _backup(e, expect=2)
        one_line_error(r.stderr, "several devices are connected", "--device", "--all")
        [one] = _backup(e, "--device", "Bob's iPad")["snapshots"]
        assert one["udid"] == b.udid.upper()
        both = _backup(e, "--all")
        assert {s["udid"] for s in both["snapshots"]} == {a.udid.upper(), b.udid.upper()} and both["failed"] == []
    cli("restore", "latest", "--device", a.udid, tmp_path / "a")
    assert_folder_matches(tmp_path / "a" / a.udid, a)


def test_a_device_that_fails_leaves_the_last_snapshot_and_says_why(env, cli, tmp_path):
    cli("init")
    phone = _device(6)
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = {**os.environ, **mux.env(home=tmp_path / "home")}
        [good] = _backup(e)["snapshots"]
        phone.misbehave = Misbehaviour(final_error=(207, "simulated failure"))
        r = _backup(e, expect=7)
        assert (
            "Traceback" not in r.stderr
            and "207" in r.stderr
            and r.stderr.strip().splitlines()[-1].startswith("ibsync: error:")
        )
        out, _ = cli("snapshots", "--json")
        assert [s["id"] for s in json.loads(out)] == [good["id"]]
        phone.misbehave = Misbehaviour()
        [again] = _backup(e)["snapshots"]
        assert again["parent"] == good["id"]
    cli("restore", "latest", tmp_path / "out")
    assert_folder_matches(tmp_path / "out" / phone.udid, phone)


def test_backup_without_devices_is_one_line(env, cli, tmp_path):
    cli("init")
    with run_sim_usbmuxd([], tmp_path / "mux") as mux:
        r = run_subprocess(["backup"], {**os.environ, **mux.env(home=tmp_path / "home")})
    assert r.returncode == 7
    one_line_error(r.stderr, "no device connected")


def test_backup_interrupted_by_the_user_keeps_data_and_the_next_run_completes(env, cli, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cli("init", "--pack-size", "4")
    phone = SimDevice.from_content(generate_content(seed=8, size_bytes=48 << 20))
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = {**os.environ, **mux.env(home=tmp_path / "home")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "ibsync", "backup", "--quiet"],
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while len(list((env / "packs").glob("*/*"))) < 2:  # some data is stored: the capture is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no pack appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        out, _ = cli("snapshots", "--json")
        assert json.loads(out) == []  # nothing half-committed
        assert list((env / "index").iterdir()), "Ctrl-C indexes what was already stored"
        _backup(e)
    # what the interrupted run stored (two packs of 4 MiB or more) was used, not stored a second
    # time: prune finds only that run's own Info.plist (a few KiB, new in every backup) unused
    out, _ = cli("prune", "--dry-run", "--json")
    plan = json.loads(out)
    assert plan["bytes_to_delete"] + plan["unused_bytes_kept"] + plan["bytes_to_repack"] < (64 << 10), plan
    cli("restore", "latest", tmp_path / "out")
    assert_folder_matches(tmp_path / "out" / phone.udid, phone)
    cli("check", "--read-data")


seaweedfs_server = server_fixture("seaweedfs")


def test_backup_straight_into_s3(seaweedfs_server, env, cli, tmp_path, monkeypatch):
    """The device's backup goes to an S3 repository named in the config file, with nothing of it on
    local disk; incremental the second time; restores exactly from S3."""
    configure(tmp_path, monkeypatch, seaweedfs_server, "offsite", seaweedfs_server.new_url("capture"))
    cli("init", "--repo", "offsite")
    phone = _device(9)
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = {**os.environ, **mux.env(home=tmp_path / "home")}
        [first] = _backup(e, "--repo", "offsite")["snapshots"]
        phone.write_file("HomeDomain", "Library/Notes/s3.txt", b"off-site")
        [second] = _backup(e, "--repo", "offsite")["snapshots"]
        assert first["mode"] == "full" and second["mode"] == "incremental" and second["files_received"] <= 4
    cli("restore", "latest", tmp_path / "out", "--repo", "offsite")
    assert_folder_matches(tmp_path / "out" / phone.udid, phone)
    cli("check", "--read-data", "--repo", "offsite")
