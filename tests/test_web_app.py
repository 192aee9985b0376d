"""The web app in a real browser (Playwright driving Debian's Chromium) as a user meets it:
`ibsync ui` started as a separate process on a repository made here and a simulated phone,
the printed login link opened, the phone on the dashboard, "Back up now" with its progress bar
reaching the end and the new snapshot shown, the repository page, a test notification, and a
restore into a folder compared with `ibsync restore`'s. Screenshots go to test-artifacts/web/."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from ibsync.errors import UserError
from ibsync.storage import Kind
from ibsync.testing.device import SimDevice, run_sim_usbmuxd
from ibsync.testing.generator import generate_content

from conftest import run_subprocess, tree_state
from test_agent_notify import receiver  # noqa: F401  (pytest fixture)
from webtools import browser, page, screenshot, start_ui  # noqa: F401  (pytest fixtures)

RECORD_JOB_TEXTS = """
window.ibsyncJobTexts = [];
new MutationObserver(() => {
  document.querySelectorAll(".job .job-text").forEach((el) => {
    const seen = window.ibsyncJobTexts;
    if (seen[seen.length - 1] !== el.textContent) seen.push(el.textContent);
  });
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def stop_ui(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    err = proc.stderr.read()
    assert code == 0, err
    assert "Traceback" not in err, err
    return err


def _snapshots(env: dict) -> list[dict]:
    r = run_subprocess(["snapshots", "--json"], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def phone_setup(env, cli, tmp_path, receiver):  # noqa: F811
    """A repository, a config file naming it (and a webhook for notifications), a simulated
    phone plugged in, and the environment a process needs to see it."""
    cli("init")
    phone = SimDevice.from_content(generate_content(seed=31, size_bytes=2 << 20), name="Alice's iPhone")
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nrepository = "{env}"\ninterval = "1h"\nnotify = ["{receiver.url("/hook", "json")}"]\n')
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = {**os.environ, **mux.env(home=tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "state")}
        yield phone, config, e


def test_login_backup_now_repository_and_restore(phone_setup, page, tmp_path, receiver):  # noqa: F811
    phone, config, e = phone_setup
    from ibsync.agent.history import History

    history = History(tmp_path / "state" / "ibsync" / "agent.db")  # an earlier prune by the agent
    history.end_maintenance(history.begin_maintenance(str(tmp_path / "repo"), "prune"), "ok", "removed 3 packs")
    history.close()
    proc, login_url = start_ui(e, "--config", str(config))
    try:
        base = login_url.split("/login")[0]
        assert login_url.startswith("http://127.0.0.1:") and "/login?token=" in login_url

        # without the link: the login page, nothing else
        page.goto(base + "/")
        assert "/login" in page.url
        assert page.locator("main.login").is_visible()
        screenshot(page, "login")

        page.goto(login_url)
        page.wait_for_url(base + "/")
        card = page.locator(f'section.device[data-udid="{phone.udid}"]')
        card.wait_for()
        assert "Alice's iPhone" in card.locator("h2").inner_text()
        assert "USB" in card.locator("h2").inner_text()
        assert "never" in card.locator(".last-success").inner_text()
        screenshot(page, "dashboard")

        # Back up now: a progress bar fed by server-sent events, to 100 %, then the new snapshot;
        # every text the bar shows is recorded, to see it move while the backup runs
        page.add_init_script(RECORD_JOB_TEXTS)
        card.get_by_role("button", name="Back up now").click()
        page.wait_for_url(lambda url: "flash=backup&job=" in url)
        job_id = page.url.rsplit("job=", 1)[1]
        bar = page.locator(f'.job[data-job="{job_id}"]')
        bar.wait_for()
        screenshot(page, "dashboard-backup-running")
        page.locator(f'.job[data-job="{job_id}"][data-state="done"]').wait_for(timeout=180_000)
        assert bar.locator("progress").evaluate("p => p.value") == 1
        text = bar.locator(".job-text").inner_text()
        assert text.startswith("Done · 100 %"), text
        seen = page.evaluate("window.ibsyncJobTexts")
        moving = [
            t for t in seen if not t.startswith("Done") and re.search(r"[1-9][0-9.]* [KM]B · [1-9][0-9]* files", t)
        ]
        assert moving, seen  # live updates while it ran, not only the end
        screenshot(page, "dashboard-backup-done")
        job = page.request.get(f"{base}/api/jobs/{job_id}").json()
        assert job["state"] == "done" and job["fraction"] == 1
        assert job["files_done"] > 10 and job["bytes_done"] > 1 << 20, job
        [snap] = _snapshots(e)
        assert job["result"]["snapshot"] == snap["id"]
        assert snap["device"]["udid"].upper() == phone.udid.upper()
        # the page reloads by itself and shows the snapshot as the last good backup
        link = page.locator(f'section.device[data-udid="{phone.udid}"] .last-success a.snapshot-link')
        link.wait_for(timeout=30_000)
        assert link.inner_text() == snap["id"][:8]
        assert "/snapshots/" + snap["id"] in link.get_attribute("href")
        screenshot(page, "dashboard-after-backup")

        # the repository: size, deduplication, the chart, notifications
        page.goto(base + "/repositories")
        page.get_by_role("link", name="repo", exact=True).click()
        page.wait_for_url(base + "/repositories/repo")
        stats = page.locator("#repo-stats").inner_text()
        assert "Snapshots\n1" in stats or "Snapshots\t1" in stats, stats
        assert page.locator("svg.chart rect.bar").count() == 1
        assert "removed 3 packs" in page.locator("table.maintenance").inner_text()
        assert "/hook" not in page.content()  # a webhook's path is its secret: masked
        screenshot(page, "repository")
        page.get_by_role("button", name="Send a test notification").click()
        page.locator(".flash").wait_for()
        assert "Test notification sent" in page.locator(".flash").inner_text()
        assert any(h.path == "/hook" and b"ibsync test notification" in h.body for h in receiver.hits), receiver.hits

        # restore into a folder: bad folders refused in one line, then the real thing
        page.goto(f"{base}/restore?repo=repo&snapshot={snap['id']}")
        form = page.locator("form.restore-folder")
        form.locator("input[name=folder]").fill("relative/out")
        form.get_by_role("button", name="Restore into the folder").click()
        assert "relative path" in page.locator("#restore-error").inner_text()
        form = page.locator("form.restore-folder")
        form.locator("input[name=folder]").fill(str(tmp_path / "missing" / "out"))
        form.get_by_role("button", name="Restore into the folder").click()
        assert "does not exist" in page.locator("#restore-error").inner_text()
        out = tmp_path / "web-restore"
        form = page.locator("form.restore-folder")
        form.locator("input[name=folder]").fill(str(out))
        form.get_by_role("button", name="Restore into the folder").click()
        page.locator('#restore-job[data-state="done"]').wait_for(timeout=120_000)
        assert "Restored" in page.locator("#restore-job .job-result").inner_text()
        screenshot(page, "restore-done")
    finally:
        stop_ui(proc)

    cli_out = tmp_path / "cli-restore"
    r = run_subprocess(["restore", snap["id"], cli_out], e)
    assert r.returncode == 0, r.stderr
    [folder] = [p.name for p in cli_out.iterdir()]
    assert [p.name for p in out.iterdir()] == [folder]
    web_tree, cli_tree = tree_state(out / folder), tree_state(cli_out / folder)
    assert len(web_tree) > 10
    assert web_tree == cli_tree


def test_the_agent_serves_the_app_and_backs_up_on_request(phone_setup, page, tmp_path):  # noqa: F811
    """`ibsync agent` with [agent] ui: the link first on stdout, the agent's own backup shown,
    "Back up now" of a device that is not due handed to the agent's loop, with its progress."""
    phone, config, e = phone_setup
    config.write_text(config.read_text() + 'poll = "1s"\nui-port = 0\n')
    log = tmp_path / "agent.log"
    agent = subprocess.Popen(
        [sys.executable, "-m", "ibsync", "agent", "--config", str(config)],
        env=e,
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,  # noqa: SIM115
        start_new_session=True,
    )
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(agent.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert line and "/login?token=" in line[0], log.read_text()
        login_url = line[0].strip()
        base = login_url.split("/login")[0]
        assert (tmp_path / "state" / "ibsync" / "ui-login.url").read_text().strip() == login_url

        page.goto(login_url)
        card = page.locator(f'section.device[data-udid="{phone.udid}"]')
        # the agent sees the phone and backs it up by itself (never backed up: due)
        first = card.locator(".last-success a.snapshot-link")
        deadline = time.monotonic() + 180
        while not first.count():
            assert time.monotonic() < deadline, log.read_text()
            page.wait_for_timeout(1000)
            page.reload()
        [snap1] = _snapshots(e)
        assert first.inner_text() == snap1["id"][:8]
        assert "The agent is not running" not in page.content()
        # a used link is replaced by a fresh one in the state folder, for the next browser
        fresh = (tmp_path / "state" / "ibsync" / "ui-login.url").read_text().strip()
        assert fresh != login_url and "/login?token=" in fresh

        card.get_by_role("button", name="Back up now").click()
        page.wait_for_url(lambda url: "flash=backup&job=" in url, timeout=60_000)  # once the agent started it
        job_id = page.url.rsplit("job=", 1)[1]
        page.locator(f'.job[data-job="{job_id}"][data-state="done"]').wait_for(timeout=180_000)
        job = page.request.get(f"{base}/api/jobs/{job_id}").json()
        assert job["state"] == "done" and job["files_done"] > 0 and job["bytes_done"] > 0, job
        snaps = _snapshots(e)
        assert len(snaps) == 2 and job["result"]["snapshot"] == snaps[-1]["id"]
        assert job["result"]["url"] == f"/repositories/repo/snapshots/{snaps[-1]['id']}/browse"
        link = page.locator(f'section.device[data-udid="{phone.udid}"] .last-success a.snapshot-link')
        page.wait_for_function(
            f"() => document.querySelector('section.device .last-success a.snapshot-link')"
            f"?.textContent === '{snaps[-1]['id'][:8]}'",
            timeout=30_000,
        )
        assert link.inner_text() == snaps[-1]["id"][:8]
        screenshot(page, "agent-dashboard")
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(60)
        text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text
    assert not (tmp_path / "state" / "ibsync" / "ui-login.url").exists()


def test_restore_onto_a_connected_device(env, cli, tmp_path, page):  # noqa: F811
    """A snapshot of one phone restored onto another connected one from the restore page, as
    `ibsync restore --to-device` does: the target ends up with the source's files."""
    cli("init")
    phone = SimDevice.from_content(generate_content(seed=32, size_bytes=1 << 20), name="Old iPhone")
    blank = SimDevice(udid="5" * 40, name="New iPhone")
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nrepository = "{env}"\n')
    with run_sim_usbmuxd([phone, blank], tmp_path / "mux") as mux:
        e = {**os.environ, **mux.env(home=tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "state")}
        r = run_subprocess(["backup", "--device", phone.udid], e)
        assert r.returncode == 0, r.stderr
        [snap] = _snapshots(e)
        assert blank.files != phone.files
        proc, login_url = start_ui(e, "--config", str(config))
        try:
            base = login_url.split("/login")[0]
            page.goto(login_url)
            page.locator(f'section.device[data-udid="{blank.udid}"]').wait_for()
            page.goto(f"{base}/restore?repo=repo&snapshot={snap['id'][:8]}")
            form = page.locator("form.restore-device")
            form.locator("select[name=device]").select_option(blank.udid)
            form.locator("input[name=reboot]").uncheck()
            screenshot(page, "restore-to-device")
            # without the confirmation box the browser does not send it
            form.get_by_role("button", name="Restore onto the device").click()
            assert page.url.startswith(f"{base}/restore?") and "job=" not in page.url
            form.locator("#confirm-device").check()
            page.once("dialog", lambda dialog: dialog.accept())
            form.get_by_role("button", name="Restore onto the device").click()
            page.wait_for_url(lambda url: "job=" in url)
            page.locator('#restore-job[data-state="done"]').wait_for(timeout=120_000)
            assert "Restored onto New iPhone" in page.locator("#restore-job .job-result").inner_text()
        finally:
            stop_ui(proc)
        assert blank.files == phone.files


def test_open_repo_lends_warm_copies_that_follow_new_snapshots_and_prunes(env, cli, tmp_path):
    """ctx.open_repo: a copy given back is lent again (its key and caches kept), two borrowers
    at once get two copies sharing one key derivation, each lend locks the repository (an idle
    copy does not: prune runs between requests), and a prune that rewrote the index is noticed."""
    from concurrent.futures import ThreadPoolExecutor

    import ibsync
    from ibsync.agent.history import History
    from ibsync.testing.device import SimLockdown
    from ibsync.web.context import WebContext

    def backup(seed: int):
        # in a thread of its own: Playwright's fixtures of this module keep an event loop in this one
        device = SimDevice.from_content(generate_content(seed=seed, size_bytes=256 << 10))
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(ibsync.backup_device, SimLockdown(device), str(env)).result().snapshot

    cli("init")
    first = backup(41)
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nrepository = "{env}"\n')
    ctx = WebContext.load(config, history=History(tmp_path / "history.db"))
    try:
        assert [r.name for r in ctx.repositories()] == ["repo"]
        with ctx.open_repo("repo") as a:
            assert [s.id for s in a.snapshots()] == [first.id]
            assert a.lock is not None  # held while lent
            with ctx.open_repo("repo") as b:
                assert b is not a and b.master is a.master  # the key derived once
            # a page holds the repository: prune waits
            cli("prune", expect=3)
        assert a.lock is None
        with ctx.open_repo("repo") as again:
            assert again is b or again is a  # given back, lent again

        second = backup(42)
        with ctx.open_repo("repo") as repo:
            assert {s.id for s in repo.snapshots()} == {first.id, second.id}
            old_index = set(repo.loaded_index)
        cli("forget", first.id)
        cli("prune")  # nothing lent: it runs, and rewrites the index
        with ctx.open_repo("repo") as repo:
            listed = {i.name for i in repo.storage.list(Kind.INDEX)}
            assert old_index - listed  # the prune replaced index objects the warm copy had loaded...
            assert repo.loaded_index <= listed  # ...and the copy lent now has none of them
            assert [s.id for s in repo.snapshots()] == [second.id]
            folder = repo.load_folder(second.tree)  # reads through the fresh index
            assert folder is not None
        with pytest.raises(UserError, match="no repository named"), ctx.open_repo("elsewhere"):
            pass
    finally:
        ctx.close()
        ctx.history.close()
