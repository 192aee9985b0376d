""" "Back up now" from the dashboard. In the agent, the agent's own loop does it (it knows the
schedule, notifies, records, runs maintenance after); under ``ibsync ui`` alone, the server
backs the device up itself with the library, as a job, and records the attempt in the agent's
history so the dashboard and ``ibsync status`` show it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from ..errors import IbsyncError, UserError
from .jobs import Job

logger = logging.getLogger("ibsync.web")

#: devices found by a look are reused this long (a look opens a lockdown session per device)
PRESENT_TTL = 5.0
#: a look that takes longer shows the devices the agent's history knows instead
PRESENT_TIMEOUT = 8.0


async def present_devices(ctx) -> dict[str, Any]:
    """{UPPER-CASE UDID: ConnectedDevice} reachable now; empty when usbmuxd is missing."""
    from ..capture.discovery import list_connected

    cache = ctx._present_cache
    if cache is not None and time.monotonic() - cache[0] < PRESENT_TTL:
        return cache[1]
    wifi = ctx.settings.defaults.wifi or any(t.get("wifi") for t in ctx.settings.devices.values())
    try:
        devices, _ = await asyncio.wait_for(list_connected(wifi=wifi, tolerant=True), PRESENT_TIMEOUT)
    except (TimeoutError, IbsyncError, OSError) as e:
        logger.debug("no devices listed: %s", e)
        devices = []
    found = {d.udid.upper(): d for d in devices}
    ctx._present_cache = (time.monotonic(), found)
    return found


async def start_backup(ctx, udid: str) -> Job | None:
    """Ask for a backup of ``udid`` now: the agent's loop is woken (None: the job appears when
    it starts), or a job starts here. A device already being backed up keeps its job."""
    running = ctx.jobs.running(kind="backup", udid=udid)
    if running is not None:
        return running
    if ctx.request_backup is not None:
        ctx.request_backup(udid)
        return None
    present = await present_devices(ctx)
    device = present.get(udid.upper())
    if device is None:
        ctx._present_cache = None  # look again next time: it may just have been plugged in
        raise UserError(f"device {udid} is not connected (plug it in with a cable, or check Wi-Fi)")
    repository = _repository_for(ctx, device)
    job = ctx.jobs.start(
        "backup", f"Backing up {device.name or device.udid}", subject={"udid": device.udid, "repo": repository}
    )
    task = asyncio.get_running_loop().create_task(
        _run_backup(ctx, job, device, repository), name=f"web backup {device.udid}"
    )
    ctx._tasks.add(task)
    task.add_done_callback(ctx._tasks.discard)
    return job


@contextlib.asynccontextmanager
async def borrowed_repo(ctx, name: str) -> AsyncIterator[Any]:
    """ctx.open_repo for a coroutine: the opening and closing I/O in a worker thread, the
    repository (locked shared, index loaded) the coroutine's until the block ends."""
    opened = ctx.open_repo(name)
    repo = await asyncio.to_thread(opened.__enter__)
    try:
        yield repo
    except BaseException as e:
        if not await asyncio.to_thread(opened.__exit__, type(e), e, e.__traceback__):
            raise
    else:
        await asyncio.to_thread(opened.__exit__, None, None, None)


def _repository_for(ctx, device) -> str:
    policy = ctx.settings.policy(device.udid, device.name)
    if policy.repository:
        return ctx.repo_ref(policy.repository).name
    repos = ctx.repositories()
    if len(repos) == 1:
        return repos[0].name
    raise UserError(
        'no repository for this device: set [agent] repository (or [devices."<UDID>"] repository) in the config file'
    )


async def _run_backup(ctx, job: Job, device, repository: str) -> None:
    from ..capture.backup import capture
    from ..capture.discovery import open_lockdown

    progress = ctx.jobs.progress(job)
    attempt = await asyncio.to_thread(_begin, ctx, device, repository)
    outcome = None
    try:

        def notify(text: str) -> None:  # "unlock the phone", "tap Trust": shown under the bar
            ctx.jobs.update(job, message=text, force=True)

        lockdown = await open_lockdown(device, notify=notify)
        try:
            async with borrowed_repo(ctx, repository) as repo:
                outcome = await capture(lockdown, repo, progress=progress, notify=notify)
        finally:
            close = getattr(lockdown, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # noqa: BLE001, S110  (a connection already gone: nothing to close)
                    pass
    except asyncio.CancelledError:
        await asyncio.to_thread(_end, ctx, attempt, "skipped", "the web app was stopped during the backup", None)
        ctx.jobs.fail(job, "stopped: the web app was stopped during the backup; nothing was committed")
        raise
    except (IbsyncError, OSError) as e:
        reason = " ".join(str(e).split()) or e.__class__.__name__
        from ..agent.runner import classify
        from ..errors import DeviceError

        result = classify(e)[0] if isinstance(e, DeviceError) else "failed"
        await asyncio.to_thread(_end, ctx, attempt, result, reason, None)
        ctx.jobs.fail(job, reason)
        return
    except Exception as e:  # a bug: shown on the page and logged, the server goes on
        logger.exception("backup of %s from the web app", device.udid)
        await asyncio.to_thread(_end, ctx, attempt, "failed", f"internal error: {e!r}", None)
        ctx.jobs.fail(job, f"internal error: {e!r}")
        return
    await asyncio.to_thread(_end, ctx, attempt, "ok", None, outcome)
    snap = outcome.snapshot
    ctx.jobs.finish(
        job,
        result={
            "snapshot": snap.id,
            "repo": repository,
            "label": f"New snapshot {snap.id[:8]}",
            "url": f"/repositories/{quote(repository, safe='')}/snapshots/{snap.id}/browse",
        },
    )


def _begin(ctx, device, repository: str) -> int | None:
    if ctx.history is None:
        return None
    with ctx.reading_history() as history:
        history.seen(device.udid, device.name, device.connection)
        return history.begin(device.udid, device.name, ctx.repo_ref(repository).spec, device.connection)


def _end(ctx, attempt: int | None, result: str, reason: str | None, outcome) -> None:
    if attempt is None or ctx.history is None:
        return
    with ctx.reading_history() as history:
        if outcome is None:
            history.end(attempt, result, reason)
        else:
            s = outcome.snapshot
            history.end(
                attempt,
                result,
                reason,
                snapshot=s.id,
                bytes_added=s.summary.added_bytes,
                bytes_received=outcome.bytes_received,
                files=outcome.files_received,
                success_time=s.time.timestamp(),
            )
