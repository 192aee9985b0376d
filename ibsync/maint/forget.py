"""Retention policies: which snapshots ``forget`` keeps, with restic's semantics, per device.

This is pure logic (no storage, no click); ``ibsync.maint.api.apply_retention`` deletes what it
decides.

**Grouping.** A policy is applied to each device (UDID) on its own, as restic applies it to each
group of snapshots (host and paths by default): ``--keep-last 3`` keeps three snapshots of
every phone, not three in all.

**Timestamp.** A snapshot's time for every rule is its ``backup_date`` (Status.plist ``Date``:
when the device made the backup), falling back to ``time`` (when ibsync stored it) for a
snapshot without one. A backup folder imported weeks after it was made therefore counts for
the day the phone made it. A naive datetime is taken as UTC.

**Rules** (restic ``internal/restic/snapshot_policy.go``, ``doc/060_forget.rst``):

- The snapshots of a group are sorted newest first (ties: newer ``time``, then higher id).
- ``last=n`` keeps the n newest snapshots ("last snapshot").
- ``hourly``/``daily``/``weekly``/``monthly``/``yearly=n``: walking from the newest, a snapshot
  is kept if its period (hour; day; ISO 8601 week, Monday to Sunday, numbered within its ISO
  year; month; year), in local time, differs from the period of the previous snapshot this rule
  kept, while fewer than n periods have been kept by the rule. Only periods that hold a snapshot
  count, not calendar time since now. ``-1`` (``UNLIMITED``) keeps one per period forever.
- While a rule still has periods left, it also keeps the group's oldest snapshot even when that
  one shares a period with a snapshot already kept, labelled "oldest <rule> snapshot" (restic
  0.17+: not enough snapshots for the count, so keep the longest history possible).
- ``within=D`` keeps every snapshot whose timestamp is strictly after (newest − D), where the
  newest is the newest snapshot that is not in the future. ``D`` is a :class:`Duration`
  (restic's ``1y5m7d2h``: years, months and days are calendar steps in local time, normalised
  like Go's ``time.AddDate``, so 31 March 2024 − 1 month is 2 March; hours are exact), or a plain
  ``timedelta`` (exact). A snapshot from the future is never removed by it.
- A snapshot is kept if any rule keeps it; its reasons list every rule that did, in the order
  within, last, hourly, daily, weekly, monthly, yearly ("within 7d", "last snapshot",
  "daily snapshot", ...).
- An empty policy keeps everything (reason "policy is empty"); the command refuses it.
  A non-empty policy always keeps the newest snapshot of each device.

"Local time" is the time zone of the machine running ``forget`` (restic uses the zone the
snapshot was taken in, which it records; ibsync records UTC only). ``tz`` overrides it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from ..errors import UserError
from ..model import Snapshot

UNLIMITED = -1

_COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
# restic's words for the rules in the policy description
_DESCR = {
    "last": "latest",
    "hourly": "hourly",
    "daily": "daily",
    "weekly": "weekly",
    "monthly": "monthly",
    "yearly": "yearly",
}


@dataclass(frozen=True)
class Duration:
    """restic's calendar duration, written like ``1y5m7d2h`` (no weeks, minutes or seconds)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    _TOKEN = re.compile(r"(\d+)([ymdh])")

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse ``2y5m7d3h`` (any subset of the units, each at most once, in any order)."""
        s = text.strip()
        if not s:
            raise ValueError("empty duration")
        values: dict[str, int] = {}
        pos = 0
        while pos < len(s):
            m = cls._TOKEN.match(s, pos)
            if m is None:
                raise ValueError(f"invalid duration {text!r}: expected numbers with units y, m, d or h, like 1y5m7d2h")
            unit = m.group(2)
            if unit in values:
                raise ValueError(f"invalid duration {text!r}: unit {unit!r} given twice")
            values[unit] = int(m.group(1))
            pos = m.end()
        return cls(values.get("y", 0), values.get("m", 0), values.get("d", 0), values.get("h", 0))

    def is_zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def __str__(self) -> str:
        parts = [
            f"{v}{u}" for v, u in ((self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")) if v
        ]
        return "".join(parts) or "0h"


def format_within(within: timedelta | Duration) -> str:
    """A duration the way restic prints it (``7d2h``); a timedelta that is not whole hours as Python does."""
    if isinstance(within, Duration):
        return str(within)
    seconds = int(within.total_seconds())
    if within.microseconds or seconds % 3600:
        return str(within)
    days, hours = divmod(seconds // 3600, 24)
    return "".join(p for p in (f"{days}d" if days else "", f"{hours}h" if hours else "")) or "0h"


@dataclass
class RetentionPolicy:
    """How many snapshots of each kind to keep; 0 means the rule is off, -1 (UNLIMITED) keep all."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: timedelta | Duration | None = None

    def __post_init__(self) -> None:
        for name in _COUNT_RULES:
            value = getattr(self, name)
            if not isinstance(value, int) or value < UNLIMITED:
                raise ValueError(f"keep-{name} must be a count of 0 or more, or unlimited (-1); got {value!r}")
        w = self.within
        if isinstance(w, timedelta) and w < timedelta(0):
            raise ValueError("keep-within must not be negative")
        if isinstance(w, Duration) and min(w.years, w.months, w.days, w.hours) < 0:
            raise ValueError("keep-within must not be negative")

    # the keys of from_mapping, in the order error messages list them
    KEYS = (*_COUNT_RULES, "within")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "keep") -> RetentionPolicy:
        """A policy from a config table such as ``{"daily": 7, "weekly": 4, "within": "1m"}``:
        counts are whole numbers of 0 or more or "unlimited", ``within`` a duration like
        ``1y5m7d2h``. Anything else, and a policy with no rule, is a one-line UserError that
        starts with ``where`` (the key the table was read from)."""
        known = ", ".join(cls.KEYS)
        if not isinstance(values, Mapping):
            raise UserError(f"{where} must be a table of rules ({known}), not {type(values).__name__}")
        counts: dict[str, int] = {}
        within: Duration | None = None
        for key, value in values.items():
            if key == "within":
                if not isinstance(value, str):
                    raise UserError(f'{where}.within must be a duration like "1y5m7d2h", not {value!r}')
                try:
                    within = Duration.parse(value)
                except ValueError as e:
                    raise UserError(f"{where}.within: {e}") from None
            elif key in _COUNT_RULES:
                counts[key] = _count(value, f"{where}.{key}")
            else:
                raise UserError(f"{where}: unknown key {str(key)!r}; the known keys are {known}")
        policy = cls(**counts, within=within)
        if policy.is_empty():
            raise UserError(f"{where} keeps everything: give at least one of {known} above 0")
        return policy

    def has_within(self) -> bool:
        w = self.within
        if w is None:
            return False
        return not w.is_zero() if isinstance(w, Duration) else w != timedelta(0)

    def is_empty(self) -> bool:
        """No rule set: such a policy would keep everything, and ``forget`` refuses it."""
        return all(getattr(self, n) == 0 for n in _COUNT_RULES) and not self.has_within()

    def describe(self) -> str:
        """restic's wording: 'keep 7 daily, 4 weekly snapshots and all snapshots within 1y of the newest'."""
        counts = []
        for name in _COUNT_RULES:
            value = getattr(self, name)
            if value > 0:
                counts.append(f"{value} {_DESCR[name]}")
            elif value == UNLIMITED:
                counts.append(f"all {_DESCR[name]}")
        s = f"{', '.join(counts)} snapshots" if counts else ""
        if self.has_within():
            assert self.within is not None
            s += (" and " if s else "") + f"all snapshots within {format_within(self.within)} of the newest"
        return "keep " + (s or "everything (empty policy)")

    def to_dict(self) -> dict:
        d: dict = {n: getattr(self, n) for n in _COUNT_RULES}
        d["within"] = format_within(self.within) if self.has_within() else None  # type: ignore[arg-type]
        return d


def _count(value: object, where: str) -> int:
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return UNLIMITED
    if value == UNLIMITED and not isinstance(value, bool):  # restic's -1
        return UNLIMITED
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:  # True is an int to Python
        raise UserError(
            f'{where} must be a whole number of 0 or more, or -1 or "unlimited" (one per period forever), not {value!r}'
        )
    return value


@dataclass
class Decision:
    snapshot: Snapshot
    keep: bool
    reasons: list[str] = field(default_factory=list)


def snapshot_timestamp(snapshot: Snapshot) -> datetime:
    """The time every rule uses: when the device made the backup, else when ibsync stored it (aware, UTC)."""
    dt = snapshot.backup_date or snapshot.time
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def _newest_first_key(snapshot: Snapshot) -> tuple:
    t = snapshot.time if snapshot.time.tzinfo else snapshot.time.replace(tzinfo=UTC)
    return (snapshot_timestamp(snapshot), t, snapshot.id)


def group_by_device(snapshots: Iterable[Snapshot]) -> dict[str, list[Snapshot]]:
    """Snapshots by device UDID (keys sorted), each group in the order given."""
    groups: dict[str, list[Snapshot]] = {}
    for s in snapshots:
        groups.setdefault(s.device.udid, []).append(s)
    return {udid: groups[udid] for udid in sorted(groups)}


# ---- the periods of the calendar rules, on a local datetime --------------------------------------


def _hour(d: datetime) -> tuple:
    return (d.year, d.month, d.day, d.hour)


def _day(d: datetime) -> tuple:
    return (d.year, d.month, d.day)


def _iso_week(d: datetime) -> tuple:
    iso = d.isocalendar()
    return (iso.year, iso.week)


def _month(d: datetime) -> tuple:
    return (d.year, d.month)


def _year(d: datetime) -> tuple:
    return (d.year,)


_PERIODS: dict[str, Callable[[datetime], tuple] | None] = {
    "last": None,  # every snapshot is a period of its own
    "hourly": _hour,
    "daily": _day,
    "weekly": _iso_week,
    "monthly": _month,
    "yearly": _year,
}


def _local(dt: datetime, tz: tzinfo | None) -> datetime:
    return dt.astimezone(tz) if tz is not None else dt.astimezone()


def _add_date(naive: datetime, years: int, months: int, days: int) -> datetime:
    """Go's ``time.AddDate`` on a wall-clock time: out-of-range days roll over (Feb 31 -> Mar 2/3)."""
    total = naive.year * 12 + (naive.month - 1) + years * 12 + months
    year, month0 = divmod(total, 12)
    first = naive.replace(year=year, month=month0 + 1, day=1)
    return first + timedelta(days=naive.day - 1 + days)


def _within_threshold(latest: datetime, within: timedelta | Duration, tz: tzinfo | None) -> datetime | None:
    """Snapshots strictly after the returned instant are within; None: all of them (out of range)."""
    try:
        if isinstance(within, timedelta):
            return latest - within
        wall = _add_date(_local(latest, tz).replace(tzinfo=None), -within.years, -within.months, -within.days)
        start = wall.astimezone() if tz is None else wall.replace(tzinfo=tz)
        return start.astimezone(UTC) - timedelta(hours=within.hours)
    except (OverflowError, ValueError):
        return None


def apply_policy(
    snapshots: Iterable[Snapshot],
    policy: RetentionPolicy,
    *,
    tz: tzinfo | None = None,
    now: datetime | None = None,
) -> list[Decision]:
    """Decide for each snapshot of ONE group (device) whether the policy keeps it, and why.

    Returns the decisions newest first. ``tz`` is the zone periods are counted in (default: the
    local zone); ``now`` is the present for ``within`` (default: now), so that snapshots from the
    future are not taken as the newest.
    """
    ordered = sorted(snapshots, key=_newest_first_key, reverse=True)
    if policy.is_empty():
        return [Decision(s, True, ["policy is empty"]) for s in ordered]
    if not ordered:
        return []

    stamps = [snapshot_timestamp(s) for s in ordered]
    threshold: datetime | None = None
    if policy.has_within():
        assert policy.within is not None
        present = now or datetime.now(UTC)
        if present.tzinfo is None:
            present = present.replace(tzinfo=UTC)
        past = [t for t in stamps if t < present]
        if past:
            threshold = _within_threshold(max(past), policy.within, tz)
        # No snapshot in the past: restic's newest is the zero time, so every snapshot is within.

    remaining = {name: getattr(policy, name) for name in _COUNT_RULES}
    previous: dict[str, object] = {name: None for name in _COUNT_RULES}
    last_index = len(ordered) - 1
    decisions = []
    for nr, (snap, stamp) in enumerate(zip(ordered, stamps)):
        reasons: list[str] = []
        if policy.has_within() and (threshold is None or stamp > threshold):
            reasons.append(f"within {format_within(policy.within)}")  # type: ignore[arg-type]
        local = _local(stamp, tz)
        for name in _COUNT_RULES:
            if remaining[name] == 0:
                continue
            period_of = _PERIODS[name]
            period = nr if period_of is None else period_of(local)
            if period != previous[name] or nr == last_index:
                oldest = period == previous[name]  # only reached for the oldest snapshot
                previous[name] = period
                if remaining[name] > 0:
                    remaining[name] -= 1
                reasons.append(f"oldest {name} snapshot" if oldest else f"{name} snapshot")
        decisions.append(Decision(snap, bool(reasons), reasons))
    return decisions


def apply_policy_by_device(
    snapshots: Iterable[Snapshot],
    policy: RetentionPolicy,
    *,
    tz: tzinfo | None = None,
    now: datetime | None = None,
) -> dict[str, list[Decision]]:
    """``apply_policy`` on each device's snapshots; UDID -> decisions, newest first."""
    return {udid: apply_policy(group, policy, tz=tz, now=now) for udid, group in group_by_device(snapshots).items()}
