"""repair index rebuilds from the packs; repair snapshots rewrites snapshots without (and names) what is lost."""

import json

import pytest

from ibsync.format.pack import BlobType
from ibsync.reader.walk import collect_blobs
from ibsync.repo.repository import Repository
from ibsync.storage import LocalStorage
from ibsync.testing.generator import generate, mutate_folder

from conftest import PASSWORD, copy_folder, tree_state


@pytest.fixture(scope="module")
def day1(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("day1"), seed=31, size_bytes=16 << 20)


def test_repair_index_after_losing_an_index_object(env, cli, day1, tmp_path):
    cli("init", "--pack-size", "4")
    cli("import", day1)
    for obj in (env / "index").iterdir():
        obj.unlink()  # every index object lost
    _, err = cli("check", expect=1)
    assert "not in the index" in err
    out, _ = cli("repair", "index", "--json")
    assert json.loads(out)["damaged_packs"] == {} and json.loads(out)["blobs"] > 0
    cli("check", "--read-data")
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / day1.name) == tree_state(day1)


def test_repair_after_losing_a_pack(env, cli, day1, tmp_path):
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init", "--pack-size", "4")
    cli("import", live)
    state1 = tree_state(live)
    mutate_folder(live, seed=31)
    second = json.loads(cli("import", live, "--json")[0])["snapshots"][0]
    # lose a data pack only the second snapshot uses: the first snapshot stays whole
    repo = Repository.open(LocalStorage(env), lambda: PASSWORD)
    repo.load_index()
    used = {}
    for snap in repo.snapshots():
        blobs: set[bytes] = set()
        collect_blobs(repo, snap.tree, blobs)
        used[snap.id] = {repo.index.get(b).pack_id.hex() for b in blobs}
    tree_packs = {loc.pack_id.hex() for _, loc in repo.index.entries() if loc.type == BlobType.TREE}
    name = sorted(used[second["id"]] - set().union(*(v for k, v in used.items() if k != second["id"])) - tree_packs)[0]
    (env / "packs" / name[:2] / name).unlink()
    cli("check", expect=1)
    out, _ = cli("repair", "index", "--json")
    assert json.loads(out)["damaged_packs"] == {}
    out, _ = cli("repair", "snapshots", "--dry-run", "--json")
    damaged = json.loads(out)
    assert [d["id"] for d in damaged] == [second["id"]] and damaged[0]["lost_files"]
    assert (env / "snapshots" / second["id"]).exists()  # dry run removed nothing
    state2 = tree_state(live)
    out, _ = cli("repair", "snapshots", "--json")
    (done,) = json.loads(out)
    assert done["id"] == second["id"] and done["removed"] and done["lost_files"] == damaged[0]["lost_files"]
    cli("check", "--read-data")
    snaps = {s["id"]: s for s in json.loads(cli("snapshots", "--json")[0])}
    assert len(snaps) == 2 and second["id"] not in snaps and done["rewritten_as"] in snaps
    # the first snapshot is untouched; the rewritten second restores all but its lost files
    first = next(i for i in snaps if i != done["rewritten_as"])
    cli("restore", first, tmp_path / "out")
    assert tree_state(tmp_path / "out" / live.name) == state1
    cli("restore", done["rewritten_as"], tmp_path / "out1")
    assert tree_state(tmp_path / "out1" / live.name) == {k: v for k, v in state2.items() if k not in done["lost_files"]}
    # the next import stores the lost data again
    cli("import", live)
    cli("restore", "latest", tmp_path / "out2")
    assert tree_state(tmp_path / "out2" / live.name) == tree_state(live)


def test_repair_index_leaves_out_a_damaged_pack(env, cli, day1):
    cli("init", "--pack-size", "4")
    cli("import", day1)
    victim = next(p for p in (env / "packs").rglob("*") if p.is_file())
    data = bytearray(victim.read_bytes())
    data[-10] ^= 1  # inside the header
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    out, _ = cli("repair", "index", "--json")
    assert list(json.loads(out)["damaged_packs"]) == [victim.name]


def test_check_reports_and_repair_replaces_a_damaged_index_object(env, cli, day1, tmp_path):
    cli("init", "--pack-size", "4")
    cli("import", day1)
    obj = next((env / "index").iterdir())
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    out, err = cli("check", "--json", expect=1)  # a report, not a failure to open
    assert any(obj.name[:12] in e for e in json.loads(out)["errors"])
    cli("repair", "index")
    cli("check", "--read-data")
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / day1.name) == tree_state(day1)
