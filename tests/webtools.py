"""Shared helpers of the web app's tests: the app served in a thread of the test process, a
headless Chromium (Debian's, never a downloaded one) driven by Playwright, screenshots kept
as test artifacts (test-artifacts/web/, or $IBSYNC_TEST_ARTIFACTS/web/).

    from webtools import browser, page, serve_app, screenshot  # noqa: F401  (pytest fixtures)

    def test_x(env, cli, tmp_path, page):
        with serve_app(config_path) as app:
            page.goto(app.login_url)
            screenshot(page, "x")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("IBSYNC_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")) / "web"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningApp:
    base_url: str
    login_url: str
    ctx: Any  # ibsync.web.context.WebContext
    app: Any  # the Starlette app
    server: Any  # uvicorn.Server
    thread: threading.Thread
    sock: socket.socket

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        self.ctx.close()
        if self.ctx.history is not None:
            self.ctx.history.close()


def start_app(
    config_path: str | Path | None,
    *,
    history_path: str | Path | None = None,
    port: int = 0,
    password: str | None = None,
    **ctx_kw: Any,
) -> RunningApp:
    """The app for a config file, served on 127.0.0.1 (any free port unless ``port``) by uvicorn
    in a thread of this process; ``history_path``: the agent's history (default: the one in
    $XDG_STATE_HOME)."""
    from ibsync.agent.history import History
    from ibsync.agent.settings import UiSettings
    from ibsync.web.app import create_app
    from ibsync.web.context import WebContext
    from ibsync.web.server import listen, make_server

    listener = listen(UiSettings(address="127.0.0.1", port=port, password=password))
    history = History(Path(history_path)) if history_path else None
    ctx = WebContext.load(config_path, history=history, auth=listener.auth, **ctx_kw)
    app = create_app(ctx)
    server = make_server(app, listener)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener.sock]}, name="ibsync-web-test", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the web app did not start")
        time.sleep(0.02)
    return RunningApp(listener.auth.base_url(), listener.login_url, ctx, app, server, thread, listener.sock)


@contextmanager
def serve_app(config_path: str | Path | None, **kw: Any) -> Iterator[RunningApp]:
    running = start_app(config_path, **kw)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for a test module (one browser process; each test gets a context)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (no cookies) and page; downloads allowed."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(30_000)
    try:
        yield p
    finally:
        context.close()


def screenshot(page, name: str) -> Path:
    """A full-page PNG in the artifacts folder (kept when the test fails too)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def login(page, login_url: str) -> None:
    """Open the printed login link: the app answers with the dashboard and a session cookie."""
    page.goto(login_url)
    page.wait_for_url(lambda url: "/login" not in url)


def start_ui(env: dict, *args: str) -> tuple[subprocess.Popen, str]:
    """`ibsync ui --no-browser --port 0 ...` and the login link it prints first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ibsync", "ui", "--no-browser", "--port", "0", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    if not line or not line[0].strip():
        proc.kill()
        raise AssertionError(f"ibsync ui printed no login link; stderr:\n{proc.stderr.read()}")
    return proc, line[0].strip()
