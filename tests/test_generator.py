"""Tests of the synthetic iOS backup generator (ibsync.testing.generator)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import plistlib
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from ibsync.testing import generator as gen
from ibsync.testing.generator import (
    FLAG_DIR,
    FLAG_FILE,
    FLAG_SYMLINK,
    BackupFile,
    generate,
    generate_content,
    mutate_content,
    mutate_folder,
    write_backup_folder,
)

MIB = 1 << 20
SIZE = 12 * MIB
SEED = 11
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sample-backup-mit" / "sample_backup"
BIG_DBS = {
    ("HomeDomain", "Library/SMS/sms.db"),
    ("CameraRollDomain", "Media/PhotoData/Photos.sqlite"),
    ("AppDomainGroup-group.net.whatsapp.WhatsApp.shared", "ChatStorage.sqlite"),
    ("HomeDomain", "Library/Mail/Envelope Index"),
}


@pytest.fixture(scope="module")
def day1():
    return generate_content(seed=SEED, size_bytes=SIZE)


@pytest.fixture(scope="module")
def day1_dir(day1, tmp_path_factory):
    return write_backup_folder(day1, tmp_path_factory.mktemp("day1"))


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root``: relative path -> (bytes, mtime_ns)."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def payload_stats(device_dir: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for d in device_dir.iterdir():
        if d.is_dir():
            for p in d.iterdir():
                st = p.stat()
                out[p.name] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    return out


def decode(blob: bytes) -> tuple[dict, list]:
    arch = plistlib.loads(blob)
    assert arch["$archiver"] == "NSKeyedArchiver"
    assert arch["$version"] == 100000
    objs = arch["$objects"]
    mb = objs[arch["$top"]["root"].data]
    assert objs[mb["$class"].data] == {"$classname": "MBFile", "$classes": ["MBFile", "NSObject"]}
    return mb, objs


def check_folder(device_dir: Path) -> dict[tuple[str, str], tuple[int, dict]]:
    """Check that Manifest.db and the payloads agree; return {(domain, path): (flags, MBFile dict)}."""
    con = sqlite3.connect(f"file:{device_dir / 'Manifest.db'}?mode=ro", uri=True)
    try:
        schema = {name for (name,) in con.execute("SELECT name FROM sqlite_master")}
        assert {"Files", "Properties", "FilesDomainIdx", "FilesRelativePathIdx", "FilesFlagsIdx"} <= schema
        rows = con.execute("SELECT fileID, domain, relativePath, flags, file FROM Files").fetchall()
    finally:
        con.close()
    on_disk = {p.name: p for d in device_dir.iterdir() if d.is_dir() for p in d.iterdir()}
    seen = {}
    for file_id, domain, path, flags, blob in rows:
        assert file_id == hashlib.sha1(f"{domain}-{path}".encode()).hexdigest()
        mb, objs = decode(blob)
        assert objs[mb["RelativePath"].data] == path
        assert mb["UserID"] == 501 and mb["GroupID"] == 501
        assert mb["LastStatusChange"] == mb["LastModified"] >= mb["Birth"]
        payload = device_dir / file_id[:2] / file_id
        if flags == FLAG_FILE:
            assert mb["Mode"] & 0o170000 == 0o100000
            st = payload.stat()
            assert st.st_size == mb["Size"], path
            assert int(st.st_mtime) == mb["LastModified"], path
            assert file_id in on_disk
        else:
            assert not payload.exists()
            assert mb["Size"] == 0
            if flags == FLAG_DIR:
                assert mb["Mode"] & 0o170000 == 0o040000
            else:
                assert flags == FLAG_SYMLINK
                assert mb["Mode"] & 0o170000 == 0o120000
                assert objs[mb["Target"].data]
        seen[(domain, path)] = (flags, mb)
    # no stray payloads, and a directory row for every parent (the domain root "" included)
    assert len(on_disk) == sum(1 for f, _ in seen.values() if f == FLAG_FILE)
    for domain, path in seen:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if path:
            assert seen[(domain, parent)][0] == FLAG_DIR, (domain, path)
    return seen


# ---- generation ---------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_bytes(tmp_path):
    a = generate(tmp_path / "a", seed=5, size_bytes=6 * MIB)
    b = write_backup_folder(generate_content(seed=5, size_bytes=6 * MIB), tmp_path / "b")
    assert a.name == b.name == hashlib.sha1(b"ibsync-synthetic-udid-5").hexdigest()
    ta, tb = tree(a), tree(b)
    assert ta.keys() == tb.keys()
    assert all(ta[k] == tb[k] for k in ta)
    other = generate_content(seed=6, size_bytes=1 * MIB, udid="00008030-000A1B2C3D4E5F60")
    assert other.udid == "00008030-000A1B2C3D4E5F60"
    assert other.manifest_db_bytes() != ta["Manifest.db"][0]
    with pytest.raises(FileExistsError):
        write_backup_folder(dataclasses.replace(other, udid=a.name), tmp_path / "a")


def test_content_shape(day1):
    files = [f for f in day1.files if f.flags == FLAG_FILE]
    total = sum(f.size for f in files) + len(day1.manifest_db_bytes())
    assert 0.85 * SIZE < total < 1.2 * SIZE
    assert len(files) >= 300
    assert {(f.domain, f.relative_path) for f in files} >= BIG_DBS
    assert len({f.file_id for f in day1.files}) == len(day1.files)
    domains = {f.domain for f in day1.files}
    for d in (
        "HomeDomain",
        "CameraRollDomain",
        "MediaDomain",
        "KeychainDomain",
        "WirelessDomain",
        "AppDomain-net.whatsapp.WhatsApp",
        "AppDomainGroup-group.net.whatsapp.WhatsApp.shared",
    ):
        assert d in domains
    assert any(d.startswith("SysSharedContainerDomain-") for d in domains)
    assert [f for f in day1.files if f.flags == FLAG_SYMLINK and f.target and f.data is None]
    assert all(f.data is not None and len(f.data) == f.size for f in files)
    assert all(f.mtime < day1.backup_date.timestamp() for f in day1.files)

    by_kind: dict[str, list[BackupFile]] = {}
    for f in files:
        by_kind.setdefault(gen._category(f.domain, f.relative_path), []).append(f)
    photos = by_kind["photo"]
    assert len(photos) >= 2 and all(p.relative_path.startswith("Media/DCIM/") for p in photos)
    assert all(p.data[4:12] == b"ftypheic" for p in photos)
    assert by_kind["video"] and all(v.data[4:12] == b"ftypqt  " for v in by_kind["video"])
    for f in by_kind["plist"][:20]:
        assert isinstance(plistlib.loads(f.data), dict)
    for f in by_kind["text"][:20]:
        text = f.data.decode()
        if f.relative_path.endswith((".json", ".jsonl")):
            json.loads(text.splitlines()[0])
    for f in by_kind["sqlite"][:5] + by_kind["bigdb"]:
        con = sqlite3.connect(":memory:")
        con.deserialize(f.data)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA page_size").fetchone()[0] == 4096
        con.close()
    thumbs = [f for f in by_kind["random"] if f.relative_path.endswith("5005.JPG")]
    assert thumbs and all(t.data[:3] == b"\xff\xd8\xff" for t in thumbs)


def test_manifest_db_matches_payloads(day1, day1_dir):
    rows = check_folder(day1_dir)
    assert len(rows) == len(day1.files)
    for f in day1.files:
        flags, mb = rows[(f.domain, f.relative_path)]
        assert flags == f.flags and mb["Size"] == f.size and mb["LastModified"] == f.mtime and mb["Mode"] == f.mode
        if f.flags == FLAG_FILE and f.size < 100_000:
            assert (day1_dir / f.file_id[:2] / f.file_id).read_bytes() == f.data


def test_mbfile_blob_is_corefoundations_layout(day1):
    samples = [f for f in day1.files if f.flags != FLAG_FILE][:20]
    samples += [f for f in day1.files if f.flags == FLAG_FILE][:20]
    samples += [
        BackupFile("HomeDomain", "Library/Préférences/ü.plist", FLAG_FILE, 1682109153, 0o100644, 2**33),
        BackupFile("HomeDomain", "MBFile", FLAG_FILE, 0, 0o100644, 0),
        BackupFile("DatabaseDomain", "timezone/localtime", FLAG_SYMLINK, 255, 0o120755, 0, None, "root"),
        BackupFile("AppDomain-x", "a" * 300, FLAG_DIR, 65536, 0o40755, 0),
    ]
    for f in samples:
        blob = gen.mbfile_blob(f)
        assert blob == plistlib.dumps(gen.mbfile_archive(f), fmt=plistlib.FMT_BINARY, sort_keys=False)
        mb, _ = decode(blob)
        assert mb["Size"] == f.size
    con = sqlite3.connect(f"file:{FIXTURE / 'Manifest.db'}?mode=ro&immutable=1", uri=True)
    real = {flags: blob for flags, blob in con.execute("SELECT flags, file FROM Files")}
    con.close()
    for flags, blob in real.items():
        # plistlib reproduces the real (CoreFoundation) bytes once Size is kept apart as mbfile_archive does
        arch = plistlib.loads(blob)
        mb_real = arch["$objects"][1]
        mb_real["Size"] = gen._Int64(mb_real["Size"])
        assert plistlib.dumps(arch, fmt=plistlib.FMT_BINARY, sort_keys=False) == blob
        ours = next(f for f in samples if f.flags == flags)
        mb_ours, _ = decode(gen.mbfile_blob(ours))
        assert list(mb_ours) == list(mb_real)  # same keys, same order
        assert list(plistlib.loads(blob)) == list(plistlib.loads(gen.mbfile_blob(ours)))


def test_plists(day1, day1_dir):
    ts = day1.backup_date.timestamp()
    info_bytes = (day1_dir / "Info.plist").read_bytes()
    assert info_bytes.startswith(b"<?xml")
    info = plistlib.loads(info_bytes)
    for key in (
        "Build Version",
        "Device Name",
        "Display Name",
        "GUID",
        "Installed Applications",
        "Product Type",
        "Product Version",
        "Serial Number",
        "Target Identifier",
        "Unique Identifier",
        "iTunes Version",
        "Last Backup Date",
    ):
        assert key in info
    assert info["Target Type"] == "Device" and info["Unique Identifier"] == day1.udid.upper()
    for name in ("Manifest.plist", "Status.plist"):
        assert (day1_dir / name).read_bytes().startswith(b"bplist00")
        assert (day1_dir / name).stat().st_mtime == ts
    manifest = plistlib.loads((day1_dir / "Manifest.plist").read_bytes())
    assert manifest["Version"] == "10.0" and manifest["IsEncrypted"] is False and manifest["BackupKeyBag"]
    assert manifest["Lockdown"]["UniqueDeviceID"] == day1.udid
    assert manifest["Lockdown"]["ProductType"] == day1.product_type
    assert manifest["Applications"]["net.whatsapp.WhatsApp"]["CFBundleIdentifier"] == "net.whatsapp.WhatsApp"
    status = plistlib.loads((day1_dir / "Status.plist").read_bytes())
    assert status["SnapshotState"] == "finished" and status["Version"] == "3.3" and status["IsFullBackup"] is False
    assert status["Date"] == day1.backup_date.replace(tzinfo=None)


def test_pyiosbackup_reads_the_folder(day1, day1_dir):
    import pyiosbackup  # a dependency of pymobiledevice3

    backup = pyiosbackup.Backup.from_path(day1_dir, password="")
    try:
        assert backup.target_identifier == day1.udid
        sms = next(f for f in day1.files if f.relative_path == "Library/SMS/sms.db")
        entry = backup.get_entry_by_domain_and_path("HomeDomain", "Library/SMS/sms.db")
        assert entry.size == sms.size and entry.read_bytes() == sms.data
        photo = next(f for f in day1.files if gen._category(f.domain, f.relative_path) == "photo")
        assert backup.get_entry_by_id(photo.file_id).read_bytes() == photo.data
        assert sum(1 for _ in backup.iter_files()) == sum(1 for f in day1.files if f.flags == FLAG_FILE)
    finally:  # pyiosbackup leaves a copy of Manifest.db in the temp dir
        db = getattr(backup, "_manifest_db", None)
        if db is not None:
            db._conn.close()
            Path(db.path).unlink(missing_ok=True)


# ---- the next day -------------------------------------------------------------------------------------------


def test_mutate_folder_changes_only_what_a_device_would(day1, tmp_path):
    device_dir = write_backup_folder(day1, tmp_path)
    before = payload_stats(device_dir)
    big_ids = {hashlib.sha1(f"{d}-{p}".encode()).hexdigest(): p for d, p in BIG_DBS}
    big_before = {fid: (device_dir / fid[:2] / fid).read_bytes() for fid in big_ids}

    summary = mutate_folder(device_dir, seed=3)

    after = payload_stats(device_dir)
    rows = check_folder(device_dir)
    old = {f.file_id: f for f in day1.files if f.flags == FLAG_FILE}
    assert summary["rewritten_files"] >= 2 and summary["deleted_files"] >= 1 and summary["new_files"] >= 4
    assert summary["edited_dbs"] == 4
    deleted = before.keys() - after.keys()
    added = after.keys() - before.keys()
    changed = {fid for fid in before.keys() & after.keys() if after[fid] != before[fid]}
    assert len(deleted) == summary["deleted_files"]
    assert len(added) == summary["new_files"]
    assert len(changed) == summary["rewritten_files"] + 4
    assert set(big_ids) <= changed
    for fid in changed:  # written to a temp file and renamed over: a new inode, mtime one day later
        assert after[fid][0] != before[fid][0]
        assert after[fid][1] == before[fid][1] + 86_400 * 10**9
        f = old[fid]
        assert rows[(f.domain, f.relative_path)][1]["LastModified"] == f.mtime + 86_400
    unchanged = before.keys() - deleted - changed
    assert len(unchanged) > 0.9 * len(before)
    for fid in unchanged:  # not touched at all: same inode, mtime and ctime
        assert after[fid] == before[fid]
    for fid, path in big_ids.items():
        new = (device_dir / fid[:2] / fid).read_bytes()
        old_bytes = big_before[fid]
        pages = max(len(new), len(old_bytes)) // 4096
        changed_pages = sum(1 for o in range(0, pages * 4096, 4096) if new[o : o + 4096] != old_bytes[o : o + 4096])
        assert 5 <= changed_pages <= 40, (path, changed_pages, pages)
        assert summary["edited_db_pages_changed"][path] == changed_pages
        assert len(new) - len(old_bytes) <= 8 * 4096  # edited in place: the db grows by a few pages at most
        con = sqlite3.connect(":memory:")
        con.deserialize(new)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
    status = plistlib.loads((device_dir / "Status.plist").read_bytes())
    assert status["Date"] == (day1.backup_date + timedelta(days=1)).replace(tzinfo=None)
    assert not list(device_dir.glob("**/*.ibsync-tmp"))

    # a third day on top works as well
    summary3 = mutate_folder(device_dir, seed=4)
    assert summary3["backup_date"] == (day1.backup_date + timedelta(days=2)).isoformat()
    check_folder(device_dir)


def test_mutate_content_agrees_with_mutate_folder(day1, tmp_path):
    snapshot = (list(day1.files), day1.manifest_db_bytes(), day1.backup_date)
    day2 = mutate_content(day1, seed=7)
    assert (day1.files, day1.manifest_db_bytes(), day1.backup_date) == snapshot  # input untouched
    assert day2.backup_date == day1.backup_date + timedelta(days=1)
    a = write_backup_folder(day2, tmp_path / "a")
    b = write_backup_folder(day1, tmp_path / "b")
    mutate_folder(b, seed=7)
    ta, tb = tree(a), tree(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if ta[k] != tb[k]] == []
    # Manifest.db was edited, not rebuilt: a fresh build of the same rows has other bytes
    assert gen.build_manifest_db(day2.files) != ta["Manifest.db"][0]


def test_cli(tmp_path, capsys):
    assert gen.main(["generate", str(tmp_path), "--size-mib", "3", "--seed", "2"]) == 0
    device_dir = Path(capsys.readouterr().out.strip())
    assert device_dir == tmp_path / hashlib.sha1(b"ibsync-synthetic-udid-2").hexdigest()
    assert (device_dir / "Manifest.db").is_file()
    assert gen.main(["mutate", str(device_dir), "--seed", "9"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["edited_dbs"] == 4 and summary["new_files"] >= 4
    check_folder(device_dir)
