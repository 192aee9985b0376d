"""prune: frees what no snapshot uses, keeps everything else restorable, survives kills, and
never runs beside an import."""

import json
import os
import random
import subprocess
import sys
import time

import pytest

from ibsync.reader.walk import collect_blobs
from ibsync.repo.lock import RepoLock
from ibsync.testing.generator import generate, mutate_folder

from conftest import copy_folder, open_repo, run_subprocess, tree_state


@pytest.fixture(scope="module")
def day1(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("day1"), seed=21, size_bytes=24 << 20)


def _repo_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _two_days(cli, live):
    first = json.loads(cli("import", live, "--json")[0])["snapshots"][0]["id"]
    mutate_folder(live, seed=21)
    second = json.loads(cli("import", live, "--json")[0])["snapshots"][0]["id"]
    return first, second


def test_prune_after_forget_frees_exactly_the_unused_data(env, cli, day1, tmp_path):
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init", "--pack-size", "4")
    first, second = _two_days(cli, live)
    repo = open_repo(env)
    used_first, used_second = set(), set()
    collect_blobs(repo, repo.load_snapshot(first).tree, used_first)
    collect_blobs(repo, repo.load_snapshot(second).tree, used_second)
    only_first = used_first - used_second
    unused_bytes = sum(repo.index.get(b).length for b in only_first)
    assert unused_bytes > 1 << 20  # the mutation replaced real data

    out, _ = cli("prune", "--json")
    assert json.loads(out)["packs_to_delete"] == 0 and json.loads(out)["packs_to_repack"] == 0  # all still used
    (env / "snapshots" / first).unlink()  # forget the first snapshot
    before = _repo_bytes(env)
    out, _ = cli("prune", "--dry-run", "--json")
    assert _repo_bytes(env) == before
    out, _ = cli("prune", "--repack-threshold", "0", "--json")
    result = json.loads(out)
    freed = before - _repo_bytes(env)
    assert result["bytes_freed"] > 0
    # everything only the forgotten snapshot used is gone; index and pack headers move the total a little
    assert abs(freed - unused_bytes) < 0.05 * unused_bytes + (64 << 10), (freed, unused_bytes)
    repo = open_repo(env)
    assert not any(repo.index.has(b) for b in only_first)
    cli("check", "--read-data")
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / live.name) == tree_state(live)
    out, _ = cli("prune", "--json")
    assert json.loads(out)["packs_to_delete"] == 0


def test_prune_killed_at_random_instants(env, cli, day1, tmp_path):
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init", "--pack-size", "4")
    first, _ = _two_days(cli, live)
    (env / "snapshots" / first).unlink()
    e = dict(os.environ)
    rnd = random.Random(7)
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ibsync", "prune", "--repack-threshold", "1", "-q"],
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(rnd.uniform(0.1, 0.9))
        proc.kill()
        proc.communicate(timeout=60)
        r = run_subprocess(["check", "--read-data"], e)  # the killed prune's lock is stale (dead PID)
        assert r.returncode == 0, r.stderr
    r = run_subprocess(["prune", "--repack-threshold", "1"], e)
    assert r.returncode == 0, r.stderr
    r = run_subprocess(["restore", "latest", tmp_path / "out"], e)
    assert r.returncode == 0, r.stderr
    assert tree_state(tmp_path / "out" / live.name) == tree_state(live)
    r = run_subprocess(["check", "--read-data", "--json"], e)
    assert r.returncode == 0 and json.loads(r.stdout)["warnings"] == []  # no leftover packs


def test_prune_and_import_never_run_together(env, cli, day1, tmp_path):
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init", "--pack-size", "4")
    first, _ = _two_days(cli, live)
    (env / "snapshots" / first).unlink()
    repo = open_repo(env)
    with RepoLock(repo, exclusive=False, command="import"):  # an import is running
        _, err = cli("prune", expect=3)
        assert "in use" in err
    with RepoLock(repo, exclusive=True, command="prune"):  # a prune is running
        mutate_folder(live, seed=22)
        _, err = cli("import", live, expect=3)
        assert "in use" in err
    cli("import", live)
    cli("prune")
    cli("check", "--read-data")
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / live.name) == tree_state(live)


def test_forget_with_prune(env, cli, day1, tmp_path):
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init", "--pack-size", "4")
    _two_days(cli, live)
    before = _repo_bytes(env)
    out, _ = cli("forget", "--keep-last", "1", "--prune", "--repack-threshold", "0", "--dry-run", "--json")
    doc = json.loads(out)
    assert len(doc["remove"]) == 1 and doc["removed"] == [] and doc["prune"]["dry_run"]
    assert doc["prune"]["packs_to_repack"] + doc["prune"]["packs_to_delete"] > 0  # planned without the forgotten one
    assert _repo_bytes(env) == before
    out, _ = cli("forget", "--keep-last", "1", "--prune", "--repack-threshold", "0", "--json")
    doc = json.loads(out)
    assert len(doc["removed"]) == 1 and doc["prune"]["bytes_freed"] > 0
    assert _repo_bytes(env) < before
    cli("check", "--read-data")
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / live.name) == tree_state(live)


def test_prune_started_during_a_running_import_refuses(env, cli, tmp_path):
    """A real import process holds its shared lock while it runs: a prune started meanwhile
    refuses and deletes nothing; the import completes and restores exactly."""
    folder = generate(tmp_path / "src", seed=23, size_bytes=96 << 20)
    cli("init", "--pack-size", "4")
    e = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ibsync", "import", str(folder), "-q"],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ((env / "locks").exists() and any((env / "locks").iterdir())):  # the import holds its lock
        assert proc.poll() is None and time.monotonic() < deadline, "the import ended before prune could start"
        time.sleep(0.005)
    r = run_subprocess(["prune", "--repack-threshold", "0"], e)
    assert r.returncode == 3 and "in use" in r.stderr and "import" in r.stderr
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    cli("prune")
    cli("check", "--read-data")
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / folder.name) == tree_state(folder)
