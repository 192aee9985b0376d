"""The web app inside ``ibsync agent`` (``[agent] ui = true``): served by uvicorn as a task of
the agent's own event loop, "Back up now" handed to the agent's loop, the agent's backups
reporting their progress into the app's jobs.

The agent runs for days, so its login link is not only printed once: after a link has been
used a fresh one is written to ``ui-login.url`` in the state folder (readable by this user
only), for the next browser."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .context import WebContext
from .server import Listener, listen, make_server

logger = logging.getLogger("ibsync.agent")
LOGIN_FILE = "ui-login.url"


@dataclass
class AgentUi:
    ctx: WebContext
    listener: Listener
    server: Any
    login_file: Path

    @classmethod
    def start(cls, agent, settings, config_path: Path, history_path: Path) -> AgentUi:
        """Bind the socket and print the login link as the first line of standard output
        (refused with a UserError before anything runs: a non-loopback address without a
        password, a port in use)."""
        from ..agent.history import History
        from .app import create_app

        listener = listen(settings.ui, state_dir=history_path.parent, where=f"config file {config_path}, [agent]")
        login_file = history_path.parent / LOGIN_FILE
        # its own connection to the history: the agent's is used by the agent's loop meanwhile
        ctx = WebContext(
            config_path=config_path if config_path.exists() else None,
            settings=settings,
            history=History(history_path),
            request_backup=agent.request_backup,
            auth=listener.auth,
        )
        listener.auth.on_new_token = lambda url: _write_private(login_file, url)
        ctx.jobs.describe_result = lambda job, result: _snapshot_link(ctx, job, result)
        agent.jobs = ctx.jobs
        server = make_server(create_app(ctx), listener)
        _write_private(login_file, listener.login_url)
        print(listener.login_url, flush=True)
        logger.info("web app on %s (login link also in %s)", listener.auth.base_url(), login_file)
        return cls(ctx, listener, server, login_file)

    async def run_with(self, agent_run) -> None:
        """Serve while the agent runs; stop serving when it stops."""
        serving = asyncio.create_task(self.server.serve(sockets=[self.listener.sock]), name="web app")
        serving.add_done_callback(_report)
        try:
            await agent_run
        finally:
            self.server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(serving), 10)
            except (TimeoutError, Exception):  # noqa: BLE001  (already reported by _report)
                serving.cancel()

    def close(self) -> None:
        self.listener.sock.close()
        try:
            self.login_file.unlink()
        except OSError:
            pass
        if self.ctx.history is not None:
            self.ctx.history.close()


def _snapshot_link(ctx: WebContext, job, result: dict) -> dict:
    """The page of the snapshot an agent's backup made (the agent names repositories as the
    config file does; the pages by their short names)."""
    from urllib.parse import quote

    from ..errors import UserError

    if not result.get("snapshot") or not job.subject.get("repo"):
        return {}
    try:
        name = ctx.repo_ref(job.subject["repo"]).name
    except UserError:
        return {}
    return {"repo": name, "url": f"/repositories/{quote(name, safe='')}/snapshots/{result['snapshot']}/browse"}


def _report(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        e = task.exception()
        logger.error("the web app stopped: %s", " ".join(str(e).split()) or e.__class__.__name__)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
