"""One constructor per tree entry type and one canonical encoding (design §10, issue 13).

A tree's bytes must not depend on how its entry dicts were built or in which order they hold
their fields: equal folders must be equal blobs, or a repository stops deduplicating against
what it stored before. The constants below were computed by the code as it was before
``model.file_entry`` and its siblings existed (commit 25e290c, entries built as dict literals
by the archiver, capture and ``Node.to_dict``); ``tests/fixtures/repo-v2-entries`` is a
repository that code made (``Repository.init(kdf=FAST_KDF)``, password ``conftest.PASSWORD``,
one ``ibsync import --allow-unfinished`` of a copy of the MIT sample backup named ``dev`` with
a folder ``ab`` of 200 fileID files, ``Big.sqlite`` of 48 blocks, a symlink ``link`` to
``Info.plist``, a file ``Café näme`` and an empty folder ``empty``, every time set to
1,700,000,000.123456789 s).
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from ibsync.capture.vtree import FILE_MODE, entry_of_record, pack_record
from ibsync.model import (
    ENTRY_FIELDS,
    Node,
    UnknownEntryField,
    canonical_entry,
    decode_tree_entries,
    dir_entry,
    encode_tree,
    entry_problem,
    file_entry,
    split_entries,
    symlink_entry,
)
from ibsync.repo import trees

from conftest import FIXTURES, copy_folder, open_repo

MTIME = 1_700_000_000_123_456_789


def _id(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def _hasher(b: bytes) -> bytes:
    return hashlib.blake2b(b, key=b"k" * 32, digest_size=32).digest()


def _old_literals() -> list[dict]:
    """A folder's entries exactly as the code before the constructors built them: dict
    literals in the key order the archiver, capture and ``Node.to_dict`` wrote."""
    out = []
    for i in range(60):  # fileID files of one blob: most of a phone
        name = hashlib.sha1(f"HomeDomain-file-{i}".encode()).hexdigest()
        out.append(
            {
                "name": name,
                "type": "file",
                "mode": 0o100644,
                "mtime_ns": MTIME + i,
                "size": 100 + i,
                "content": [_id(f"blob {i}")],
            }
        )
    out.append(
        {
            "name": "Manifest.db",
            "type": "file",
            "mode": 0o100644,
            "mtime_ns": MTIME,
            "size": 40 << 15,
            "content": [_id(f"block {k}") for k in range(40)],
        }
    )  # more than 32 ids: an id list
    out.append({"name": "Status.plist", "type": "file", "mode": 0o100600, "mtime_ns": -5, "size": 0, "content": []})
    out.append({"name": "00", "type": "dir", "mode": 0o040755, "mtime_ns": MTIME, "subtree": _id("tree 00")})
    out.append({"name": "empty", "type": "dir", "mode": 0o040700, "mtime_ns": 0, "subtree": None})
    out.append({"name": "link", "type": "symlink", "mode": 0o120777, "mtime_ns": MTIME, "target": "Info.plist"})
    out.append(
        {
            "name": "Caf\u00e9 n\u00e4me",
            "type": "file",
            "mode": 0o100644,
            "mtime_ns": MTIME,
            "size": 1,
            "content": [_id("cafe")],
        }
    )
    out.append(
        {"name": "raw\udcff", "type": "file", "mode": 0o100644, "mtime_ns": MTIME, "size": 2, "content": [_id("raw")]}
    )  # a non-UTF-8 name from a Linux folder
    return out


def _constructed() -> list[dict]:
    """The same folder, built by the constructors."""
    out = []
    for d in _old_literals():
        if d["type"] == "file":
            out.append(file_entry(d["name"], d["mode"], d["mtime_ns"], d["size"], list(d["content"])))
        elif d["type"] == "dir":
            out.append(dir_entry(d["name"], d["mode"], d["mtime_ns"], d["subtree"]))
        else:
            out.append(symlink_entry(d["name"], d["mode"], d["mtime_ns"], d["target"]))
    return out


def _shuffled(d: dict, rnd: random.Random) -> dict:
    keys = list(d)
    rnd.shuffle(keys)
    return {k: d[k] for k in keys}


# Computed by the code of commit 25e290c (before this change) from _old_literals().
OLD_FORMAT1_SHA256 = "6bb421d2efab62997c3f97a4cb22b346e1ffafc1521aea48dc43d7f129061410"
OLD_FORMAT1_SMALL = (  # entries 0, 62 and 64: one of each type
    b'{"nodes":[{"name":"00","type":"dir","mode":16877,"mtime_ns":1700000000123456789,"subtree":"c2637a4c4'
    b'54c72957cf1ba13e63199207df45db60bdfcefeea810428479e5315"},{"name":"0d79a305197fba57c15bc8b397f0afe2b'
    b'f8fa9be","type":"file","mode":33188,"mtime_ns":1700000000123456789,"size":100,"content":["a32b217ef1'
    b'7069c89f5f22c5a0b1b0f1292375d7304acc3f5d8a6ecc7e0c7208"]},{"name":"link","type":"symlink","mode":414'
    b'71,"mtime_ns":1700000000123456789,"target":"Info.plist"}]}'
)
OLD_FORMAT2_TOP = "fc5ce7abe025bb69c61f9189a9f4c8aefd3ba108908d0fd30f3022c1b7d29335"  # ids pin every node below
OLD_FORMAT2_BLOBS = 11
OLD_FORMAT2_SMALL = bytes.fromhex(
    "9301009395c4010001cd41edcf17979cfe3d85cd15c420c2637a4c454c72957cf1ba13e63199207df45db60bdfcefeea810428479e53"
    "1596c4140d79a305197fba57c15bc8b397f0afe2bf8fa9be00cd81a4cf17979cfe3d85cd1564c420a32b217ef17069c89f5f22c5a0b1"
    "b0f1292375d7304acc3f5d8a6ecc7e0c720895a46c696e6b02cda1ffcf17979cfe3d85cd15aa496e666f2e706c697374"
)
# entries readers refuse (only repair hands them back) or the positional form cannot hold: JSON text
REFUSED = [
    {"name": "weird", "type": "fifo", "mode": 4480, "mtime_ns": 1},
    "not a dict",
    {"name": "UP", "type": "file", "mode": 0o100644, "mtime_ns": 1, "size": 1, "content": ["AB" * 32]},
]
OLD_FORMAT2_REFUSED = bytes.fromhex(
    "93010093ac226e6f742061206469637422d98d7b226e616d65223a225550222c2274797065223a2266696c65222c226d6f6465223a33"
    "333138382c226d74696d655f6e73223a312c2273697a65223a312c22636f6e74656e74223a5b22414241424142414241424142414241"
    "42414241424142414241424142414241424142414241424142414241424142414241424142414241424142414241424142225d7dd937"
    "7b226e616d65223a227765697264222c2274797065223a226669666f222c226d6f6465223a343438302c226d74696d655f6e73223a31"
    "7d"
)
OLD_FORMAT1_REFUSED = (
    b'{"nodes":["not a dict",{"name":"UP","type":"file","mode":33188,"mtime_ns":1,"size":1,"content":["ABA'
    b'BABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB"]},{"name":"weird","type":"fifo","mode'
    b'":4480,"mtime_ns":1}]}'
)


def _small(entries: list[dict]) -> list[dict]:
    return [entries[0], entries[62], entries[64]]


# ---- byte identity with the trees stored before ----------------------------------------------


@pytest.mark.parametrize("build", [_old_literals, _constructed], ids=["old literals", "constructors"])
def test_trees_are_the_bytes_the_code_before_wrote(build):
    entries = build()
    assert hashlib.sha256(encode_tree(entries)).hexdigest() == OLD_FORMAT1_SHA256
    assert encode_tree(_small(entries)) == OLD_FORMAT1_SMALL
    built = trees.build_tree(_hasher, entries)
    assert built.id.hex() == OLD_FORMAT2_TOP and len(built.blobs) == OLD_FORMAT2_BLOBS
    small = trees.build_tree(_hasher, _small(entries))
    assert small.blobs[small.id] == OLD_FORMAT2_SMALL


def test_entries_readers_refuse_are_kept_as_the_code_before_kept_them():
    built = trees.build_tree(_hasher, [dict(d) if isinstance(d, dict) else d for d in REFUSED])
    assert built.blobs[built.id] == OLD_FORMAT2_REFUSED
    assert encode_tree(list(REFUSED)) == OLD_FORMAT1_REFUSED


@pytest.mark.parametrize("fixture, folder", [("repo-v1", "dev"), ("repo-v2-entries", "dev")])
def test_reimport_into_a_repository_made_before_adds_nothing(env, cli, tmp_path, fixture, folder):
    """Restore the latest snapshot of a repository the code before wrote, forget every
    snapshot (so nothing is compared against a parent: every tree is built anew by today's
    constructors and encoder) and import the restored folder: each tree is a blob the
    repository already holds, so nothing is added and the snapshot's tree id is the old one."""
    copy_folder(FIXTURES / fixture, env)
    repo = open_repo(env)
    snaps = sorted(repo.snapshots(), key=lambda s: s.sort_key())
    latest = snaps[-1]
    assert repo.tree_format == (1 if fixture == "repo-v1" else 2)
    cli("restore", latest.id, tmp_path / "out")
    cli("forget", *[s.id for s in snaps])
    out, _ = cli("import", "--allow-unfinished", "--json", tmp_path / "out" / folder)
    summary = json.loads(out)["snapshots"][0]["summary"]
    assert summary["files"] == latest.summary.files and summary["bytes_read"] > 0  # every file read again
    assert summary["blobs_added"] == 0 and summary["added_bytes"] == 0
    (new,) = open_repo(env).snapshots()
    assert new.tree == latest.tree


# ---- key order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_shuffled_key_order_gives_identical_bytes(seed):
    rnd = random.Random(seed)
    entries = _constructed()
    shuffled = [_shuffled(d, rnd) for d in entries]
    assert any(list(a) != list(b) for a, b in zip(entries, shuffled))
    rnd.shuffle(shuffled)  # and the folder's order: sorted by name either way
    assert encode_tree(shuffled) == encode_tree(entries)
    assert trees.build_tree(_hasher, shuffled).blobs == trees.build_tree(_hasher, entries).blobs
    for a, b in zip(entries, [_shuffled(d, rnd) for d in entries]):
        assert trees.pack_entry(b, _hasher) == trees.pack_entry(a, _hasher)


@pytest.mark.parametrize("seed", range(3))
def test_entries_stored_as_json_text_do_not_depend_on_key_order(seed):
    """Entries the positional form cannot hold (capital hex ids, a missing optional field) are
    stored as their JSON text: in the canonical field order too."""
    rnd = random.Random(seed)
    odd = [
        {"name": "UP", "type": "file", "mode": 0o100644, "mtime_ns": 1, "size": 1, "content": ["AB" * 32]},
        {"name": "nosize", "type": "file", "mode": 0o100644, "mtime_ns": 1, "content": []},
        {"name": "nosub", "type": "dir", "mode": 0o040755, "mtime_ns": 1},
    ]
    for d in odd:
        assert entry_problem(d) is None  # usable: a reader takes it as it is
        packed = trees.pack_entry(d, _hasher)
        stored = trees.msgpack.unpackb(packed, raw=False)
        assert isinstance(stored, str)  # not positional: the JSON text
        assert list(json.loads(stored)) == [k for k in ENTRY_FIELDS[d["type"]] if k in d]
        reversed_order = {k: d[k] for k in reversed(list(d))}
        assert trees.pack_entry(reversed_order, _hasher) == packed
        for _ in range(4):
            assert trees.pack_entry(_shuffled(d, rnd), _hasher) == packed
    assert trees.build_tree(_hasher, [_shuffled(d, rnd) for d in odd]).blobs == trees.build_tree(_hasher, odd).blobs
    assert encode_tree([_shuffled(d, rnd) for d in odd]) == encode_tree(odd)


def test_canonical_entry_orders_fields_and_keeps_what_it_cannot_judge():
    d = file_entry("a", 0o100644, 1, 2, ["00" * 32])
    assert canonical_entry(d) is d  # already canonical: no copy (the hot path)
    back = canonical_entry(
        {"content": d["content"], "size": 2, "mtime_ns": 1, "mode": 0o100644, "type": "file", "name": "a"}
    )
    assert list(back.items()) == list(d.items())
    for other in ("text", 5, None, {"name": "x", "type": "fifo", "zzz": 1, "name2": 2}):
        assert canonical_entry(other) is other  # refused by every reader, whatever it holds


# ---- constructors ---------------------------------------------------------------------------------


CONSTRUCTED = [
    file_entry("Info.plist", 0o100644, MTIME, 1234, [_id("a"), _id("b")]),
    file_entry("0d79a305197fba57c15bc8b397f0afe2bf8fa9be", 0o100600, -1, 0, []),
    file_entry("Manifest.db", 0o100644, 0, 40 << 15, [_id(f"block {k}") for k in range(40)]),
    dir_entry("00", 0o040755, MTIME, _id("tree")),
    dir_entry("Caf\u00e9", 0o040700, MTIME, None),
    symlink_entry("link", 0o120777, MTIME, "Info.plist"),
]


@pytest.mark.parametrize("d", CONSTRUCTED, ids=[d["name"] for d in CONSTRUCTED])
def test_each_constructor_round_trips_through_both_formats(d):
    assert tuple(d) == ENTRY_FIELDS[d["type"]]
    assert entry_problem(d) is None
    # format 1
    (back,) = decode_tree_entries(encode_tree([d]))
    assert list(back.items()) == list(d.items())
    # format 2: one entry, and a whole folder read back through the reader's fast path
    lists: dict[bytes, bytes] = {}

    def store(ids: bytes) -> bytes:
        key = _hasher(ids)
        lists[key] = ids
        return key

    def expand(ref: list) -> list[str]:
        h = lists[ref[0]].hex()
        return [h[i : i + 64] for i in range(0, len(h), 64)]

    item = trees.msgpack.unpackb(trees.pack_entry(d, store), raw=False, unicode_errors="surrogateescape")
    assert isinstance(item, list)  # the positional form
    back = trees.unpack_entry(item, expand)
    assert list(back.items()) == list(d.items())
    good, rejected, _ = trees.split_items([item], expand)
    assert rejected == [] and list(good[0].items()) == list(d.items())
    # the Node view
    assert list(Node.from_dict(d).to_dict().items()) == list(d.items())


def test_node_to_dict_uses_the_constructors():
    node = Node("f", "file", 0o100644, 5, 3, [bytes(32)])
    assert node.to_dict() == file_entry("f", 0o100644, 5, 3, ["00" * 32])
    assert tuple(Node("d", "dir", 0o040755, 5, subtree=bytes(32)).to_dict()) == ENTRY_FIELDS["dir"]
    assert tuple(Node("l", "symlink", 0o120777, 5, target="x").to_dict()) == ENTRY_FIELDS["symlink"]


def test_a_received_file_of_a_capture_is_a_constructed_entry():
    ids = bytes(range(32)) + bytes(32)
    d = entry_of_record("0d79a305197fba57c15bc8b397f0afe2bf8fa9be", pack_record(MTIME, 77, ids))
    assert d == file_entry(
        "0d79a305197fba57c15bc8b397f0afe2bf8fa9be", FILE_MODE, MTIME, 77, [ids[:32].hex(), ids[32:].hex()]
    )
    assert tuple(d) == ENTRY_FIELDS["file"]


# ---- unknown fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{"xattrs": {}}, {"flags": 0}, {"target": "x"}], ids=["xattrs", "flags", "target"])
def test_an_unknown_field_is_refused_by_every_encoder(extra):
    bad = {**file_entry("f", 0o100644, 1, 0, []), **extra}  # a file has no target either
    with pytest.raises(UnknownEntryField, match=f"'f': a file has no field '{next(iter(extra))}'"):
        encode_tree([bad])
    with pytest.raises(UnknownEntryField):
        trees.build_tree(_hasher, [file_entry("g", 0o100644, 1, 0, []), bad])
    with pytest.raises(UnknownEntryField):
        trees.pack_entry(bad, _hasher)
    with pytest.raises(UnknownEntryField):
        canonical_entry({**dir_entry("d", 0o040755, 1, None), "size": 3})


def test_readers_refuse_an_entry_with_an_unknown_field():
    """A tree no ibsync wrote may hold one: no reader uses it (a restore would drop the field),
    so the import's files cache and copy never hand it back to an encoder that refuses it."""
    bad = {**file_entry("f", 0o100644, 1, 0, []), "xattrs": {"user.x": "1"}}
    assert entry_problem(bad) == "it has a field its type does not have"
    stored = json.dumps({"nodes": [bad, file_entry("g", 0o100644, 1, 0, [])]}).encode()
    good, rejected = split_entries(decode_tree_entries(stored))
    assert [d["name"] for d in good] == ["g"] and [(r.name, r.reason) for r in rejected] == [
        ("f", "it has a field its type does not have")
    ]
    item = trees.msgpack.packb(json.dumps(bad))  # format 2: an entry stored as its JSON text
    good2, rejected2, _ = trees.split_items([trees.msgpack.unpackb(item)], lambda ref: None)
    assert good2 == [] and rejected2[0].reason == "it has a field its type does not have"
