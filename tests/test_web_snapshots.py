"""The web app's snapshot pages: a device's snapshots, the diff, the browser (domains, folders,
search, downloads of a file and of a ZIP, previews and thumbnails), the iOS backup password of
an encrypted backup; in a real browser (Playwright driving Debian's Chromium) and over plain
HTTP for the security rules (paths outside the snapshot, unknown snapshots) and streaming."""

from __future__ import annotations

import dataclasses
import io
import plistlib
import zipfile
from datetime import timedelta
from pathlib import Path

import httpx
import pillow_heif
import pytest
from PIL import Image

from ibsync.cli import main
from ibsync.repo.repository import Repository
from ibsync.storage import LocalStorage
from ibsync.testing.generator import (
    FLAG_FILE,
    MODE_FILE,
    BackupFile,
    generate_content,
    write_backup_folder,
)

from conftest import ENCRYPTED_BACKUP, FAST_KDF, PASSWORD, copy_folder
from webtools import browser, login, page, screenshot, serve_app  # noqa: F401  (pytest fixtures)

T0 = 1_700_000_000
PHOTOS = "CameraRollDomain/Media/DCIM/100APPLE"
NOTES = "HomeDomain/Library/Notes Export"
UNICODE_NAME = "Café ünïcode – 日本.txt"
ENCRYPTED_PASSWORD = "0000"  # pyiosbackup's fixture

pillow_heif.register_heif_opener()  # to write the test's HEIC photo


def _image(fmt: str, size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    im = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):  # not a flat colour: a real decode is needed to show it
        for y in range(0, size[1], 5):
            im.putpixel((x, y), (x % 256, y % 256, 128))
    out = io.BytesIO()
    im.save(out, fmt)
    return out.getvalue()


def _file(domain_path: str, data: bytes, mtime: int = T0) -> BackupFile:
    domain, _, rel = domain_path.partition("/")
    return BackupFile(domain, rel, FLAG_FILE, mtime, MODE_FILE, len(data), data)


def _with_parents(files: list[BackupFile]) -> list[BackupFile]:
    """Directory rows for the folders the added files need (as a device records them)."""
    have = {(f.domain, f.relative_path) for f in files}
    out = list(files)
    for f in files:
        parts = f.relative_path.split("/")
        for i in range(1, len(parts)):
            key = (f.domain, "/".join(parts[:i]))
            if key not in have:
                have.add(key)
                out.append(BackupFile(f.domain, key[1], 2, T0, 0o40755, 0))
    return sorted(out, key=lambda f: (f.domain, f.relative_path))


def _ours_day1() -> dict[str, bytes]:
    bplist = plistlib.dumps(
        {"Greeting": "hello from a binary plist", "Count": 3, "Nested": {"a": [1, 2]}}, fmt=plistlib.FMT_BINARY
    )
    return {
        f"{PHOTOS}/IMG_9001.PNG": _image("PNG", (640, 480), (30, 120, 200)),
        f"{PHOTOS}/IMG_9002.JPG": _image("JPEG", (800, 600), (200, 80, 40)),
        f"{PHOTOS}/IMG_9003.HEIC": _image("HEIF", (320, 240), (40, 200, 90)),
        f"{NOTES}/{UNICODE_NAME}": "Grüße aus dem Backup\n".encode() * 50,
        f"{NOTES}/shopping.txt": b"milk\nbread\neggs\n",
        f"{NOTES}/settings.plist": bplist,
        f"{NOTES}/Sub/deep.bin": bytes(range(256)) * 300,
        f"{NOTES}/Sub/gone-tomorrow.txt": b"removed in the second snapshot\n",
    }


def _ours_day2(day1: dict[str, bytes]) -> dict[str, bytes]:
    day2 = dict(day1)
    day2[f"{NOTES}/shopping.txt"] = b"milk\nbread\neggs\ncoffee\n"  # changed
    del day2[f"{NOTES}/Sub/gone-tomorrow.txt"]  # removed
    day2[f"{NOTES}/Sub/new-today.txt"] = b"added in the second snapshot\n"  # added
    return day2


def _content(base, ours: dict[str, bytes], day: int):
    mine = {tuple(p.split("/", 1)) for p in ours}
    files = [f for f in base.files if (f.domain, f.relative_path) not in mine]
    files += [_file(p, data, T0 + day * 86400) for p, data in ours.items()]
    files = _with_parents(files)
    return dataclasses.replace(
        base, files=files, backup_date=base.backup_date + timedelta(days=day), manifest_db=None, manifest_signature=None
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A repository with two snapshots of a generated phone (our files added: photos, text, a
    binary plist, a non-ASCII name; one file changed, one removed, one added on day 2) and one
    encrypted iOS backup (another device); a config file naming the repository 'phone'."""
    base = tmp_path_factory.mktemp("websnap")
    generated = generate_content(seed=31, size_bytes=2 << 20, device_name="Web Test iPhone")
    day1, day2 = _ours_day1(), None
    day2 = _ours_day2(day1)
    repo = base / "repo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IBSYNC_REPO", str(repo))
        mp.setenv("IBSYNC_PASSWORD", PASSWORD)
        mp.setenv("IBSYNC_CACHE_DIR", str(base / "cache"))
        mp.setattr("ibsync.format.crypto.DEFAULT_KDF", FAST_KDF)
        assert main(["init", "-q"]) == 0
        f1 = write_backup_folder(_content(generated, day1, 0), base / "day1")
        assert main(["import", str(f1), "-q"]) == 0
        f2 = write_backup_folder(_content(generated, day2, 1), base / "day2")
        assert main(["import", str(f2), "-q"]) == 0
        enc = copy_folder(ENCRYPTED_BACKUP, base / "enc" / ENCRYPTED_BACKUP.name)
        assert main(["import", str(enc), "--allow-unfinished", "-q"]) == 0
    r = Repository.open(LocalStorage(repo), lambda: PASSWORD)
    snaps = r.snapshots()
    plain = [s for s in snaps if s.device.udid.upper() == generated.udid.upper()]
    encrypted = [s for s in snaps if s.ios_encrypted]
    assert len(plain) == 2 and len(encrypted) == 1
    config = base / "config.toml"
    config.write_text(f'[repositories.phone]\nurl = "{repo}"\n')
    return {
        "repo": repo,
        "config": config,
        "udid": generated.udid,
        "first": plain[0],
        "second": plain[1],
        "encrypted": encrypted[0],
        "day1": day1,
        "day2": day2,
        "cache": base / "cache",
    }


@pytest.fixture
def app(world, monkeypatch, tmp_path):
    monkeypatch.setenv("IBSYNC_PASSWORD", PASSWORD)
    monkeypatch.setenv("IBSYNC_CACHE_DIR", str(world["cache"]))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with serve_app(world["config"], history_path=tmp_path / "history.db") as running:
        yield running


def _client(app) -> httpx.Client:
    """An HTTP client with a session (the login link followed once)."""
    client = httpx.Client(base_url=app.base_url, follow_redirects=False, timeout=60)
    r = client.get(app.login_url)
    assert r.status_code in (302, 303), r.text
    assert client.cookies, "the login link gave no session cookie"
    return client


def _second_client(app) -> httpx.Client:
    """Another session (the login link works once): made by the app's Auth, as a login does."""
    auth = app.ctx.auth
    session = auth.new_session()
    client = httpx.Client(base_url=app.base_url, follow_redirects=False, timeout=60)
    client.cookies.set(auth.cookie_name, session.id)
    return client


def _snap_url(world, which: str, page: str) -> str:
    return f"/repositories/phone/snapshots/{world[which].id}/{page}"


# ---- plain HTTP ---------------------------------------------------------------------------------


def test_paths_outside_the_snapshot_are_refused(world, app):
    c = _client(app)
    for bad in (
        "../etc/passwd",
        "/etc/passwd",
        "HomeDomain/../../x",
        "HomeDomain/./Library",
        "HomeDomain//Library",
        "HomeDomain/Library\0x",
        "..",
    ):
        for page_ in ("browse", "file", "preview", "thumb", "zip"):
            r = c.get(_snap_url(world, "second", page_), params={"path": bad})
            assert r.status_code == 400, (page_, bad, r.status_code, r.text[:200])
    # a real path that is not there: 404, not a listing of something else
    r = c.get(_snap_url(world, "second", "file"), params={"path": "HomeDomain/no/such/file"})
    assert r.status_code == 404
    # the repository's own objects are not reachable through a snapshot
    r = c.get(_snap_url(world, "second", "file"), params={"path": "Manifest.db"})
    assert r.status_code == 404


def test_unknown_or_malformed_snapshot(world, app):
    c = _client(app)
    r = c.get(f"/repositories/phone/snapshots/{'0' * 64}/browse")
    assert r.status_code == 404
    r = c.get("/repositories/phone/snapshots/xyz/browse")
    assert r.status_code == 400
    r = c.get(f"/repositories/nosuchrepo/snapshots/{world['second'].id}/browse")
    assert r.status_code == 404
    r = c.get("/repositories/phone/devices/NOSUCHDEVICE")
    assert r.status_code == 404
    r = c.get(_snap_url(world, "second", "browse"), params={"offset": "-1", "path": "HomeDomain"})
    assert r.status_code == 400


def test_no_session_no_snapshot(world, app):
    r = httpx.get(app.base_url + _snap_url(world, "second", "file"), params={"path": f"{NOTES}/shopping.txt"})
    assert r.status_code in (401, 303) and b"milk" not in r.content


def test_file_download_and_zip_stream(world, app):
    c = _client(app)
    path = f"{NOTES}/{UNICODE_NAME}"
    r = c.get(_snap_url(world, "second", "file"), params={"path": path})
    assert r.status_code == 200
    assert r.content == world["day2"][path]
    cd = r.headers["content-disposition"]
    assert cd.startswith("attachment;") and "filename*=UTF-8''Caf%C3%A9%20%C3%BCn%C3%AFcode" in cd
    assert r.headers["content-type"] == "application/octet-stream"
    # a folder as ZIP: streamed (chunked, no Content-Length), every member's bytes, relative names
    with c.stream("GET", _snap_url(world, "second", "zip"), params={"path": NOTES}) as r:
        assert r.status_code == 200
        assert r.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in r.headers
        assert r.headers["content-type"] == "application/zip"
        data = r.read()
    z = zipfile.ZipFile(io.BytesIO(data))
    want = {p: b for p, b in world["day2"].items() if p.startswith(NOTES + "/")}
    assert {i.filename for i in z.infolist()} == set(want)
    for name, content in want.items():
        assert z.read(name) == content
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in z.namelist())
    # a selection (POST with the CSRF token): a file and a folder, each once
    token = _csrf(c, world)
    r = c.post(
        _snap_url(world, "second", "zip"),
        data={"csrf": token, "path": [f"{PHOTOS}/IMG_9001.PNG", f"{NOTES}/Sub", f"{NOTES}/Sub/deep.bin"]},
        headers={"Origin": app.base_url},
    )
    assert r.status_code == 200, r.text[:300]
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(z.namelist()) == sorted(
        [f"{PHOTOS}/IMG_9001.PNG", f"{NOTES}/Sub/deep.bin", f"{NOTES}/Sub/new-today.txt"]
    )
    assert z.read(f"{PHOTOS}/IMG_9001.PNG") == world["day2"][f"{PHOTOS}/IMG_9001.PNG"]


def _csrf(client: httpx.Client, world) -> str:
    import re

    r = client.get(_snap_url(world, "second", "browse"), params={"path": NOTES})
    assert r.status_code == 200
    m = re.search(r'name="csrf" value="([^"]+)"', r.text)
    assert m, "no CSRF field on the browse page"
    return m.group(1)


def test_previews_thumbnails_and_plists(world, app):
    c = _client(app)
    for name, (w, h) in (("IMG_9001.PNG", (640, 480)), ("IMG_9002.JPG", (800, 600)), ("IMG_9003.HEIC", (320, 240))):
        r = c.get(_snap_url(world, "second", "thumb"), params={"path": f"{PHOTOS}/{name}"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", name
        im = Image.open(io.BytesIO(r.content))
        assert im.format == "JPEG" and max(im.size) == 160 and abs(im.size[0] / im.size[1] - w / h) < 0.05
        r = c.get(_snap_url(world, "second", "image"), params={"path": f"{PHOTOS}/{name}"})
        assert Image.open(io.BytesIO(r.content)).size == (w, h)
    # not an image: no thumbnail
    r = c.get(_snap_url(world, "second", "thumb"), params={"path": f"{NOTES}/shopping.txt"})
    assert r.status_code == 415
    # a binary plist is shown as XML text, escaped into the page
    r = c.get(_snap_url(world, "second", "preview"), params={"path": f"{NOTES}/settings.plist"})
    assert r.status_code == 200
    assert "&lt;key&gt;Greeting&lt;/key&gt;" in r.text and "hello from a binary plist" in r.text
    r = c.get(_snap_url(world, "second", "preview"), params={"path": f"{NOTES}/shopping.txt"})
    assert "coffee" in r.text


def test_encrypted_backup_asks_for_its_password(world, app):
    c = _client(app)
    snap = world["encrypted"]
    browse = f"/repositories/phone/snapshots/{snap.id}/browse"
    r = c.get(browse)
    assert r.status_code == 303 and "/unlock" in r.headers["location"]
    form = c.get(r.headers["location"])
    assert form.status_code == 200 and 'type="password"' in form.text
    import re

    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    unlock = f"/repositories/phone/snapshots/{snap.id}/unlock"
    # without the CSRF token: refused by the app's middleware
    r = c.post(unlock, data={"password": ENCRYPTED_PASSWORD, "next": browse}, headers={"Origin": app.base_url})
    assert r.status_code == 403
    r = c.post(unlock, data={"csrf": token, "password": "1234", "next": browse}, headers={"Origin": app.base_url})
    assert r.status_code == 403 and "Wrong iOS backup password" in r.text
    assert c.get(browse).status_code == 303  # still locked
    r = c.post(
        unlock, data={"csrf": token, "password": ENCRYPTED_PASSWORD, "next": browse}, headers={"Origin": app.base_url}
    )
    assert r.status_code == 303 and r.headers["location"] == browse
    r = c.get(f"/repositories/phone/snapshots/{snap.id}/file", params={"path": "MyTestDomain/Media/Test.txt"})
    assert r.status_code == 200 and r.content == b"Test data"
    # another session does not get the unlocked backup
    other = _second_client(app)
    assert other.get(browse).status_code == 303


def test_many_snapshots_page_without_opening_manifests(world, app, monkeypatch):
    """The device page reads snapshot objects only: no Manifest.db is opened to render it."""
    from ibsync.reader import manifest

    def refuse(*a, **k):
        raise AssertionError("the snapshot list opened a Manifest.db")

    monkeypatch.setattr(manifest.SnapshotManifest, "__init__", refuse)
    c = _client(app)
    r = c.get(f"/repositories/phone/devices/{world['udid']}")
    assert r.status_code == 200
    assert world["first"].short_id in r.text and world["second"].short_id in r.text
    assert f"/restore?repo=phone&amp;snapshot={world['second'].id}" in r.text


def test_diff_lists_changes_by_domain(world, app):
    c = _client(app)
    r = c.get(_snap_url(world, "second", "diff"))  # default: against the device's previous snapshot
    assert r.status_code == 200
    assert world["first"].short_id in r.text and world["second"].short_id in r.text
    for kind, path in (
        ("changed", f"{NOTES}/shopping.txt"),
        ("removed", f"{NOTES}/Sub/gone-tomorrow.txt"),
        ("added", f"{NOTES}/Sub/new-today.txt"),
    ):
        assert f'data-kind="{kind}" data-path="{path}"' in r.text, (kind, path)
    assert 'data-domain="HomeDomain"' in r.text
    r = c.get(_snap_url(world, "second", "diff"), params={"from": world["first"].id, "domain": "HomeDomain"})
    assert r.status_code == 200 and f'data-path="{NOTES}/shopping.txt"' in r.text
    r = c.get(_snap_url(world, "first", "diff"))
    assert r.status_code == 200 and "first of its device" in r.text
    r = c.get(_snap_url(world, "second", "diff"), params={"from": "../x"})
    assert r.status_code == 400


# ---- in a browser -------------------------------------------------------------------------------


def test_browse_in_a_browser(world, app, page, tmp_path):
    login(page, app.login_url)
    page.goto(app.base_url + "/snapshots")
    page.get_by_role("link", name="Web Test iPhone").first.click()
    page.wait_for_selector("table#snapshots")
    rows = page.locator("table#snapshots tbody tr")
    assert rows.count() == 2
    screenshot(page, "snapshots-device")
    # the newest snapshot first: browse it
    rows.first.get_by_role("link", name="Browse").click()
    page.wait_for_selector(".domains")
    groups = page.locator("main h2").all_inner_texts()
    assert "Photos & media" in groups and "Messages & home" in groups
    assert page.locator('a.domain[data-domain="CameraRollDomain"]').inner_text().startswith("Camera Roll")
    screenshot(page, "browse-top")
    # into a domain and down its folders
    page.locator('a.domain[data-domain="HomeDomain"]').click()
    page.get_by_role("link", name="Library/", exact=True).click()
    page.get_by_role("link", name="Notes Export/", exact=True).click()
    page.wait_for_selector("table#listing")
    names = page.locator("table#listing td.name a").all_inner_texts()
    assert "Sub/" in names and "shopping.txt" in names and UNICODE_NAME in names
    assert page.locator("p.crumbs").inner_text().endswith("Notes Export")
    screenshot(page, "browse-folder")
    # download one file with a non-ASCII name: its bytes and its real name
    with page.expect_download() as dl:
        page.locator(f'tr[data-path="{NOTES}/{UNICODE_NAME}"] a.download').click()
    download = dl.value
    assert download.suggested_filename == UNICODE_NAME
    assert Path(download.path()).read_bytes() == world["day2"][f"{NOTES}/{UNICODE_NAME}"]
    # select a folder and a file, download them as one ZIP
    page.locator(f'tr[data-path="{NOTES}/Sub"] input[type=checkbox]').check()
    page.locator(f'tr[data-path="{NOTES}/shopping.txt"] input[type=checkbox]').check()
    button = page.locator("#download-selected")
    assert button.is_enabled() and "2 selected" in button.inner_text()
    with page.expect_download() as dl:
        button.click()
    z = zipfile.ZipFile(dl.value.path())
    want = {p: b for p, b in world["day2"].items() if p.startswith(f"{NOTES}/Sub/") or p == f"{NOTES}/shopping.txt"}
    assert sorted(z.namelist()) == sorted(want)
    for name, content in want.items():
        assert z.read(name) == content, name
    # search across the snapshot, open the hit, download it
    page.get_by_role("search").get_by_role("searchbox").fill("deep.bin")
    page.get_by_role("search").get_by_role("button").click()
    page.wait_for_selector("table#listing")
    hits = page.locator("table#listing tbody tr")
    assert hits.count() == 1 and hits.first.get_attribute("data-path") == f"{NOTES}/Sub/deep.bin"
    screenshot(page, "browse-search")
    hits.first.locator("td.name a").click()
    with page.expect_download() as dl:
        page.locator("a.download").click()
    assert Path(dl.value.path()).read_bytes() == world["day2"][f"{NOTES}/Sub/deep.bin"]
    # photos: thumbnails in the folder, a preview of one
    page.goto(app.base_url + f"/repositories/phone/snapshots/{world['second'].id}/browse?path={PHOTOS}")
    for name in ("IMG_9001.PNG", "IMG_9002.JPG", "IMG_9003.HEIC"):
        img = page.locator(f'tr[data-path="{PHOTOS}/{name}"] td.thumb img')
        img.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
        assert img.evaluate("img => img.naturalWidth") == 160
    screenshot(page, "browse-photos")
    page.locator(f'tr[data-path="{PHOTOS}/IMG_9002.JPG"] td.name a').click()
    preview = page.locator("img#image-preview")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=preview.element_handle())
    assert preview.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [800, 600]
    screenshot(page, "browse-preview")
    # the diff with the previous snapshot lists the changed file
    page.goto(app.base_url + f"/repositories/phone/devices/{world['udid']}")
    page.locator("table#snapshots tbody tr").first.get_by_role("link", name="Diff with previous").click()
    page.wait_for_selector("table#diff-files")
    changed = page.locator('table#diff-files tr[data-kind="changed"]')
    assert f"{NOTES}/shopping.txt" in changed.all_inner_texts()[0]
    screenshot(page, "snapshot-diff")


def test_encrypted_backup_in_a_browser(world, app, page):
    login(page, app.login_url)
    snap = world["encrypted"]
    page.goto(app.base_url + f"/repositories/phone/snapshots/{snap.id}/browse")
    page.wait_for_selector("form.unlock")
    page.fill("input[name=password]", "wrong")
    page.click("form.unlock button")
    assert "Wrong iOS backup password" in page.locator("#unlock-error").inner_text()
    screenshot(page, "encrypted-wrong-password")
    page.fill("input[name=password]", ENCRYPTED_PASSWORD)
    page.click("form.unlock button")
    page.wait_for_selector(".domains")
    page.locator('a.domain[data-domain="MyTestDomain"]').click()
    page.get_by_role("link", name="Media/", exact=True).click()
    with page.expect_download() as dl:
        page.locator('tr[data-path="MyTestDomain/Media/Test.txt"] a.download').click()
    assert Path(dl.value.path()).read_bytes() == b"Test data"


# ---- the shared view cache -----------------------------------------------------------------------


class _FakeView:
    def __init__(self, key, log):
        self.key, self.log = key, log

    def close(self):
        self.log.append(("closed", self.key))


def _opener(key, log, opened):
    def open_(stack, progress):
        opened.append(key)
        view = _FakeView(key, log)
        stack.callback(view.close)
        return view

    return open_


def test_view_cache_bounds_shares_and_closes():
    import threading

    from ibsync.web.snapshots_state import ViewCache

    now = [0.0]
    cache = ViewCache(max_open=2, idle_seconds=100, clock=lambda: now[0])
    log, opened = [], []
    # concurrent requests for one view open it once
    start = threading.Barrier(4)
    leases = []

    def get():
        start.wait()
        leases.append(cache.acquire("a", _opener("a", log, opened)))

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert opened == ["a"] and len({id(lease.view) for lease in leases}) == 1
    # beyond max_open, the least recently used is closed, but only once its last user is done
    for key in ("b", "c"):
        cache.acquire(key, _opener(key, log, opened)).release()
    assert ("closed", "a") not in log  # "a" is evicted but still in use
    for lease in leases:
        lease.release()
    lease.release()  # releasing twice is harmless
    assert log.count(("closed", "a")) == 1
    # an idle view is closed at the next request
    now[0] = 1000.0
    cache.acquire("d", _opener("d", log, opened)).release()
    assert ("closed", "b") in log and ("closed", "c") in log and ("closed", "d") not in log

    # a failing opener reaches the caller and is retried next time
    def fail(stack, progress):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.acquire("e", fail)
    cache.acquire("e", _opener("e", log, opened)).release()
    cache.close_all()
    assert ("closed", "d") in log and ("closed", "e") in log


def test_open_views_are_closed_with_the_app(world, monkeypatch, tmp_path):
    """A browsed snapshot's view is kept open (its shared lock held) between requests, and
    closed, lock released, when the app stops."""
    from ibsync.repo.lock import list_locks

    monkeypatch.setenv("IBSYNC_PASSWORD", PASSWORD)
    monkeypatch.setenv("IBSYNC_CACHE_DIR", str(world["cache"]))
    r = Repository.open(LocalStorage(world["repo"]), lambda: PASSWORD)
    assert list_locks(r) == []
    with serve_app(world["config"], history_path=tmp_path / "history.db") as running:
        c = _client(running)
        assert c.get(_snap_url(world, "first", "browse"), params={"path": NOTES}).status_code == 200
        assert len(list_locks(r)) == 1  # the cached view's
        assert c.get(_snap_url(world, "first", "browse"), params={"path": NOTES + "/Sub"}).status_code == 200
        assert len(list_locks(r)) == 1  # the same view, not a second one
    assert list_locks(r) == []


def test_odd_names_never_break_links_headers_or_zip_names():
    from ibsync.web.snapshots_browse import content_disposition
    from ibsync.web.snapshots_http import url
    from ibsync.web.zipstream import member_name

    odd = "bad-\udcff-name.txt"  # a row that was not UTF-8 (surrogateescape)
    assert "filename*=UTF-8''bad-%ED%B3%BF-name.txt" in content_disposition(odd)
    assert content_disposition('a"b;c\\d.txt').startswith('attachment; filename="a_b_c_d.txt";')
    assert url("phone", "0" * 64, "file", path=odd).endswith("?path=bad-%ED%B3%BF-name.txt")
    assert member_name("HomeDomain/" + odd) is None
    for bad in ("", "/abs", "a/../b", "a//b", "./a", "a/.", "a\0b"):
        assert member_name(bad) is None, bad
    assert member_name("HomeDomain/Library/x\\y.txt") == "HomeDomain/Library/x_y.txt"


def test_idle_views_are_closed_without_a_request():
    import time

    from ibsync.web.snapshots_state import ViewCache

    cache = ViewCache(max_open=4, idle_seconds=0.2)
    log, opened = [], []
    cache.acquire("a", _opener("a", log, opened)).release()
    deadline = time.monotonic() + 10
    while ("closed", "a") not in log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ("closed", "a") in log and len(cache) == 0
    cache.close_all()


def test_a_slow_view_opens_in_the_background_with_progress():
    import threading

    from ibsync.web.snapshots_state import StillOpening, ViewCache

    cache = ViewCache()
    go = threading.Event()
    log = []

    def slow(stack, progress):
        progress(500, 2000)
        assert go.wait(10)
        view = _FakeView("slow", log)
        stack.callback(view.close)
        return view

    with pytest.raises(StillOpening) as info:
        cache.acquire("s", slow, wait=0.2)
    assert (info.value.done, info.value.total) == (500, 2000)
    with pytest.raises(StillOpening):  # asked again: still the same opening, not a second one
        cache.acquire("s", slow, wait=0.1)
    go.set()
    lease = cache.acquire("s", slow, wait=5)
    assert lease.view.key == "slow"
    lease.release()

    # a background opening that fails with no one waiting: the next request gets the error once
    def broken(stack, progress):
        go2.wait(10)
        raise RuntimeError("damaged")

    go2 = threading.Event()
    with pytest.raises(StillOpening):
        cache.acquire("b", broken, wait=0.05)
    go2.set()
    import time

    time.sleep(0.3)
    with pytest.raises(RuntimeError, match="damaged"):
        cache.acquire("b", broken, wait=1)
    with pytest.raises(RuntimeError, match="damaged"):  # a fresh attempt, which fails again
        cache.acquire("b", broken, wait=1)
    cache.close_all()
    assert ("closed", "slow") in log


def test_plist_preview_shows_uids_and_refuses_expansion_bombs():
    from ibsync.web.snapshots_browse import _plist_text

    text = _plist_text(plistlib.dumps({"obj": plistlib.UID(3)}, fmt=plistlib.FMT_BINARY))
    assert "<key>CF$UID</key>" in text and "<integer>3</integer>" in text
    bomb = "x"
    for _ in range(40):  # 2**40 values once expanded, 203 bytes stored
        bomb = [bomb, bomb]
    assert _plist_text(plistlib.dumps(bomb, fmt=plistlib.FMT_BINARY)) is None
    assert _plist_text(b"bplist00 not really") is None


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, at open
def test_image_previews_refuse_pixel_bombs_and_non_images():
    from ibsync.web.thumbs import ImageProblem, ThumbnailCache, to_jpeg

    out = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(out, "PNG")  # 144 M pixels in a few KB
    assert len(out.getvalue()) < 1 << 20
    with pytest.raises(ImageProblem, match="too large"):
        to_jpeg(out.getvalue(), 160)
    with pytest.raises(ImageProblem):
        to_jpeg(b"\xff\xd8\xff\xe0 not really a JPEG", 160)
    cache = ThumbnailCache(max_entries=2, max_bytes=10)
    cache.put("a", b"12345")
    cache.put("b", b"12345")
    cache.put("c", b"1")  # over both bounds: the oldest goes
    assert cache.get("a") is None and cache.get("b") == b"12345" and cache.get("c") == b"1"
