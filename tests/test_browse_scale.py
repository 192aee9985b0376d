"""find, diff, ls and extract across many daily snapshots read what changed, not snapshots x size.

One generated device, a Manifest.db grown to a few MB with folder rows (as real ones are), and
DAYS daily snapshots, each made by ``mutate_folder`` (a few files and Manifest.db pages edited
in place, as iOS does). The repository's storage is wrapped to count what is read from packs;
results are compared with a straightforward oracle that rehydrates every Manifest.db whole and
queries it with sqlite3.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from datetime import UTC, datetime
from hashlib import sha1
from pathlib import Path

import pytest

from ibsync.cli import main
from ibsync.model import utc_iso
from ibsync.reader.files import read_file
from ibsync.reader.manifest_cache import StoredFile
from ibsync.reader.mbfile import decode_mbfile
from ibsync.reader.paths import PathPattern
from ibsync.repo.repository import Repository
from ibsync.storage import Kind, LocalStorage
from ibsync.testing.generator import BackupFile, generate, mbfile_blob, mutate_folder

from conftest import FAST_KDF, PASSWORD

DAYS = 16
FOLDER_ROWS = 12_000


class CountingStorage(LocalStorage):
    """The real local storage, counting the pack bytes read (instrumentation, not a mock)."""

    reads: list[tuple[str, int, int]] = []  # (pack, offset, length), shared by every instance

    def get(self, kind, name, offset=0, length=None):
        data = super().get(kind, name, offset, length)
        if kind is Kind.PACKS:
            CountingStorage.reads.append((name, offset, len(data)))
        return data


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    base = tmp_path_factory.mktemp("scale")
    live = generate(base / "live", seed=5, size_bytes=2 << 20)
    con = sqlite3.connect(live / "Manifest.db")
    with con:  # folder rows: no payload, a real MBFile each (a real phone has tens of thousands)
        rows = []
        for i in range(FOLDER_ROWS):
            rel = f"Library/Caches/c{i // 100:03d}/d{i:05d}"
            f = BackupFile("AppDomain-com.example.cache", rel, 2, 1_700_000_000, 0o40755, 0)
            rows.append((f.file_id, f.domain, rel, 2, mbfile_blob(f)))
        con.executemany("INSERT INTO Files VALUES (?, ?, ?, ?, ?)", rows)
    con.close()
    repo = base / "repo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IBSYNC_REPO", str(repo))
        mp.setenv("IBSYNC_PASSWORD", PASSWORD)
        mp.setenv("IBSYNC_CACHE_DIR", str(base / "import-cache"))
        mp.setattr("ibsync.format.crypto.DEFAULT_KDF", FAST_KDF)
        assert main(["init", "-q"]) == 0
        assert main(["import", str(live), "-q"]) == 0
        for day in range(1, DAYS):
            mutate_folder(live, seed=100 + day)
            assert main(["import", str(live), "-q"]) == 0
    return {"repo": repo, "oracle": _oracle(repo)}


def _open(repo_path: Path) -> Repository:
    r = Repository.open(LocalStorage(repo_path), lambda: PASSWORD)
    r.load_index()
    return r


def _oracle(repo_path: Path) -> dict:
    """Each snapshot's file rows as a plain sqlite3 query of its whole Manifest.db gives them:
    ``fileID -> (domain, path, size, mtime, payload)``; plus each db's stored block list."""
    r = _open(repo_path)
    out = {"snaps": [], "rows": {}, "db": {}}
    for snap in r.snapshots():
        root = {n.name: n for n in r.load_tree(snap.tree)}
        db = root["Manifest.db"]
        path = repo_path.parent / f"oracle-{snap.id}.db"
        with open(path, "wb") as f:
            for chunk in read_file(r, db):
                f.write(chunk)
        con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        subtrees: dict[str, dict] = {}
        rows = {}
        for fid, domain, rel, flags, blob in con.execute("SELECT fileID, domain, relativePath, flags, file FROM Files"):
            if flags != 1:
                continue
            size, mtime, _, _ = decode_mbfile(blob)
            d = root.get(fid[:2])
            if fid[:2] not in subtrees:
                subtrees[fid[:2]] = {n.name: n for n in r.load_tree(d.subtree)} if d is not None else {}
            node = subtrees[fid[:2]].get(fid)
            rows[fid] = (domain, rel or "", size, mtime, (tuple(node.content), node.size) if node else None)
        con.close()
        path.unlink()
        out["snaps"].append(snap)
        out["rows"][snap.id] = rows
        out["db"][snap.id] = StoredFile.of(r, db.content, db.size)
    return out


def _expected_find(oracle: dict, pattern: str) -> dict[str, list[tuple]]:
    pat = PathPattern(pattern)
    history: dict[str, list[tuple]] = {}
    last: dict[str, object] = {}
    for n, snap in enumerate(oracle["snaps"]):
        rows = oracle["rows"][snap.id]
        seen = set()
        for _fid, (domain, rel, size, mtime, content) in rows.items():
            if not pat.matches(domain, rel):
                continue
            path = f"{domain}/{rel}"
            seen.add(path)
            versions = history.setdefault(path, [])
            if path not in last:
                status = "first" if n == 0 else "new"
            else:
                status = "changed" if last[path] != content else "unchanged"
            versions.append((snap.id, status, size, _iso(mtime)))
            last[path] = content
        for path in list(last):
            if path not in seen:
                history[path].append((snap.id, "removed", None, None))
                del last[path]
    return history


def _got_find(out: str) -> dict[str, list[tuple]]:
    return {
        p["path"]: [(v["snapshot"], v["status"], v["size"], v["mtime"]) for v in p["versions"]]
        for p in json.loads(out)["paths"]
    }


def _iso(seconds: int) -> str:
    return utc_iso(datetime.fromtimestamp(seconds, UTC))


@pytest.fixture
def counted(days, env, monkeypatch, tmp_path):
    """The days' repository through a counting storage, with an empty Manifest.db cache."""
    monkeypatch.setenv("IBSYNC_REPO", str(days["repo"]))
    monkeypatch.setattr("ibsync.cli.app.App.storage", lambda self: CountingStorage(days["repo"]))
    CountingStorage.reads.clear()
    return days


def _read_bytes() -> int:
    n = sum(length for _, _, length in CountingStorage.reads)
    CountingStorage.reads.clear()
    return n


def _db_blob_reads(oracle: dict, snap_id: str) -> int:
    """Reads that touched a blob of that snapshot's Manifest.db."""
    r = _open(Path(os.environ["IBSYNC_REPO"]))
    spans = {}
    for blob_id in oracle["db"][snap_id].ids:
        loc = r.locate(blob_id)
        spans.setdefault(loc.pack_id.hex(), []).append((loc.offset, loc.offset + loc.length))
    return sum(1 for name, off, n in CountingStorage.reads for a, b in spans.get(name, ()) if off < b and a < off + n)


def test_find_across_snapshots_reads_what_changed(counted, cli, capsys):
    oracle = counted["oracle"]
    db_size = max(s.size for s in oracle["db"].values())
    blocks_changed = sum(
        len(
            {
                i
                for i in range(max(len(a.ids), len(b.ids)))
                if i >= len(a.ids) or i >= len(b.ids) or a.ids[i] != b.ids[i]
            }
        )
        for a, b in zip(list(oracle["db"].values()), list(oracle["db"].values())[1:])
    )
    assert db_size > 2 << 20 and blocks_changed < DAYS * len(oracle["db"][oracle["snaps"][0].id].ids) / 4
    _read_bytes()
    started = time.perf_counter()
    out, _ = cli("find", "**", "--json")
    wall = time.perf_counter() - started
    got = _read_bytes()
    assert _got_find(out) == _expected_find(oracle, "**")
    # in pack bytes (compressed): every snapshot's database whole, against the first one whole,
    # the blocks that changed and each snapshot's root tree and changed folders' trees
    r = _open(counted["repo"])
    dbs = list(oracle["db"].values())
    packed = lambda ids: sum(r.locate(i).length for i in set(ids))  # noqa: E731
    straightforward = sum(packed(s.ids) for s in dbs)
    floor = packed(dbs[0].ids) + sum(packed(set(b.ids) - set(a.ids)) for a, b in zip(dbs, dbs[1:]))
    trees = DAYS * (128 << 10)  # root trees and the changed folders' trees, compressed
    assert got < floor + trees and got < straightforward / 3, (got, floor, straightforward)
    with capsys.disabled():
        print(
            f"\nfind '**' over {DAYS} snapshots of a {db_size >> 10} KiB Manifest.db "
            f"({blocks_changed} blocks changed in all): read {got >> 10} KiB of packs in {wall:.2f} s; "
            f"first database and changed blocks: {floor >> 10} KiB; every database whole: {straightforward >> 10} KiB"
        )
    for pattern in ("sms.db", "HomeDomain/**", "CameraRollDomain/Media/**", "nothing-matches-this"):
        out, _ = cli("find", pattern, "--json")
        assert _got_find(out) == _expected_find(oracle, pattern), pattern


def _expected_diff(oracle: dict, a: str, b: str) -> list[tuple]:
    ra, rb = oracle["rows"][a], oracle["rows"][b]
    out = []
    for fid in ra.keys() | rb.keys():
        x, y = ra.get(fid), rb.get(fid)
        if x is None:
            out.append(("added", f"{y[0]}/{y[1]}", y[2]))
        elif y is None:
            out.append(("removed", f"{x[0]}/{x[1]}", x[2]))
        elif x[4] != y[4]:
            out.append(("changed", f"{y[0]}/{y[1]}", y[2]))
    return sorted(out, key=lambda t: t[1])


def test_diff_of_neighbours_reads_what_changed(counted, cli):
    oracle = counted["oracle"]
    snaps = [s.id for s in oracle["snaps"]]
    cli("ls", snaps[0], "--json")  # the first day's database in the cache
    _read_bytes()
    db_size = oracle["db"][snaps[0]].size
    for a, b in zip(snaps, snaps[1:]):
        out, _ = cli("diff", a, b, "--json", "--files")
        got = sorted(((f["status"], f["path"], f["size"]) for f in json.loads(out)["files"]), key=lambda t: t[1])
        assert got == _expected_diff(oracle, a, b)
        read = _read_bytes()
        changed = sum(1 for x, y in zip(oracle["db"][a].ids, oracle["db"][b].ids) if x != y)
        changed += abs(len(oracle["db"][a].ids) - len(oracle["db"][b].ids))
        assert read < db_size / 4 and read < (changed + 30) * (40 << 10), (a, b, read, changed)


def test_second_ls_reads_no_manifest_blocks_and_cache_is_private(counted, cli):
    oracle = counted["oracle"]
    snap = oracle["snaps"][-1].id
    first, _ = cli("ls", snap, "--json")
    assert _db_blob_reads(oracle, snap) > 0
    CountingStorage.reads.clear()
    again, _ = cli("ls", snap, "--json")
    assert again == first
    assert _db_blob_reads(oracle, snap) == 0
    folder = next(Path(os.environ["IBSYNC_CACHE_DIR"]).glob("*/manifests"))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert not [p for p in files if p.name.startswith(".tmp-")]  # nothing private left behind


def test_stale_entries_go_beyond_the_size_limit(counted, cli, monkeypatch):
    oracle = counted["oracle"]
    size = max(s.size for s in oracle["db"].values())
    monkeypatch.setenv("IBSYNC_MANIFEST_CACHE", str(int(size * 1.5)))
    for snap in oracle["snaps"][:4]:
        cli("ls", snap.id, "--json")
    folder = next(Path(os.environ["IBSYNC_CACHE_DIR"]).glob("*/manifests"))
    dbs = list(folder.glob("*.db"))
    assert len(dbs) == 1 and dbs[0].name == f"{oracle['db'][oracle['snaps'][3].id].key}.db"
    assert sorted(p.stem for p in folder.glob("*.ids")) == [dbs[0].stem]
    # without a limit: twice the largest file, so two neighbours fit
    monkeypatch.delenv("IBSYNC_MANIFEST_CACHE")
    for snap in oracle["snaps"][4:7]:
        cli("ls", snap.id, "--json")
    assert len(list(folder.glob("*.db"))) == 2


def test_damaged_or_truncated_cache_files_are_rebuilt(counted, cli):
    oracle = counted["oracle"]
    snap = oracle["snaps"][2].id
    stored = oracle["db"][snap]
    expected, _ = cli("ls", snap, "**", "--json")
    folder = next(Path(os.environ["IBSYNC_CACHE_DIR"]).glob("*/manifests"))
    cached = folder / f"{stored.key}.db"
    good = cached.read_bytes()
    data = bytearray(good)
    data[stored.offsets[3] + 100] ^= 0xFF  # one block damaged: only it is read again
    cached.write_bytes(bytes(data))
    CountingStorage.reads.clear()
    out, _ = cli("ls", snap, "**", "--json")
    assert out == expected and cached.read_bytes() == good
    assert _db_blob_reads(oracle, snap) == 1
    cached.write_bytes(good[: len(good) // 2])  # as a killed writer would leave it, had it no rename
    out, _ = cli("ls", snap, "**", "--json")
    assert out == expected and cached.read_bytes() == good
    # a left-over temporary file is never read as a database, and goes once old
    junk = folder / ".tmp-999999-0123456789abcdef"
    junk.write_bytes(b"half a database")
    os.utime(junk, (time.time() - 7200, time.time() - 7200))
    out, _ = cli("ls", oracle["snaps"][3].id, "**", "--json")
    assert not junk.exists()


def test_extract_uses_the_cache(counted, cli, tmp_path):
    oracle = counted["oracle"]
    snap = oracle["snaps"][-1].id
    cli("ls", snap, "--json")
    CountingStorage.reads.clear()
    cli("extract", snap, "HomeDomain/Library/SMS/sms.db", tmp_path / "out")
    assert _db_blob_reads(oracle, snap) == 0
    fid = sha1(b"HomeDomain-Library/SMS/sms.db").hexdigest()
    assert (tmp_path / "out" / "HomeDomain" / "Library" / "SMS" / "sms.db").stat().st_size == oracle["rows"][snap][fid][
        2
    ]


def test_rows_that_change_without_their_payload(env, cli, tmp_path):
    """A row whose MBFile changes but not its payload (a new time), a large row whose overflow
    page alone changes, a folder row added and a file row removed: find and diff give what whole
    queries give (the overflow change cannot be pinned to rows: that snapshot is read whole)."""
    from test_browse_hostile import backup_with, good

    long_rel = "Library/" + "b" * 5000 + "/big.plist"  # past one page: the MBFile sits on overflow pages
    big = good("HomeDomain", long_rel, b"big")
    rows = [good("HomeDomain", f"Library/f{i:04d}.txt", f"x{i}".encode(), file_id=f"{i:040x}") for i in range(600)]
    src = backup_with(tmp_path / "sample_backup", rows + [big])
    cli("init", "-q")
    cli("import", src, "--allow-unfinished", "-q")
    con = sqlite3.connect(src / "Manifest.db")
    with con:  # day 2: one MBFile gets a new time, its payload stays
        f = BackupFile("HomeDomain", "Library/f0007.txt", 1, 1_800_000_000, 0o100644, 2)
        con.execute("UPDATE Files SET file = ? WHERE fileID = ?", (mbfile_blob(f), f"{7:040x}"))
        con.execute(
            "INSERT INTO Files VALUES (?, 'HomeDomain', 'Library/NewFolder', 2, ?)",
            ("ee" * 20, mbfile_blob(BackupFile("HomeDomain", "Library/NewFolder", 2, 1, 0o40755, 0))),
        )
        con.execute("DELETE FROM Files WHERE fileID = ?", (f"{9:040x}",))
    con.close()
    cli("import", src, "--allow-unfinished", "-q")
    con = sqlite3.connect(src / "Manifest.db")
    with con:  # day 3: only the tail of the large MBFile changes (its overflow page)
        f = BackupFile("HomeDomain", long_rel, 1, 1_700_000_001, 0o100644, 3)
        con.execute("UPDATE Files SET file = ? WHERE fileID = ?", (mbfile_blob(f), big.file_id))
    con.close()
    cli("import", src, "--allow-unfinished", "-q")
    oracle = _oracle(env)
    for pattern in ("**", "HomeDomain/Library/f000*", "big.plist"):
        out, _ = cli("find", pattern, "--json")
        assert _got_find(out) == _expected_find(oracle, pattern), pattern
    out, _ = cli("find", "f0007.txt", "--json")
    assert [v["mtime"] for v in json.loads(out)["paths"][0]["versions"]] == [
        _iso(1_700_000_000),
        _iso(1_800_000_000),
        _iso(1_800_000_000),
    ]
    snaps = [s.id for s in oracle["snaps"]]
    for a, b in zip(snaps, snaps[1:]):
        out, _ = cli("diff", a, b, "--json", "--files")
        got = sorted(((f["status"], f["path"], f["size"]) for f in json.loads(out)["files"]), key=lambda t: t[1])
        assert got == _expected_diff(oracle, a, b)
    assert [f[:2] for f in _expected_diff(oracle, snaps[0], snaps[1])] == [("removed", "HomeDomain/Library/f0009.txt")]
    # day 2 was followed by rowid; day 3's overflow-only change was read whole, not guessed
    from ibsync.reader.history import DeviceHistory

    r = _open(env)
    follow = DeviceHistory(r, PathPattern("**"), None, None)
    whole = []
    for snap in r.snapshots():
        before = follow.whole_queries
        follow.step(snap)
        whole.append(follow.whole_queries - before)
    follow.close()
    assert whole == [1, 0, 1]
