"""Round trips, deduplication and the files cache on generated, realistic backup folders."""

import json

import pytest

from ibsync.testing.generator import generate, mutate_folder

from conftest import copy_folder, tree_state

SIZE = 24 << 20


@pytest.fixture(scope="module")
def day1(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("day1"), seed=3, size_bytes=SIZE)


@pytest.fixture
def live(day1, tmp_path):
    """A copy of day 1 that tests may mutate, as a device updates its backup folder."""
    return copy_folder(day1, tmp_path / "live" / day1.name)


def _import(cli, path, *extra):
    out, _ = cli("import", path, "--json", *extra)
    return json.loads(out)["snapshots"][0]


def test_restore_is_byte_identical_with_mtimes_and_modes(env, cli, live, tmp_path):
    cli("init")
    s = _import(cli, live)
    assert s["summary"]["files"] == sum(1 for p in live.rglob("*") if p.is_file())
    assert s["udid"] == s["udid"].upper() and live.name == live.name.lower()  # Info.plist vs folder name
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / live.name) == tree_state(live)


def test_next_day_dedups_and_both_snapshots_restore(env, cli, live, tmp_path):
    cli("init")
    first = _import(cli, live)
    before = tree_state(live)
    change = mutate_folder(live, seed=3)
    second = _import(cli, live)
    s = second["summary"]
    assert second["parent"] == first["id"]
    assert s["files_changed"] + s["files_new"] > 0 and s["files_unmodified"] > 0.9 * s["files"]
    # the increment is near the real change (new and rewritten files, a few database pages)
    real_change = change["new_bytes"] + change["rewritten_bytes"]
    pages = sum(change["edited_db_pages_changed"].values())  # each costs one 32 KiB block
    assert real_change <= s["raw_bytes_added"] < real_change + pages * (32 << 10) + (1 << 20), (s, change)
    # unchanged files were not read again: only new, rewritten and edited files, and the metadata
    metadata = sum((live / n).stat().st_size for n in ("Manifest.db", "Info.plist", "Manifest.plist", "Status.plist"))
    assert s["bytes_read"] <= change["new_bytes"] + change["rewritten_bytes"] + change["edited_db_bytes"] + metadata
    cli("restore", first["id"][:8], tmp_path / "one")
    cli("restore", "latest", tmp_path / "two")
    assert tree_state(tmp_path / "one" / live.name) == before
    assert tree_state(tmp_path / "two" / live.name) == tree_state(live)
    cli("check", "--read-data")


def test_unchanged_reimport_reads_nothing_and_writes_nothing(env, cli, live):
    cli("init")
    first = _import(cli, live)
    listing = sorted(p.name for p in env.rglob("*"))
    again = _import(cli, live)
    assert again["status"] == "unchanged" and again["id"] == first["id"]
    s = again["summary"]  # this run's numbers, not the first import's
    assert s["added_bytes"] == 0 and s["bytes_read"] == 0 and s["files_unmodified"] == s["files"] > 0
    assert sorted(p.name for p in env.rglob("*")) == listing
    forced = _import(cli, live, "--force")  # --force reads everything, and still finds nothing new
    assert forced["status"] == "unchanged"


def test_sqlite_page_writes_store_little(env, cli, live):
    """A few scattered page writes in the large databases re-store kilobytes, not the databases."""
    cli("init")
    _import(cli, live)
    change = mutate_folder(live, seed=5)
    second = _import(cli, live)["summary"]
    pages = sum(change["edited_db_pages_changed"].values())
    assert pages >= 40
    # beyond the new and rewritten files, what is stored again is one 32 KiB block per changed
    # page (plus Manifest.db's changed pages and the trees), not the databases' several MiB
    extra = second["raw_bytes_added"] - change["new_bytes"] - change["rewritten_bytes"]
    assert 0 < extra < pages * (32 << 10) + (1 << 20), (second, change)


def test_two_devices_share_data(env, cli, day1, tmp_path):
    """A folder of several device folders imports as one snapshot each; identical content dedups."""
    parent = tmp_path / "Backup"
    copy_folder(day1, parent / day1.name)
    b = copy_folder(day1, parent / ("f" * 40))
    info = (b / "Info.plist").read_bytes().replace(day1.name.upper().encode(), (b"F" * 40))
    (b / "Info.plist").write_bytes(info)
    cli("init")
    out, _ = cli("import", parent, "--json")
    snaps = json.loads(out)["snapshots"]
    assert [s["status"] for s in snaps] == ["created", "created"]
    assert {s["udid"] for s in snaps} == {day1.name.upper(), "F" * 40}
    assert snaps[1]["summary"]["added_bytes"] < 0.02 * snaps[0]["summary"]["added_bytes"]
    _, err = cli("restore", "latest", tmp_path / "x", expect=2)
    assert "--device" in err
    cli("restore", "latest", "--device", "F" * 40, tmp_path / "x")
    assert tree_state(tmp_path / "x" / b.name) == tree_state(b)
    out, _ = cli("stats", "--json")
    st = json.loads(out)
    assert len(st["devices"]) == 2 and st["dedup_ratio"] > 1.9
    per = {s["id"]: s for s in st["snapshots_detail"]}
    assert set(per) == {s["id"] for s in snaps}
    first, second = per[snaps[0]["id"]], per[snaps[1]["id"]]
    assert abs(first["stored_bytes"] - second["stored_bytes"]) < 4096  # the same content but Info.plist
    assert first["added_bytes"] > 50 * second["added_bytes"]
    assert first["logical_bytes"] == snaps[0]["summary"]["total_bytes"]
    assert 1.0 < first["dedup_ratio"] < 2.0  # compression only, within one snapshot
    out, _ = cli("stats")
    assert snaps[0]["id"][:8] in out and "Dedup" in out
    out, _ = cli("snapshots", "--json", "--device", "F" * 40)
    assert [s["device"]["udid"] for s in json.loads(out)] == ["F" * 40]
