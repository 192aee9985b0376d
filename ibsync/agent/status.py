"""``ibsync status``: per device, the last good backup and its age, the last attempt and why,
when it is next due and whether it is overdue; read from the agent's history and the config
file alone (no repository is opened, so it answers while the NAS sleeps)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..pids import pid_alive
from .history import History
from .schedule import format_duration, is_overdue, next_due
from .settings import AgentSettings


@dataclass(frozen=True)
class DeviceStatus:
    udid: str | None
    name: str | None
    repository: str | None
    last_success: datetime | None
    last_snapshot: str | None
    last_attempt: datetime | None
    last_result: str | None  # ok | skipped | failed | running | None
    reason: str | None
    next_due: datetime | None
    overdue: bool
    connected: str | None  # "USB", "Network", "Wi-Fi" while the agent sees it
    waiting: str | None
    enabled: bool

    def to_dict(self, now: datetime) -> dict[str, Any]:
        return {
            "udid": self.udid,
            "name": self.name,
            "repository": self.repository,
            "last_success": _iso(self.last_success),
            "age_seconds": None if self.last_success is None else int((now - self.last_success).total_seconds()),
            "last_snapshot": self.last_snapshot,
            "last_attempt": _iso(self.last_attempt),
            "last_result": self.last_result,
            "reason": self.reason,
            "next_due": _iso(self.next_due),
            "overdue": self.overdue,
            "connected": self.connected,
            "waiting": self.waiting,
            "enabled": self.enabled,
        }


@dataclass(frozen=True)
class AgentState:
    running: bool
    pid: int | None
    started: datetime | None
    heartbeat: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "pid": self.pid,
            "started": _iso(self.started),
            "heartbeat": _iso(self.heartbeat),
        }


@dataclass(frozen=True)
class Status:
    agent: AgentState
    devices: list[DeviceStatus]
    now: datetime
    upkeep: list[dict[str, Any]]  # the latest retention, prune and check run of each repository

    @property
    def overdue(self) -> bool:
        return any(d.overdue for d in self.devices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": _iso(self.now),
            "agent": self.agent.to_dict(),
            "overdue": self.overdue,
            "devices": [d.to_dict(self.now) for d in self.devices],
            "upkeep": self.upkeep,
        }


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat(timespec="seconds")


def read_status(settings: AgentSettings, history: History, now: datetime | None = None) -> Status:
    now = now or datetime.now(UTC)
    rows: list[DeviceStatus] = []
    known = history.devices()
    covered: set[str] = set()
    for rec in known:
        policy = settings.policy(rec.udid, rec.name)
        covered.update(k for k in settings.devices if k.upper() == rec.udid.upper() or k == rec.name)
        last = history.last_attempt(rec.udid)
        retry_after = history.retry_after(rec.udid, settings.retry, policy.interval)
        due = next_due(rec.last_success, policy.interval, retry_after=retry_after, window=policy.window, now=now)
        rows.append(
            DeviceStatus(
                udid=rec.udid,
                name=rec.name,
                repository=policy.repository,
                last_success=rec.last_success,
                last_snapshot=rec.last_snapshot,
                last_attempt=last.started if last else None,
                last_result=last.result if last else None,
                reason=last.reason if last else None,
                next_due=due if policy.enabled and policy.repository else None,
                overdue=policy.enabled
                and bool(policy.repository)
                and is_overdue(rec.last_success, rec.first_seen, policy.interval, policy.grace, now),
                connected=rec.connection,
                waiting=rec.waiting,
                enabled=policy.enabled,
            )
        )
    for key in settings.devices:  # listed but never seen: nothing is known of it yet
        if key in covered:
            continue
        policy = settings.policy(key, key)
        udid = key if _looks_like_udid(key) else None
        rows.append(
            DeviceStatus(
                udid=udid,
                name=None if udid else key,
                repository=policy.repository,
                last_success=None,
                last_snapshot=None,
                last_attempt=None,
                last_result=None,
                reason="never seen by the agent",
                next_due=None,
                overdue=False,
                connected=None,
                waiting=None,
                enabled=policy.enabled,
            )
        )
    return Status(agent_state(history), rows, now, latest_upkeep(history))


def latest_upkeep(history: History) -> list[dict[str, Any]]:
    """The newest run of each kind (forget, prune, check) in each repository, newest first."""
    seen: set[tuple[str, str]] = set()
    latest = []
    for run in history.maintenance(limit=200):
        if (run["repository"], run["kind"]) not in seen:
            seen.add((run["repository"], run["kind"]))
            latest.append(run)
    return latest


def agent_state(history: History) -> AgentState:
    pid_text = history.get("pid")
    pid = int(pid_text) if pid_text and pid_text.isdigit() else None
    running = pid is not None and history.get("stopped") is None and pid_alive(pid)
    return AgentState(
        running, pid if running else None, _parse(history.get("started")), _parse(history.get("heartbeat"))
    )


def _parse(text: str | None) -> datetime | None:
    return None if not text else datetime.fromisoformat(text)


def _looks_like_udid(key: str) -> bool:
    plain = key.replace("-", "")
    return len(plain) in (24, 40) and all(c in "0123456789abcdefABCDEF" for c in plain)


def describe(status: Status) -> list[str]:
    """Text lines for a terminal: one block per device."""
    lines = []
    a = status.agent
    lines.append(f"agent: running (pid {a.pid}) since {_local(a.started)}" if a.running else "agent: not running")
    if not status.devices:
        lines.append(
            "no devices yet: connect a phone while the agent runs, or list it under [devices] in the config file"
        )
    for d in status.devices:
        title = f"{d.name or '?'} ({d.udid})" if d.udid else f"{d.name}"
        lines.append("")
        lines.append(title + ("  OVERDUE" if d.overdue else "") + ("" if d.enabled else "  (disabled)"))
        lines.append(f"  repository:   {d.repository or '(none configured)'}")
        if d.last_success:
            lines.append(
                f"  last backup:  {_local(d.last_success)} ({format_duration(status.now - d.last_success)} ago)"
                + (f", snapshot {d.last_snapshot[:8]}" if d.last_snapshot else "")
            )
        else:
            lines.append("  last backup:  never")
        if d.last_attempt:
            why = f": {d.reason}" if d.reason else ""
            lines.append(f"  last attempt: {_local(d.last_attempt)}, {d.last_result}{why}")
        if d.connected:
            lines.append(f"  connected:    {d.connected}" + (f", waiting: {d.waiting}" if d.waiting else ""))
        if d.next_due:
            when = (
                "now"
                if d.next_due <= status.now
                else f"{_local(d.next_due)} (in {format_duration(d.next_due - status.now)})"
            )
            lines.append(f"  next due:     {when}")
        elif d.reason and not d.last_attempt:
            lines.append(f"  note:         {d.reason}")
    if status.upkeep:
        lines.append("")
        lines.append("upkeep:")
        for run in status.upkeep:
            started = _local(_parse(run["started"]))
            lines.append(
                f"  {run['repository']}: {run['kind']} {started}, {run['result']}"
                + (f": {run['detail']}" if run["detail"] else "")
            )
    return lines


def _local(dt: datetime | None) -> str:
    return "?" if dt is None else dt.astimezone().strftime("%Y-%m-%d %H:%M")
