"""When a device is due: durations, the daily start window, back-off and the overdue rule.

Pure functions of the settings, the history and the clock, so the agent's decisions (and
``ibsync status``'s answers) can be tested without waiting for time to pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from ..errors import UserError

_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: object, where: str) -> timedelta:
    """``"24h"``, ``"90m"``, ``"1d12h"``, ``"30s"``, ``"2w"``: seconds, minutes, hours, days and
    weeks (as systemd timers write them; ``m`` is minutes here, unlike forget's ``--keep-within``,
    which follows restic's calendar months)."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f'{where}: expected a duration like "24h", "90m" or "7d"')
    s = text.replace(" ", "")
    pos, seconds = 0, 0
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if m is None:
            raise UserError(f'{where}: {text!r} is not a duration (numbers with s, m, h, d or w, like "1d12h")')
        seconds += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if seconds <= 0:
        raise UserError(f"{where}: the duration must be longer than zero")
    return timedelta(seconds=seconds)


def format_duration(d: timedelta) -> str:
    """The shortest of "3d 4h", "5h 10m", "12m", "40s" for people reading a status."""
    s = int(abs(d.total_seconds()))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{s}s"


@dataclass(frozen=True)
class Window:
    """Local times of day a backup may start in, e.g. ``20:00-07:00`` (through midnight). A
    backup that started inside the window runs to its end."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: object, where: str) -> Window:
        if not isinstance(text, str):
            raise UserError(f'{where}: expected a time window like "20:00-07:00"')
        parts = text.replace(" ", "").split("-")
        try:
            if len(parts) != 2:
                raise ValueError
            start, end = (time.fromisoformat(p) for p in parts)
        except ValueError:
            raise UserError(f'{where}: {text!r} is not a time window like "20:00-07:00" (local times, HH:MM)') from None
        if start == end:
            raise UserError(f"{where}: the window {text!r} is empty; leave 'window' out to allow any time")
        return cls(start, end)

    def contains(self, moment: datetime) -> bool:
        t = moment.time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def next_open(self, moment: datetime) -> datetime:
        """``moment`` if the window is open then, else when it next opens (same time zone)."""
        if self.contains(moment):
            return moment
        opening = moment.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        return opening if opening > moment else opening + timedelta(days=1)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def backoff(failures_in_a_row: int, base: timedelta, ceiling: timedelta) -> timedelta:
    """How long to wait after the n-th unsuccessful attempt in a row: base, 2×, 4×, ... capped."""
    if failures_in_a_row <= 0:
        return timedelta(0)
    return min(base * (2 ** min(failures_in_a_row - 1, 20)), ceiling)


def next_due(
    last_success: datetime | None,
    interval: timedelta,
    *,
    retry_after: datetime | None,
    window: Window | None,
    now: datetime,
) -> datetime:
    """When the device should next be backed up: its last good snapshot plus the interval (now
    if it has none), not before the back-off of a recent unsuccessful attempt, moved to the
    window's next opening."""
    due = now if last_success is None else last_success + interval
    if retry_after is not None and retry_after > due:
        due = retry_after
    if window is not None:
        due = window.next_open(due.astimezone())
    return due


def is_overdue(
    last_success: datetime | None, first_seen: datetime | None, interval: timedelta, grace: timedelta, now: datetime
) -> bool:
    """No good backup for longer than the interval plus the grace period (counted from when the
    agent first knew the device, for one never backed up)."""
    since = last_success or first_seen
    return since is not None and now - since > interval + grace
