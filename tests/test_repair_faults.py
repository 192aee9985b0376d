"""repair under storage faults and after damage inside a pack.

A read that failed is not damage: repair index / packs / snapshots stop before they change
anything. A pack with a damaged blob (header intact) is salvaged by `repair packs`, and the
snapshots that used the lost blob are rewritten by `repair snapshots` without the files that
held it; every other file restores byte-identical. check warns (does not fail) about packs no
index lists, and names every stray file in the repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ibsync.format.index import PackIndex
from ibsync.maint.repair import read_pack_header
from ibsync.storage import Kind
from ibsync.testing import campaign
from ibsync.testing.faulty import Action, Fault
from ibsync.testing.generator import generate, mutate_folder

from conftest import copy_folder, one_line_error, open_repo, tree_state

READ_PACKS_FAILS = {
    "transient": Fault("get", Action.FAIL, kinds=frozenset({Kind.PACKS}), transient=True, times=None),
    "permanent": Fault("get", Action.FAIL, kinds=frozenset({Kind.PACKS}), transient=False, times=None),
}


@pytest.fixture(scope="module")
def day1(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("day1"), seed=41, size_bytes=1 << 20)


@pytest.fixture
def two_days(env, cli, day1, tmp_path):
    """A repository with two snapshots of one phone (day 1, day 2); returns the two folders'
    states by snapshot id, and the folder name."""
    live = copy_folder(day1, tmp_path / "live" / day1.name)
    cli("init")
    cli("import", live)
    states = {_newest(cli): tree_state(live)}
    mutate_folder(live, seed=41)
    cli("import", live)
    states[_newest(cli)] = tree_state(live)
    return states, live.name


def _snapshots(cli) -> list[dict]:
    return json.loads(cli("snapshots", "--json")[0])


def _newest(cli) -> str:
    return max(_snapshots(cli), key=lambda s: s["time"])["id"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _faulted(args: list, fault: Fault, tmp_path: Path) -> campaign.Outcome:
    return campaign.run_faulted(args, 0, [fault], tmp_path / "report.json")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def _pack_file(env: Path, pack_id: bytes) -> Path:
    name = pack_id.hex()
    return env / "packs" / name[:2] / name


def _damage_blob(env: Path, blob_id: bytes) -> str:
    """Flip a byte in the middle of a blob's stored bytes (the pack's header stays intact)."""
    loc = open_repo(env).index.get(blob_id)
    _flip(_pack_file(env, loc.pack_id), loc.offset + loc.length // 2)
    return loc.pack_id.hex()


# ---- a failed read is not damage --------------------------------------------------------------


@pytest.mark.parametrize("how", sorted(READ_PACKS_FAILS))
def test_repair_index_stops_at_a_pack_it_cannot_read(env, cli, two_days, tmp_path, how):
    index_before = sorted(p.name for p in (env / "index").iterdir())
    o = _faulted(["repair", "index"], READ_PACKS_FAILS[how], tmp_path)
    assert o.injected and o.code == 1, o.describe()
    one_line_error(o.err, "could not read pack", "nothing was changed", "run 'ibsync repair index' again")
    packs = [p.name for p in (env / "packs").rglob("*") if p.is_file()]
    assert any(f"pack {n[:12]}" in o.err for n in packs)
    assert sorted(p.name for p in (env / "index").iterdir()) == index_before
    cli("check", "--read-data")
    cli("repair", "index")  # and once the storage reads again, it completes


@pytest.mark.parametrize("how", sorted(READ_PACKS_FAILS))
def test_repair_snapshots_stops_at_a_tree_it_cannot_read(env, cli, two_days, tmp_path, how):
    states, _ = two_days
    o = _faulted(["repair", "snapshots"], READ_PACKS_FAILS[how], tmp_path)
    assert o.injected and o.code == 1, o.describe()
    one_line_error(o.err, "could not read tree", "nothing was changed", "run 'ibsync repair snapshots' again")
    assert sorted(s["id"] for s in _snapshots(cli)) == sorted(states)
    cli("check", "--read-data")
    out, _ = cli("repair", "snapshots")
    assert "no damaged snapshots" in out


def test_repair_snapshots_refuses_while_an_index_object_is_unreadable(env, cli, two_days):
    """What a skipped index object lists would look lost: the snapshots must not be touched."""
    states, _ = two_days
    for obj in (env / "index").iterdir():
        _flip(obj, obj.stat().st_size // 2)
    _, err = cli("repair", "snapshots", expect=1)
    assert "repair index' first" in err.strip().splitlines()[-1]
    assert sorted(s["id"] for s in _snapshots(cli)) == sorted(states)
    cli("repair", "index")
    cli("repair", "snapshots")
    assert sorted(s["id"] for s in _snapshots(cli)) == sorted(states)
    cli("check", "--read-data")


def test_repair_packs_stops_at_a_pack_it_cannot_read(env, cli, two_days, tmp_path):
    packs_before = sorted(p.name for p in (env / "packs").rglob("*") if p.is_file())
    index_before = sorted(p.name for p in (env / "index").iterdir())
    o = _faulted(["repair", "packs", "--read-data"], READ_PACKS_FAILS["permanent"], tmp_path)
    assert o.injected and o.code == 1, o.describe()
    one_line_error(o.err, "could not read pack", "nothing was deleted", "run 'ibsync repair packs' again")
    assert sorted(p.name for p in (env / "packs").rglob("*") if p.is_file()) == packs_before
    assert sorted(p.name for p in (env / "index").iterdir()) == index_before


def test_repair_packs_wants_packs_or_read_data(env, cli, two_days):
    _, err = cli("repair", "packs", expect=2)
    one_line_error(err, "name the packs to repair", "--read-data")
    _, err = cli("repair", "packs", "0000beef", expect=2)
    one_line_error(err, "no pack with id '0000beef'")


# ---- a damaged blob inside a pack whose header is intact ----------------------------------------


def _pick(env: Path, what: str) -> bytes:
    """A data blob of a file, a tree blob of a folder below the top, or the top tree of the
    newest snapshot."""
    repo = open_repo(env)
    snap = repo.snapshots()[-1]
    root = repo.load_tree(snap.tree)
    if what == "root":
        return snap.tree
    folder = next(n for n in root if n.type == "dir" and n.subtree)
    if what == "tree":
        return folder.subtree
    return next(n for n in repo.load_tree(folder.subtree) if n.type == "file" and n.content).content[0]


def _expected_after(state: dict[str, tuple], removed: list[str]) -> dict[str, tuple]:
    def gone(rel: str) -> bool:
        return any(rel == r.rstrip("/") or rel.startswith(r if r.endswith("/") else r + "/") for r in removed)

    return {k: v for k, v in state.items() if not gone(k)}


@pytest.mark.parametrize("what", ["data", "tree"])
def test_repair_packs_then_snapshots_rewrites_what_lost_a_blob(env, cli, two_days, tmp_path, what):
    states, name = two_days
    before = {s["id"]: s for s in _snapshots(cli)}
    pack = _damage_blob(env, _pick(env, what))
    out, err = cli("check", "--read-data", expect=1)
    assert f"pack {pack[:12]}" in err and f"ibsync repair packs {pack[:12]}" in out
    cli("repair", "index")  # the header is intact: the index keeps the pack
    cli("check", "--read-data", expect=1)

    out, _ = cli("repair", "packs", pack[:12], "--json")
    report = json.loads(out)["damaged"][pack]
    assert report["deleted"] and len(report["blobs_lost"]) == 1 and report["blobs_salvaged"] > 0
    assert not _pack_file(env, bytes.fromhex(pack)).exists()
    out, err = cli("check", expect=1)
    assert "not in the index" in err or "unreadable" in err

    out, _ = cli("repair", "snapshots", "--dry-run", "--json")
    planned = json.loads(out)
    assert planned and all(d["lost_files"] or d["lost_folders"] for d in planned)
    assert sorted(s["id"] for s in _snapshots(cli)) == sorted(before)  # a dry run changes nothing

    out, _ = cli("repair", "snapshots", "--json")
    done = json.loads(out)
    assert [d["id"] for d in done] == [d["id"] for d in planned]
    cli("check", "--read-data")
    after = {s["id"]: s for s in _snapshots(cli)}
    assert len(after) == len(before)
    repo = open_repo(env)
    for d in done:
        assert d["removed"] and d["rewritten_as"] in after and d["id"] not in after
        new = repo.load_snapshot(d["rewritten_as"])
        old = before[d["id"]]
        assert new.source["repaired_from"] == d["id"]
        assert (after[d["rewritten_as"]]["backup_date"], after[d["rewritten_as"]]["time"]) == (
            old["backup_date"],
            old["time"],
        )
        removed = new.source["removed"]
        assert removed == sorted([f"{p}/" for p in d["lost_folders"]] + d["lost_files"])
        target = tmp_path / d["id"][:8]
        cli("restore", d["rewritten_as"], target)
        assert tree_state(target / name) == _expected_after(states[d["id"]], removed)
    for sid in set(before) - {d["id"] for d in done}:  # an untouched snapshot restores whole
        cli("restore", sid, tmp_path / sid[:8])
        assert tree_state(tmp_path / sid[:8] / name) == states[sid]


def test_repair_snapshots_removes_a_snapshot_whose_top_folder_is_lost(env, cli, two_days, tmp_path):
    states, name = two_days
    newest = _newest(cli)
    pack = _damage_blob(env, _pick(env, "root"))
    cli("repair", "packs", pack)
    out, _ = cli("repair", "snapshots")
    assert f"snapshot {newest[:8]}" in out and "its top folder is lost" in out
    assert newest not in {s["id"] for s in _snapshots(cli)}
    cli("check", "--read-data")
    for s in _snapshots(cli):  # the older snapshot has its own top folder
        cli("restore", s["id"], tmp_path / s["short_id"])
        assert tree_state(tmp_path / s["short_id"] / name) == _expected_after(
            states[s["source"]["repaired_from"]] if "repaired_from" in s.get("source", {}) else states[s["id"]],
            s.get("source", {}).get("removed", []),
        )


def test_rewriting_is_repeatable_after_an_interruption(env, cli, two_days, tmp_path):
    """Stopped between saving the rewritten snapshot and removing the original: the next run
    keeps the rewrite already saved (no second copy) and removes the original."""
    pack = _damage_blob(env, _pick(env, "data"))
    cli("repair", "packs", pack)
    o = _faulted(
        ["repair", "snapshots", "--json"],
        Fault("delete", Action.FAIL, kinds=frozenset({Kind.SNAPSHOTS}), times=None),
        tmp_path,
    )
    assert o.code == 1 and "could not delete snapshots/" in o.err, o.describe()
    first = {d["id"]: d["rewritten_as"] for d in json.loads(o.out)}
    assert set(first) <= {s["id"] for s in _snapshots(cli)}  # originals still there, beside their rewrites
    out, _ = cli("repair", "snapshots", "--json")
    assert {d["id"]: d["rewritten_as"] for d in json.loads(out)} == first
    assert sorted(s["id"] for s in _snapshots(cli)) == sorted(first.values())
    cli("check", "--read-data")


def test_repair_packs_recovers_every_blob_of_swapped_packs(env, cli, two_days, tmp_path):
    """Two packs' contents swapped: both misnamed, every blob intact. repair index leaves them
    out; repair packs stores their blobs again and deletes both (their headers authenticate);
    no snapshot loses anything."""
    states, name = two_days
    a, b = sorted((p for p in (env / "packs").rglob("*") if p.is_file()), key=lambda p: p.name)[:2]
    da, db = a.read_bytes(), b.read_bytes()
    a.chmod(0o644), b.chmod(0o644)
    a.write_bytes(db), b.write_bytes(da)
    cli("repair", "index")
    out, _ = cli("repair", "packs", "--read-data", "--json")
    doc = json.loads(out)
    assert sorted(doc["damaged"]) == sorted([a.name, b.name])
    assert all(d["deleted"] and not d["blobs_lost"] for d in doc["damaged"].values())
    out, _ = cli("repair", "snapshots")
    assert "no damaged snapshots" in out
    cli("check", "--read-data")
    for sid, state in states.items():
        cli("restore", sid, tmp_path / sid[:8])
        assert tree_state(tmp_path / sid[:8] / name) == state


# ---- check: what no index uses is a warning; strays are named -------------------------------------


def test_check_warns_about_an_unindexed_pack_that_does_not_authenticate(env, cli, two_days):
    victim = max((p for p in (env / "packs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cli("repair", "index")
    cli("repair", "snapshots")
    out, _ = cli("check", "--read-data", "--json")
    doc = json.loads(out)
    assert doc["ok"] and not doc["errors"]
    assert any(victim.name in w and "not an ibsync pack" in w and "left in place" in w for w in doc["warnings"])
    assert victim.exists()  # not ours to delete
    cli("prune")
    assert victim.exists()


def test_check_counts_authenticated_leftovers_as_a_warning(env, cli, two_days):
    """A pack no index lists whose header authenticates (what an interrupted import leaves) is
    a leftover prune removes (a guard: check said so before this change too)."""
    repo = open_repo(env)
    pack = next(iter(repo.index.packs())).hex()
    for obj in (env / "index").iterdir():
        obj.unlink()
    # an index of every pack but one: that one is left over
    infos = {i.name: i.size for i in repo.storage.list(Kind.PACKS)}
    repo.save_full_index(
        PackIndex(bytes.fromhex(n), read_pack_header(repo, n, s)) for n, s in sorted(infos.items()) if n != pack
    )
    out, _ = cli("check", "--json", expect=1)  # the snapshots need that pack's blobs
    doc = json.loads(out)
    assert any("1 pack(s) not in any index" in w and "prune removes them" in w for w in doc["warnings"])


def test_check_names_strays_as_warnings(env, cli, two_days, tmp_path):
    planted = {
        "index/notes.txt": "file",
        "snapshots/" + "ab" * 32 + "/": "folder",
        "locks/" + "cd" * 32: "link",
    }
    (env / "index" / "notes.txt").write_text("mine")
    (env / "snapshots" / ("ab" * 32)).mkdir()
    (tmp_path / "elsewhere").write_text("x")
    os.symlink(tmp_path / "elsewhere", env / "locks" / ("cd" * 32))
    out, _ = cli("check", "--json")
    doc = json.loads(out)
    assert doc["ok"]
    for path in planted:
        path = path.rstrip("/")
        assert path in doc["strays"], doc["strays"]
        assert any(w.startswith(f"{path}: not an ibsync object") for w in doc["warnings"])
    _, err = cli("check")
    assert "warning: index/notes.txt: not an ibsync object" in err
    assert (env / "index" / "notes.txt").read_text() == "mine"


def test_repair_packs_leaves_a_file_that_is_not_ours(env, cli, two_days):
    """A file in packs/ named like a pack whose bytes are not ibsync's: named, never deleted,
    and the index is not rewritten for it (no index lists it)."""
    junk = env / "packs" / "ee" / ("ee" * 32)
    junk.parent.mkdir(exist_ok=True)
    junk.write_bytes(os.urandom(5000))
    index_before = sorted(p.name for p in (env / "index").iterdir())
    out, err = cli("repair", "packs", "--read-data", "--json")
    doc = json.loads(out)
    assert list(doc["damaged"]) == [junk.name] and not doc["damaged"][junk.name]["deleted"]
    assert f"pack {junk.name[:12]} left in place: not authenticated" in err
    assert junk.exists() and sorted(p.name for p in (env / "index").iterdir()) == index_before
    cli("check", "--read-data")
