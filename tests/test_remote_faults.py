"""Remote repositories when things go wrong or run at once: a server restarted in the middle of
an import, a server that stays down, two devices importing into one repository together, and
copy to S3. Imports run as separate processes, as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ibsync.storage import Kind, open_storage
from ibsync.testing.generator import generate

from conftest import PASSWORD, copy_folder, tree_state
from servers_fixture import configure, server_fixture

seaweedfs_server = server_fixture("seaweedfs")
sshd_server = server_fixture("sshd")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("faults"), seed=11, size_bytes=48 << 20)


@pytest.fixture
def remote(request, env, tmp_path, monkeypatch, cli):
    """A fresh repository named 'remote' in the config file, on the server the test names."""

    def make(server, name: str, *init_args: str):
        url = server.new_url(name)
        configure(tmp_path, monkeypatch, server, "remote", url)
        cli("init", "--repo", "remote", *init_args)
        return open_storage(url, server.options)

    return make


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(extra)
    return env


def start_import(folder, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ibsync", "import", str(folder), "--json", "--repo", "remote"],
        env=subprocess_env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lock(storage, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until the import holds its lock: it has opened the repository and is about to upload."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(storage.list(Kind.LOCKS)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the import never took its lock")


def restore_equals(cli, folder, tmp_path, *args: str) -> None:
    out = tmp_path / f"restored-{time.monotonic_ns()}"
    cli("restore", "latest", out, "--repo", "remote", *args)
    assert tree_state(out / folder.name) == tree_state(folder)


@pytest.mark.parametrize("kind", ["seaweedfs", "sshd"])
def test_server_restarted_mid_import(request, kind, remote, cli, folder, tmp_path):
    server = request.getfixturevalue(f"{kind}_server")
    storage = remote(server, "restart", "--pack-size", "4")
    proc = start_import(folder)
    wait_for_lock(storage, proc)
    server.stop()
    time.sleep(3)
    server.start()
    # an import of this size takes about a second: still running means it waited out the outage
    assert proc.poll() is None, ("the import ended before the server came back", proc.communicate())
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(out)["snapshots"][0]["status"] == "created"
    restore_equals(cli, folder, tmp_path)
    out, _ = cli("check", "--read-data", "--json", "--repo", "remote")
    assert json.loads(out)["errors"] == []


def test_server_down_ends_clearly_and_next_run_completes(seaweedfs_server, remote, cli, folder, tmp_path):
    storage = remote(seaweedfs_server, "down", "--pack-size", "4")
    proc = start_import(folder, IBSYNC_RETRY_SECONDS="3")
    wait_for_lock(storage, proc)
    seaweedfs_server.stop()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        seaweedfs_server.start()
    assert proc.returncode == 6
    last = err.strip().splitlines()[-1]
    assert last.startswith("ibsync: error:") and "still failing after" in last, err
    assert "Traceback" not in err
    out, _ = cli("snapshots", "--json", "--repo", "remote")
    assert json.loads(out) == []  # no half snapshot
    out, _ = cli("check", "--json", "--repo", "remote")
    assert json.loads(out)["errors"] == []
    out, _ = cli("import", folder, "--json", "--repo", "remote")
    assert json.loads(out)["snapshots"][0]["status"] == "created"
    restore_equals(cli, folder, tmp_path)


@pytest.mark.parametrize("kind", ["seaweedfs", "sshd"])
def test_two_devices_import_at_once(request, kind, remote, cli, folder, tmp_path):
    server = request.getfixturevalue(f"{kind}_server")
    remote(server, "concurrent")
    other = copy_folder(folder, tmp_path / "other" / ("e" * 40))
    info = (other / "Info.plist").read_bytes().replace(folder.name.upper().encode(), b"E" * 40)
    (other / "Info.plist").write_bytes(info)
    procs = [start_import(folder), start_import(other)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err
    out, _ = cli("snapshots", "--json", "--repo", "remote")
    assert {s["device"]["udid"] for s in json.loads(out)} == {folder.name.upper(), "E" * 40}
    restore_equals(cli, folder, tmp_path, "--device", folder.name.upper())
    restore_equals(cli, other, tmp_path, "--device", "E" * 40)
    out, _ = cli("check", "--read-data", "--json", "--repo", "remote")
    assert json.loads(out)["errors"] == []
    # a third device's import now deduplicates against both
    third = copy_folder(folder, tmp_path / "third" / ("d" * 40))
    (third / "Info.plist").write_bytes(info.replace(b"E" * 40, b"D" * 40))
    out, _ = cli("import", third, "--json", "--repo", "remote")
    s = json.loads(out)["snapshots"][0]["summary"]
    assert s["added_bytes"] < 0.02 * s["total_bytes"]


def test_copy_local_to_s3_then_restore_from_s3(seaweedfs_server, env, cli, folder, tmp_path, monkeypatch):
    cli("init")
    cli("import", folder)
    configure(tmp_path, monkeypatch, seaweedfs_server, "offsite", seaweedfs_server.new_url("offsite"))
    monkeypatch.setenv("IBSYNC_FROM_PASSWORD", PASSWORD)
    monkeypatch.setenv("IBSYNC_PASSWORD", "another password for the off-site copy")
    cli("init", "--repo", "offsite")
    out, _ = cli("copy", "--from-repo", str(env), "--repo", "offsite", "--json")
    first = json.loads(out)
    assert len(first["copied"]) == 1 and first["bytes_sent"] > 0
    out, _ = cli("copy", "--from-repo", str(env), "--repo", "offsite", "--json")
    assert json.loads(out)["bytes_sent"] == 0  # only missing data travels
    cli("restore", "latest", tmp_path / "from-s3", "--repo", "offsite")
    assert tree_state(tmp_path / "from-s3" / folder.name) == tree_state(folder)
    cli("check", "--read-data", "--repo", "offsite")
