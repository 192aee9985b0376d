"""ls, find, extract and diff: browsing snapshots by iOS domain and path."""

import json
import os
import shutil
import sqlite3
from hashlib import sha1

import pytest

from ibsync.cli import main
from ibsync.reader.mbfile import decode_mbfile
from ibsync.reader.paths import PathPattern
from ibsync.repo.repository import Repository
from ibsync.storage import LocalStorage
from ibsync.testing.generator import BackupFile, generate, mbfile_blob, mutate_folder

from conftest import ENCRYPTED_BACKUP, FAST_KDF, MIT_BACKUP, PASSWORD, copy_folder

SMS = ("HomeDomain", "Library/SMS/sms.db")


def _payload(folder, domain, rel):
    fid = sha1(f"{domain}-{rel}".encode()).hexdigest()
    return folder / fid[:2] / fid


@pytest.fixture(scope="module")
def two_days(tmp_path_factory):
    """A repository with a generated folder's day 1 and day 2 (after mutate_folder), a copy of
    day 1 as it was, and the mutation's summary."""
    base = tmp_path_factory.mktemp("browse")
    live = generate(base / "live", seed=21, size_bytes=16 << 20)
    day1 = shutil.copytree(live, base / "day1" / live.name)
    repo = base / "repo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IBSYNC_REPO", str(repo))
        mp.setenv("IBSYNC_PASSWORD", PASSWORD)
        mp.setattr("ibsync.format.crypto.DEFAULT_KDF", FAST_KDF)
        assert main(["init", "-q"]) == 0
        assert main(["import", str(live), "-q"]) == 0
        change = mutate_folder(live, seed=21)
        assert main(["import", str(live), "-q"]) == 0
    r = Repository.open(LocalStorage(repo), lambda: PASSWORD)
    first, second = (s.id for s in r.snapshots())
    return {"repo": repo, "day1": day1, "day2": live, "change": change, "first": first, "second": second}


@pytest.fixture
def repo2(two_days, env, monkeypatch):
    monkeypatch.setenv("IBSYNC_REPO", str(two_days["repo"]))
    return two_days


def _manifest(folder):
    return sqlite3.connect(f"file:{folder / 'Manifest.db'}?mode=ro&immutable=1", uri=True)


def test_patterns():
    p = PathPattern("CameraRollDomain/Media/DCIM/**")
    assert p.domain == "CameraRollDomain"
    assert p.matches("CameraRollDomain", "Media/DCIM/100APPLE/IMG_0001.HEIC")
    assert not p.matches("CameraRollDomain", "Media/DCIMX/a")
    assert not p.matches("HomeDomain", "Media/DCIM/a")
    star = PathPattern("HomeDomain/Library/*.db")
    assert star.matches("HomeDomain", "Library/a.db") and not star.matches("HomeDomain", "Library/SMS/sms.db")
    deep = PathPattern("HomeDomain/**/*.db")
    assert deep.matches("HomeDomain", "a.db") and deep.matches("HomeDomain", "Library/SMS/sms.db")
    name = PathPattern("sms.db")  # a bare name matches anywhere
    assert name.matches(*SMS) and not name.matches("HomeDomain", "Library/SMS/sms.db-wal")
    folder = PathPattern("HomeDomain/Library/SMS")  # a folder selects what it holds
    assert folder.matches(*SMS) and not folder.matches("HomeDomain", "Library/SMSX/a")
    assert PathPattern("Home?omain/Library/[sS]MS/*").matches(*SMS)
    assert PathPattern(None).matches("X", "y") and PathPattern("**").matches("X", "y")


def test_mbfile_decoder_agrees_with_plistlib():
    for f in (
        BackupFile("HomeDomain", "Library/SMS/sms.db", 1, 1_700_000_000, 0o100644, 123_456),
        BackupFile("D", "x" * 300, 1, 2**31 + 5, 0o100600, 2**40),
    ):
        assert decode_mbfile(mbfile_blob(f)) == (f.size, f.mtime, f.mode, None)
    with pytest.raises(Exception, match="unreadable"):
        decode_mbfile(b"not a plist")


def test_ls_domains_match_manifest_db(repo2, cli):
    out, _ = cli("ls", repo2["first"][:8], "--json")
    listed = {d["domain"]: d for d in json.loads(out)["domains"]}
    con = _manifest(repo2["day1"])
    counts = dict(con.execute("SELECT domain, count(*) FROM Files WHERE flags = 1 GROUP BY domain"))
    dirs = dict(con.execute("SELECT domain, count(*) FROM Files WHERE flags = 2 GROUP BY domain"))
    assert set(listed) == {d for (d,) in con.execute("SELECT DISTINCT domain FROM Files")}
    assert {d: v["files"] for d, v in listed.items() if v["files"]} == counts
    assert {d: v["dirs"] for d, v in listed.items() if v["dirs"]} == dirs
    # sizes are the Manifest.db sizes, which are the payloads' sizes
    for domain, v in listed.items():
        rels = [r for (r,) in con.execute("SELECT relativePath FROM Files WHERE flags = 1 AND domain = ?", (domain,))]
        assert v["bytes"] == sum(_payload(repo2["day1"], domain, r).stat().st_size for r in rels)
    text, _ = cli("ls", "latest")
    assert "CameraRollDomain" in text and "HomeDomain" in text


def test_ls_pattern_lists_the_matching_files(repo2, cli):
    out, _ = cli("ls", repo2["first"][:8], "CameraRollDomain/Media/DCIM/**", "--json")
    files = json.loads(out)["files"]
    con = _manifest(repo2["day1"])
    expected = sorted(
        r
        for (r,) in con.execute(
            "SELECT relativePath FROM Files WHERE flags = 1 AND domain = 'CameraRollDomain' AND relativePath LIKE 'Media/DCIM/%'"
        )
    )
    assert expected and [f["relative_path"] for f in files] == expected
    for f in files:
        st = _payload(repo2["day1"], f["domain"], f["relative_path"]).stat()
        assert f["size"] == st.st_size
        assert f["file_id"] == sha1(f"{f['domain']}-{f['relative_path']}".encode()).hexdigest()
    text, _ = cli("ls", "latest", "Library/SMS/sms.db")  # no domain: a literal path is not a bare name
    assert "0 file(s)" in text
    text, _ = cli("ls", "latest", "sms.db")
    assert "Library/SMS/sms.db" in text and "1 file(s)" in text


def test_extract_writes_real_names_bytes_and_mtime(repo2, cli, tmp_path):
    out_dir = tmp_path / "out"
    cli("extract", repo2["first"][:8], "/".join(SMS), out_dir)
    got = out_dir / "HomeDomain" / "Library" / "SMS" / "sms.db"
    src = _payload(repo2["day1"], *SMS)
    assert got.read_bytes() == src.read_bytes()
    assert got.stat().st_mtime == src.stat().st_mtime
    assert sorted(p.name for p in out_dir.rglob("*")) == ["HomeDomain", "Library", "SMS", "sms.db"]
    # existing files are kept unless --overwrite
    got.write_bytes(b"mine")
    _, err = cli("extract", repo2["first"][:8], "/".join(SMS), out_dir, expect=2)
    assert "exists" in err and "--overwrite" in err and got.read_bytes() == b"mine"
    cli("extract", repo2["second"][:8], "/".join(SMS), out_dir, "--overwrite")
    assert got.read_bytes() == _payload(repo2["day2"], *SMS).read_bytes() != src.read_bytes()
    _, err = cli("extract", "latest", "NoSuchDomain/**", out_dir, expect=2)
    assert "matches" in err


def test_find_shows_both_snapshots_and_the_change(repo2, cli):
    out, _ = cli("find", "sms.db", "--json")
    paths = json.loads(out)["paths"]
    assert [p["path"] for p in paths] == ["/".join(SMS)]
    versions = paths[0]["versions"]
    assert [v["snapshot"] for v in versions] == [repo2["first"], repo2["second"]]
    assert [v["status"] for v in versions] == ["first", "changed"]
    assert versions[1]["size"] == _payload(repo2["day2"], *SMS).stat().st_size
    text, _ = cli("find", "sms.db")
    assert "changed" in text and repo2["second"][:8] in text
    # a file nobody touched is unchanged; a deleted one is marked removed
    con = _manifest(repo2["day1"])
    rows = con.execute(
        "SELECT domain, relativePath FROM Files WHERE flags = 1 ORDER BY domain, relativePath"
    ).fetchall()
    kept = next(r for r in rows if _payload(repo2["day1"], *r).read_bytes() == _payload(repo2["day2"], *r).read_bytes())
    out, _ = cli("find", "/".join(kept), "--json")
    assert [v["status"] for v in json.loads(out)["paths"][0]["versions"]] == ["first", "unchanged"]
    gone = next(r for r in rows if not _payload(repo2["day2"], *r).exists())
    out, _ = cli("find", "/".join(gone), "--json")
    assert [v["status"] for v in json.loads(out)["paths"][0]["versions"]] == ["first", "removed"]


def test_diff_reports_the_mutation(repo2, cli):
    change = repo2["change"]
    out, _ = cli("diff", repo2["first"][:8], "latest", "--json", "--files")
    result = json.loads(out)
    total = result["total"]
    assert total["added"] == change["new_files"]
    assert total["added_bytes"] == change["new_bytes"]
    assert total["removed"] == change["deleted_files"]
    assert total["removed_bytes"] == change["deleted_bytes"]
    assert total["changed"] == change["rewritten_files"] + change["edited_dbs"]
    assert set(result["domains"]) >= {"CameraRollDomain", "HomeDomain"}
    sms = next(f for f in result["files"] if f["path"] == "/".join(SMS))
    assert sms["status"] == "changed" and sms["size"] == _payload(repo2["day2"], *SMS).stat().st_size
    assert sum(f["status"] == "added" for f in result["files"]) == change["new_files"]
    text, _ = cli("diff", repo2["first"][:8], "latest")
    assert "total" in text and "CameraRollDomain" in text
    out, _ = cli("diff", "latest", "latest", "--json")
    assert json.loads(out)["domains"] == {}


def test_extract_names_files_it_cannot_read(env, cli, tmp_path):
    """A damaged blob fails the file that uses it: named on stderr, not written, exit 1."""
    src = copy_folder(MIT_BACKUP, tmp_path / "sample_backup")
    cli("init")
    cli("import", src, "--allow-unfinished")
    out, _ = cli("ls", "latest", "**", "--json")
    victim = next(f for f in json.loads(out)["files"] if f["size"] > 0)
    repo = Repository.open(LocalStorage(env), lambda: PASSWORD)
    repo.load_index()
    from ibsync.reader.manifest import SnapshotManifest

    with SnapshotManifest(repo, repo.snapshots()[-1]) as m:
        node = m.payload(victim["file_id"])
    loc = repo.locate(node.content[0])
    pack = env / "packs" / loc.pack_id.hex()[:2] / loc.pack_id.hex()
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x01
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))
    _, err = cli("extract", "latest", victim["path"], tmp_path / "out", expect=1)
    assert f"cannot extract {victim['path']}" in err and "1 file(s) could not be extracted" in err
    assert not (tmp_path / "out" / victim["domain"] / victim["relative_path"]).exists()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # no temporary file left


def test_encrypted_ios_backup(env, cli, tmp_path, monkeypatch):
    """pyiosbackup's fixture (password 0000): one file, flags 0, plaintext 'Test data'."""
    monkeypatch.delenv("IBSYNC_BACKUP_PASSWORD", raising=False)
    src = copy_folder(ENCRYPTED_BACKUP, tmp_path / "src" / ENCRYPTED_BACKUP.name)
    cli("init")
    cli("import", src, "--allow-unfinished")
    _, err = cli("ls", "latest", expect=2)  # stdin is not a terminal here: no prompt, a clear line
    assert "--backup-password-file" in err and len(err.strip().splitlines()) == 1
    pw = tmp_path / "pw"
    pw.write_text("0000\n")
    out_dir = tmp_path / "out"
    out, _ = cli("extract", "latest", "MyTestDomain/**", out_dir, "--backup-password-file", pw, "--json")
    assert json.loads(out)["files"] == 1
    got = out_dir / "MyTestDomain" / "Media" / "Test.txt"
    assert got.read_bytes() == b"Test data"
    assert got.stat().st_mtime == 1628082463  # LastModified from the encrypted Manifest.db
    monkeypatch.setenv("IBSYNC_BACKUP_PASSWORD", "1234")
    out, err = cli("extract", "latest", "MyTestDomain/**", tmp_path / "out2", expect=4)
    assert err.strip() == "ibsync: error: wrong iOS backup password"
    assert "Traceback" not in out + err
