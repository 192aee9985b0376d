"""Every remote backend against its real server on 127.0.0.1: the storage conformance suite,
then the full round trip a user runs (init, import, next-day import, restore byte-identical,
check --read-data) through a named repository in the config file."""

from __future__ import annotations

import json

import pytest

from ibsync.storage import open_storage
from ibsync.storage.testing import run_conformance
from ibsync.testing.generator import generate, mutate_folder

from conftest import copy_folder, tree_state
from servers_fixture import configure, server_fixture

seaweedfs_server = server_fixture("seaweedfs")
moto_server = server_fixture("moto")
sshd_server = server_fixture("sshd")
samba_server = server_fixture("samba")
rclone_webdav_server = server_fixture("rclone-webdav")
wsgidav_server = server_fixture("wsgidav")

BACKENDS = ["seaweedfs", "moto", "sshd", "samba", "rclone-webdav", "wsgidav"]


def server_of(request, kind: str):
    return request.getfixturevalue(f"{kind.replace('-', '_')}_server")


@pytest.fixture(scope="module")
def day1(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("day1"), seed=7, size_bytes=8 << 20)


@pytest.mark.parametrize("kind", BACKENDS)
def test_conformance(request, kind):
    server = server_of(request, kind)
    run_conformance(open_storage(server.new_url("conformance"), server.options))


@pytest.mark.parametrize("kind", BACKENDS)
def test_round_trip(request, kind, env, cli, day1, tmp_path, monkeypatch):
    server = server_of(request, kind)
    configure(tmp_path, monkeypatch, server, "remote", server.new_url("roundtrip"))
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init", "--repo", "remote")
    out, _ = cli("import", live, "--json", "--repo", "remote")
    first = json.loads(out)["snapshots"][0]
    state1 = tree_state(live)
    mutate_folder(live, seed=7)
    out, _ = cli("import", live, "--json", "--repo", "remote")
    second = json.loads(out)["snapshots"][0]
    assert second["parent"] == first["id"] and second["summary"]["files_unmodified"] > 0
    cli("restore", first["id"][:10], tmp_path / "one", "--repo", "remote")
    cli("restore", "latest", tmp_path / "two", "--repo", "remote")
    assert tree_state(tmp_path / "one" / live.name) == state1
    assert tree_state(tmp_path / "two" / live.name) == tree_state(live)
    out, _ = cli("check", "--read-data", "--json", "--repo", "remote")
    assert json.loads(out)["errors"] == []


@pytest.mark.parametrize("kind", ["seaweedfs", "moto"])
def test_init_creates_a_missing_bucket(request, kind, env, cli, tmp_path, monkeypatch):
    server = server_of(request, kind)
    url = f"s3://ibsync-new-{kind}/iphone"
    configure(tmp_path, monkeypatch, server, "fresh", url)
    cli("init", "--repo", "fresh")
    cli("snapshots", "--repo", "fresh")
    assert open_storage(url, server.options).exists()
