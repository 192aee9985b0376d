"""Damaged repositories and interrupted imports: found, named, never silently wrong."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ibsync.format.pack import BlobType
from ibsync.reader.restorer import partial_folder
from ibsync.reader.walk import walk
from ibsync.repo.repository import Repository
from ibsync.storage import LocalStorage
from ibsync.testing.generator import generate

from conftest import FAST_KDF, PASSWORD, open_repo, run_subprocess, tree_state


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("src"), seed=11, size_bytes=16 << 20)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("big"), seed=12, size_bytes=160 << 20)


def test_flipped_byte_is_found_by_check_and_refused_by_restore(env, cli, folder, tmp_path):
    cli("init")
    cli("import", folder)
    repo = open_repo(env)
    snap = repo.snapshots()[-1]
    # pick a data blob used by exactly one file, and damage one byte in the middle of it
    users: dict[bytes, list[str]] = {}
    for path, node in walk(repo, snap.tree):
        for c in node.content:
            users.setdefault(c, []).append(path)
    blob_id, paths = next((b, p) for b, p in users.items() if len(p) == 1 and repo.locate(b).length > 1000)
    loc = repo.locate(blob_id)
    pack = env / "packs" / loc.pack_id.hex()[:2] / loc.pack_id.hex()
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x40
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))

    cli("check")  # structure alone is intact
    out, err = cli("check", "--read-data", "--json", expect=1)
    result = json.loads(out)
    assert not result["ok"]
    assert any(blob_id.hex()[:12] in e and "authentication failed" in e for e in result["errors"])

    _, err = cli("restore", "latest", tmp_path / "out", expect=1)
    assert paths[0] in err and "could not be restored" in err
    # the rest is restored, but left in the partial folder: nothing that looks like a finished backup
    assert os.listdir(tmp_path / "out") == [partial_folder(tmp_path / "out", folder.name).name]
    restored = partial_folder(tmp_path / "out", folder.name) / folder.name
    assert not (restored / paths[0]).exists()
    expected = {k: v for k, v in tree_state(folder).items() if k != paths[0]}
    assert tree_state(restored) == expected


def test_missing_pack_is_reported(env, cli, folder, tmp_path):
    cli("init")
    cli("import", folder)
    victim = max((p for p in (env / "packs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.unlink()
    _, err = cli("check", expect=1)
    assert "missing from the repository" in err
    _, err = cli("restore", "latest", tmp_path / "out", expect=1)
    assert "could not be restored" in err


def _start_import(env_vars, folder):
    return subprocess.Popen(
        [sys.executable, "-m", "ibsync", "import", str(folder), "--quiet"],
        env={**env_vars, "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc, timeout=60):
    """communicate(); if the process hangs, its threads' stacks (faulthandler on SIGABRT) go in the failure."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"the import did not end within {timeout} s:\n{err}") from None


def _wait_for_objects(repo_path, kind: str, n: int, proc, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([p for p in (repo_path / kind).rglob("*") if p.is_file() and not p.name.startswith(".")]) >= n:
            return
        assert proc.poll() is None, f"import finished before it could be interrupted: {proc.communicate()}"
        time.sleep(0.005)
    raise AssertionError(f"no {n} {kind} objects after {timeout} s")


def _small_pack_repo(path):
    """A repository with 4 MiB packs, so an import writes index objects early."""
    Repository.init(LocalStorage(path), PASSWORD, kdf=FAST_KDF, pack_size=4 << 20)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_interrupted_import_keeps_data_and_recovers(env, big_folder, tmp_path, how):
    _small_pack_repo(env)
    e = dict(os.environ)
    proc = _start_import(e, big_folder)
    _wait_for_objects(env, "index", 1, proc)  # at least 8 packs are indexed
    proc.send_signal(getattr(signal, how))
    _, err = _finish(proc)
    assert proc.returncode != 0
    if how != "SIGKILL":
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not list((env / "snapshots").glob("*")), "no snapshot from an interrupted import"

    r = run_subprocess(["check", "--read-data"], e)
    assert r.returncode == 0, r.stderr

    r = run_subprocess(["import", big_folder, "--json"], e)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["snapshots"][0]["summary"]
    full = sum(p.stat().st_size for p in big_folder.rglob("*") if p.is_file())
    assert summary["raw_bytes_added"] < full - (30 << 20), "the re-run reused what was uploaded"

    r = run_subprocess(["restore", "latest", tmp_path / "out"], e)
    assert r.returncode == 0, r.stderr
    assert tree_state(tmp_path / "out" / big_folder.name) == tree_state(big_folder)
    r = run_subprocess(["check", "--read-data"], e)
    assert r.returncode == 0, r.stderr


def test_kill_at_random_instants_never_corrupts(env, big_folder, tmp_path):
    """A repository survives a kill at any instant: kill an import at several random moments,
    check after each, and finally complete it and restore exactly."""
    import random

    _small_pack_repo(env)
    e = dict(os.environ)
    rnd = random.Random(1234)
    for _ in range(4):
        proc = _start_import(e, big_folder)
        time.sleep(rnd.uniform(0.05, 1.2))
        proc.kill()
        proc.communicate(timeout=60)
        r = run_subprocess(["check", "--read-data", "--json"], e)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["errors"] == []
    r = run_subprocess(["import", big_folder], e)
    assert r.returncode == 0, r.stderr
    r = run_subprocess(["restore", "latest", tmp_path / "out"], e)
    assert r.returncode == 0, r.stderr
    assert tree_state(tmp_path / "out" / big_folder.name) == tree_state(big_folder)


def test_restore_overwrite(env, cli, folder, tmp_path):
    cli("init", "--pack-size", "4")
    assert json.loads((env / "config").read_text())["pack_size"] == 4 << 20
    cli("import", folder)
    out = tmp_path / "out"
    cli("restore", "latest", out)
    victim = next(p for p in (out / folder.name).rglob("*") if p.is_file() and p.stat().st_size > 100)
    os.chmod(victim, 0o644)
    victim.write_bytes(b"scribbled over")
    _, err = cli("restore", "latest", out, expect=2)
    assert "--overwrite" in err
    cli("restore", "latest", out, "--overwrite")
    assert tree_state(out / folder.name) == tree_state(folder)


def test_read_data_subsets_cover_every_pack(env, cli, folder, tmp_path):
    """n/t subsets partition the packs: t runs read each pack exactly once; N% reads a part."""
    cli("init", "--pack-size", "4")
    cli("import", folder)
    packs = sum(1 for p in (env / "packs").rglob("*") if p.is_file())
    read = []
    for n in (1, 2, 3):
        out, _ = cli("check", "--read-data-subset", f"{n}/3", "--json")
        read.append(json.loads(out)["packs_read"])
    assert sum(read) == packs
    out, _ = cli("check", "--read-data-subset", "50%", "--json")
    assert json.loads(out)["packs_read"] == round(packs * 0.5)
    _, err = cli("check", "--read-data-subset", "4/3", expect=2)
    assert "n/t" in err
    # a damaged data pack is found by the subset that holds it, and only by that one
    repo = open_repo(env)
    tree_packs = {loc.pack_id.hex() for _, loc in repo.index.entries() if loc.type == BlobType.TREE}
    victim = next(p for p in (env / "packs").rglob("*") if p.is_file() and p.name not in tree_packs)
    data = bytearray(victim.read_bytes())
    data[10] ^= 1
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes(data))
    group = int(victim.name[:2], 16) % 3 + 1
    cli("check", "--read-data-subset", f"{group}/3", expect=1)
    cli("check", "--read-data-subset", f"{group % 3 + 1}/3")
