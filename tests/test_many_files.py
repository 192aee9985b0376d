"""A phone of tens of thousands of small files (the generator's "many files" profile) round-tripped,
its next day imported reading only what changed, and, in a slow test, memory of import and restore
bounded loosely at about 100,000 files. The exact figures are the benchmark's (bench/README.md)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ibsync.testing import many_files
from ibsync.testing.generator import FLAG_FILE, generate_many_files, mutate_many_files

from conftest import PASSWORD, ibsync_peak_rss, tree_state

N_FILES = 20_000
SEED = 5
METADATA = ("Manifest.db", "Info.plist", "Manifest.plist", "Status.plist")
#: The slow test's size; set IBSYNC_TEST_MANY_FILES to try another (the issue's target is 1,000,000).
SLOW_FILES = int(os.environ.get("IBSYNC_TEST_MANY_FILES", "100000"))
#: Generous: the benchmark's target is 150 MB at a million files.
SLOW_RSS_LIMIT = 400 * 10**6


@dataclass(frozen=True)
class RowChanges:
    """File rows (domain, path) that changed between two Manifest.db files."""

    updated: set[tuple[str, str]]
    inserted: set[tuple[str, str]]
    deleted: set[tuple[str, str]]


def file_rows(db: Path) -> dict[tuple[str, str], bytes]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            (d, p): blob
            for d, p, blob in con.execute("SELECT domain, relativePath, file FROM Files WHERE flags = ?", (FLAG_FILE,))
        }
    finally:
        con.close()


def row_changes(before: Path, after: Path) -> RowChanges:
    a, b = file_rows(before), file_rows(after)
    return RowChanges({k for k in a.keys() & b.keys() if a[k] != b[k]}, b.keys() - a.keys(), a.keys() - b.keys())


def payload(dev: Path, domain: str, path: str) -> Path:
    fid = many_files.BackupFile(domain, path, FLAG_FILE, 0, 0, 0).file_id
    return dev / fid[:2] / fid


@pytest.fixture
def files_tmp(tmp_path):
    """A scratch folder in memory (/dev/shm) when there is one: tens of thousands of file creations on the
    shared VM's disk take a minute of I/O wait, and what is tested here is ibsync, not the disk."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="ibsync-test-many-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _import(cli, path) -> dict:
    out, _ = cli("import", path, "--json")
    return json.loads(out)["snapshots"][0]


def test_generator_profile_is_deterministic_and_day_two_leaves_day_one_alone(files_tmp):
    tmp_path = files_tmp
    a = generate_many_files(tmp_path / "a", seed=SEED, files=2_000)
    b = generate_many_files(tmp_path / "b", seed=SEED, files=2_000)
    assert many_files.file_count(a) == 2_000
    assert sum(1 for p in a.rglob("*") if p.is_file()) == 2_000 + len(METADATA)
    day1 = many_files.digest(a)
    assert day1 == many_files.digest(b)
    # day 2 made as the benchmark makes it: hard links to day 1, then the mutation
    subprocess.run(["cp", "-al", str(a), str(tmp_path / "day2")], check=True)
    summary = mutate_many_files(tmp_path / "day2", seed=SEED)
    assert many_files.digest(a) == day1, "the next day changed a file of day 1 through a hard link"
    assert summary["touched_files"] == round(2_000 * many_files.TOUCH_FRACTION)
    changes = row_changes(a / "Manifest.db", tmp_path / "day2" / "Manifest.db")
    assert len(changes.updated) == summary["touched_files"]
    assert len(changes.deleted) == summary["deleted_files"]
    assert len(changes.inserted) == summary["new_files"] + summary["new_photos_and_thumbnails"]


def test_many_small_files_round_trip_and_next_day_reads_only_what_changed(env, cli, files_tmp):
    tmp_path = files_tmp
    dev = generate_many_files(tmp_path / "live", seed=SEED, files=N_FILES)
    on_disk = N_FILES + len(METADATA)
    cli("init")
    first = _import(cli, dev)
    assert first["summary"]["files"] == on_disk and first["summary"]["files_new"] == on_disk

    shutil.copy2(dev / "Manifest.db", tmp_path / "day1-Manifest.db")
    summary = mutate_many_files(dev, seed=SEED)
    changes = row_changes(tmp_path / "day1-Manifest.db", dev / "Manifest.db")
    assert len(changes.updated) == summary["touched_files"] == N_FILES // 200
    assert summary["fileid_folders_touched"] > 64  # spread over the fileID folders, not one corner

    second = _import(cli, dev)
    s = second["summary"]
    assert second["parent"] == first["id"]
    # only the touched files (and the four metadata files) were read: nothing else counts as changed
    assert s["files_changed"] == len(changes.updated) + len(METADATA)
    assert s["files_new"] == len(changes.inserted)
    assert s["files_unmodified"] == on_disk - len(changes.deleted) - len(changes.updated) - len(METADATA)
    touched_bytes = sum(payload(dev, *k).stat().st_size for k in changes.updated | changes.inserted)
    metadata_bytes = sum((dev / n).stat().st_size for n in METADATA)
    assert s["bytes_read"] <= touched_bytes + metadata_bytes

    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / dev.name) == tree_state(dev)  # bytes, modes and mtimes

    edited = min(changes.updated)
    out, _ = cli("ls", "latest", "/".join(edited), "--json")
    rows = json.loads(out)["files"]
    st = payload(dev, *edited).stat()
    assert [(r["domain"], r["relative_path"], r["size"]) for r in rows] == [(*edited, st.st_size)]
    assert rows[0]["mtime"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime))
    for key, statuses in (
        (edited, ["first", "changed"]),
        (min(changes.inserted), ["new"]),
        (min(changes.deleted), ["first", "removed"]),
    ):
        out, _ = cli("find", "/".join(key), "--json")
        paths = json.loads(out)["paths"]
        assert [p["path"] for p in paths] == ["/".join(key)]
        assert [v["status"] for v in paths[0]["versions"]] == statuses, key


@pytest.mark.slow
def test_import_and_restore_of_a_hundred_thousand_files_stay_in_bounded_memory(files_tmp):
    """Peak RSS of import and restore (each its own process) under a generous limit."""
    tmp_path = files_tmp
    env = {
        **os.environ,
        "IBSYNC_REPO": str(tmp_path / "repo"),
        "IBSYNC_PASSWORD": PASSWORD,
        "IBSYNC_CACHE_DIR": str(tmp_path / "cache"),
    }
    env.pop("IBSYNC_PASSWORD_FILE", None)
    gen = [
        sys.executable,
        "-m",
        "ibsync.testing.generator",
        "generate",
        str(tmp_path / "live"),
        "--profile",
        "many-files",
        "--files",
        str(SLOW_FILES),
        "--seed",
        str(SEED),
    ]
    subprocess.run(gen, check=True, stdout=subprocess.DEVNULL)
    dev = next((tmp_path / "live").iterdir())
    ibsync = [sys.executable, "-m", "ibsync"]
    subprocess.run([*ibsync, "init"], env=env, check=True, capture_output=True)
    peaks = {}
    for name, args in (
        ("import", ["import", str(dev), "-q"]),
        ("restore", ["restore", "latest", str(tmp_path / "out")]),
    ):
        r, peaks[name] = ibsync_peak_rss(
            args, env, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        assert r.returncode == 0, r.stderr
    assert sum(1 for _ in (tmp_path / "out" / dev.name).rglob("*")) == sum(1 for _ in dev.rglob("*"))
    shown = {k: f"{v / 1e6:.0f} MB" for k, v in peaks.items()}
    print(f"peak RSS at {SLOW_FILES:,} files: {shown}")  # seen with -s; the benchmark has the exact figures
    assert max(peaks.values()) < SLOW_RSS_LIMIT, shown
