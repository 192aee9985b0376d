"""Repository format 2: trees as msgpack nodes cut at content-defined boundaries (design §10).

The format-1 fixture ``tests/fixtures/repo-v1`` was made by ibsync 0.1 (format 1, before this
change) with ``ibsync init`` and two ``ibsync import --allow-unfinished`` of a copy of the MIT
sample backup (folder name ``dev``; the only file in ``12/`` got ``b"day two\\n"`` appended
before the second import), password ``conftest.PASSWORD``, ``FAST_KDF``.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ibsync.errors import IbsyncError
from ibsync.format.pack import BlobType
from ibsync.model import MalformedTree, encode_tree, split_entries
from ibsync.reader.walk import collect_blobs, rejected_entries
from ibsync.repo import trees
from ibsync.repo.repository import Repository
from ibsync.storage import Kind, LocalStorage

from conftest import FAST_KDF, FIXTURES, MIT_BACKUP, PASSWORD, copy_folder, one_line_error, open_repo, tree_state

V1_FIXTURE = FIXTURES / "repo-v1"
T = 1_700_000_000_000_000_000


def fresh_repo(path: Path, encrypted: bool = True) -> Repository:
    return Repository.init(LocalStorage(path), PASSWORD if encrypted else None, kdf=FAST_KDF)


def file_id(i: int) -> str:
    return hashlib.sha1(f"HomeDomain-file-{i}".encode()).hexdigest()


def blob(i: int, salt: str = "") -> str:
    return hashlib.sha256(f"{salt}{i}".encode()).hexdigest()


def a_file(name: str, ids: list[str], size: int = 1000) -> dict:
    return {"name": name, "type": "file", "mode": 0o100644, "mtime_ns": T, "size": size, "content": ids}


def fileid_folder(n: int) -> list[dict]:
    return [a_file(file_id(i), [blob(i)], 1000 + i) for i in range(n)]


def sort_key(d):
    return d["name"].encode("utf-8", "surrogatepass")


def stored_bytes(built: trees.BuiltTree, before: set[bytes] = frozenset()) -> int:
    return sum(len(data) for node_id, data in built.blobs.items() if node_id not in before)


class Reads:
    """Counts the blobs a repository reads (instrumentation around the real load_blob)."""

    def __init__(self, repo: Repository) -> None:
        self.count = 0
        self._load = repo.load_blob
        repo.load_blob = self  # type: ignore[method-assign]

    def __call__(self, blob_id: bytes) -> bytes:
        self.count += 1
        return self._load(blob_id)


# ---- the format -----------------------------------------------------------------------------


def test_new_repositories_are_version_2_and_imports_write_nodes(env, cli):
    cli("init")
    assert json.loads((env / "config").read_bytes())["version"] == 2
    cli("import", "--allow-unfinished", MIT_BACKUP)
    repo = open_repo(env)
    snap = repo.snapshots()[-1]
    assert trees.is_node(repo.load_blob(snap.tree))
    assert {n.name for n in repo.load_tree(snap.tree)} == {p.name for p in MIT_BACKUP.iterdir()}


@pytest.mark.parametrize("encrypted", [True, False])
def test_entries_round_trip_exactly(tmp_path, encrypted):
    repo = fresh_repo(tmp_path / "repo", encrypted)
    rnd = random.Random(7)
    entries = fileid_folder(3000)
    entries += [
        {"name": "sub", "type": "dir", "mode": 0o40755, "mtime_ns": -5, "subtree": blob(1)},
        {"name": "nosub", "type": "dir", "mode": 0o40755, "mtime_ns": 0, "subtree": None},
        {"name": "link", "type": "symlink", "mode": 0o120777, "mtime_ns": T, "target": "../x"},
        {"name": "empty", "type": "file", "mode": 0o100600, "mtime_ns": T, "size": 0, "content": []},
        {
            "name": "big",
            "type": "file",
            "mode": 0o100600,
            "mtime_ns": T,
            "size": 5 << 30,
            "content": [blob(i, "big") for i in range(5000)],
        },
        {
            "name": "caf\u00e9 \U0001f600",
            "type": "file",
            "mode": 0o100644,
            "mtime_ns": 1,
            "size": 1,
            "content": [blob(9)],
        },
        {"name": "raw\udcff", "type": "file", "mode": 0o100644, "mtime_ns": 1, "size": 1, "content": [blob(8)]},
    ]
    rnd.shuffle(entries)
    with repo.write_session() as s:
        tid = s.save_tree(entries)
    repo = open_repo(tmp_path / "repo") if encrypted else Repository.open(LocalStorage(tmp_path / "repo"), lambda: "")
    repo.load_index()
    assert repo.load_tree_entries(tid) == sorted(entries, key=sort_key)
    parts = repo.tree_parts(tid)
    assert parts[0] == tid and len(parts) == len(set(parts)) > 20  # split, plus the id-list nodes of "big"
    assert all(repo.index.get(p).type is BlobType.TREE for p in parts)
    assert [n.name for n in repo.load_tree(tid)] == [d["name"] for d in sorted(entries, key=sort_key)]
    # one canonical encoding: the order of entries and of their keys does not matter
    shuffled = [dict(reversed(list(d.items()))) for d in reversed(entries)]
    assert repo.build_tree(shuffled).id == tid


def test_a_small_folder_is_one_leaf(tmp_path):
    repo = fresh_repo(tmp_path / "repo")
    built = repo.build_tree(fileid_folder(5))
    assert list(built.blobs) == [built.id]
    node = msgpack.unpackb(built.blobs[built.id])
    assert node[:2] == [1, 0] and len(node[2]) == 5


def test_changed_entries_rewrite_a_few_small_nodes(tmp_path):
    """20 of 4,000 fileID entries change: format 1 stores the whole folder again; format 2 a
    few leaves and the path above them (figures: design §26)."""
    repo = fresh_repo(tmp_path / "repo")
    old = fileid_folder(4000)
    new = [dict(d) for d in old]
    changed = random.Random(3).sample(range(4000), 20)
    for i in changed:
        new[i]["content"] = [blob(i, "day2")]
        new[i]["mtime_ns"] += 1
    a, b = repo.build_tree(old), repo.build_tree(new)
    added = stored_bytes(b, set(a.blobs))
    whole = stored_bytes(b)
    changed_own = sum(len(trees.pack_entry(new[i], lambda ids: b"")) for i in changed)
    assert added < whole / 6, (added, whole)
    assert added < len(encode_tree(new)) / 15
    assert added < 30 * changed_own, (added, changed_own)


def test_diff_and_lookup_read_only_what_changed(tmp_path):
    repo = fresh_repo(tmp_path / "repo")
    old = fileid_folder(4000)
    new = [dict(d) for d in old]
    for i in (10, 2000, 3999):
        new[i]["size"] += 1
    del new[500]
    new.append(a_file("zz-new", [blob(1, "n")]))
    with repo.write_session() as s:
        ta, tb = s.save_tree(old), s.save_tree(new)
    nodes = len(repo.tree_parts(tb))
    reads = Reads(repo)
    diff = list(trees.diff_folder(repo, ta, tb))
    assert reads.count < nodes / 4, (reads.count, nodes)
    names = [(o or n)["name"] for o, n in diff]
    assert names == sorted([file_id(10), file_id(2000), file_id(3999), file_id(500), "zz-new"])
    by_name = {(o or n)["name"]: (o, n) for o, n in diff}
    assert by_name[file_id(500)] == (old[500], None) and by_name["zz-new"] == (None, new[-1])
    assert by_name[file_id(10)] == (old[10], new[10])
    levels = msgpack.unpackb(repo.load_blob(tb))[1] + 1
    reads.count = 0
    assert trees.lookup(repo, tb, file_id(77)) == old[77]
    assert trees.lookup(repo, tb, file_id(500)) is None
    assert trees.lookup(repo, tb, "zz-new") == new[-1]
    assert reads.count == 3 * levels < 20, (reads.count, levels)  # one node per level
    assert list(trees.diff_folder(repo, ta, ta)) == []
    assert [n["name"] for _, n in trees.diff_folder(repo, None, tb)] == sorted(d["name"] for d in new)


def test_a_long_content_list_is_stored_apart_and_shared(tmp_path):
    """Manifest.db of a real phone: ~37,500 blocks of 32 KiB. 1 % of them change."""
    repo = fresh_repo(tmp_path / "repo")
    ids = [blob(i, "manifest") for i in range(37_500)]
    changed = [i for i in random.Random(5).sample(range(37_500), 375)]
    ids2 = list(ids)
    for i in changed:
        ids2[i] = blob(i, "manifest-day2")
    others = [
        a_file("Info.plist", [blob(1, "i")]),
        {"name": "00", "type": "dir", "mode": 0o40755, "mtime_ns": T, "subtree": blob(2)},
    ]
    root1 = others + [a_file("Manifest.db", ids, 37_500 * 32768)]
    root2 = others + [a_file("Manifest.db", ids2, 37_500 * 32768)]
    root3 = [dict(d, mtime_ns=T + 1) if d["name"] == "Info.plist" else d for d in root1]
    with repo.write_session() as s:
        t1, t2, t3 = s.save_tree(root1), s.save_tree(root2), s.save_tree(root3)
    b1, b2 = repo.build_tree(root1), repo.build_tree(root2)
    full = len(json.dumps(ids))
    added = stored_bytes(b2, set(b1.blobs))
    assert added < full / 3, (added, full)
    assert repo.load_tree_entries(t2)[2]["content"] == ids2
    # comparing the list by its id reads no list node
    reads = Reads(repo)
    k1, k2, k3 = (trees.content_id(repo, t, "Manifest.db") for t in (t1, t2, t3))
    assert k1 == k3 != k2 and len(k1) == 32
    assert reads.count == 3
    assert trees.content_id(repo, t1, "Info.plist") == trees.content_id(repo, t3, "Info.plist")
    assert trees.content_id(repo, t1, "00") is None and trees.content_id(repo, t1, "nothing") is None
    # an unchanged Manifest.db is not part of a diff, and its list nodes are not read
    reads.count = 0
    assert [(o["name"], n["name"]) for o, n in trees.diff_folder(repo, t1, t3)] == [("Info.plist", "Info.plist")]
    assert reads.count == 2


def test_format_1_trees_stay_readable_in_a_format_2_repository(tmp_path):
    repo = fresh_repo(tmp_path / "repo")
    entries = fileid_folder(50)
    with repo.write_session() as s:
        old, _ = s.save_blob(BlobType.TREE, encode_tree(entries))
        new = s.save_tree(entries[1:])
    assert repo.load_tree_entries(old) == sorted(entries, key=sort_key)
    assert repo.tree_parts(old) == [old]
    assert [(o["name"], n) for o, n in trees.diff_folder(repo, old, new)] == [(entries[0]["name"], None)]
    assert trees.lookup(repo, old, entries[3]["name"]) == entries[3]


# ---- untrusted nodes ------------------------------------------------------------------------


def save_raw(repo: Repository, *nodes) -> list[bytes]:
    with repo.write_session() as s:
        return [s.save_blob(BlobType.TREE, n if isinstance(n, bytes) else msgpack.packb(n))[0] for n in nodes]


def leaf(*items) -> list:
    return [1, 0, list(items)]


def pos(name, ids=None):
    return [name, 0, 0o100644, T, 3, b"".join(bytes.fromhex(i) for i in (ids or [blob(0)]))]


def test_a_name_stored_in_two_leaves_is_refused_in_both(tmp_path):
    repo = fresh_repo(tmp_path / "repo")
    l1, l2 = save_raw(repo, leaf(pos("a"), pos("b")), leaf(pos("b"), pos("c")))
    (top,) = save_raw(repo, [1, 1, [b"", b"b"], l1 + l2])
    tree = repo.load_tree(top)
    assert [n.name for n in tree] == ["a", "c"]
    assert {(r.name, r.reason) for r in tree.rejected} == {("b", "its name appears 2 times in its folder")}
    assert sorted(repo.tree_parts(top)) == sorted([top, l1, l2])


def test_malformed_entries_are_refused_by_name(tmp_path):
    repo = fresh_repo(tmp_path / "repo")
    bad_list = save_raw(repo, [2, 0, bytes.fromhex(blob(1)) * 3])[0]
    items = [
        pos("../up"),
        ["badtype", 7, 0o644, T, 1],
        ["file-as-code", "file", 0o644, T, 1, b""],
        ["short", 0, 0o644, T, 1],
        ["oddids", 0, 0o644, T, 1, b"x" * 33],
        ["baddir", 1, 0o755, T, b"x" * 5],
        ["badlist", 0, 0o644, T, 1, [bad_list, 5]],  # the list holds 3 ids, not 5
        ["biglist", 0, 0o644, T, 1, [bad_list, 1 << 40]],
        ["emptylink", 2, 0o777, T, ""],
        json.dumps({"name": "rawbad", "type": "file", "mode": "x", "mtime_ns": 1}),
        "not json {",
        17,
        pos("ok"),
    ]
    (top,) = save_raw(repo, leaf(*items))
    tree = repo.load_tree(top)
    assert [n.name for n in tree] == ["ok"]
    refused = {r.name: r.reason for r in tree.rejected}
    assert set(refused) >= {
        "../up",
        "badtype",
        "file-as-code",
        "short",
        "oddids",
        "baddir",
        "badlist",
        "biglist",
        "emptylink",
        "rawbad",
    }
    assert refused["badlist"] == "its size or content is malformed"
    assert refused["file-as-code"].startswith("its type")
    assert len(tree.rejected) == len(items) - 1
    paths = dict(rejected_entries(repo, top))
    assert paths["../up"].startswith("refused: its name")


@pytest.mark.parametrize(
    "case",
    ["child level", "level too high", "node twice", "not msgpack", "wrong kind", "keys and ids differ", "list level"],
)
def test_malformed_nodes_make_the_folder_unreadable(tmp_path, case):
    repo = fresh_repo(tmp_path / "repo")
    (l1,) = save_raw(repo, leaf(pos("a")))
    (inner,) = save_raw(repo, [1, 1, [b""], l1])
    (lst,) = save_raw(repo, [2, 1, bytes.fromhex(blob(1))])  # claims to list list nodes; holds a data id
    top = {
        "child level": [1, 2, [b""], l1],
        "level too high": [1, trees.MAX_LEVEL + 1, [b""], inner],
        "node twice": [1, 1, [b"", b"b"], l1 + l1],
        "not msgpack": b"\x93\xc1\xc1\xc1",
        "wrong kind": [2, 0, l1],
        "keys and ids differ": [1, 1, [b"", b"b"], l1],
        "list level": leaf(["m", 0, 0o644, T, 1, [lst, 1]]),
    }[case]
    (tid,) = save_raw(repo, top)
    if case == "list level":
        with pytest.raises(IbsyncError):
            repo.load_blob(bytes.fromhex(blob(1)))  # the list's child is missing: the folder cannot read
        with pytest.raises(IbsyncError):
            repo.load_tree(tid)
        return
    with pytest.raises(MalformedTree):
        repo.load_tree(tid)
    with pytest.raises(MalformedTree):
        list(trees.diff_folder(repo, None, tid)) if case != "node twice" else repo.tree_parts(tid)


def test_a_hostile_v2_tree_restores_only_its_safe_entries(env, cli, tmp_path):
    cli("init")
    repo = open_repo(env)
    with repo.write_session() as s:
        data, _ = s.save_blob(BlobType.DATA, b"hello")
        link = {"name": "x", "type": "symlink", "mode": 0o120777, "mtime_ns": T, "target": "/etc"}
        sub = s.save_tree([a_file("inside", [data.hex()], 5)])
        folder = {"name": "x", "type": "dir", "mode": 0o40755, "mtime_ns": T, "subtree": sub.hex()}
        root = s.save_tree([link, folder, a_file("good", [data.hex()], 5), a_file("..", [data.hex()], 5)])
    from datetime import datetime

    from ibsync.model import DeviceInfo, Snapshot

    repo.save_snapshot(
        Snapshot(
            time=datetime.now(UTC),
            tree=root,
            device=DeviceInfo(udid="U1"),
            backup_date=None,
            ios_encrypted=False,
            source={"kind": "folder", "path": "/x"},
        )
    )
    _, err = cli("restore", "latest", tmp_path / "out", expect=1)
    partial = tmp_path / "out" / ".U1.ibsync-partial"  # where restore leaves what it could restore
    assert sorted(str(p.relative_to(partial)) for p in (partial / "U1").rglob("*")) == ["U1/good"]
    assert (partial / "U1" / "good").read_bytes() == b"hello"
    assert "appears 2 times" in err and "'..'" in err


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.binary(max_size=40) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=5),
    max_leaves=20,
)
_items = st.one_of(
    _values,
    st.tuples(st.text(max_size=4) | st.binary(max_size=3), st.integers(-1, 3), _values, _values, _values).map(list),
    st.tuples(
        st.text(max_size=4),
        st.just(0),
        st.integers(0, 7),
        st.integers(0, 7),
        st.integers(0, 9),
        st.binary(max_size=70) | st.tuples(st.binary(min_size=32, max_size=32), st.integers(-2, 5)).map(list),
    ).map(list),
)
_nodes = st.tuples(st.integers(0, 3), st.integers(-1, 3), st.lists(_items, max_size=6)).map(list) | st.tuples(
    st.integers(1, 2), st.integers(0, 3), st.lists(st.binary(max_size=4), max_size=3), st.binary(max_size=100)
).map(list)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=200).map(lambda b: b"\x93" + b),
        _values.map(msgpack.packb),
        _nodes.map(msgpack.packb),
    )
)
def test_node_decoding_is_total(data):
    for kind in (trees.FOLDER_NODE, trees.LIST_NODE):
        try:
            node = trees.parse_node(data, kind)
        except MalformedTree:
            continue
        if kind == trees.FOLDER_NODE and node[1] == 0:
            entries = [trees.unpack_entry(item, lambda ref: None) for item in node[2]]
            split_entries(entries)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "name": st.text(min_size=1, max_size=12),
                "type": st.sampled_from(["file", "dir", "symlink"]),
                "mode": st.integers(0, 1 << 32),
                "mtime_ns": st.integers(-(1 << 63), (1 << 63) - 1),
                "size": st.integers(0, 1 << 40),
                "ids": st.lists(st.binary(min_size=32, max_size=32), max_size=3),
                "target": st.text(max_size=5),
            }
        ),
        max_size=30,
    )
)
def test_entry_encoding_round_trips(raw):
    """Every dict-form entry, well-formed or not, comes back as it went in."""
    entries = []
    for r in raw:
        d = {"name": r["name"], "type": r["type"], "mode": r["mode"], "mtime_ns": r["mtime_ns"]}
        if r["type"] == "file":
            d.update(size=r["size"], content=[i.hex() for i in r["ids"]])
        elif r["type"] == "dir":
            d["subtree"] = r["ids"][0].hex() if r["ids"] else None
        else:
            d["target"] = r["target"]
        entries.append(d)
    stored = {}
    built = trees.TreeBuilder(lambda b: hashlib.blake2b(b, digest_size=32).digest()).folder(entries)
    stored.update(built.blobs)

    class Store:
        def load_blob(self, i):
            return stored[i]

    got, parts = trees.read_folder(Store(), built.id, stored[built.id])  # type: ignore[arg-type]
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, entries))
    assert set(parts) == set(stored)


# ---- format 1 repositories, upgrade ---------------------------------------------------------


def test_a_version_1_repository_upgrades_in_place(env, cli, tmp_path, monkeypatch):
    copy_folder(V1_FIXTURE, env)
    day = copy_folder(MIT_BACKUP, tmp_path / "dev")
    (changed,) = list((MIT_BACKUP / "12").iterdir())
    # read with this ibsync: both snapshots, byte for byte
    out, _ = cli("snapshots", "--json")
    first, second = [s["id"] for s in json.loads(out)]
    for snap, extra in ((first, b""), (second, b"day two\n")):
        cli("restore", snap, tmp_path / snap)
        restored = tmp_path / snap / "dev"
        for p in MIT_BACKUP.rglob("*"):
            if p.is_file():
                want = p.read_bytes() + (extra if p.name == changed.name else b"")
                assert (restored / p.relative_to(MIT_BACKUP)).read_bytes() == want
    assert "12e90d5b620bbdeaaa88de34607ebf880fa708f5" in cli("ls", "latest", "*")[0] or cli("ls", "latest")[0]
    cli("find", "*")
    cli("check", "--read-data")
    before = {s: tree_state(tmp_path / s / "dev") for s in (first, second)}
    # an import into it still writes format-1 trees: an older ibsync can read the repository
    (day / "Info.plist").touch()
    cli("import", "--allow-unfinished", day)
    repo = open_repo(env)
    (third,) = [s for s in repo.snapshots() if s.id not in (first, second)]  # the copy's date sorts first
    assert repo.config["version"] == 1 and not trees.is_node(repo.load_blob(third.tree))
    key_files = sorted(p.name for p in (env / "keys").iterdir())
    repo_id = repo.id
    out, _ = cli("upgrade")
    assert "from format version 1 to 2" in out
    assert "already has format version 2" in cli("upgrade")[0]
    config = json.loads((env / "config").read_bytes())
    assert config["version"] == 2 and config["id"] == repo_id
    assert sorted(p.name for p in (env / "keys").iterdir()) == key_files
    (day / "12" / changed.name).write_bytes(b"day four\n")
    cli("import", "--allow-unfinished", day)
    repo = open_repo(env)
    (fourth,) = [s for s in repo.snapshots() if s.id not in (first, second, third.id)]
    assert trees.is_node(repo.load_blob(fourth.tree))
    for snap in (first, second):
        cli("restore", snap, tmp_path / "again" / snap)
        assert tree_state(tmp_path / "again" / snap / "dev") == before[snap]
    cli("restore", fourth.id, tmp_path / "fourth")
    assert (tmp_path / "fourth" / "dev" / "12" / changed.name).read_bytes() == b"day four\n"
    cli("forget", first, second)
    cli("prune", "--repack-threshold", "0")
    cli("check", "--read-data")
    cli("restore", third.id, tmp_path / "third")
    assert (tmp_path / "third" / "dev" / "12" / changed.name).read_bytes() == changed.read_bytes()


@pytest.mark.parametrize(
    "version, needle",
    [(3, "format 3"), (0, "version is not a positive integer"), ("2", "version is not a positive integer")],
)
def test_config_versions_this_ibsync_cannot_read_are_refused(env, cli, version, needle):
    cli("init", "--no-encryption")
    config = json.loads((env / "config").read_bytes())
    config["version"] = version
    (env / "config").write_text(json.dumps(config))
    _, err = cli("snapshots", expect=1)
    one_line_error(err, needle)


def test_upgrade_keeps_an_unencrypted_repository_unencrypted(env, cli, monkeypatch):
    monkeypatch.delenv("IBSYNC_PASSWORD")
    storage = LocalStorage(env)
    config = dict(Repository.init(storage, None).config, version=1)  # as an unencrypted 0.1 made it
    storage.put(Kind.CONFIG, "config", json.dumps(config).encode())
    cli("upgrade")
    config = json.loads((env / "config").read_bytes())
    assert config["version"] == 2 and config["encryption"] == "none" and "mac" not in config
    cli("import", "--allow-unfinished", MIT_BACKUP)
    cli("check", "--read-data")


# ---- prune keeps every node -----------------------------------------------------------------


def test_prune_keeps_every_node_blob(env, cli, tmp_path):
    """A folder split into many leaves and a sqlite file whose block list is stored apart,
    changed between two imports; the first snapshot forgotten, prune, everything restores."""
    day = copy_folder(MIT_BACKUP, tmp_path / "dev")
    many = day / "ab"
    many.mkdir()
    for i in range(400):
        (many / file_id(i)).write_bytes(f"file {i}\n".encode())
    db = day / "Big.sqlite"
    db.write_bytes(b"SQLite format 3\0" + bytes(range(256)) * 1024 * 12)  # 3 MiB: 96 blocks
    cli("init")
    cli("import", "--allow-unfinished", day)
    for i in range(0, 400, 37):
        (many / file_id(i)).write_bytes(b"changed\n")
    data = bytearray(db.read_bytes())
    data[40000:40010] = b"x" * 10
    db.write_bytes(bytes(data))
    cli("import", "--allow-unfinished", day)
    repo = open_repo(env)
    first, second = repo.snapshots()
    used: set[bytes] = set()
    collect_blobs(repo, second.tree, used)
    root = {n.name: n for n in repo.load_tree(second.tree)}
    ab_parts = repo.tree_parts(root["ab"].subtree)
    assert len(ab_parts) > 5 and set(ab_parts) <= used
    assert len(repo.tree_parts(second.tree)) > 1 and set(repo.tree_parts(second.tree)) <= used  # the block list
    cli("forget", first.id)
    cli("prune", "--repack-threshold", "0")
    cli("check", "--read-data")
    before = tree_state(day)
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / "dev") == before


# ---- fast reading and rebuilding (issue 9: format 2 as cheap per entry as format 1) ------------


def _hasher(b: bytes) -> bytes:
    return hashlib.blake2b(b, key=b"k" * 32, digest_size=32).digest()


_HOSTILE_FIELDS = [
    [b"", "ab", "Manifest.db", "..", b"\x01" * 128, None],  # name
    [False, True, 2, 7, None],  # type code
    [-1, 1 << 32, True, None],  # mode
    [1 << 63, -(1 << 63) - 1, 1.5, False],  # mtime_ns
    [-1, 1 << 63, None, b"\x01" * 32, "x", True],  # size
    [b"\x04" * 33, b"\x05" * (33 * 32), None, [b"\x06" * 32, 40], "t", [b"\x06" * 31, 40]],  # ids
]


def _hostile(item: list, field: int, value: object) -> list:
    item = list(item)
    if field >= 0:
        item[field] = value
    return item


# items in the positional form a writer makes (the fast path's), and each with one field wrong
_fast_shaped = st.one_of(
    st.tuples(
        st.binary(min_size=1, max_size=3),
        st.just(0),
        st.just(0o100644),
        st.just(T),
        st.integers(0, 9),
        st.sampled_from([b"", b"\x02" * 32, b"\x03" * 64]),
    ).map(list),
    st.tuples(
        st.binary(min_size=1, max_size=2),
        st.just(1),
        st.just(0o40755),
        st.just(T),
        st.sampled_from([None, b"\x07" * 32, b"\x07" * 31, b""]),
    ).map(list),
).flatmap(
    lambda item: st.integers(-1, len(item) - 1).flatmap(
        lambda f: st.sampled_from(_HOSTILE_FIELDS[f] if f >= 0 else [None]).map(lambda v: _hostile(item, f, v))
    )
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_fast_shaped | _items, max_size=12))
def test_fast_split_refuses_exactly_what_split_entries_refuses(items):
    """The shape-checked fast path of read_folder_split gives what unpack_entry + split_entries
    give, for hostile items too (duplicates across fast and slow items, bools for ints, ids of
    the wrong length, integers out of range)."""
    expand = lambda ref: None  # noqa: E731
    good, rejected, reuse = trees.split_items(items, expand)
    want_good, want_rejected = split_entries([trees.unpack_entry(i, expand) for i in items])
    assert good == want_good
    assert [(r.name, r.reason, r.entry) for r in rejected] == [(r.name, r.reason, r.entry) for r in want_rejected]
    assert all(any(d is g for g in good) for d, _ in reuse.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_fast_shaped | _items, max_size=12), st.data())
def test_a_rebuild_from_read_entries_is_the_from_scratch_tree(items, data):
    """build_tree(entries, reuse) packs the entries it read as they were stored; the tree must
    be byte for byte the one a build from the dicts makes, whatever the stored items were
    (a crafted tree may store a hex name as text or 33 ids inline: those are not reused)."""
    good, _, reuse = trees.split_items(items, lambda ref: None)
    entries = [dict(d, mtime_ns=d["mtime_ns"] + 1) if data.draw(st.booleans()) else d for d in good]
    entries += [a_file(file_id(i), [blob(i)]) for i in range(data.draw(st.integers(0, 3)))]
    assert trees.build_tree(_hasher, entries, reuse).blobs == trees.build_tree(_hasher, entries).blobs


def test_a_changed_folder_rebuilt_from_its_parent_equals_a_fresh_build(tmp_path):
    """A 3,000-entry folder read back, 1 % of it changed, a few added and removed: the rebuild
    that packs the unchanged entries as stored gives the canonical tree, and reuses them."""
    repo = fresh_repo(tmp_path / "r")
    entries = fileid_folder(3000) + [
        a_file("Manifest.db", [blob(i, "m") for i in range(40)]),
        {"name": "ab", "type": "dir", "mode": 0o40755, "mtime_ns": T, "subtree": None},
    ]
    with repo.write_session() as s:
        tid = s.save_tree(entries)
    old = repo.load_folder(tid)
    assert old.rejected == [] and len(old.good) == 3002 and len(old.reuse) == 3001  # not the listed file
    assert repo.build_tree(old.good, old.reuse).id == tid
    rnd = random.Random(5)
    new = [
        dict(d, size=d["size"] + 1, content=[blob(i, "new")]) if rnd.random() < 0.01 else d
        for i, d in enumerate(old.good)
    ]
    new = new[40:] + fileid_folder(3010)[3000:]
    rnd.shuffle(new)
    assert repo.build_tree(new, old.reuse).blobs == repo.build_tree(new).blobs


def test_copies_of_one_content_still_cut_a_folder_into_leaves(tmp_path):
    """Leaf boundaries come from each entry's first id; copies of one content take their
    name's keyed hash instead, or a folder of 4,000 copies would be one 64 KiB-cut run."""
    entries = [a_file(file_id(i), [blob(0)]) for i in range(4000)]
    built = trees.build_tree(_hasher, entries)
    leaves = [b for b in built.blobs.values() if b[:3] == b"\x93\x01\x00"]
    assert len(leaves) > 4000 // 40
    assert max(map(len, leaves)) < 8 << 10


def test_a_next_day_import_rebuilds_changed_folders_canonically(env, cli, tmp_path):
    """The archiver rebuilds a changed folder from its parent's entries: what it stores is the
    tree a from-scratch build of the same entries makes (so two imports of one state dedup)."""
    cli("init")
    day = copy_folder(MIT_BACKUP, tmp_path / "dev")
    cli("import", day, "--allow-unfinished")
    changed = next(p for p in sorted(day.rglob("*")) if p.is_file() and p.parent != day)
    changed.write_bytes(changed.read_bytes() + b"day two\n")
    cli("import", day, "--allow-unfinished")
    repo = open_repo(env)
    snaps = sorted(repo.snapshots(), key=lambda s: s.time)
    root = repo.load_folder(snaps[-1].tree)
    sub = next(d for d in root.good if d["name"] == changed.parent.name)
    assert (
        sub["subtree"] != next(d for d in repo.load_folder(snaps[0].tree).good if d["name"] == sub["name"])["subtree"]
    )
    for tree_id in (snaps[-1].tree, bytes.fromhex(sub["subtree"])):
        assert repo.build_tree(repo.load_folder(tree_id).good).id == tree_id
