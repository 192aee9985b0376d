"""Jinja filters: sizes, local times and ages as the CLI shows them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def size(n: float | None) -> str:
    from ..ui.text import size as text_size

    return "?" if n is None else text_size(n)


def when(dt: datetime | float | None) -> str:
    if dt is None:
        return "never"
    if isinstance(dt, (int, float)):
        dt = datetime.fromtimestamp(dt, UTC)
    return dt.astimezone().strftime("%Y-%m-%d %H:%M")


def ago(dt: datetime | None, now: datetime | None = None) -> str:
    from ..agent.schedule import format_duration

    if dt is None:
        return ""
    delta = (now or datetime.now(UTC)) - dt
    return f"in {format_duration(-delta)}" if delta < timedelta(0) else f"{format_duration(delta)} ago"


def iso(dt: datetime | None) -> str:
    return "" if dt is None else dt.isoformat(timespec="seconds")


def urlpart(text: object) -> str:
    """One path segment of a URL (Jinja's urlencode keeps "/")."""
    from urllib.parse import quote

    return quote(str(text), safe="")


def install(env) -> None:
    env.filters.update(size=size, when=when, ago=ago, iso=iso, urlpart=urlpart)
