"""The dashboard: every device the agent knows or sees now, whether its backups are current,
"Back up now", and the progress of running jobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..errors import UserError


@dataclass
class DeviceRow:
    status: object  # ibsync.agent.status.DeviceStatus
    connected: str | None  # how it is reachable now ("USB", "Network", "Wi-Fi"), None when absent
    job: object | None  # its running backup job


async def dashboard(request: Request) -> Response:
    from ..agent.status import read_status

    ctx = request.app.state.ctx

    def read():
        with ctx.reading_history() as history:
            return read_status(ctx.settings, history)

    status = await run_in_threadpool(read)
    present = await _present(request)
    shown = ctx.jobs.get(request.query_params.get("job", ""))  # the job just started here, even if ended

    def job_of(udid):
        if shown is not None and shown.kind == "backup" and str(shown.subject.get("udid", "")).upper() == udid.upper():
            return shown
        return ctx.jobs.running(kind="backup", udid=udid)

    rows = []
    known = set()
    for d in status.devices:
        udid = (d.udid or "").upper()
        known.add(udid)
        live = present.get(udid) if present is not None else None
        connected = live.connection if live is not None else (d.connected if present is None else None)
        rows.append(DeviceRow(d, connected, job_of(d.udid or "")))
    for udid, dev in (present or {}).items():  # seen now, never by the agent
        if udid not in known:
            rows.append(DeviceRow(_unknown_status(dev, ctx.settings), dev.connection, job_of(dev.udid)))
    jobs = ctx.jobs.list()[:10]
    return request.app.state.templates.TemplateResponse(
        request,
        "dashboard.html",
        {
            "section": "dashboard",
            "status": status,
            "rows": rows,
            "jobs": jobs,
            "now": datetime.now(UTC),
            "in_agent": ctx.request_backup is not None,
            "repo_names": _repo_names(ctx),
            "flash": request.query_params.get("flash"),
        },
    )


def _repo_names(ctx) -> dict[str, str]:
    """{how the config names a repository: its name in the pages}"""
    try:
        return {r.spec: r.name for r in ctx.repositories()}
    except UserError:  # a config file broken since the start: the dashboard still shows the devices
        return {}


async def _present(request: Request):
    """{UDID: ConnectedDevice} seen now, looked up by this server (under `ibsync ui`; in the
    agent, None: its history knows what is connected). Cached for a few seconds."""
    ctx = request.app.state.ctx
    if ctx.request_backup is not None:
        return None
    from .backup import present_devices

    return await present_devices(ctx)


def _unknown_status(dev, settings):
    from ..agent.status import DeviceStatus

    policy = settings.policy(dev.udid, dev.name)
    return DeviceStatus(
        udid=dev.udid,
        name=dev.name,
        repository=policy.repository,
        last_success=None,
        last_snapshot=None,
        last_attempt=None,
        last_result=None,
        reason=None,
        next_due=None,
        overdue=False,
        connected=dev.connection,
        waiting=None,
        enabled=policy.enabled,
    )


async def backup_now(request: Request) -> Response:
    from .backup import start_backup

    udid = request.path_params["udid"]
    ctx = request.app.state.ctx
    known = {j.id for j in ctx.jobs.list(kind="backup")}
    job = await start_backup(ctx, udid)
    if job is not None:
        return RedirectResponse(f"/?flash=backup&job={job.id}", status_code=303)
    # the agent starts it at its next look: the page waits for a job newer than these
    after = max((int(i) for i in known), default=0)
    return RedirectResponse(f"/?flash=requested&udid={quote(udid, safe='')}&after={after}", status_code=303)


ROUTES = [
    Route("/", dashboard, name="dashboard"),
    Route("/devices/{udid}/backup", backup_now, methods=["POST"], name="backup_now"),
]
