"""Repository pages: the list, and per repository its size, deduplication, snapshots over
time, the agent's retention/prune/check history, and the notification settings with a
"Send a test notification" button."""

from __future__ import annotations

import logging
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from .formatting import size

#: snapshots drawn one bar each up to this many; more are summed per day, then per week
CHART_BARS = 120


async def repositories(request: Request) -> Response:
    ctx = request.app.state.ctx
    return request.app.state.templates.TemplateResponse(
        request, "repositories.html", {"section": "repositories", "repos": ctx.repositories()}
    )


async def repository(request: Request) -> Response:
    ctx = request.app.state.ctx
    ref = ctx.repo_ref(request.path_params["name"])

    def read():
        with ctx.open_repo(ref.name) as repo:
            snaps = repo.snapshots()
            return snaps, _stats(request.app, ref.name, repo, snaps), repo.encrypted

    snaps, stats, encrypted = await run_in_threadpool(read)

    def upkeep():
        with ctx.reading_history() as history:
            return [m for m in history.maintenance(limit=500) if m["repository"] in (ref.name, ref.spec)][:50]

    maintenance = await run_in_threadpool(upkeep) if ctx.history is not None else []
    return request.app.state.templates.TemplateResponse(
        request,
        "repository.html",
        {
            "section": "repositories",
            "ref": ref,
            "snapshots": snaps,
            "stats": stats,
            "encrypted": encrypted,
            "chart": snapshot_chart(snaps),
            "maintenance": maintenance,
            "notify": notification_settings(ctx, ref),
            "flash": request.query_params.get("flash"),
            "flash_ok": request.query_params.get("ok") == "1",
        },
    )


_stats_lock = threading.Lock()


def _stats(app, name: str, repo, snaps) -> Any:
    """ibsync.maint.stats for the repository, computed again only when its snapshots changed
    (it reads every snapshot's trees)."""
    from ..maint.stats import stats

    key = frozenset(s.id for s in snaps)
    with _stats_lock:
        cache = app.state.__dict__.setdefault("repo_stats", {})
        hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    result = stats(repo, snaps)
    with _stats_lock:
        cache[name] = (key, result)
    return result


# ---- the chart ---------------------------------------------------------------------------------


@dataclass
class Bar:
    x: float
    y: float
    w: float
    h: float
    label: str  # the tooltip


@dataclass
class Chart:
    width: int
    height: int
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # x, date
    top: str  # the value of the top line
    empty: bool


def snapshot_chart(snaps, width: int = 720, height: int = 180) -> Chart:
    """Logical size of each snapshot over time (several per period summed when there are
    many), as bars an inline SVG draws; no script, no library."""
    left, bottom, top_pad = 8, 22, 14
    if not snaps:
        return Chart(width, height, [], [], "", True)
    points = [
        (
            s.time,
            s.summary.total_bytes,
            (
                f"{s.time.astimezone():%Y-%m-%d %H:%M} · {s.device.name or s.device.udid}"
                f" · {size(s.summary.total_bytes)} (+{size(s.summary.added_bytes)} stored)"
            ),
        )
        for s in snaps
    ]
    if len(points) > CHART_BARS:
        points = _bucket(points, "%Y-%m-%d")
    if len(points) > CHART_BARS:
        points = _bucket(points, "%G-W%V")
    peak = max(p[1] for p in points) or 1
    inner_w, inner_h = width - 2 * left, height - bottom - top_pad
    slot = min(inner_w / len(points), 48.0)  # a few snapshots stay bars, not walls
    bars = []
    for i, (_when, value, label) in enumerate(points):
        h = max(1.0, inner_h * value / peak)
        bars.append(Bar(left + i * slot + slot * 0.1, top_pad + inner_h - h, max(1.0, slot * 0.8), h, label))
    every = max(1, len(points) // 6)
    ticks = [
        (left + i * slot + slot / 2, points[i][0].astimezone().strftime("%Y-%m-%d"))
        for i in range(0, len(points), every)
    ]
    return Chart(width, height, bars, ticks, size(peak), False)


def _bucket(points, fmt: str):
    out: dict[str, list] = {}
    for when, value, _ in points:
        key = when.astimezone().strftime(fmt)
        entry = out.setdefault(key, [when, 0, 0])
        entry[1] += value
        entry[2] += 1
    return [(when, value, f"{key}: {n} snapshot(s), {size(value)}") for key, (when, value, n) in out.items()]


# ---- notifications -----------------------------------------------------------------------------


@dataclass
class NotifySettings:
    urls: list[str]  # masked
    problem: str | None  # why the URLs cannot be used, as the agent would say
    healthchecks: list[tuple[str, str]]  # (where, masked URL)
    devices: list[str]  # the devices whose backups go to this repository (by their table name)


def mask_url(url: str) -> str:
    """``scheme://host/…``: a ping or webhook URL's path and query are its secret."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(not a valid URL)"
    if not parts.scheme:
        return "(not a URL)"
    more = "/…" if (parts.path.strip("/") or parts.query or parts.username) else ""
    return f"{parts.scheme}://{host}{port}{more}"


def notification_settings(ctx, ref) -> NotifySettings:
    from ..errors import UserError

    urls: list[str] = []
    problem = None
    if ctx.settings.notify:
        try:
            from ..agent.notify import Notifier

            # Apprise's masking of each service's tokens, then no path or query (a webhook's secret)
            urls = [mask_url(u) for u in Notifier(list(ctx.settings.notify)).urls]
        except UserError as e:
            problem = str(e)
            urls = [mask_url(u) for u in ctx.settings.notify]
    checks = []
    if ctx.settings.defaults.healthcheck:
        checks.append(("[agent] healthcheck", mask_url(ctx.settings.defaults.healthcheck)))
    for key, table in ctx.settings.devices.items():
        if "healthcheck" in table:
            checks.append((f'[devices."{key}"] healthcheck', mask_url(table["healthcheck"])))
    devices = [
        key
        for key, table in ctx.settings.devices.items()
        if table.get("repository", ctx.settings.defaults.repository) in (ref.name, ref.spec)
    ]
    return NotifySettings(urls, problem, checks, devices)


async def test_notification(request: Request) -> Response:
    ctx = request.app.state.ctx
    ref = ctx.repo_ref(request.path_params["name"])
    base = f"/repositories/{urllib.parse.quote(ref.name, safe='')}"
    if not ctx.settings.notify:
        return _back(base, "No notification URLs are configured ([agent] notify in the config file).", False)

    def send() -> tuple[bool, list[str]]:
        from ..agent.notify import Notifier

        notifier = Notifier(list(ctx.settings.notify))
        with _capture_warnings() as lines:
            ok = notifier.send(
                "ibsync test notification",
                f"A test from the ibsync web app on {datetime.now(UTC).astimezone():%Y-%m-%d %H:%M} "
                f"(repository {ref.name}). Notifications work.",
                "info",
            )
        return ok, lines

    ok, lines = await run_in_threadpool(send)
    if ok:
        return _back(base, f"Test notification sent to {len(ctx.settings.notify)} service(s).", True)
    return _back(base, "Not sent: " + ("; ".join(lines) or "a service did not accept it"), False)


def _back(base: str, message: str, ok: bool) -> Response:
    query = urllib.parse.urlencode({"flash": message, "ok": "1" if ok else "0"})
    return RedirectResponse(f"{base}?{query}#notifications", status_code=303)


class _capture_warnings:
    """The warnings the notifier logs while it sends (they name the failing service, never its
    secrets), to show them on the page."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        self.thread = threading.get_ident()
        outer = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.thread == outer.thread and record.levelno >= logging.WARNING:
                    outer.lines.append(record.getMessage())

        self.handler = Handler()
        logging.getLogger("ibsync").addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("ibsync").removeHandler(self.handler)


ROUTES = [
    Route("/repositories", repositories, name="repositories"),
    Route("/repositories/{name}", repository, name="repository"),
    Route("/repositories/{name}/test-notification", test_notification, methods=["POST"], name="test_notification"),
]
