"""SnapshotView (ibsync/reader/browse.py): a snapshot as domains, apps, folders and files."""

from __future__ import annotations

import plistlib
import sqlite3
from pathlib import Path

import pytest

from ibsync.cli import main
from ibsync.errors import NotFound, UserError
from ibsync.reader.browse import Item, SnapshotView
from ibsync.reader.ios_crypto import BackupKeyring
from ibsync.reader.manifest_cache import ManifestCache
from ibsync.reader.mbfile import decode_mbfile
from ibsync.testing.generator import (
    FLAG_DIR,
    FLAG_FILE,
    FLAG_SYMLINK,
    MODE_DIR,
    MODE_FILE,
    MODE_SYMLINK,
    BackupFile,
    generate,
    write_rows_folder,
)

from conftest import FAST_KDF, PASSWORD, open_repo

T = 1_700_000_000
IOS_PASSWORD = "hunter2"


def _f(domain: str, rel: str, data: bytes, mtime: int = T, mode: int = MODE_FILE) -> BackupFile:
    return BackupFile(domain, rel, FLAG_FILE, mtime, mode, len(data), data)


def _hand_rows() -> list[BackupFile]:
    rows = [
        _f("HomeDomain", "Library/SMS/sms.db", b"sqlite" * 100, T + 1),
        _f("HomeDomain", "Library/Notes/notes.txt", "Grüße".encode(), T + 2, 0o100600),
        _f("CameraRollDomain", "Media/DCIM/100APPLE/IMG_0001.JPG", b"\xff\xd8photo-1", T + 3),
        _f("CameraRollDomain", "Media/DCIM/100APPLE/IMG_0002.HEIC", b"heic-2", T + 4),
        _f("AppDomain-net.whatsapp.WhatsApp", "Documents/chat.sqlite", b"chat", T + 5),
        _f("AppDomainGroup-group.net.whatsapp.WhatsApp.shared", "Message/Media/a/b.jpg", b"wa", T + 6),
        _f("AppDomainPlugin-net.whatsapp.WhatsApp.ServiceExtension", "Library/x.plist", b"<plist/>", T + 7),
        _f("MediaDomain", "Media/Recordings/Ünïcode Mémo.m4a", b"memo", T + 8),
        BackupFile("HomeDomain", "Library/link", FLAG_SYMLINK, T + 9, MODE_SYMLINK, 0, None, "SMS/sms.db"),
        # hostile names: left out, never a folder of their own
        _f("HomeDomain", "Library/../escape.txt", b"no"),
        _f("HomeDomain", "Library//double.txt", b"no"),
        _f("HomeDomain", "Library/./dot.txt", b"no"),
    ]
    rows += [_f("HomeDomain", f"Library/Many/file{i:03d}.txt", f"n{i}".encode(), T + i) for i in range(250)]
    rows += [BackupFile("HomeDomain", f"Library/Many/sub{i}", FLAG_DIR, T, MODE_DIR, 0) for i in range(3)]
    # a file row where other rows need a folder: the folder wins
    rows += [_f("HomeDomain", "Library/Clash", b"file row"), _f("HomeDomain", "Library/Clash/inner.txt", b"in", T + 11)]
    # rows below a folder without a row of its own (Implied/, Implied/Deeper/): implied folders
    rows += [_f("SysContainerDomain-com.apple.geod", "Implied/Deeper/leaf.bin", b"leaf", T + 10)]
    return rows


def _import(folder: Path, repo: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IBSYNC_REPO", str(repo))
        mp.setenv("IBSYNC_PASSWORD", PASSWORD)
        mp.setenv("IBSYNC_CACHE_DIR", str(repo.parent / "cache"))
        mp.setattr("ibsync.format.crypto.DEFAULT_KDF", FAST_KDF)
        if not repo.exists():
            assert main(["init", "-q"]) == 0
        assert main(["import", str(folder), "-q"]) == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One repository with three snapshots: a generated backup, a hand-made one (implied
    folders, hostile names, a big folder) and the hand-made one as an encrypted iOS backup."""
    base = tmp_path_factory.mktemp("view")
    repo = base / "repo"
    generated = generate(base / "gen", seed=31, size_bytes=4 << 20, udid="a" * 40)
    rows = _hand_rows()
    # the geod domain gets no directory rows at all: its folders are implied
    plain = write_rows_folder(base / "hand", rows, udid="b" * 40)
    with sqlite3.connect(plain / "Manifest.db") as con:
        con.execute("DELETE FROM Files WHERE domain = 'SysContainerDomain-com.apple.geod' AND flags = 2")
        # a name that is not UTF-8 (bytes ff): left out of browsing like the other unusable names
        con.execute(
            "INSERT INTO Files SELECT 'f' || substr(fileID, 2), domain, CAST(X'4c6962726172792fff2e747874' AS TEXT),"
            " flags, file FROM Files WHERE relativePath = 'Library/SMS/sms.db'"
        )
    encrypted = write_rows_folder(base / "enc", rows, udid="c" * 40, password=IOS_PASSWORD)
    for folder in (generated, plain, encrypted):
        _import(folder, repo)
    r = open_repo(repo)
    snaps = {s.device.udid[0].lower(): s for s in r.snapshots()}
    assert set(snaps) == {"a", "b", "c"}
    return {"repo": r, "generated": generated, "plain": plain, "snaps": snaps, "base": base}


def _view(world, which: str, keyring=None) -> SnapshotView:
    repo = world["repo"]
    return SnapshotView(repo, world["snaps"][which], keyring, cache=ManifestCache(world["base"] / "mcache"))


def _source_rows(folder: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """path -> (flags, size, mtime, mode, fileID) of every row of a plaintext folder's Manifest.db."""
    con = sqlite3.connect(f"file:{folder / 'Manifest.db'}?mode=ro", uri=True)
    out = {}
    for fid, domain, rel, flags, blob in con.execute("SELECT fileID, domain, relativePath, flags, file FROM Files"):
        size, mtime, mode, _ = decode_mbfile(blob)
        out[f"{domain}/{rel}" if rel else domain] = (flags, size, mtime, mode, fid)
    con.close()
    return out


def test_generated_snapshot_matches_its_folder(world):
    src = world["generated"]
    rows = _source_rows(src)
    files = {p: r for p, r in rows.items() if r[0] == FLAG_FILE}
    with _view(world, "a") as v:
        walked = list(v.walk(""))
        assert [i.path for i in walked] == sorted(p for p, r in rows.items() if r[0] in (FLAG_FILE, FLAG_SYMLINK))
        for item in walked:
            flags, size, mtime, mode, fid = rows[item.path]
            assert (item.size if item.kind == "file" else 0, item.mtime, item.mode, item.file_id) == (
                size if flags == FLAG_FILE else 0,
                mtime,
                mode & 0o7777,
                fid,
            )
            assert item.name == item.path.rsplit("/", 1)[1]
        # every file's bytes, verified and equal to the payload in the folder
        for item in walked:
            if item.kind == "file":
                fid = files[item.path][4]
                assert b"".join(v.open(item)) == (src / fid[:2] / fid).read_bytes(), item.path
        # the top level: one folder per domain; domain summaries agree with the rows
        top = v.list("")
        domains = sorted({p.split("/", 1)[0] for p in rows})
        assert sorted(i.path for i in top) == domains and all(i.kind == "dir" for i in top)
        assert v.count("") == len(domains)
        summaries = {d.name: d for d in v.domains()}
        assert set(summaries) == set(domains)
        for d in domains:
            mine = [r for p, r in files.items() if p.split("/", 1)[0] == d]
            assert (summaries[d].files, summaries[d].bytes) == (len(mine), sum(r[1] for r in mine)), d
        # app names come from Manifest.plist, not bundle ids
        wa = summaries["AppDomain-net.whatsapp.WhatsApp"]
        assert wa.title == "WhatsApp" and wa.group == "Apps" and wa.app.version == "24.10.79"
        assert "AppDomainGroup-group.net.whatsapp.WhatsApp.shared" in wa.app.domains
        assert summaries["CameraRollDomain"].title == "Camera Roll"
        assert summaries["CameraRollDomain"].group == "Photos & media"
        assert summaries["HomeDomain"].group == "Messages & home"
        order = [
            (["Apps", "Photos & media", "Messages & home", "System"].index(d.group), d.title.casefold())
            for d in v.domains()
        ]
        assert order == sorted(order)
        assert {a.bundle_id for a in v.apps()} >= {"net.whatsapp.WhatsApp"}
        # each folder lists exactly its direct children, folders first then by name
        for folder in ("HomeDomain", "HomeDomain/Library", "CameraRollDomain/Media"):
            kids = v.list(folder)
            expect = sorted(
                (p for p in rows if p.startswith(folder + "/") and "/" not in p[len(folder) + 1 :]),
                key=lambda p: (rows[p][0] != FLAG_DIR, p),
            )
            assert [i.path for i in kids] == expect
            assert v.count(folder) == len(expect)
        assert not v.bad_rows


def test_hand_made_snapshot(world):
    rows = {f"{r.domain}/{r.relative_path}": r for r in _hand_rows()}
    with _view(world, "b") as v:
        # stat: the top, a domain, a folder, a file, a symlink, nothing
        assert v.stat("") == Item("", "", "dir", 0, 0, 0o755, None)
        home = v.stat("HomeDomain")
        assert home.kind == "dir" and home.name == "HomeDomain" and home.file_id is not None
        sms = v.stat("HomeDomain/Library/SMS/sms.db")
        assert (sms.kind, sms.size, sms.mtime, sms.mode, sms.name) == ("file", 600, T + 1, 0o644, "sms.db")
        assert v.stat("HomeDomain/Library/Notes/notes.txt").mode == 0o600
        assert v.stat("HomeDomain/Library/link").kind == "symlink"
        assert v.stat("HomeDomain/nothing") is None and v.stat("NoSuchDomain") is None
        assert b"".join(v.open(sms)) == rows["HomeDomain/Library/SMS/sms.db"].data
        memo = v.stat("MediaDomain/Media/Recordings/Ünïcode Mémo.m4a")
        assert memo is not None and b"".join(v.open(memo)) == b"memo"
        # implied folders: no row of their own, still folders, file_id None
        implied = v.stat("SysContainerDomain-com.apple.geod/Implied")
        assert implied == Item("SysContainerDomain-com.apple.geod/Implied", "Implied", "dir", 0, 0, 0o755, None)
        assert [i.path for i in v.list("SysContainerDomain-com.apple.geod")] == [
            "SysContainerDomain-com.apple.geod/Implied"
        ]
        assert [i.name for i in v.list("SysContainerDomain-com.apple.geod/Implied/Deeper")] == ["leaf.bin"]
        assert [i.path for i in v.walk("SysContainerDomain-com.apple.geod")] == [
            "SysContainerDomain-com.apple.geod/Implied/Deeper/leaf.bin"
        ]
        # hostile names are left out and named in bad_rows, nothing of them is listed
        lib = [i.name for i in v.list("HomeDomain/Library")]
        assert lib == ["Clash", "Many", "Notes", "SMS", "link"]
        assert v.stat("HomeDomain/Library/Clash") == Item("HomeDomain/Library/Clash", "Clash", "dir", 0, 0, 0o755, None)
        assert [i.path for i in v.list("HomeDomain/Library/Clash")] == ["HomeDomain/Library/Clash/inner.txt"]
        files_in_home = sum(
            1
            for r in rows.values()
            if r.domain == "HomeDomain"
            and r.flags == FLAG_FILE
            and "/." not in r.relative_path
            and "//" not in r.relative_path
            and r.relative_path != "Library/Clash"
        )
        home_summary = {d.name: d for d in v.domains()}["HomeDomain"]
        assert home_summary.files == files_in_home == len([i for i in v.walk("HomeDomain") if i.kind == "file"])
        assert not [i for i in v.walk("") if "escape" in i.path or "double" in i.path or "dot.txt" in i.path]
        assert {b.path for b in v.bad_rows} == {
            "HomeDomain/Library/../escape.txt",
            "HomeDomain/Library//double.txt",
            "HomeDomain/Library/./dot.txt",  # and the generator's folder rows:
            "HomeDomain/Library/..",
            "HomeDomain/Library/.",
            "HomeDomain/Library/",
            "HomeDomain/Library/\udcff.txt",
        }
        # paging through a folder of 3 folders and 250 files
        many = "HomeDomain/Library/Many"
        assert v.count(many) == 253
        pages = [v.list(many, offset=o, limit=100) for o in (0, 100, 200, 300)]
        assert [len(p) for p in pages] == [100, 100, 53, 0]
        names = [i.name for p in pages for i in p]
        assert names == ["sub0", "sub1", "sub2"] + [f"file{i:03d}.txt" for i in range(250)]
        assert names == [i.name for i in v.list(many)]
        assert [i.mtime for i in pages[1][:2]] == [T + 97, T + 98]
        # walk: files and symlinks at or below a path, in path order; a file walks to itself
        walked = [i.path for i in v.walk("HomeDomain/Library")]
        assert walked == sorted(walked) and len(walked) == 254
        assert [i.path for i in v.walk("HomeDomain/Library/SMS/sms.db")] == ["HomeDomain/Library/SMS/sms.db"]
        # search: case-insensitive, rows only, path order, limited
        assert [i.path for i in v.search("IMG_000")] == [
            "CameraRollDomain/Media/DCIM/100APPLE/IMG_0001.JPG",
            "CameraRollDomain/Media/DCIM/100APPLE/IMG_0002.HEIC",
        ]
        assert [i.path for i in v.search("ünïcode mém")] == ["MediaDomain/Media/Recordings/Ünïcode Mémo.m4a"]
        assert [i.path for i in v.search("ÜNÏCODE")] == ["MediaDomain/Media/Recordings/Ünïcode Mémo.m4a"]
        assert len(v.search("file", limit=7)) == 7
        assert v.search("Implied") == [v.stat("SysContainerDomain-com.apple.geod/Implied/Deeper/leaf.bin")]
        assert v.search("100%") == [] and v.search("_") != []  # LIKE's wildcards are plain characters
        assert [i.path for i in v.search("sms")][:2] == ["HomeDomain/Library/SMS", "HomeDomain/Library/SMS/sms.db"]
        # errors: a missing path, a file where a folder is needed, opening a folder
        with pytest.raises(NotFound):
            v.list("HomeDomain/nothing")
        with pytest.raises(NotFound):
            v.count("Nope")
        with pytest.raises(UserError):
            v.list("HomeDomain/Library/SMS/sms.db")
        with pytest.raises(UserError):
            v.open(v.stat("HomeDomain/Library"))
        # apps: a group and a plugin domain belong to their app
        wa = {d.name: d for d in v.domains()}["AppDomainPlugin-net.whatsapp.WhatsApp.ServiceExtension"]
        assert wa.app is not None and wa.app.bundle_id == "net.whatsapp.WhatsApp" and wa.group == "Apps"


def test_encrypted_snapshot(world, monkeypatch):
    asked = []

    def password():
        asked.append(1)
        return IOS_PASSWORD

    with pytest.raises(UserError):
        _view(world, "c")  # no keyring: a clear error, not a traceback
    with _view(world, "c", BackupKeyring(password)) as v:
        sms = v.stat("HomeDomain/Library/SMS/sms.db")
        assert b"".join(v.open(sms)) == b"sqlite" * 100
        assert [i.name for i in v.list("HomeDomain/Library")] == ["Clash", "Many", "Notes", "SMS", "link"]
        for item in v.walk("CameraRollDomain"):
            assert b"".join(v.open(item)).startswith((b"\xff\xd8photo", b"heic"))
        assert v.count("HomeDomain/Library/Many") == 253
        assert [i.path for i in v.search("mémo")] == ["MediaDomain/Media/Recordings/Ünïcode Mémo.m4a"]
    assert asked == [1]


def test_views_share_threads(world):
    """Pages asked from several threads at once all come back whole (the web server's case)."""
    from concurrent.futures import ThreadPoolExecutor

    with _view(world, "b") as v:
        expect = [i.name for i in v.list("HomeDomain/Library/Many")]
        with ThreadPoolExecutor(4) as pool:
            got = list(
                pool.map(
                    lambda o: [i.name for i in v.list("HomeDomain/Library/Many", offset=o, limit=50)], range(0, 253, 50)
                )
            )
        assert [n for page in got for n in page] == expect


def test_index_is_cached_for_plaintext_backups_only(world, monkeypatch):
    """A plaintext snapshot's index is kept beside the Manifest.db cache and reused (left-out rows
    included); an encrypted backup's names never reach the cache."""
    cache = ManifestCache(world["base"] / "cache2" / "manifests")
    browse_dir = world["base"] / "cache2" / "browse"
    repo = world["repo"]
    with SnapshotView(repo, world["snaps"]["b"], cache=cache) as v:
        first = ([i.path for i in v.walk("")], sorted(b.path for b in v.bad_rows), v.domains())
        key = v.manifest.stored.key
    cached = [p.name for p in browse_dir.iterdir()]
    assert cached == [f"{key}.v1.db"]
    assert oct(browse_dir.stat().st_mode & 0o777) == "0o700"
    with monkeypatch.context() as mp, SnapshotView(repo, world["snaps"]["b"], cache=cache) as v:
        mp.setattr("ibsync.reader.browse._Index.build", None)  # loaded, not built again
        assert ([i.path for i in v.walk("")], sorted(b.path for b in v.bad_rows), v.domains()) == first
        assert v.list("HomeDomain/Library/Many", offset=3, limit=2) == [
            v.stat("HomeDomain/Library/Many/file000.txt"),
            v.stat("HomeDomain/Library/Many/file001.txt"),
        ]
    # a damaged cached index is rebuilt, not trusted
    (browse_dir / f"{key}.v1.db").write_bytes(b"not a database")
    with SnapshotView(repo, world["snaps"]["b"], cache=cache) as v:
        assert [i.path for i in v.walk("")] == first[0]
    with SnapshotView(repo, world["snaps"]["c"], BackupKeyring(lambda: IOS_PASSWORD), cache=cache) as v:
        assert v.stat("HomeDomain/Library/SMS/sms.db") is not None
    assert [p.name for p in browse_dir.iterdir()] == [f"{key}.v1.db"]


def test_app_names_from_both_plists():
    """Manifest.plist's Applications (the .app folder's name) and iTunes' Info.plist (the
    iTunesMetadata item name, CFBundleDisplayName); odd values fall back to the bundle id."""
    from ibsync.reader.apps import build_apps, describe

    manifest = {
        "Applications": {
            "net.whatsapp.WhatsApp": {
                "CFBundleVersion": "24.1",
                "Path": "/private/var/containers/Bundle/Application/X/WhatsApp.app",
            },
            "com.example.odd": {"Path": 42, "CFBundleVersion": ["no"]},
            "com.example.meta": {"CFBundleIdentifier": "com.example.meta"},
        }
    }
    info = {
        "Applications": {
            "com.example.meta": {
                "iTunesMetadata": plistlib.dumps({"itemName": "Meta App", "bundleShortVersionString": "2.0"})
            },
            "com.example.shown": {"CFBundleDisplayName": "Shown Name"},
            "com.example.broken": {"iTunesMetadata": b"not a plist"},
        },
        "Installed Applications": ["com.example.installed", 7],
    }
    domains = [
        "AppDomain-net.whatsapp.WhatsApp",
        "AppDomainGroup-group.net.whatsapp.WhatsApp.shared",
        "AppDomainPlugin-net.whatsapp.WhatsApp.Intents",
        "AppDomain-com.example.meta",
        "AppDomain-org.unlisted.App",
        "AppDomainGroup-group.org.nobody",
        "HomeDomain",
    ]
    apps = build_apps(manifest, info, domains)
    assert (apps["net.whatsapp.WhatsApp"].name, apps["net.whatsapp.WhatsApp"].version) == ("WhatsApp", "24.1")
    assert apps["net.whatsapp.WhatsApp"].domains == (
        "AppDomain-net.whatsapp.WhatsApp",
        "AppDomainGroup-group.net.whatsapp.WhatsApp.shared",
        "AppDomainPlugin-net.whatsapp.WhatsApp.Intents",
    )
    assert (apps["com.example.meta"].name, apps["com.example.meta"].version) == ("Meta App", "2.0")
    assert apps["com.example.shown"].name == "Shown Name"
    assert (apps["com.example.odd"].name, apps["com.example.odd"].version) == ("com.example.odd", None)
    assert apps["com.example.broken"].name == "com.example.broken"
    assert apps["com.example.installed"].domains == ()
    assert apps["org.unlisted.App"].name == "org.unlisted.App"  # an AppDomain the plists do not name
    wa = apps["net.whatsapp.WhatsApp"]
    assert describe("AppDomainPlugin-net.whatsapp.WhatsApp.Intents", wa) == ("WhatsApp (extension Intents)", "Apps")
    assert describe("AppDomainGroup-group.net.whatsapp.WhatsApp.shared", wa) == ("WhatsApp (shared)", "Apps")
    assert describe("AppDomainGroup-group.org.nobody", None) == ("group.org.nobody", "Apps")
    assert describe("CameraRollDomain", None) == ("Camera Roll", "Photos & media")
    assert describe("SysContainerDomain-com.apple.geod", None) == ("System container com.apple.geod", "System")
    assert describe("SomethingNewDomain", None) == ("SomethingNewDomain", "System")


def test_prepare_reports_progress(world):
    seen = []
    with SnapshotView(world["repo"], world["snaps"]["a"]) as v:  # no cache: built here
        v.prepare(lambda done, total: seen.append((done, total)))
        total = (
            sqlite3.connect(f"file:{world['generated'] / 'Manifest.db'}?mode=ro", uri=True)
            .execute("SELECT count(*) FROM Files")
            .fetchone()[0]
        )
        assert seen and seen[-1] == (total, total)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        assert v.count("") == len(v.domains())
