"""Restore against crafted snapshots: a family member with the password, or anyone who can write
an unencrypted repository, chooses every name in a snapshot. Nothing may land outside
TARGET/<folder>, whatever the names, the target's own symlinks or the modes say; unusable
entries are refused by name, the rest restores, the exit is not 0, and `check` names them.

Snapshots are written through the library (a write session storing hand-made tree blobs, then
``save_snapshot``), as a writer of the repository could."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

import ibsync
from ibsync.capture.restore import RestoreFailed
from ibsync.capture.vtree import VirtualTree, VTreeError
from ibsync.format.pack import BlobType
from ibsync.model import DeviceInfo, Snapshot, encode_tree
from ibsync.reader.restorer import partial_folder
from ibsync.repo.repository import Repository
from ibsync.storage import LocalStorage
from ibsync.testing.device import SimDevice, SimLockdown
from ibsync.testing.generator import generate_content

from conftest import PASSWORD, one_line_error, tree_state
from simdevice_fixtures import connect  # noqa: F401  (pytest fixture)

T = 1_600_000_000 * 10**9
UDID = "00008030-001A2B3C4D5E6F70"
FOLDER = "DEV"


@pytest.fixture(params=["encrypted", "unencrypted"])
def repo_path(request, env, cli, monkeypatch) -> Path:
    """An initialised repository of each kind (an unencrypted one is opened with no password)."""
    if request.param == "encrypted":
        cli("init")
    else:
        monkeypatch.delenv("IBSYNC_PASSWORD")
        cli("init", "--no-encryption")
    return env


def open_repository(path: Path) -> Repository:
    repo = Repository.open(LocalStorage(path), lambda: PASSWORD)
    repo.load_index()
    return repo


class Writer:
    """Stores hand-made entries as a repository writer could (no check on names or fields)."""

    def __init__(self, session) -> None:
        self.session = session

    def file(self, name, data: bytes, mode: int = 0o100644) -> dict:
        blob, _ = self.session.save_blob(BlobType.DATA, data)
        return {"name": name, "type": "file", "mode": mode, "mtime_ns": T, "size": len(data), "content": [blob.hex()]}

    def tree(self, entries: list, *, raw: bool = False) -> bytes:
        data = json.dumps({"nodes": entries}).encode() if raw else encode_tree(entries)
        tid, _ = self.session.save_blob(BlobType.TREE, data)
        return tid

    def dir(self, name, entries: list, mode: int = 0o040755, *, raw: bool = False) -> dict:
        return {"name": name, "type": "dir", "mode": mode, "mtime_ns": T, "subtree": self.tree(entries, raw=raw).hex()}

    @staticmethod
    def link(name, target: str) -> dict:
        return {"name": name, "type": "symlink", "mode": 0o120777, "mtime_ns": T, "target": target}


def save_snapshot(path: Path, build, *, folder: str = FOLDER, udid: str = UDID, raw: bool = False) -> Snapshot:
    """A snapshot whose root tree holds what ``build(writer)`` returns."""
    repo = open_repository(path)
    with repo.write_session() as session:
        w = Writer(session)
        root = w.tree(build(w), raw=raw)
    snap = Snapshot(
        time=datetime.now(UTC),
        tree=root,
        device=DeviceInfo(udid=udid),
        backup_date=None,
        ios_encrypted=False,
        source={"kind": "folder", "path": "/crafted"},
        folder=folder,
    )
    repo.save_snapshot(snap)
    repo.close()
    return snap


def state_outside(root: Path, *inside: Path) -> dict[str, tuple]:
    """Every entry below ``root`` but the ``inside`` folders (and the repository and cache):
    kind, mode, mtime and bytes, links not followed."""
    skip = {root / "repo", root / "cache", *inside}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            p = here / name
            st = p.lstat()
            body = (
                p.read_bytes() if stat.S_ISREG(st.st_mode) else (os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
            )
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_mtime_ns, body)
    return out


def plant_outside(tmp_path: Path) -> None:
    """A sentinel folder beside the target and an 'outside' folder a crafted absolute name points into."""
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "precious.txt").write_bytes(b"precious")
    (tmp_path / "outside").mkdir()


# ---- defect 1: names that are not one path component --------------------------------------------


def test_unsafe_names_are_refused_by_name_and_nothing_lands_outside(repo_path, cli, tmp_path):
    plant_outside(tmp_path)
    absolute = str(tmp_path / "outside" / "abs.txt")

    def build(w: Writer) -> list:
        return [
            w.file("Info.plist", b"good root file"),
            w.dir(
                "a",
                [
                    w.file("ok.txt", b"good nested file"),
                    w.file("../../../sentinel/deep.txt", b"escape from a folder"),
                    w.file("x/../../../../sentinel/dotdot.txt", b"escape through a name with separators"),
                ],
            ),
            w.file("../../sentinel/pwned.txt", b"escape"),
            w.file(absolute, b"absolute"),
            w.file("..\\..\\windows.txt", b"windows separators"),
            w.file("nul\0name", b"nul"),
            w.file("n" * 256, b"too long a name"),
            w.dir("..", [w.file("escape.txt", b"a folder named ..")]),
            w.file(".", b"dot"),
        ]

    save_snapshot(repo_path, build)
    before = state_outside(tmp_path)
    target = tmp_path / "target"
    out, err = cli("restore", "latest", target, expect=1)
    assert "Traceback" not in err and "internal error" not in err
    # the snapshot cannot be restored whole: its good entries wait in the partial folder, and
    # nothing that looks like a finished backup is at TARGET/<folder>
    partial = partial_folder(target, FOLDER)
    assert state_outside(tmp_path, target) == before and os.listdir(target) == [partial.name]
    assert not (tmp_path / "outside" / "abs.txt").exists() and os.listdir(tmp_path / "sentinel") == ["precious.txt"]
    # the good entries are restored
    dest = partial / FOLDER
    assert str(dest) in err.strip().splitlines()[-1]
    assert (dest / "Info.plist").read_bytes() == b"good root file"
    assert (dest / "a" / "ok.txt").read_bytes() == b"good nested file"
    assert sorted(os.listdir(dest)) == ["Info.plist", "a"] and os.listdir(dest / "a") == ["ok.txt"]
    # every refused entry is named, escaped
    for name in (
        "a/../../../sentinel/deep.txt",
        "a/x/../../../../sentinel/dotdot.txt",
        "../../sentinel/pwned.txt",
        absolute,
        "..\\..\\windows.txt",
        "nul\\x00name",
        "n" * 256,
        "'..'",
        "'.'",
    ):
        assert name in err, name
    assert "path separator" in err and "NUL" in err and "256 bytes" in err
    assert err.strip().splitlines()[-1].startswith("ibsync: error: 9 entries of the snapshot refused")

    _, err = cli("check", expect=1)
    for name in ("a/../../../sentinel/deep.txt", absolute, "nul\\x00name", "'..'", "n" * 256):
        assert name in err, name
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "folder, udid",
    [
        ("../escaped", UDID),
        ("", "../../escaped-udid"),
        ("a/b", UDID),
        ("ABSOLUTE", UDID),
        ("..", UDID),
        ("bad\\name", UDID),
    ],
)
def test_unsafe_folder_name_is_refused_before_anything_is_created(repo_path, cli, tmp_path, folder, udid):
    if folder == "ABSOLUTE":
        folder = str(tmp_path / "outside" / "dev")
    plant_outside(tmp_path)
    save_snapshot(repo_path, lambda w: [w.file("Info.plist", b"data")], folder=folder, udid=udid)
    before = state_outside(tmp_path)
    target = tmp_path / "target"
    _, err = cli("restore", "latest", target, expect=1)
    one_line_error(err, "refusing to restore", "device folder", "is unsafe")
    assert not target.exists() and state_outside(tmp_path) == before
    _, err = cli("check", expect=1)
    assert "device folder" in err and "is unsafe" in err


# ---- defect 9: crafted trees end in a named failure per entry, never an internal error ----------


def test_crafted_trees_fail_per_entry_and_check_reports_them(repo_path, cli, tmp_path):
    plant_outside(tmp_path)
    outside = tmp_path / "outside"

    def build(w: Writer) -> list:
        junk, _ = w.session.save_blob(BlobType.DATA, b"this is no tree")
        return [
            w.file("Info.plist", b"good"),
            w.file("", b"an empty name"),
            # a symlink and a folder of one name: the file would be written under the link
            w.link("s", str(outside)),
            w.dir("s", [w.file("f.txt", b"under the link")]),
            # one name twice: no silent last-wins
            w.file("dup", b"first"),
            w.file("dup", b"second"),
            {**w.file("badmode", b"x"), "mode": "rwx"},
            {**w.file("badtype", b"x"), "type": "fifo"},
            {**w.file("badhex", b"x"), "content": ["zz"]},
            w.link("badlink", "a\0b"),
            w.link("emptylink", ""),
            ["not", "an", "entry"],
            {**w.file(7, b"x")},
            {"name": "junk", "type": "dir", "mode": 0o040755, "mtime_ns": T, "subtree": junk.hex()},
            w.dir("fine", [w.file("kept.txt", b"kept")]),
        ]

    save_snapshot(repo_path, build, raw=True)
    before = state_outside(tmp_path)
    target = tmp_path / "target"
    _, err = cli("restore", "latest", target, expect=1)
    assert "Traceback" not in err and "internal error" not in err
    assert state_outside(tmp_path, target) == before and os.listdir(outside) == []
    dest = partial_folder(target, FOLDER) / FOLDER
    assert os.listdir(target) == [dest.parent.name]
    assert sorted(os.listdir(dest)) == ["Info.plist", "fine", "junk"] and os.listdir(dest / "junk") == []
    assert (dest / "fine" / "kept.txt").read_bytes() == b"kept"
    for needle in (
        "'': refused: its name is empty",
        "'s': refused: its name appears 2 times",
        "'dup': refused: its name appears 2 times",
        "'badmode'",
        "'badtype'",
        "'badhex'",
        "'badlink'",
        "'emptylink'",
        "not a tree entry",
        "its name is not text",
        "'junk': its folder listing cannot be read",
    ):
        assert needle in err, needle

    _, err = cli("check", expect=1)
    for needle in (
        "'s' is unusable: its name appears 2 times",
        "'dup' is unusable",
        "'' is unusable",
        "'badtype' is unusable",
        "junk",
    ):
        assert needle in err, needle


# ---- defect 4: --overwrite never writes through a symlink found in the target -------------------


def _good(w: Writer) -> list:
    return [w.file("Info.plist", b"restored info"), w.dir("d", [w.file("f.txt", b"restored f")])]


def test_overwrite_replaces_planted_symlinks_and_writes_nothing_outside(repo_path, cli, tmp_path):
    save_snapshot(repo_path, _good)
    target = tmp_path / "target"
    cli("restore", "latest", target)
    dest = target / FOLDER
    victim_file = tmp_path / "victim.txt"
    victim_file.write_bytes(b"precious file")
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    (victim_dir / "f.txt").write_bytes(b"precious f")
    os.chmod(victim_file, 0o600)
    (dest / "Info.plist").unlink()
    (dest / "Info.plist").symlink_to(victim_file)
    for p in (dest / "d").iterdir():
        p.unlink()
    (dest / "d").rmdir()
    (dest / "d").symlink_to(victim_dir)
    before = state_outside(tmp_path, target)

    cli("restore", "latest", target, "--overwrite")
    assert state_outside(tmp_path, target) == before
    assert not (dest / "Info.plist").is_symlink() and (dest / "Info.plist").read_bytes() == b"restored info"
    assert not (dest / "d").is_symlink() and (dest / "d" / "f.txt").read_bytes() == b"restored f"


def test_overwrite_after_a_snapshot_with_a_symlink_where_this_one_has_a_folder(repo_path, cli, tmp_path):
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    (victim_dir / "f.txt").write_bytes(b"precious f")
    linked = save_snapshot(repo_path, lambda w: [w.file("Info.plist", b"old"), w.link("d", str(victim_dir))])
    good = save_snapshot(repo_path, _good)
    target = tmp_path / "target"
    cli("restore", linked.id, target)
    assert (target / FOLDER / "d").is_symlink()
    before = state_outside(tmp_path, target)
    cli("restore", good.id, target, "--overwrite")
    assert state_outside(tmp_path, target) == before
    assert not (target / FOLDER / "d").is_symlink() and (target / FOLDER / "d" / "f.txt").read_bytes() == b"restored f"


def test_device_folder_that_is_a_symlink_is_not_written_through(repo_path, cli, tmp_path):
    save_snapshot(repo_path, _good)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / FOLDER).symlink_to(elsewhere)
    before = state_outside(tmp_path, target)
    _, err = cli("restore", "latest", target, expect=2)  # an empty folder behind a link: still refused
    one_line_error(err, "is not a folder", "--overwrite")
    cli("restore", "latest", target, "--overwrite")
    assert state_outside(tmp_path, target) == before and os.listdir(elsewhere) == []
    assert not (target / FOLDER).is_symlink() and (target / FOLDER / "d" / "f.txt").read_bytes() == b"restored f"


# ---- defect 5: setuid, setgid and sticky bits are never restored --------------------------------


def test_setuid_setgid_and_sticky_bits_are_masked(repo_path, cli, tmp_path):
    save_snapshot(
        repo_path,
        lambda w: [
            w.file("Info.plist", b"x", mode=0o104755),  # setuid
            w.file("g", b"y", mode=0o102750),  # setgid
            w.dir("t", [w.file("f", b"z", mode=0o106644)], mode=0o041777),  # sticky folder
            w.dir("sg", [], mode=0o042755),  # setgid folder
        ],
    )
    target = tmp_path / "target"
    cli("restore", "latest", target)
    dest = target / FOLDER
    modes = {p: stat.S_IMODE((dest / p).lstat().st_mode) for p in ("Info.plist", "g", "t", "t/f", "sg")}
    assert modes == {"Info.plist": 0o755, "g": 0o750, "t": 0o777, "t/f": 0o644, "sg": 0o755}


# ---- restore onto a device -----------------------------------------------------------------------


@pytest.fixture
def captured(env, cli):
    cli("init")
    phone = SimDevice.from_content(generate_content(seed=21, size_bytes=256 << 10))
    return phone, ibsync.backup_device(SimLockdown(phone), str(env)).snapshot


def _with_extra(env: Path, snap: Snapshot, extra) -> Snapshot:
    """``snap`` with more entries in its device folder, saved as a new snapshot."""
    repo = open_repository(env)
    entries = repo.load_tree_entries(snap.tree)
    with repo.write_session() as session:
        root = Writer(session).tree(entries + extra(Writer(session)))
    crafted = dataclasses.replace(snap, tree=root, id="", time=datetime.now(UTC))
    repo.save_snapshot(crafted)
    return crafted


@pytest.mark.parametrize(
    "extra, named",
    [
        (
            lambda w: [w.file("../../../escape.txt", b"x")],
            "'../../../escape.txt': refused: its name holds a path separator",
        ),
        (lambda w: [w.file("Info.plist", b"a second Info.plist")], "'Info.plist': refused: its name appears 2 times"),
        (lambda w: [w.dir("..", [w.file("Manifest.db", b"x")])], "'..': refused: its name is '..'"),
    ],
)
def test_restore_to_device_refuses_a_crafted_snapshot_before_the_device_asks(captured, connect, env, extra, named):
    phone, snap = captured
    crafted = _with_extra(env, snap, extra)
    blank = SimDevice(udid="0" * 40)
    lockdown = connect(blank)
    with pytest.raises(RestoreFailed, match=r"refusing to restore: \d+ entr(y|ies) cannot be restored") as e:
        ibsync.restore_to_device(lockdown, str(env), crafted)
    assert named in str(e.value) and "\n" not in str(e.value)
    assert lockdown.log.downloaded == [] and blank.files == {}
    ibsync.restore_to_device(connect(blank), str(env), snap)  # the snapshot it was made from restores
    assert blank.files == phone.files


def test_restore_to_device_refuses_an_unsafe_device_folder(captured, connect, env):
    _, snap = captured
    repo = open_repository(env)
    crafted = dataclasses.replace(snap, folder="../../etc", device=DeviceInfo(udid="../../etc"), id="")
    repo.save_snapshot(crafted)
    blank = SimDevice(udid="0" * 40)
    lockdown = connect(blank)
    with pytest.raises(RestoreFailed, match=r"device folder '\.\./\.\./etc' is unsafe"):
        ibsync.restore_to_device(lockdown, str(env), crafted)
    assert lockdown.log.downloaded == [] and blank.files == {}


def test_virtual_tree_never_lists_or_serves_an_unusable_entry(captured, env):
    """What the device could ask for while a restore or capture runs over a crafted snapshot."""
    _, snap = captured
    crafted = _with_extra(
        env,
        snap,
        lambda w: [w.file("../escape", b"x"), w.file("two", b"1"), w.file("two", b"2"), w.file("nul\0", b"x")],
    )
    tree = VirtualTree(open_repository(env), snap.folder, crafted.tree)
    listed = tree.listdir(snap.folder)
    assert "../escape" not in listed and "two" not in listed and "nul\0" not in listed and "Manifest.db" in listed
    for path in ("two", "../escape", "..", "nul\0"):
        with pytest.raises(VTreeError):
            tree.file(f"{snap.folder}/{path}")


def test_prune_keeps_the_data_of_refused_entries(repo_path, cli):
    """Refused entries are still the snapshot's: prune must not delete their data (a later
    ibsync, or repair, may yet recover them under a safe name)."""
    snap = save_snapshot(
        repo_path,
        lambda w: [
            w.file("ok", b"kept"),
            w.file("../refused", b"refused but still referenced " * 100),
            w.dir("..", [w.file("f", b"below a refused folder " * 100)]),
        ],
    )
    repo = open_repository(repo_path)
    refused_dir = next(e for e in repo.load_tree_entries(snap.tree) if e["name"] == "..")
    ids = [c for e in repo.load_tree_entries(snap.tree) if e["type"] == "file" for c in e["content"]]
    ids += [refused_dir["subtree"]] + [
        c for e in repo.load_tree_entries(bytes.fromhex(refused_dir["subtree"])) for c in e["content"]
    ]
    repo.close()
    cli("prune", "--repack-threshold", "0")
    repo = open_repository(repo_path)
    assert all(repo.index.has(bytes.fromhex(i)) for i in ids)
    assert [b for b in ids if repo.load_blob(bytes.fromhex(b)) is None] == []


def test_copy_names_the_entries_it_leaves_out(repo_path, cli, tmp_path, caplog, monkeypatch):
    save_snapshot(repo_path, lambda w: [w.file("Info.plist", b"kept"), w.file("../escape.txt", b"left out")])
    target = tmp_path / "copy-target"
    if os.environ.get("IBSYNC_PASSWORD"):
        monkeypatch.setenv("IBSYNC_FROM_PASSWORD", os.environ["IBSYNC_PASSWORD"])
        cli("init", "--repo", target)
    else:
        cli("init", "--no-encryption", "--repo", target)
    with caplog.at_level("WARNING", logger="ibsync"):
        cli("copy", "--from-repo", repo_path, "--repo", target)
    assert any("'../escape.txt' of a folder left out of the copy" in r.getMessage() for r in caplog.records)
    cli("restore", "latest", tmp_path / "out", "--repo", target)
    assert os.listdir(tmp_path / "out" / FOLDER) == ["Info.plist"]


def test_import_over_a_crafted_parent_neither_crashes_nor_keeps_its_bad_entries(repo_path, cli, tmp_path):
    from ibsync.source.backup_folder import read_backup_folder

    from conftest import MIT_BACKUP, copy_folder

    src = copy_folder(MIT_BACKUP, tmp_path / "in" / "sample_backup")
    udid = read_backup_folder(src, allow_unfinished=True).device.udid
    # the "previous backup" of this phone, written by someone who chose its entries
    crafted = save_snapshot(
        repo_path,
        lambda w: [w.file("Info.plist", b"x"), w.file("../evil", b"y"), 42, {"name": "Manifest.db", "type": "dir"}],
        udid=udid,
        raw=True,
    )
    cli("import", "--allow-unfinished", src)
    cli("forget", crafted.id)
    cli("check")  # the new snapshot carries none of the parent's refused entries
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / "sample_backup") == tree_state(src)


def test_unreadable_data_is_not_called_refused_and_a_lost_top_folder_creates_nothing(repo_path, cli, tmp_path):
    repo = open_repository(repo_path)
    with repo.write_session() as session:  # the sub-folder's tree in a pack of its own
        sub = Writer(session).tree([Writer(session).file("f", b"x")])
    pack = repo.index.get(sub).pack_id.hex()
    repo.close()
    snap = save_snapshot(
        repo_path,
        lambda w: [
            w.file("Info.plist", b"kept"),
            {"name": "d", "type": "dir", "mode": 0o40755, "mtime_ns": T, "subtree": sub.hex()},
        ],
    )
    # the sub-folder's tree blob lost: data damage, not a refused entry
    (repo_path / "packs" / pack[:2] / pack).unlink()
    _, err = cli("restore", snap.id[:8], tmp_path / "out", expect=1)
    assert "'d': its folder listing cannot be read" in err
    assert "refused" not in err.strip().splitlines()[-1]
    # the top folder itself lost: one line naming the snapshot, and no folder created
    lost = save_snapshot(repo_path, lambda w: [w.file("x", b"y")])
    repo = open_repository(repo_path)
    repo.load_index()
    pack = repo.index.get(lost.tree).pack_id.hex()
    repo.close()
    (repo_path / "packs" / pack[:2] / pack).unlink()
    _, err = cli("restore", lost.id[:8], tmp_path / "out2", expect=1)
    one_line_error(err, f"snapshot {lost.short_id}: its top folder cannot be read", "repair index")
    assert not (tmp_path / "out2").exists()


def test_a_device_asking_for_host_files_during_a_restore_gets_none(captured, connect, env, tmp_path):
    """A malicious device, being restored, asks for files outside the snapshot: absolute host
    paths, paths climbing out of the backup folder, a folder as a file. The host serves only the
    snapshot's virtual folder, answers each with an error, and the restore still completes."""
    from ibsync.testing.device.model import Misbehaviour

    phone, snap = captured
    secret = tmp_path / "host-secret.txt"
    secret.write_bytes(b"the host's own file")
    asked: dict[str, bytes | None] = {}

    def ask_for_host_files(link, root: str) -> None:
        paths = [
            str(secret),
            f"{root}/../../../../../..{secret}",
            f"{root}/../{root}/Info.plist",
            "/etc/passwd",
            f"{root}//Info.plist",
            f"{root}/./Info.plist",
            root,
            f"{root}/00",
        ]
        got, _ = link.download_files(paths, 100.0)
        asked.update(got)

    blank = SimDevice(udid="0" * 40, misbehave=Misbehaviour(before_finish=ask_for_host_files))
    ibsync.restore_to_device(connect(blank), str(env), snap)
    assert len(asked) == 8 and all(v is None for v in asked.values()), asked
    assert blank.files == phone.files  # the restore itself completed
