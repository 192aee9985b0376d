"""The agent's decisions as pure functions: durations, windows, back-off, overdue; the config
tables it reads; its history surviving a restart and a crash."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from ibsync.agent.history import FAILED, INTERRUPTED, OK, SKIPPED, History
from ibsync.agent.schedule import Window, backoff, format_duration, is_overdue, next_due, parse_duration
from ibsync.agent.settings import parse_agent_settings
from ibsync.agent.status import read_status
from ibsync.errors import UserError


def test_durations():
    assert parse_duration("24h", "x") == timedelta(hours=24)
    assert parse_duration("1d12h", "x") == timedelta(hours=36)
    assert parse_duration("90m", "x") == timedelta(minutes=90)
    assert parse_duration("2w", "x") == timedelta(days=14)
    assert parse_duration("1 h 30 m", "x") == timedelta(minutes=90)
    for bad in ("", "24", "h", "1y", "-1h", "0s", 24):
        with pytest.raises(UserError, match="where"):
            parse_duration(bad, "where")
    assert format_duration(timedelta(days=3, hours=4, minutes=5)) == "3d 4h"
    assert format_duration(timedelta(minutes=12, seconds=3)) == "12m"
    assert format_duration(timedelta(seconds=40)) == "40s"


def test_window_through_midnight_and_within_a_day():
    night = Window.parse("20:00-07:00", "w")
    day = datetime(2026, 12, 4)
    assert night.contains(day.replace(hour=23)) and night.contains(day.replace(hour=3))
    assert not night.contains(day.replace(hour=12)) and not night.contains(day.replace(hour=7))
    assert night.next_open(day.replace(hour=12)) == day.replace(hour=20)
    assert night.next_open(day.replace(hour=23, minute=5)) == day.replace(hour=23, minute=5)
    office = Window.parse("09:30-17:00", "w")
    assert office.contains(day.replace(hour=9, minute=30)) and not office.contains(day.replace(hour=17))
    assert office.next_open(day.replace(hour=18)) == day.replace(hour=9, minute=30) + timedelta(days=1)
    for bad in ("20:00", "25:00-07:00", "08:00-08:00", "evening"):
        with pytest.raises(UserError):
            Window.parse(bad, "w")


def test_due_backoff_and_overdue():
    now = datetime(2026, 12, 4, 12, tzinfo=UTC)
    day = timedelta(days=1)
    assert next_due(None, day, retry_after=None, window=None, now=now) == now
    assert next_due(now - timedelta(hours=3), day, retry_after=None, window=None, now=now) == now + timedelta(hours=21)
    assert next_due(
        now - 2 * day, day, retry_after=now + timedelta(minutes=15), window=None, now=now
    ) == now + timedelta(minutes=15)
    base, ceiling = timedelta(minutes=15), day
    assert [backoff(n, base, ceiling) for n in range(4)] == [timedelta(0), base, 2 * base, 4 * base]
    assert backoff(30, base, ceiling) == ceiling
    assert not is_overdue(now - timedelta(hours=47), None, day, day, now)
    assert is_overdue(now - timedelta(hours=49), None, day, day, now)
    assert not is_overdue(None, None, day, day, now)  # never seen: nothing to be late for yet
    assert is_overdue(None, now - 3 * day, day, day, now)  # seen 3 days ago, never backed up


def test_settings_tables_and_their_errors():
    doc = {
        "agent": {
            "repository": "nas",
            "interval": "24h",
            "window": "20:00-07:00",
            "notify": ["json://127.0.0.1:1/x"],
            "keep": {"daily": 7, "weekly": 4},
            "prune": "7d",
            "check-subset": "1/7",
            "retry": "1m",
            "poll": "5s",
            "parallel": 2,
        },
        "devices": {
            "00008110-0011223344556677": {"repository": "offsite", "interval": "12h"},
            "Bob's iPad": {"enabled": False},
        },
    }
    s = parse_agent_settings(doc, "cfg")
    own = s.policy("00008110-0011223344556677".lower(), "whatever")
    assert own.repository == "offsite" and own.interval == timedelta(hours=12) and str(own.window) == "20:00-07:00"
    assert s.policy("X", "Bob's iPad").enabled is False and s.policy("X", "Bob's iPad").repository == "nas"
    assert s.policy("Y", None).keep == {"daily": 7, "weekly": 4}
    assert s.check_subset == (1, 7) and s.prune_every == timedelta(days=7) and s.parallel == 2
    bad = [
        ({"agent": {"intervall": "1h"}}, "unknown key(s) intervall"),
        ({"agent": {"interval": "soon"}}, "interval"),
        ({"agent": {"keep": {"dayly": 3}}}, "[agent] keep: unknown key 'dayly'"),
        ({"agent": {"keep": {"daily": 0}}}, "keeps everything"),
        ({"agent": {"keep": {"daily": -3}}}, "[agent] keep.daily must be a whole number"),
        ({"agent": {"check-subset": "8/7"}}, "check-subset"),
        ({"agent": {"only-when-charging": "yes"}}, "true or false"),
        ({"devices": {"x": {"prune": "1d"}}}, "unknown key(s) prune"),
        ({"agent": {"parallel": 0}}, "parallel"),
    ]
    for doc, needle in bad:
        with pytest.raises(UserError) as e:
            parse_agent_settings(doc, "cfg")
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_history_survives_a_restart_and_a_crash_is_recognised(tmp_path):
    path = tmp_path / "agent.db"
    h = History(path)
    h.seen("UDID-1", "Alice's iPhone", "USB")
    ok = h.begin("UDID-1", "Alice's iPhone", "nas", "USB")
    h.end(ok, OK, snapshot="ab" * 32, bytes_added=10, files=3)
    skipped = h.begin("UDID-1", "Alice's iPhone", "nas", "USB")
    h.end(skipped, SKIPPED, "the passcode was not entered")
    h.close()
    # a running attempt of a process that is gone: reported as failed, and marked so by the next agent
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ibsync.agent.history import History; "
            "h = History(sys.argv[1]); h.begin('UDID-2', 'Bob', 'nas', 'USB')",
            str(path),
        ],
        check=True,
    )
    assert child.returncode == 0
    h = History(path)
    [crashed] = h.attempts("UDID-2")
    assert crashed.result == FAILED and crashed.reason == INTERRUPTED
    assert h.mark_interrupted() == 1
    assert h.attempts("UDID-2")[0].result == FAILED
    [last, first] = h.attempts("UDID-1")
    assert (last.result, last.reason, first.result) == (SKIPPED, "the passcode was not entered", OK)
    assert h.unsuccessful_in_a_row("UDID-1") == 1
    assert h.retry_after("UDID-1", timedelta(minutes=10), timedelta(days=1)) == last.ended + timedelta(minutes=10)
    assert h.device("udid-1").last_snapshot == "ab" * 32
    assert h.notice_due("overdue:UDID-1", 3600) and not h.notice_due("overdue:UDID-1", 3600)
    assert h.clear_notice("overdue:UDID-1") and h.notice_due("overdue:UDID-1", 3600)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_status_reports_ages_results_and_overdue(tmp_path):
    h = History(tmp_path / "agent.db")
    h.seen("UDID-1", "Alice's iPhone", "USB")
    a = h.begin("UDID-1", "Alice's iPhone", "nas", "USB")
    h.end(a, OK, snapshot="cd" * 32, success_time=(datetime.now(UTC) - timedelta(days=3)).timestamp())
    s = parse_agent_settings(
        {"agent": {"repository": "nas", "interval": "1d", "grace": "1d"}, "devices": {"Listed Phone": {}}}, "cfg"
    )
    status = read_status(s, h)
    doc = status.to_dict()
    alice = next(d for d in doc["devices"] if d["udid"] == "UDID-1")
    assert alice["overdue"] is True and alice["last_result"] == "ok" and alice["repository"] == "nas"
    assert 3 * 86400 - 60 < alice["age_seconds"] < 3 * 86400 + 60
    assert datetime.fromisoformat(alice["next_due"]) <= datetime.now(UTC)
    listed = next(d for d in doc["devices"] if d["name"] == "Listed Phone")
    assert listed["udid"] is None and listed["overdue"] is False and listed["last_success"] is None
    assert doc["overdue"] is True and doc["agent"]["running"] is False
