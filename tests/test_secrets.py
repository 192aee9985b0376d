"""Secrets: with encryption on, no object in the repository and no file in the local cache holds
a file name, path, domain, UDID, device name, serial number or a piece of file content (plain or
as zstd would store it); the password appears in no command's output (text or --json), no error
message, no lock object, no cache file and no process's command line."""

from __future__ import annotations

import os
import plistlib
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from ibsync.storage import Kind, open_storage
from ibsync.testing.generator import generate

from conftest import PASSWORD
from servers_fixture import configure, server_fixture

seaweedfs_server = server_fixture("seaweedfs")

UDID = "00008030-001A2B3C4D5E6F70"
DEVICE_NAME = "Zelda's Secret iPhone"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return generate(
        tmp_path_factory.mktemp("secret-src"), seed=23, size_bytes=4 << 20, udid=UDID, device_name=DEVICE_NAME
    )


def needles(folder: Path) -> dict[bytes, str]:
    """What must not be readable anywhere: byte string -> what it is."""
    info = plistlib.loads((folder / "Info.plist").read_bytes())
    found: dict[bytes, str] = {}

    def add(text: str, what: str, min_len: int = 8) -> None:
        if len(text) >= min_len:  # shorter strings turn up in random bytes by chance
            for form in {text, text.upper(), text.lower()}:
                found[form.encode()] = what
                found[form.encode("utf-16-le")] = what + " (UTF-16)"

    add(UDID, "UDID")
    add(DEVICE_NAME, "device name")
    add(info["Serial Number"], "serial number", 6)
    db = sqlite3.connect(folder / "Manifest.db")
    rows = db.execute("SELECT fileID, domain, relativePath FROM Files").fetchall()
    db.close()
    for file_id, domain, rel in rows:
        add(domain, "domain")
        add(rel, "relative path", 12)
        add(rel.rsplit("/", 1)[-1], "file name", 12)
        add(file_id, "file id (hash of domain and path)", 40)
    rnd = random.Random(5)
    payloads = sorted(p for p in folder.glob("??/*") if p.stat().st_size > 4096)
    for p in rnd.sample(payloads, min(25, len(payloads))):
        data = p.read_bytes()
        start = rnd.randrange(len(data) - 64)
        found[data[start : start + 48]] = f"content of {p.name}"
        packed = zstandard.ZstdCompressor(level=3).compress(data)
        if len(packed) > 200:
            mid = len(packed) // 2
            found[packed[mid : mid + 32]] = f"zstd content of {p.name}"
    found[PASSWORD.encode()] = "the password"
    return found


def leaks(data: bytes, wanted: dict[bytes, str]) -> set[str]:
    return {what for needle, what in wanted.items() if needle in data}


def test_nothing_readable_in_repository_cache_or_output(seaweedfs_server, folder, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("IBSYNC_PASSWORD", PASSWORD)
    monkeypatch.setenv("IBSYNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(
        "ibsync.format.crypto.DEFAULT_KDF", {"name": "argon2id", "memory_kib": 8192, "iterations": 1, "lanes": 1}
    )
    url = seaweedfs_server.new_url("secrets")
    configure(tmp_path, monkeypatch, seaweedfs_server, "remote", url)
    wanted = needles(folder)
    assert len(wanted) > 100

    outputs = []
    for args in (
        ["init"],
        ["import", folder],
        ["import", folder, "--json"],
        ["snapshots"],
        ["snapshots", "--json"],
        ["check", "--read-data"],
        ["check", "--json"],
        ["stats"],
        ["stats", "--json"],
        ["restore", "latest", tmp_path / "out"],
        ["key", "list"],
        ["key", "list", "--json"],
    ):
        outputs.append(cli(*args, "--repo", "remote"))
    monkeypatch.setenv("IBSYNC_PASSWORD", "not " + PASSWORD)
    outputs.append(cli("snapshots", "--repo", "remote", expect=4))  # wrong password
    outputs.append(cli("snapshots", "--repo", "remote", "--json", expect=4))  # wrong password
    for out, err in outputs:
        assert PASSWORD not in out + err

    # a lock left behind: a process that dies holding it
    monkeypatch.setenv("IBSYNC_PASSWORD", PASSWORD)
    storage = open_storage(url, seaweedfs_server.options)
    scanned = {}
    for kind in Kind:
        for info in storage.list(kind):
            scanned[f"{kind.value}/{info.name}"] = storage.get(kind, info.name)
    assert any(k.startswith("packs/") for k in scanned) and any(k.startswith("snapshots/") for k in scanned)
    cache_files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cache_files, "a remote repository keeps index, snapshots and tree packs in the cache"
    for p in cache_files:
        scanned[f"cache:{p.relative_to(tmp_path)}"] = p.read_bytes()
    found = {name: leaks(data, wanted) for name, data in scanned.items()}
    assert not {k: v for k, v in found.items() if v}, "plaintext found"


def test_lock_objects_hold_no_secret(tmp_path, folder):
    """A lock names host, user, pid and command: sealed like a snapshot, so none of it is
    readable, and the password is nowhere in it."""
    env = {
        **os.environ,
        "IBSYNC_PASSWORD": PASSWORD,
        "IBSYNC_REPO": str(tmp_path / "repo"),
        "IBSYNC_CACHE_DIR": str(tmp_path / "cache"),
    }
    env.pop("IBSYNC_CONFIG", None)
    subprocess.run([sys.executable, "-m", "ibsync", "init"], env=env, check=True, capture_output=True)
    code = (
        "import os\nfrom ibsync.repo.repository import Repository\nfrom ibsync.repo.lock import RepoLock\n"
        "from ibsync.storage import LocalStorage\n"
        "r = Repository.open(LocalStorage(os.environ['IBSYNC_REPO']), lambda: os.environ['IBSYNC_PASSWORD'])\n"
        "RepoLock(r, exclusive=False, command='import').acquire()\nos._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    locks = list((tmp_path / "repo" / "locks").iterdir())
    assert locks
    import getpass
    import socket

    for lock in locks:
        data = lock.read_bytes()
        assert PASSWORD.encode() not in data
        assert socket.gethostname().encode() not in data and getpass.getuser().encode() not in data


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (by the parent pid in /proc/PID/stat)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_password_not_on_any_command_line(tmp_path):
    """ps shows command lines: a running import (and the key-derivation helper it starts)
    carries the password in its environment or a pipe, never in argv."""
    big = generate(tmp_path / "src", seed=24, size_bytes=48 << 20)
    env = {
        **os.environ,
        "IBSYNC_PASSWORD": PASSWORD,
        "IBSYNC_REPO": str(tmp_path / "repo"),
        "IBSYNC_CACHE_DIR": str(tmp_path / "cache"),
    }
    env.pop("IBSYNC_CONFIG", None)
    # a key derivation heavy enough to run in its helper process, which gets the password too
    from ibsync.repo.repository import Repository
    from ibsync.storage import LocalStorage

    Repository.init(
        LocalStorage(tmp_path / "repo"),
        PASSWORD,
        kdf={"name": "argon2id", "memory_kib": 256 << 10, "iterations": 2, "lanes": 1},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ibsync", "import", str(big)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    seen: dict[int, bytes] = {}
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline:  # empty between fork and exec
                seen[pid] = cmdline
        time.sleep(0.002)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert len(seen) >= 2, f"the helper process was never seen: {seen}"
    for pid, cmdline in seen.items():
        assert PASSWORD.encode() not in cmdline, (pid, cmdline)
    assert PASSWORD.encode() not in out + err
