"""The maintenance library (ibsync.maint.api) called directly, as the agent calls it: retention
removes what the policy says, prune then frees that data, check's subsets n/t together read
everything and report damage in the result, and bad policies or missing locks are refused."""

from __future__ import annotations

import json
import os
import plistlib
from datetime import UTC, datetime

import pytest

from ibsync.errors import StorageError, UserError
from ibsync.maint import api
from ibsync.maint.api import KeepPolicy, LockRequired, Subset
from ibsync.reader.walk import collect_blobs
from ibsync.repo.lock import RepoLock
from ibsync.storage import Kind, LocalStorage

from conftest import MIT_BACKUP, copy_folder, open_repo

DAYS = {  # device -> the days its backups were made, oldest first
    "phone_a": [(2024, 1, 1), (2024, 1, 2), (2024, 2, 10), (2024, 3, 5)],
    "phone_b": [(2024, 5, 1), (2024, 5, 2)],
}


def _backup(folder, i: int, date: datetime) -> None:
    """Turn the folder into backup number i, made at ``date``, with one file of its own content."""
    with open(folder / "Status.plist", "wb") as f:
        plistlib.dump(
            {"SnapshotState": "finished", "BackupState": "new", "Version": "3.3", "Date": date.replace(tzinfo=None)},
            f,
            fmt=plistlib.FMT_BINARY,
        )
    changed = next((folder / "12").iterdir())
    changed.write_bytes(f"backup {i} of {folder.name}\n".encode() * (i + 1))
    mtime = 1_700_000_000_000_000_000 + i * 1_000_000_000
    os.utime(folder / "Status.plist", ns=(mtime, mtime))
    os.utime(changed, ns=(mtime, mtime))


@pytest.fixture
def repo_with_history(env, cli, tmp_path) -> dict[str, list[str]]:
    """Six snapshots of two devices; device -> snapshot ids, oldest first."""
    cli("init", "--pack-size", "4")
    ids: dict[str, list[str]] = {}
    for name, days in DAYS.items():
        src = copy_folder(MIT_BACKUP, tmp_path / "src" / name)
        for i, day in enumerate(days):
            _backup(src, i, datetime(*day, 12, tzinfo=UTC))
            out, _ = cli("import", src, "--json")
            ids.setdefault(name, []).append(json.loads(out)["snapshots"][0]["id"])
    return ids


def _stored(repo, kind: Kind) -> set[str]:
    return {info.name for info in repo.storage.list(kind)}


def _blobs_of(repo, snapshot_ids) -> set[bytes]:
    blobs: set[bytes] = set()
    for sid in snapshot_ids:
        collect_blobs(repo, repo.load_snapshot(sid).tree, blobs)
    return blobs


def test_retention_removes_what_the_policy_says_then_prune_frees_its_data(env, repo_with_history):
    a, b = repo_with_history["phone_a"], repo_with_history["phone_b"]
    repo = open_repo(env)
    policy = KeepPolicy.from_mapping({"daily": 2, "monthly": 1})
    with RepoLock(repo, exclusive=False, command="test"):
        dry = api.apply_retention(repo, policy, dry_run=True)
        assert _stored(repo, Kind.SNAPSHOTS) == set(a + b) and dry.removed == []

        result = api.apply_retention(repo, policy)
    # phone_a, newest first: 5 March (daily, monthly), 10 Feb (daily); January goes.
    # phone_b: both days kept by "daily 2".
    assert [s.id for s in dry.remove] == [s.id for s in result.remove]  # the dry run showed the same
    assert [s.id for s in result.remove] == [a[1], a[0]] and sorted(result.removed) == sorted(a[:2])
    assert result.failed == {}
    by_device = {g.device.udid: g for g in result.groups}
    assert [(d.snapshot.id, d.reasons) for d in by_device["phone_a"].keep] == [
        (a[3], ["daily snapshot", "monthly snapshot"]),
        (a[2], ["daily snapshot"]),
    ]
    assert by_device["phone_b"].remove == [] and {s.id for s in result.kept} == {a[3], a[2], *b}
    assert _stored(repo, Kind.SNAPSHOTS) == {a[2], a[3], *b}
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["policy"]["daily"] == 2 and sorted(doc["removed"]) == sorted(a[:2])

    # A device filter touches that device only.
    with RepoLock(repo, exclusive=False, command="test"):
        only_b = api.apply_retention(repo, KeepPolicy(last=1), device="phone_b")
    assert [g.device.udid for g in only_b.groups] == ["phone_b"] and only_b.removed == [b[0]]
    assert _stored(repo, Kind.SNAPSHOTS) == {a[2], a[3], b[1]}

    # Prune frees exactly what only the forgotten snapshots used.
    repo = open_repo(env)
    kept_blobs = _blobs_of(repo, [a[2], a[3], b[1]])
    packs_before = _stored(repo, Kind.PACKS)
    with RepoLock(repo, exclusive=True, command="test"):
        planned = api.prune(repo, repack_threshold=0.0, dry_run=True)
        assert planned.dry_run and planned.packs_deleted == 0 and _stored(repo, Kind.PACKS) == packs_before
        assert planned.plan.delete or planned.plan.repack
        pruned = api.prune(repo, repack_threshold=0.0)
    assert pruned.packs_deleted >= 1 and pruned.bytes_freed > 0 and pruned.failed == {} and pruned.problems == []
    assert json.loads(json.dumps(pruned.to_dict()))["packs_deleted"] == pruned.packs_deleted
    after = open_repo(env)
    assert {blob_id for blob_id, _ in after.index.entries()} == kept_blobs  # nothing else is left
    with RepoLock(after, exclusive=False, command="test"):
        assert api.check(after, read_data=True).ok


def test_forget_by_id_and_a_failed_deletion_is_collected_not_raised(env, cli, repo_with_history, monkeypatch):
    a = repo_with_history["phone_a"]
    repo = open_repo(env)
    real = LocalStorage.delete

    def delete(self, kind, name):
        if kind is Kind.SNAPSHOTS and name == a[0]:
            raise StorageError("cannot delete it: Permission denied")
        return real(self, kind, name)

    monkeypatch.setattr(LocalStorage, "delete", delete)
    with RepoLock(repo, exclusive=False, command="test"):
        result = api.forget_snapshots(repo, [a[0][:8], a[1], a[0]])
    assert [s.id for s in result.remove] == [a[0], a[1]]
    assert result.removed == [a[1]] and list(result.failed) == [f"snapshots/{a[0]}"]
    assert "Permission denied" in result.to_dict()["failed"][f"snapshots/{a[0]}"]
    assert result.problems == [f"could not delete snapshots/{a[0]}: cannot delete it: Permission denied"]
    assert a[0] in _stored(repo, Kind.SNAPSHOTS) and a[1] not in _stored(repo, Kind.SNAPSHOTS)
    # the command names it on stderr and exits 1; the other snapshot is gone
    _, err = cli("forget", a[0], a[2], expect=1)
    assert f"could not delete snapshots/{a[0]}" in err and "still valid" in err
    assert a[2] not in _stored(repo, Kind.SNAPSHOTS)


def test_check_subsets_together_read_everything_and_damage_is_a_result(env, repo_with_history):
    repo = open_repo(env)
    packs = {info.name: info.size for info in repo.storage.list(Kind.PACKS)}
    with RepoLock(repo, exclusive=False, command="test"):
        full = api.check(repo, read_data=True)
        halves = [api.check(repo, read_data_subset=s) for s in ("1/2", "2/2")]
    assert full.ok and full.problems == [] and full.packs_read == len(packs) == full.packs
    assert all(h.ok for h in halves)
    assert sum(h.packs_read for h in halves) == len(packs) and sum(h.bytes_read for h in halves) == sum(packs.values())
    assert [str(Subset.parse("1/2").following()), str(Subset.parse("7/7").following())] == ["2/2", "1/7"]

    # One flipped byte in the largest pack: an error in the result of whichever subset reads it.
    name = max(packs, key=lambda n: (packs[n], n))
    path = env / "packs" / name[:2] / name
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    repo = open_repo(env)
    with RepoLock(repo, exclusive=False, command="test"):
        damaged = api.check(repo, read_data=True)
        results = {s: api.check(repo, read_data_subset=s) for s in ("1/2", "2/2")}
    assert not damaged.ok and damaged.damaged_packs == [name]
    assert any(name[:12] in e for e in damaged.errors) and damaged.problems == damaged.errors
    assert json.loads(json.dumps(damaged.to_dict()))["damaged_packs"] == [name]
    holder = f"{int(name[:2], 16) % 2 + 1}/2"
    assert results[holder].damaged_packs == [name] and not results[holder].ok
    other = "1/2" if holder == "2/2" else "2/2"
    assert results[other].ok and results[other].damaged_packs == []


@pytest.mark.parametrize(
    "values,needles",
    [
        ({"dayly": 7}, ["unknown key 'dayly'", "last, hourly, daily, weekly, monthly, yearly, within"]),
        ({"daily": -2}, ["keep.daily", "0 or more", "unlimited"]),
        ({"daily": "7"}, ["keep.daily"]),
        ({"weekly": True}, ["keep.weekly"]),
        ({"within": "3w"}, ["keep.within", "invalid duration"]),
        ({"within": 30}, ["keep.within", "1y5m7d2h"]),
        ({}, ["keeps everything", "daily"]),
        ({"daily": 0}, ["keeps everything"]),
        ([("daily", 7)], ["must be a table"]),
    ],
)
def test_bad_policies_are_refused_in_one_line(values, needles):
    with pytest.raises(UserError) as e:
        KeepPolicy.from_mapping(values)
    assert "\n" not in str(e.value) and str(e.value).startswith("keep")
    for n in needles:
        assert n in str(e.value)


def test_good_policies_and_subsets_from_config():
    p = KeepPolicy.from_mapping(
        {"daily": 7, "weekly": 4, "monthly": 12, "yearly": 3, "last": "unlimited", "within": "1m"}, where="agent.keep"
    )
    assert (p.daily, p.weekly, p.monthly, p.yearly, p.last, str(p.within)) == (7, 4, 12, 3, -1, "1m")
    with pytest.raises(UserError, match="^agent.keep: unknown key 'x'"):
        KeepPolicy.from_mapping({"x": 1}, where="agent.keep")
    with pytest.raises(UserError, match="^agent.check-subset takes"):
        Subset.parse("8/7", what="agent.check-subset")


def test_calls_without_the_lock_they_need_are_refused(env, repo_with_history):
    repo = open_repo(env)
    before = (_stored(repo, Kind.SNAPSHOTS), _stored(repo, Kind.PACKS))
    with pytest.raises(LockRequired):
        api.apply_retention(repo, KeepPolicy(last=1))
    with pytest.raises(LockRequired):
        api.check(repo)
    with RepoLock(repo, exclusive=False, command="test"):
        with pytest.raises(LockRequired, match="exclusive"):
            api.prune(repo)
        assert api.prune(repo, dry_run=True).dry_run  # planning alone needs no exclusivity
        with pytest.raises(UserError, match="empty"):
            api.apply_retention(repo, KeepPolicy())
    assert (_stored(repo, Kind.SNAPSHOTS), _stored(repo, Kind.PACKS)) == before
