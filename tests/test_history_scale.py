"""A year of snapshots: copy, stats, repair and forget cost what changed, not snapshots x size;
prune and check mark used blobs in a compact table.

Costs are counted with the real repository's own reads (a counter around the storage's
``get`` and the repository's ``load_blob``), never timed."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ibsync.format.pack import BlobType
from ibsync.ingest.copy import copy_snapshots
from ibsync.maint.repair import damaged_snapshots
from ibsync.maint.stats import stats
from ibsync.maint.used import BlobMap, BlobMarks, collect_used
from ibsync.model import DeviceInfo, Snapshot
from ibsync.reader.walk import collect_blobs
from ibsync.repo.repository import Repository
from ibsync.storage import Kind, LocalStorage
from ibsync.testing.generator import generate, mutate_folder

from conftest import FAST_KDF, PASSWORD, copy_folder, tree_state

UDID = "00008030-000A1B2C3D4E5F60"
T0 = datetime(2024, 1, 1, 3, 0, tzinfo=UTC)
FILE_MODE, DIR_MODE = 0o100644, 0o40755


@pytest.fixture(scope="module")
def day1(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("day1"), seed=93, size_bytes=16 << 20)


class ReadCounter:
    """Bytes a storage object hands out from packs/, around its real ``get``."""

    def __init__(self, storage) -> None:
        self.pack_bytes = 0
        self._get = storage.get
        storage.get = self._counting

    def _counting(self, kind, name, offset=0, length=None):
        data = self._get(kind, name, offset, length)
        if kind is Kind.PACKS:
            self.pack_bytes += len(data)
        return data


class BlobLoads:
    """How often each tree blob is loaded (decoded) from a repository."""

    def __init__(self, repo: Repository) -> None:
        self.trees: Counter[bytes] = Counter()
        self._repo, self._load = repo, repo.load_blob
        repo.load_blob = self._counting  # type: ignore[method-assign]

    def _counting(self, blob_id: bytes) -> bytes:
        loc = self._repo.index.get(blob_id)
        if loc is not None and loc.type is BlobType.TREE:
            self.trees[blob_id] += 1
        return self._load(blob_id)


def _open(path: Path, password: str = PASSWORD) -> Repository:
    repo = Repository.open(LocalStorage(path), lambda: password)
    repo.load_index()
    return repo


# ---- copy ------------------------------------------------------------------------------------


def test_copy_of_the_next_day_reads_about_what_it_adds(env, cli, day1, tmp_path, monkeypatch):
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init")
    cli("import", live)
    day1_state = tree_state(live)
    mutate_folder(live, seed=93)
    cli("import", live)
    day2_state = tree_state(live)
    target = tmp_path / "target"
    cli("init", "--repo", target)

    src = _open(env)
    first, second = sorted(src.snapshots(), key=lambda s: s.time)
    dst = _open(target)
    copy_snapshots(src, dst, [first])
    reads = ReadCounter(src.storage)
    result = copy_snapshots(src, dst, [second])
    incremental_read, added = reads.pack_bytes, result.bytes_sent
    ((_, incremental),) = result.copied
    assert added > 0
    # the next day's data plus the trees of the folders that changed, not the phone
    assert incremental_read <= 2 * added, (incremental_read, added)
    print(f"next day: read {incremental_read} bytes from the source, added {added} to the target", file=sys.__stderr__)

    # the same snapshot copied whole into a repository with no earlier copy reads all of it
    whole_target = tmp_path / "whole"
    cli("init", "--repo", whole_target)
    whole_dst = _open(whole_target)
    reads.pack_bytes = 0
    ((_, whole),) = copy_snapshots(src, whole_dst, [second]).copied
    print(f"whole copy of the same snapshot: read {reads.pack_bytes} bytes", file=sys.__stderr__)
    assert reads.pack_bytes > 3 * incremental_read

    # byte for byte what a whole copy writes: drop both copies from the first target and copy
    # the second snapshot again with nothing to copy against: the same root tree, nothing sent
    for s in dst.snapshots():
        dst.storage.delete(Kind.SNAPSHOTS, s.id)
    dst = _open(target)
    again = copy_snapshots(src, dst, [second])
    assert again.copied[0][1].tree == incremental.tree and again.bytes_sent == 0

    monkeypatch.setenv("IBSYNC_PASSWORD", PASSWORD)
    cli("check", "--read-data", "--repo", target)
    for where, snap in ((target, again.copied[0][1]), (whole_target, whole)):
        out = tmp_path / f"restored-{where.name}"
        cli("restore", snap.id[:12], out, "--repo", where)
        assert tree_state(out / live.name) == day2_state
    assert day1_state != day2_state


def test_copy_against_an_altered_earlier_copy_copies_the_folder_whole(env, cli, day1, tmp_path):
    """A copy whose entries no longer match its source (here: one the next day changes was
    removed from it) is not trusted for that folder: the result is still the whole copy."""
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init")
    cli("import", live)
    mutate_folder(live, seed=93)
    cli("import", live)
    target = tmp_path / "target"
    cli("init", "--repo", target)
    src = _open(env)
    first, second = sorted(src.snapshots(), key=lambda s: s.time)
    dst = _open(target)
    ((_, copied_first),) = copy_snapshots(src, dst, [first]).copied

    # Manifest.db changes every day: the altered copy lacks it
    entries = [d for d in dst.load_tree_entries(copied_first.tree) if d["name"] != "Manifest.db"]
    with dst.write_session() as session:
        altered_root = session.save_tree(entries)
    dst.storage.delete(Kind.SNAPSHOTS, copied_first.id)
    altered = dataclasses.replace(copied_first, tree=altered_root, id="")
    dst.save_snapshot(altered)

    ((_, copied_second),) = copy_snapshots(src, dst, [second]).copied
    whole_target = tmp_path / "whole"
    cli("init", "--repo", whole_target)
    whole_dst = _open(whole_target)
    ((_, whole),) = copy_snapshots(src, whole_dst, [second]).copied
    names = {d["name"] for d in dst.load_tree_entries(copied_second.tree)}
    assert "Manifest.db" in names
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    cli("restore", copied_second.id[:12], out_a, "--repo", target)
    cli("restore", whole.id[:12], out_b, "--repo", whole_target)
    assert tree_state(out_a / live.name) == tree_state(out_b / live.name) == tree_state(live)


# ---- a month of daily snapshots sharing most trees --------------------------------------------


def _file(name: str, blob: bytes, size: int) -> dict:
    return {"name": name, "type": "file", "mode": FILE_MODE, "mtime_ns": 1, "size": size, "content": [blob.hex()]}


def _month(path: Path, days: int = 30, folders: int = 12, files: int = 8) -> tuple[Repository, list[Snapshot]]:
    """``days`` snapshots of one device; each day changes one file of one folder."""
    repo = Repository.init(LocalStorage(path), PASSWORD, kdf=FAST_KDF)
    repo.load_index()
    snaps = []
    with repo.write_session() as session:
        contents = {(f, i): os.urandom(64) for f in range(folders) for i in range(files)}
        for day in range(days):
            if day:
                contents[(day % folders, day % files)] = os.urandom(64 + day)
            root = []
            for f in range(folders):
                entries = []
                for i in range(files):
                    data = contents[(f, i)]
                    blob, _ = session.save_blob(BlobType.DATA, data)
                    entries.append(_file(f"{i:02d}", blob, len(data)))
                sub = session.save_tree(entries)
                root.append({"name": f"{f:02x}", "type": "dir", "mode": DIR_MODE, "mtime_ns": 1, "subtree": sub.hex()})
            snaps.append(
                Snapshot(
                    time=T0 + timedelta(days=day),
                    tree=session.save_tree(root),
                    device=DeviceInfo(UDID),
                    backup_date=T0 + timedelta(days=day),
                    ios_encrypted=False,
                    source={"kind": "folder", "path": "/crafted"},
                )
            )
    for s in snaps:
        repo.save_snapshot(s)
    return _open(path), snaps


def _distinct_trees(repo: Repository, snaps: list[Snapshot]) -> set[bytes]:
    blobs: set[bytes] = set()
    for s in snaps:
        collect_blobs(repo, s.tree, blobs)
    return {b for b in blobs if repo.index.get(b).type is BlobType.TREE}


class TreeVisits:
    """Per tree id, how often stats asks for it: a folder listing (load_tree, load_tree_entries),
    its parts, or one side of a diff_folder (whose own reads are not counted again)."""

    def __init__(self, repo: Repository, monkeypatch) -> None:
        self.trees: Counter[bytes] = Counter()
        self._inside = False
        for name in ("load_tree", "load_tree_entries", "tree_parts"):
            monkeypatch.setattr(repo, name, self._counting(getattr(repo, name)))
        import ibsync.maint.stats as module

        real_diff = getattr(module, "diff_folder", None)

        def diff(repo_, old, new):
            self.trees.update(t for t in (old, new) if t is not None and old != new)
            self._inside = True
            try:
                yield from real_diff(repo_, old, new)
            finally:
                self._inside = False

        monkeypatch.setattr(module, "diff_folder", diff, raising=False)

    def _counting(self, real):
        def counted(tree_id):
            if not self._inside:
                self.trees[tree_id] += 1
            return real(tree_id)

        return counted


def test_stats_visits_each_distinct_tree_at_most_thrice_and_agrees_with_a_full_walk(tmp_path, monkeypatch):
    repo, snaps = _month(tmp_path / "repo")
    distinct = _distinct_trees(repo, snaps)
    repo = _open(tmp_path / "repo")
    visits = TreeVisits(repo, monkeypatch)
    st = stats(repo, sorted(repo.snapshots(), key=lambda s: s.time))
    counts = dict(visits.trees)
    assert len(distinct) > 30 and set(counts) == distinct
    # its parts when it appears, one diff then and one when it goes; walking each snapshot
    # would ask for the 13 trees of every snapshot, 30 times for the ones they all share
    assert max(counts.values()) <= 3, counts
    assert sum(counts.values()) <= 3 * len(distinct) < 30 * 13

    # the same figures as a walk of each snapshot on its own
    device_blobs: set[bytes] = set()
    for s, figures in zip(sorted(repo.snapshots(), key=lambda s: s.time), st.snapshot_stats):
        own: set[bytes] = set()
        collect_blobs(repo, s.tree, own)
        device_blobs |= own
        assert figures.stored_bytes == sum(repo.index.get(b).length for b in own)
    (device,) = st.devices
    assert device.unique_blobs == len(device_blobs)
    assert device.stored_bytes == sum(repo.index.get(b).length for b in device_blobs)


def test_repair_snapshots_judges_each_shared_tree_once(tmp_path):
    repo, snaps = _month(tmp_path / "repo")
    distinct = _distinct_trees(repo, snaps)
    repo = _open(tmp_path / "repo")
    loads = BlobLoads(repo)
    repair = damaged_snapshots(repo)
    assert repair.damaged == [] and loads.trees
    assert max(loads.trees.values()) == 1 and set(loads.trees) == distinct


def test_forget_reads_no_tree(env, cli, tmp_path, monkeypatch):
    repo, _ = _month(env, days=40)
    loads: list[str] = []
    real_get = LocalStorage.get

    def counting(self, kind, name, offset=0, length=None):
        if kind is Kind.PACKS:
            loads.append(name)
        return real_get(self, kind, name, offset, length)

    monkeypatch.setattr(LocalStorage, "get", counting)
    out, _ = cli("forget", "--keep-daily", "7", "--json")
    assert len(json.loads(out)["removed"]) == 33
    assert loads == []


# ---- compact marks ---------------------------------------------------------------------------


def test_blob_marks_keep_ids_and_counters_in_about_36_bytes_each():
    marks = BlobMarks(expected=50_000)
    ids = [os.urandom(32) for _ in range(50_000)]
    for i, b in enumerate(ids):
        assert marks.add(b, i % 7)
    assert not marks.add(ids[0])
    assert all(b in marks for b in ids[::97]) and os.urandom(32) not in marks
    marks.set(ids[5], 99)
    assert marks.get(ids[5]) == 99 and marks.get(ids[6]) == 6 and marks.get(os.urandom(32)) is None
    odd = b"\x01\x02"  # only a refused entry can name such an id; kept, not lost
    assert marks.add(odd) and odd in marks and len(marks) == 50_001
    assert dict(marks.items())[ids[7]] == 0
    assert marks.nbytes() <= 40 * 50_000

    pairs = BlobMap(expected=1000)
    keys = [os.urandom(32) for _ in range(1000)]
    for k in keys:
        pairs.put(k, k[::-1])
    assert all(pairs.get(k) == k[::-1] for k in keys) and pairs.get(os.urandom(32)) is None
    # a value is never found as a key
    assert pairs.get(keys[0][::-1]) is None or keys[0][::-1] in keys


def test_collect_used_finds_what_collect_blobs_finds(tmp_path):
    repo, snaps = _month(tmp_path / "repo", days=5)
    expected: set[bytes] = set()
    for s in snaps:
        collect_blobs(repo, s.tree, expected)
    used = collect_used(repo, [s.tree for s in snaps])
    assert {b for b, _ in used.items()} == expected
