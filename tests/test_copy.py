"""copy: snapshots move between repositories with different keys; only missing data travels."""

import json
import uuid

import pytest

from ibsync.testing.generator import generate, mutate_folder

from conftest import copy_folder, tree_state


@pytest.fixture(scope="module")
def day1(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("day1"), seed=41, size_bytes=16 << 20)


def _ids(cli, *repo):
    out, _ = cli("snapshots", "--json", *repo)
    return [s["id"] for s in json.loads(out)]


@pytest.mark.parametrize("target_kind", ["local", "fsspec-memory"])
def test_copy_between_repositories(env, cli, day1, tmp_path, monkeypatch, target_kind):
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init")
    cli("import", live)
    states = [tree_state(live)]
    mutate_folder(live, seed=41)
    cli("import", live)
    states.append(tree_state(live))

    target = str(tmp_path / "target") if target_kind == "local" else f"memory://ibsync-copy-{uuid.uuid4().hex}"
    monkeypatch.setenv("IBSYNC_FROM_PASSWORD", "correct horse battery staple")  # the source's password (conftest)
    monkeypatch.setenv("IBSYNC_PASSWORD", "a different password for the target")
    cli("init", "--repo", target)
    out, _ = cli("copy", "--from-repo", str(env), "--repo", target, "--json")
    first = json.loads(out)
    assert len(first["copied"]) == 2 and first["skipped"] == []
    assert first["blobs_read"] > 0 and first["blobs_sent"] <= first["blobs_read"] + 600  # + trees
    out, _ = cli("copy", "--from-repo", str(env), "--repo", target, "--json")
    again = json.loads(out)
    assert again["copied"] == [] and len(again["skipped"]) == 2 and again["bytes_sent"] == 0

    cli("check", "--read-data", "--repo", target)
    ids = _ids(cli, "--repo", target)
    for i, sid in enumerate(ids):
        cli("restore", sid[:12], tmp_path / f"out{i}", "--repo", target)
        assert tree_state(tmp_path / f"out{i}" / live.name) == states[i]

    # the copy is a valid parent for the target's own imports: unchanged files are not read again
    out, _ = cli("import", live, "--json", "--repo", target)
    s = json.loads(out)["snapshots"][0]
    assert s["status"] in ("created", "unchanged") and s["summary"]["bytes_read"] == 0


def test_copy_selected_snapshot_and_wrong_source_password(env, cli, day1, tmp_path, monkeypatch):
    cli("init")
    cli("import", day1)
    target = tmp_path / "target"
    cli("init", "--repo", target)
    monkeypatch.setenv("IBSYNC_FROM_PASSWORD", "not the source password")
    _, err = cli("copy", "latest", "--from-repo", env, "--repo", target, expect=4)
    assert "wrong password" in err
    monkeypatch.setenv("IBSYNC_FROM_PASSWORD", "correct horse battery staple")
    cli("copy", "latest", "--from-repo", env, "--repo", target)
    assert len(_ids(cli, "--repo", target)) == 1
    _, err = cli("copy", "--from-repo", env, "--repo", env, expect=2)
    assert "same repository" in err
