"""``ibsync agent`` as a user runs it: a separate process that finds simulated phones through a
simulated usbmuxd, backs up each one that is due, records every attempt, and stops cleanly;
``ibsync status`` reading what it did."""

from __future__ import annotations

import json
import os
import plistlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from ibsync.testing.device import Misbehaviour, PasscodePrompt, SimDevice, run_sim_usbmuxd
from ibsync.testing.device.lockdownd import make_pair_record
from ibsync.testing.device.usbmuxd import Reach
from ibsync.testing.generator import generate_content

from conftest import run_subprocess
from test_agent_notify import receiver  # noqa: F401  (pytest fixture)


def _device(seed: int, **kw) -> SimDevice:
    return SimDevice.from_content(generate_content(seed=seed, size_bytes=1 << 20), **kw)


def _config(tmp_path: Path, repo: Path, agent: str = "", devices: str = "", poll: str = "1s") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[agent]\nrepository = "{repo}"\ninterval = "1h"\npoll = "{poll}"\nretry = "1s"\n{agent}\n{devices}'
    )
    return path


def _env(mux, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **mux.env(home=tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "state")}


def _status(env: dict, config: Path) -> tuple[dict, int]:
    r = run_subprocess(["status", "--json", "--config", config, "--history", "20"], env)
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout), r.returncode


def _snapshots(env: dict) -> list[dict]:
    r = run_subprocess(["snapshots", "--json"], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _plug_in(mux, device: SimDevice) -> None:
    """A phone this computer is paired with is plugged in (its record is there before it
    appears, as for a phone paired on an earlier day)."""
    mux.records.save(device.udid, plistlib.dumps(make_pair_record(device, system_buid=mux.records.buid())))
    mux.attach(device)


def _start_agent(env: dict, config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ibsync", "agent", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )


def _wait(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(agent: subprocess.Popen, log: Path) -> str:
    agent.send_signal(signal.SIGTERM)
    code = agent.wait(30)
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text
    return text


def test_once_backs_up_a_due_device_and_not_a_recent_one(env, cli, tmp_path):
    cli("init")
    phone = _device(11, name="Alice's iPhone")
    config = _config(tmp_path, env)
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        r = run_subprocess(["agent", "--once", "--config", config], e)
        assert r.returncode == 0, r.stderr
        [snap] = _snapshots(e)
        assert snap["device"]["udid"].upper() == phone.udid.upper()
        assert f"Alice's iPhone ({phone.udid}): ok, snapshot {snap['id'][:8]}" in r.stderr, r.stderr
        r = run_subprocess(["agent", "--once", "--config", config], e)  # backed up minutes ago: not due
        assert r.returncode == 0, r.stderr
        assert len(_snapshots(e)) == 1
        status, code = _status(e, config)
    assert code == 0
    [dev] = status["devices"]
    assert dev["udid"].upper() == phone.udid.upper() and dev["name"] == "Alice's iPhone"
    assert dev["last_result"] == "ok" and dev["overdue"] is False and dev["repository"] == str(env)
    assert dev["last_snapshot"] == snap["id"] and dev["age_seconds"] < 600
    assert [a["result"] for a in status["attempts"]] == ["ok"]
    assert dev["next_due"] > dev["last_success"]


def test_a_backup_made_by_hand_counts_for_the_schedule(env, cli, tmp_path):
    cli("init")
    phone = _device(12)
    config = _config(tmp_path, env)
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        assert run_subprocess(["backup"], e).returncode == 0
        r = run_subprocess(["agent", "--once", "--config", config], e)
        assert r.returncode == 0, r.stderr
        assert len(_snapshots(e)) == 1
        status, _ = _status(e, config)
    [dev] = status["devices"]
    assert dev["last_success"] is not None and dev["last_snapshot"] == _snapshots(e)[0]["id"]


def test_outside_the_window_nothing_starts_and_status_says_why(env, cli, tmp_path):
    cli("init")
    phone = _device(13)
    now = time.localtime()
    start = f"{(now.tm_hour + 2) % 24:02d}:00"
    end = f"{(now.tm_hour + 3) % 24:02d}:00"
    config = _config(tmp_path, env, agent=f'window = "{start}-{end}"')
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        r = run_subprocess(["agent", "--once", "--config", config], e)
        assert r.returncode == 0, r.stderr
        assert _snapshots(e) == []
        status, code = _status(e, config)
    [dev] = status["devices"]
    assert dev["last_attempt"] is None and dev["waiting"] == f"outside its window {start}-{end}"
    assert dev["next_due"].startswith(time.strftime("%Y-")) and code == 0


def test_devices_coming_and_going_and_sigterm_mid_backup(env, cli, tmp_path):
    """The agent runs with no device; a phone plugged in later is backed up; a phone that waits
    for its passcode when SIGTERM comes is left with nothing committed, and the next run
    completes it."""
    cli("init")
    alice = _device(14, name="Alice's iPhone")
    bob = _device(15, name="Bob's iPhone", misbehave=Misbehaviour(passcode_prompt=PasscodePrompt()))
    config = _config(tmp_path, env)
    log = tmp_path / "agent.log"
    with run_sim_usbmuxd([], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        agent = _start_agent(e, config, log)
        try:
            time.sleep(2)
            assert _snapshots(e) == []
            _plug_in(mux, alice)
            _wait(lambda: len(_snapshots(e)) == 1, what="Alice's backup")
            mux.detach(alice.udid)
            _plug_in(mux, bob)
            bob_side = mux.attachment(bob.udid)
            _wait(bob_side.runtime.passcode_prompt_shown.is_set, what="Bob's passcode prompt")
            status, _ = _status(e, config)
            assert {d["name"]: d["last_result"] for d in status["devices"]} == {
                "Alice's iPhone": "ok",
                "Bob's iPhone": "running",
            }
        finally:
            text = _stop(agent, log)
        assert "asking for its passcode" in text
        status, _ = _status(e, config)
        bob_row = next(d for d in status["devices"] if d["name"] == "Bob's iPhone")
        assert bob_row["last_result"] == "skipped" and "agent was stopped" in bob_row["reason"]
        assert status["agent"]["running"] is False
        assert len(_snapshots(e)) == 1
        assert run_subprocess(["check"], e).returncode == 0  # nothing half-written or left locked
        bob.misbehave = Misbehaviour()
        r = run_subprocess(["agent", "--once", "--config", config], e)
        assert r.returncode == 0, r.stderr
    assert sorted(s["device"]["name"] for s in _snapshots(e)) == ["Alice's iPhone", "Bob's iPhone"]
    assert run_subprocess(["check", "--read-data"], e).returncode == 0


def test_a_phone_plugged_in_is_seen_at_once_not_at_the_next_poll(env, cli, tmp_path):
    """usbmuxd's Attached event wakes the agent: with a 10-minute poll, a phone plugged in after
    the agent's first look is still backed up within seconds."""
    cli("init")
    phone = _device(16)
    path = _config(tmp_path, env, poll="10m")
    log = tmp_path / "agent.log"
    with run_sim_usbmuxd([], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        agent = _start_agent(e, path, log)
        try:
            _wait(lambda: "agent started" in log.read_text(), what="the agent")
            time.sleep(1)
            _plug_in(mux, phone)
            _wait(lambda: len(_snapshots(e)) == 1, timeout=45, what="the backup after the Attached event")
        finally:
            _stop(agent, log)


def test_a_second_agent_is_refused_and_bad_config_is_one_line(env, cli, tmp_path):
    cli("init")
    config = _config(tmp_path, env)
    log = tmp_path / "agent.log"
    with run_sim_usbmuxd([], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        agent = _start_agent(e, config, log)
        try:
            _wait(lambda: "agent started" in log.read_text(), what="the first agent")
            r = run_subprocess(["agent", "--config", config], e, timeout=30)
            assert r.returncode == 2 and r.stderr.strip() == (
                f"ibsync: error: another ibsync agent is running for this user (lock {tmp_path / 'state' / 'ibsync' / 'agent.lock'})"
            )
            status, _ = _status(e, config)
            assert status["agent"]["running"] is True and status["agent"]["pid"] == agent.pid
        finally:
            _stop(agent, log)
        bad = tmp_path / "bad.toml"
        bad.write_text('[agent]\nrepository = "x"\ninterval = "daily"\n')
        r = run_subprocess(["agent", "--once", "--config", bad], e)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "interval" in r.stderr
        assert "Traceback" not in r.stderr


def test_passcode_never_entered_is_skipped_notified_pinged_and_retried(env, cli, tmp_path, receiver):
    """The phone asks for its passcode and nobody types it: the person is told, the device gives
    up (ErrorCode 208), the attempt is 'skipped' (a /log ping, not /fail), and after the back-off
    the agent tries again; this time the passcode is entered and the backup completes."""
    cli("init")
    phone = _device(17, name="Carol's iPhone", misbehave=Misbehaviour(passcode_prompt=PasscodePrompt(give_up_after=1)))
    config = _config(
        tmp_path,
        env,
        agent=f'notify = ["{receiver.url("/notify", "json")}"]\nhealthcheck = "{receiver.url("/ping/abc")}"',
    )
    log = tmp_path / "agent.log"
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        agent = _start_agent(e, config, log)
        try:
            status = _wait(
                lambda: (s := _status(e, config)[0])["devices"] and s["devices"][0]["last_result"] == "skipped" and s,
                what="a skipped attempt",
            )
            assert "208" in status["devices"][0]["reason"] or "passcode" in status["devices"][0]["reason"]
            side = mux.attachment(phone.udid)
            phone.misbehave = Misbehaviour(passcode_prompt=PasscodePrompt())
            _wait(side.runtime.passcode_prompt_shown.is_set, what="the retry's passcode prompt")
            side.enter_passcode()
            _wait(lambda: len(_snapshots(e)) == 1, what="the backup after the passcode")
            _wait(lambda: _status(e, config)[0]["devices"][0]["last_result"] == "ok", what="ok recorded")
        finally:
            _stop(agent, log)
    results = [a["result"] for a in _status(e, config)[0]["attempts"]]
    assert results[0] == "ok" and "skipped" in results and "failed" not in results
    notes = [json.loads(h.body) for h in receiver.hits if h.path == "/notify"]
    assert any(n["title"] == "Unlock Carol's iPhone" and "enter its passcode" in n["message"] for n in notes), notes
    pings = [h.path for h in receiver.hits if h.path.startswith("/ping/abc")]
    assert pings.count("/ping/abc/start") >= 2 and "/ping/abc/log" in pings and "/ping/abc" in pings
    assert "/ping/abc/fail" not in pings


def test_an_unreachable_device_does_not_hold_up_another(env, cli, tmp_path):
    cli("init")
    silent = _device(18, name="Asleep iPad")
    phone = _device(19, name="Dan's iPhone")
    config = _config(tmp_path, env)
    with run_sim_usbmuxd([], tmp_path / "mux") as mux:
        mux.records.save(silent.udid, plistlib.dumps(make_pair_record(silent, system_buid=mux.records.buid())))
        mux.attach(silent, "Network", reach=Reach.SILENT)
        _plug_in(mux, phone)
        e = {**_env(mux, tmp_path), "IBSYNC_DEVICE_CONNECT_TIMEOUT": "2"}
        started = time.monotonic()
        r = run_subprocess(["agent", "--once", "--config", config], e, timeout=120)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - started < 60
        [snap] = _snapshots(e)
        assert snap["device"]["name"] == "Dan's iPhone"
        status, _ = _status(e, config)
    by_udid = {d["udid"]: d for d in status["devices"]}
    assert by_udid[phone.udid]["last_result"] == "ok"
    assert by_udid[silent.udid]["last_attempt"] is None and "not answering" in by_udid[silent.udid]["waiting"]


def test_only_when_charging_waits_for_the_charger(env, cli, tmp_path):
    cli("init")
    phone = _device(20)
    phone.battery.charging = False
    phone.battery.external = False
    config = _config(tmp_path, env, agent="only-when-charging = true")
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        r = run_subprocess(["agent", "--once", "--config", config], e)
        assert r.returncode == 0, r.stderr
        assert _snapshots(e) == []
        [dev] = _status(e, config)[0]["devices"]
        assert dev["waiting"].startswith("not charging") and dev["last_attempt"] is None
        phone.battery.external = True  # plugged into a charger
        r = run_subprocess(["agent", "--once", "--config", config], e)
        assert r.returncode == 0, r.stderr
        assert len(_snapshots(e)) == 1


def test_over_wifi_directly_and_wifi_false(env, cli, tmp_path):
    """A paired phone reachable only over the LAN (no usbmuxd entry) is backed up over Wi-Fi;
    with wifi = false for it, it is left alone and status says why."""
    cli("init")
    phone = _device(21, name="Eve's iPhone")
    with run_sim_usbmuxd([], tmp_path / "mux") as mux:
        mux.records.save(phone.udid, plistlib.dumps(make_pair_record(phone, system_buid=mux.records.buid())))
        mux.join_wifi(phone)
        e = _env(mux, tmp_path)
        off = _config(tmp_path, env, devices=f'[devices."{phone.udid}"]\nwifi = false')
        assert run_subprocess(["agent", "--once", "--config", off], e).returncode == 0
        assert _snapshots(e) == []
        [dev] = _status(e, off)[0]["devices"]
        assert dev["connected"] == "Wi-Fi" and "wifi = false" in dev["waiting"]
        on = _config(tmp_path, env)
        r = run_subprocess(["agent", "--once", "--config", on], e)
        assert r.returncode == 0, r.stderr
        assert "over Wi-Fi" in r.stderr
        [snap] = _snapshots(e)
        assert snap["device"]["name"] == "Eve's iPhone"


def test_an_unreachable_repository_is_a_soft_failure_told_once_and_overdue_escalates(env, cli, tmp_path, receiver):
    """The drive is not plugged in: each attempt is 'skipped' (not failed), the person is told
    once; when the device has gone longer than interval + grace without a good backup it is
    overdue: told once (not at every look), and `status` exits 1."""
    phone = _device(22, name="Fay's iPhone")
    missing = tmp_path / "drive-not-plugged-in" / "repo"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[agent]\nrepository = "{missing}"\ninterval = "1s"\ngrace = "1s"\nretry = "1s"\n'
        f'notify = ["{receiver.url("/n", "json")}"]\n'
    )
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        for _ in range(3):
            r = run_subprocess(["agent", "--once", "--config", config], e)
            assert r.returncode == 0, r.stderr
            time.sleep(2.5)  # past the back-off, and past interval + grace
        status, code = _status(e, config)
    [dev] = status["devices"]
    assert dev["last_result"] == "skipped" and "not reachable" in dev["reason"] and "drive" in dev["reason"]
    assert [a["result"] for a in status["attempts"]] == ["skipped"] * 3
    assert dev["overdue"] is True and status["overdue"] is True and code == 1
    told = [json.loads(h.body)["title"] for h in receiver.hits if h.path == "/n"]
    assert told == [f"Repository {missing} not reachable", "Fay's iPhone: backup overdue"], told


def test_a_phone_waiting_for_its_passcode_does_not_hold_up_another(env, cli, tmp_path):
    """Two phones into one repository at once: Gil's waits for a passcode nobody types, Hal's
    is backed up meanwhile; Gil's attempt ends 'skipped'."""
    cli("init")
    gil = _device(23, name="Gil's iPhone", misbehave=Misbehaviour(passcode_prompt=PasscodePrompt(give_up_after=6)))
    hal = _device(24, name="Hal's iPhone")
    config = _config(tmp_path, env)
    with run_sim_usbmuxd([gil, hal], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        agent = subprocess.Popen(
            [sys.executable, "-m", "ibsync", "agent", "--once", "--config", str(config)],
            env=e,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait(mux.attachment(gil.udid).runtime.passcode_prompt_shown.is_set, what="Gil's passcode prompt")
        _wait(lambda: len(_snapshots(e)) == 1, what="Hal's backup while Gil waits")
        assert mux.attachment(gil.udid).runtime.passcode_prompt_shown.is_set()  # still waiting
        _, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err
        status, _ = _status(e, config)
    results = {d["name"]: d["last_result"] for d in status["devices"]}
    assert results == {"Gil's iPhone": "skipped", "Hal's iPhone": "ok"}
    assert [s["device"]["name"] for s in _snapshots(e)] == ["Hal's iPhone"]


def test_upkeep_after_backups_retention_prune_and_a_rotating_check(env, cli, tmp_path):
    """keep/prune/check-subset: after each good backup the agent forgets what the policy drops,
    prunes (here: every time) and reads the next half of the data; status shows each run."""
    cli("init")
    phone = _device(17, name="Kid's iPad")
    config = _config(
        tmp_path,
        env,
        agent='keep = { last = 1 }\nprune = "1s"\ncheck-subset = "1/2"',
        devices=f'[devices."{phone.udid}"]\ninterval = "1s"',
    )
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = _env(mux, tmp_path)
        ids = []
        for _ in range(2):
            r = run_subprocess(["agent", "--once", "--config", config], e)
            assert r.returncode == 0, r.stderr
            [snap] = _snapshots(e)  # keep last=1: the previous one was forgotten
            ids.append(snap["id"])
            time.sleep(1.2)  # past interval and prune's 1s
        status, code = _status(e, config)
        r = run_subprocess(["status", "--config", config], e)
        check = run_subprocess(["check"], e)
    assert ids[0] != ids[1] and code == 0
    assert check.returncode == 0, check.stderr  # prune left a sound repository
    runs = {(u["kind"], u["result"]) for u in status["upkeep"]}
    assert runs == {("forget", "ok"), ("prune", "ok"), ("check", "ok")}, status["upkeep"]
    detail = {u["kind"]: u["detail"] for u in status["upkeep"]}
    assert "kept 1, removed 1" in detail["forget"]
    assert detail["check"].startswith("subset 2/2")  # the second run read the other half
    assert "packs_deleted" in detail["prune"]
    assert "upkeep:" in r.stdout and "check" in r.stdout
