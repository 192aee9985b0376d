"""forget: restic's retention policies per device, and the command that applies them."""

from __future__ import annotations

import json
import os
import plistlib
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ibsync.maint.forget import (
    UNLIMITED,
    Duration,
    RetentionPolicy,
    apply_policy,
    apply_policy_by_device,
    group_by_device,
)
from ibsync.model import DeviceInfo, Snapshot

from conftest import MIT_BACKUP, copy_folder, tree_state

UTC = UTC
NOW = datetime(2031, 1, 1, tzinfo=UTC)  # "now" for keep-within, after every synthetic snapshot but k6


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def snap(id: str, backup_date: str | None, udid: str = "A", time: str | None = None) -> Snapshot:
    stored = _dt(time) if time else (_dt(backup_date) if backup_date else _dt("2000-01-01T00:00"))
    return Snapshot(
        time=stored,
        tree=b"x" * 32,
        device=DeviceInfo(udid),
        backup_date=_dt(backup_date) if backup_date else None,
        ios_encrypted=False,
        source={},
        id=id,
    )


def kept(decisions) -> list[str]:
    return [d.snapshot.id for d in decisions if d.keep]


def reasons(decisions) -> dict[str, list[str]]:
    return {d.snapshot.id: d.reasons for d in decisions if d.keep}


# Several backups within a few hours of one day.
HOURS = [
    snap("h1", "2024-03-10T10:05"),
    snap("h2", "2024-03-10T10:40"),
    snap("h3", "2024-03-10T11:10"),
    snap("h4", "2024-03-10T11:50"),
    snap("h5", "2024-03-10T12:30"),
    snap("h6", "2024-03-10T09:00"),
]
# restic's documentation example: one backup every Sunday for 12 weeks.
SUNDAYS = [snap(f"s{i:02}", (datetime(2019, 9, 1, 11) + timedelta(weeks=i)).isoformat()) for i in range(12)]
# Around the turn of 2024/2025: ISO week 1 of 2025 starts on Monday 30 December 2024.
YEAR_END = [
    snap("w1", "2024-12-23T12:00"),  # Mon, 2024-W52
    snap("w2", "2024-12-28T12:00"),  # Sat, 2024-W52
    snap("w3", "2024-12-30T12:00"),  # Mon, 2025-W01 (calendar year 2024)
    snap("w4", "2025-01-01T12:00"),  # Wed, 2025-W01
    snap("w5", "2025-01-05T12:00"),  # Sun, 2025-W01
    snap("w6", "2025-01-06T12:00"),  # Mon, 2025-W02
]
MONTHS = [
    snap("m1", "2022-06-15T12:00"),
    snap("m2", "2022-12-31T23:00"),
    snap("m3", "2023-01-01T01:00"),
    snap("m4", "2023-05-10T12:00"),
    snap("m5", "2023-05-20T12:00"),
    snap("m6", "2024-02-29T12:00"),
    snap("m7", "2024-03-01T12:00"),
]
WITHIN = [
    snap("k1", "2024-01-01T00:00"),
    snap("k2", "2024-02-15T00:00"),
    snap("k3", "2024-03-01T12:00"),
    snap("k4", "2024-03-10T12:00"),
    snap("k5", "2024-03-12T12:00"),
    snap("k6", "2035-01-01T00:00"),  # in the future: never the "newest", never removed by within
]
MONTH_END = [snap("n1", "2024-03-01T00:00"), snap("n2", "2024-03-02T12:00"), snap("n3", "2024-03-31T00:00")]
SAME_DAY = [snap("d1", "2024-03-10T08:00"), snap("d2", "2024-03-10T20:00"), snap("d3", "2024-03-11T09:00")]

# name: (snapshots, policy, kept ids newest first)
CASES = {
    "hourly 2": (HOURS, RetentionPolicy(hourly=2), ["h5", "h4"]),
    "hourly 10: one per hour that has one": (HOURS, RetentionPolicy(hourly=10), ["h5", "h4", "h2", "h6"]),
    "last 3": (HOURS, RetentionPolicy(last=3), ["h5", "h4", "h3"]),
    "last more than there are": (HOURS, RetentionPolicy(last=10), ["h5", "h4", "h3", "h2", "h1", "h6"]),
    "daily 4, restic's example": (SUNDAYS, RetentionPolicy(daily=4), ["s11", "s10", "s09", "s08"]),
    "daily 2": (SAME_DAY, RetentionPolicy(daily=2), ["d3", "d2"]),
    "daily 5 also keeps the oldest": (SAME_DAY, RetentionPolicy(daily=5), ["d3", "d2", "d1"]),
    "weekly across the year boundary": (YEAR_END, RetentionPolicy(weekly=3), ["w6", "w5", "w2"]),
    "weekly unlimited": (YEAR_END, RetentionPolicy(weekly=UNLIMITED), ["w6", "w5", "w2", "w1"]),
    "yearly is the calendar year, not the ISO year": (YEAR_END, RetentionPolicy(yearly=5), ["w6", "w3", "w1"]),
    "monthly 3 + yearly 2": (MONTHS, RetentionPolicy(monthly=3, yearly=2), ["m7", "m6", "m5"]),
    "monthly 4 + yearly 3": (MONTHS, RetentionPolicy(monthly=4, yearly=3), ["m7", "m6", "m5", "m3", "m2"]),
    "daily 1 + monthly 12": (MONTHS, RetentionPolicy(daily=1, monthly=12), ["m7", "m6", "m5", "m3", "m2", "m1"]),
    "within 10d: newest past snapshot is k5": (WITHIN, RetentionPolicy(within=Duration(days=10)), ["k6", "k5", "k4"]),
    "within 11d: the boundary itself is out": (WITHIN, RetentionPolicy(within=Duration(days=11)), ["k6", "k5", "k4"]),
    "within 1m: calendar month": (WITHIN, RetentionPolicy(within=Duration(months=1)), ["k6", "k5", "k4", "k3", "k2"]),
    "within 10d12h": (WITHIN, RetentionPolicy(within=Duration(days=10, hours=12)), ["k6", "k5", "k4"]),
    "within 10d25h: hours are exact hours": (
        WITHIN,
        RetentionPolicy(within=Duration(days=10, hours=25)),
        ["k6", "k5", "k4", "k3"],
    ),
    "within 36 hours as a timedelta": (WITHIN, RetentionPolicy(within=timedelta(hours=36)), ["k6", "k5"]),
    "within 1m from 31 March is after 2 March (Go AddDate)": (
        MONTH_END,
        RetentionPolicy(within=Duration(months=1)),
        ["n3", "n2"],
    ),
    "within + last": (WITHIN, RetentionPolicy(last=4, within=Duration(days=1)), ["k6", "k5", "k4", "k3"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_policy(name):
    snapshots, policy, expected = CASES[name]
    decisions = apply_policy(list(reversed(snapshots)), policy, tz=UTC, now=NOW)
    assert kept(decisions) == expected
    assert sorted(d.snapshot.id for d in decisions) == sorted(s.id for s in snapshots)


def test_decisions_are_newest_first_by_backup_date_then_time():
    snaps = [
        snap("x1", "2024-01-02T00:00", time="2024-05-01T00:00"),  # imported months after the phone made it
        snap("x2", "2024-01-03T00:00"),
        snap("x3", None, time="2024-01-01T00:00"),  # no backup date: its storage time counts
    ]
    decisions = apply_policy(snaps, RetentionPolicy(daily=10), tz=UTC, now=NOW)
    assert [d.snapshot.id for d in decisions] == ["x2", "x1", "x3"]
    assert kept(apply_policy(snaps, RetentionPolicy(last=1), tz=UTC, now=NOW)) == ["x2"]


def test_every_reason_is_listed():
    policy = RetentionPolicy(last=1, daily=2, weekly=1, monthly=1, yearly=1, within=Duration(days=1))
    got = reasons(apply_policy(SUNDAYS, policy, tz=UTC, now=NOW))
    assert got == {
        "s11": [
            "within 1d",
            "last snapshot",
            "daily snapshot",
            "weekly snapshot",
            "monthly snapshot",
            "yearly snapshot",
        ],
        "s10": ["daily snapshot"],
    }


def test_oldest_snapshot_is_marked():
    got = reasons(apply_policy(SAME_DAY, RetentionPolicy(daily=5), tz=UTC, now=NOW))
    assert got == {"d3": ["daily snapshot"], "d2": ["daily snapshot"], "d1": ["oldest daily snapshot"]}


@pytest.fixture
def local_zone(monkeypatch):
    """Set the process's local time zone (POSIX TZ strings need no time zone database)."""

    def set_zone(tz: str) -> None:
        monkeypatch.setenv("TZ", tz)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def test_periods_are_counted_in_local_time(local_zone):
    snaps = [snap("t0", "2022-12-31T12:00"), snap("t1", "2022-12-31T23:00"), snap("t2", "2023-01-01T01:00")]
    policy = RetentionPolicy(yearly=2)
    assert kept(apply_policy(snaps, policy, tz=UTC, now=NOW)) == ["t2", "t1"]
    # At UTC+2, t1 is 01:00 on New Year's Day: the same year as t2.
    assert kept(apply_policy(snaps, policy, tz=timezone(timedelta(hours=2)), now=NOW)) == ["t2", "t0"]
    # Without tz, the machine's zone.
    local_zone("UTC0")
    assert kept(apply_policy(snaps, policy, now=NOW)) == ["t2", "t1"]
    local_zone("JST-9")
    assert kept(apply_policy(snaps, policy, now=NOW)) == ["t2", "t0"]
    # and keep-within's calendar steps are taken on the local calendar: from 1 March 00:30 local
    # (29 February 15:30 UTC), one month back is 1 February 00:30 local.
    month = [snap("f1", "2024-01-31T15:00"), snap("f2", "2024-01-31T16:00"), snap("f3", "2024-02-29T15:30")]
    assert kept(apply_policy(month, RetentionPolicy(within=Duration(months=1)), now=NOW)) == ["f3", "f2"]
    local_zone("UTC0")  # from 29 February 15:30, one month back is 29 January 15:30
    assert kept(apply_policy(month, RetentionPolicy(within=Duration(months=1)), now=NOW)) == ["f3", "f2", "f1"]


def test_policies_apply_per_device():
    snaps = [
        snap("a1", "2024-03-01T10:00", "AAAA"),
        snap("b1", "2024-03-01T11:00", "BBBB"),
        snap("a2", "2024-03-02T10:00", "AAAA"),
        snap("b2", "2024-03-05T11:00", "BBBB"),
        snap("a3", "2024-03-02T18:00", "AAAA"),
        snap("c1", "2020-01-01T00:00", "CCCC"),
    ]
    assert {u: [s.id for s in g] for u, g in group_by_device(reversed(snaps)).items()} == {
        "AAAA": ["a3", "a2", "a1"],
        "BBBB": ["b2", "b1"],
        "CCCC": ["c1"],
    }
    by_device = apply_policy_by_device(snaps, RetentionPolicy(last=1), tz=UTC, now=NOW)
    assert {u: kept(d) for u, d in by_device.items()} == {"AAAA": ["a3"], "BBBB": ["b2"], "CCCC": ["c1"]}
    by_device = apply_policy_by_device(snaps, RetentionPolicy(daily=1), tz=UTC, now=NOW)
    assert {u: kept(d) for u, d in by_device.items()} == {"AAAA": ["a3"], "BBBB": ["b2"], "CCCC": ["c1"]}
    by_device = apply_policy_by_device(snaps, RetentionPolicy(daily=2), tz=UTC, now=NOW)
    assert {u: kept(d) for u, d in by_device.items()} == {"AAAA": ["a3", "a1"], "BBBB": ["b2", "b1"], "CCCC": ["c1"]}
    # within is measured from each device's own newest snapshot
    by_device = apply_policy_by_device(snaps, RetentionPolicy(within=Duration(days=1)), tz=UTC, now=NOW)
    assert {u: kept(d) for u, d in by_device.items()} == {"AAAA": ["a3", "a2"], "BBBB": ["b2"], "CCCC": ["c1"]}


def test_empty_policy_keeps_everything():
    for policy in (RetentionPolicy(), RetentionPolicy(within=timedelta(0)), RetentionPolicy(within=Duration())):
        assert policy.is_empty()
        decisions = apply_policy(HOURS, policy, tz=UTC, now=NOW)
        assert all(d.keep and d.reasons == ["policy is empty"] for d in decisions)
        assert len(decisions) == len(HOURS)
    assert not RetentionPolicy(yearly=UNLIMITED).is_empty()
    assert not RetentionPolicy(within=Duration(hours=1)).is_empty()
    assert apply_policy([], RetentionPolicy(last=1)) == []


def test_policy_validation_and_description():
    with pytest.raises(ValueError):
        RetentionPolicy(daily=-2)
    with pytest.raises(ValueError):
        RetentionPolicy(within=timedelta(hours=-1))
    p = RetentionPolicy(last=2, daily=7, weekly=UNLIMITED, within=Duration(years=1, days=2))
    assert p.describe() == "keep 2 latest, 7 daily, all weekly snapshots and all snapshots within 1y2d of the newest"
    assert p.to_dict() == {
        "last": 2,
        "hourly": 0,
        "daily": 7,
        "weekly": -1,
        "monthly": 0,
        "yearly": 0,
        "within": "1y2d",
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1y5m7d2h", Duration(1, 5, 7, 2)),
        ("7d", Duration(days=7)),
        (" 2h3d ", Duration(days=3, hours=2)),
        ("0d", Duration()),
    ],
)
def test_duration_parse(text, expected):
    assert Duration.parse(text) == expected


@pytest.mark.parametrize("text", ["", "5", "3w", "1d2", "-1d", "1d1d", "1.5d"])
def test_duration_parse_rejects(text):
    with pytest.raises(ValueError):
        Duration.parse(text)


# ---- the command ---------------------------------------------------------------------------------


def _version(folder, i: int, date: datetime) -> dict:
    """Make the folder backup number i, made at ``date``; return its tree_state."""
    with open(folder / "Status.plist", "wb") as f:
        plistlib.dump(
            {"SnapshotState": "finished", "BackupState": "new", "Version": "3.3", "Date": date.replace(tzinfo=None)},
            f,
            fmt=plistlib.FMT_BINARY,
        )
    changed = next((folder / "12").iterdir())
    changed.write_bytes(f"backup {i}\n".encode() * (i + 1))
    mtime = 1_700_000_000_000_000_000 + i * 1_000_000_000
    os.utime(folder / "Status.plist", ns=(mtime, mtime))
    os.utime(changed, ns=(mtime, mtime))
    return tree_state(folder)


def _snapshots(cli) -> list[dict]:
    out, _ = cli("snapshots", "--json")
    return json.loads(out)


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("ibsync: error:"), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def test_forget_command(env, cli, tmp_path):
    src = copy_folder(MIT_BACKUP, tmp_path / "src" / "sample_backup")
    cli("init")
    states, ids = {}, []
    for i, month in enumerate((1, 2, 3, 4)):
        state = _version(src, i, datetime(2024, month, 1, 12, tzinfo=UTC))
        out, _ = cli("import", src, "--json")
        result = json.loads(out)["snapshots"][0]
        assert result["status"] == "created"
        ids.append(result["id"])
        states[result["id"]] = state
    assert len(_snapshots(cli)) == 4

    # A dry run shows what would go and deletes nothing.
    out, _ = cli("forget", "--keep-last", "2", "--dry-run")
    assert "keep 2 snapshot(s):" in out and "remove 2 snapshot(s):" in out and "last snapshot" in out
    assert "would remove 2 snapshot(s)" in out
    assert len(_snapshots(cli)) == 4

    out, _ = cli("forget", "--keep-last", "2", "--json")
    result = json.loads(out)
    assert result["dry_run"] is False and result["policy"]["last"] == 2
    [group] = result["groups"]
    assert group["device"]["udid"] == "sample_backup"
    assert [k["id"] for k in group["keep"]] == [ids[3], ids[2]]
    assert [k["reasons"] for k in group["keep"]] == [["last snapshot"], ["last snapshot"]]
    assert sorted(r["id"] for r in group["remove"]) == sorted(ids[:2])
    assert sorted(result["removed"]) == sorted(ids[:2])

    left = _snapshots(cli)
    assert [s["id"] for s in left] == [ids[2], ids[3]]
    for s in left:  # the data of the kept snapshots is untouched
        cli("restore", s["id"], tmp_path / f"out-{s['short_id']}")
        assert tree_state(tmp_path / f"out-{s['short_id']}" / "sample_backup") == states[s["id"]]
    cli("check", "--read-data")

    # Explicit ids (unique prefixes); with --dry-run first.
    out, _ = cli("forget", ids[2][:8], "--dry-run")
    assert "would remove 1 snapshot(s)" in out
    out, _ = cli("forget", ids[2][:8])
    assert "removed 1 snapshot(s)" in out and "prune" in out
    assert [s["id"] for s in _snapshots(cli)] == [ids[3]]


def test_forget_refuses_bad_requests(env, cli, tmp_path):
    cli("init")
    _, err = cli("forget", expect=2)
    _one_line_error(err, "no policy")
    _, err = cli("forget", "--keep-daily", "0", "--dry-run", expect=2)
    _one_line_error(err, "no policy")
    _, err = cli("forget", "abcd1234", "--keep-last", "1", expect=2)
    _one_line_error(err, "not both")
    _, err = cli("forget", "--keep-last", "1", "--device", "nope", expect=5)
    _one_line_error(err, "no snapshot of a device 'nope'")
    _, err = cli("forget", "--keep-within", "3w", expect=2)
    assert "invalid duration" in err
    _, err = cli("forget", "--keep-last", "-1", expect=2)
    assert "unlimited" in err


def test_forget_per_device_and_device_filter(env, cli, tmp_path):
    cli("init")
    ids: dict[str, list[str]] = {}
    for name in ("phone_a", "phone_b"):
        src = copy_folder(MIT_BACKUP, tmp_path / "src" / name)
        for i, day in enumerate((1, 2, 3)):
            _version(src, i, datetime(2024, 5, day, 9, tzinfo=UTC))
            out, _ = cli("import", src, "--json")
            ids.setdefault(name, []).append(json.loads(out)["snapshots"][0]["id"])

    out, _ = cli("forget", "--keep-daily", "1", "--device", "phone_b", "--json")
    result = json.loads(out)
    assert [g["device"]["udid"] for g in result["groups"]] == ["phone_b"]
    assert [k["id"] for k in result["groups"][0]["keep"]] == [ids["phone_b"][2]]
    assert sorted(result["removed"]) == sorted(ids["phone_b"][:2])

    out, _ = cli("forget", "--keep-last", "2")
    assert "snapshots of phone_a:" in out and "snapshots of phone_b:" in out
    assert "removed 1 snapshot(s)" in out
    left = {s["id"] for s in _snapshots(cli)}
    assert left == {ids["phone_a"][1], ids["phone_a"][2], ids["phone_b"][2]}
