"""The ``[agent]`` and ``[devices."<UDID or name>"]`` tables of the config file.

    [agent]
    repository = "nas"             # name from [repositories], or a URL/path
    interval = "24h"               # back up a device whose last good snapshot is older than this
    window = "20:00-07:00"         # only start inside these local times
    only-when-charging = false
    wifi = true                    # also paired devices seen over Wi-Fi
    notify = ["ntfy://ntfy.example/ibsync"]       # Apprise URLs
    healthcheck = "https://hc-ping.com/<uuid>"
    keep = { daily = 7, weekly = 4, monthly = 12, yearly = 3 }
    prune = "7d"                   # prune at most this often
    check-subset = "1/7"           # after each prune, check this share of the data, rotating
    ui = true                      # serve the web app (README: "Web app")
    ui-address = "127.0.0.1"       # another address needs ui-password; TLS is then on
    ui-port = 8765
    ui-password = "${IBSYNC_UI_PASSWORD}"        # asked by the login page; ${VAR}: from the environment
    ui-certificate = "~/ibsync.crt"              # TLS (PEM); with ui-key. Default off loopback: self-signed
    ui-key = "~/ibsync.key"

    [devices."00008110-0011223344556677"]
    repository = "offsite"
    interval = "12h"

Every key is optional except that a device needs a repository from one of the two tables.
Unknown keys are refused, as for ``[repositories]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from ..errors import UserError
from .schedule import Window, parse_duration

#: keys a device table may override; the rest are the agent's alone
_DEVICE_KEYS = {
    "repository",
    "interval",
    "window",
    "only-when-charging",
    "wifi",
    "grace",
    "keep",
    "healthcheck",
    "enabled",
}
_AGENT_KEYS = {
    "repository",
    "interval",
    "window",
    "only-when-charging",
    "wifi",
    "notify",
    "healthcheck",
    "keep",
    "prune",
    "check-subset",
    "grace",
    "retry",
    "poll",
    "parallel",
    "ui",
    "ui-address",
    "ui-port",
    "ui-password",
    "ui-certificate",
    "ui-key",
}


@dataclass(frozen=True)
class UiSettings:
    """The web app the agent serves (``ibsync ui`` reads the same keys for its password and TLS)."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 8765
    password: str | None = None  # as written: ``${VAR}`` is expanded when the server starts
    certificate: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class DevicePolicy:
    """What applies to one device: the agent's settings with its own table over them."""

    repository: str | None = None
    interval: timedelta = timedelta(hours=24)
    window: Window | None = None
    only_when_charging: bool = False
    wifi: bool = True
    #: how long past its interval a device may go without a good backup before it is "overdue"
    grace: timedelta = timedelta(hours=24)
    keep: dict[str, object] = field(default_factory=dict)
    healthcheck: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class AgentSettings:
    defaults: DevicePolicy = field(default_factory=DevicePolicy)
    #: per device, keyed by the table's name (a UDID or a device name), with only its own keys
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    notify: tuple[str, ...] = ()
    prune_every: timedelta | None = None
    check_subset: tuple[int, int] | None = None  # (1, 7): a seventh of the data after each prune
    #: first wait after a skipped or failed attempt; doubled after each one in a row, up to the interval
    retry: timedelta = timedelta(minutes=15)
    #: how often the agent looks for devices and re-reads what is due
    poll: timedelta = timedelta(seconds=30)
    #: devices backed up at the same time (a phone waiting for its passcode must not hold up another)
    parallel: int = 4
    ui: UiSettings = field(default_factory=UiSettings)

    def policy(self, udid: str, name: str | None) -> DevicePolicy:
        """The settings for a device, found by UDID (any case) or by name."""
        own = self.table_of(udid, name)
        return self.defaults if own is None else _apply(self.defaults, own, f'[devices."{udid}"]')

    def table_of(self, udid: str, name: str | None) -> dict[str, Any] | None:
        for key, table in self.devices.items():
            if key.upper() == udid.upper():
                return table
        for key, table in self.devices.items():
            if name and key == name:
                return table
        return None

    def listed(self) -> list[str]:
        return list(self.devices)


def parse_agent_settings(doc: dict[str, Any], where: str) -> AgentSettings:
    """``[agent]`` and ``[devices]`` of a parsed config document (``where`` names the file)."""
    agent = doc.get("agent", {})
    devices = doc.get("devices", {})
    if not isinstance(agent, dict):
        raise UserError(f"{where}: [agent] must be a table")
    if not isinstance(devices, dict):
        raise UserError(f'{where}: [devices] must be a table of tables, like [devices."<UDID>"]')
    _refuse_unknown(agent, _AGENT_KEYS, f"{where}, [agent]")
    defaults = _apply(DevicePolicy(), {k: v for k, v in agent.items() if k in _DEVICE_KEYS}, f"{where}, [agent]")
    own: dict[str, dict[str, Any]] = {}
    for key, table in devices.items():
        at = f'{where}, [devices."{key}"]'
        if not isinstance(table, dict):
            raise UserError(f"{at}: must be a table")
        _refuse_unknown(table, _DEVICE_KEYS, at)
        _apply(defaults, table, at)  # validated now, applied per device later
        own[key] = dict(table)
    notify = agent.get("notify", [])
    if isinstance(notify, str):
        notify = [notify]
    if not isinstance(notify, list) or not all(isinstance(u, str) and u for u in notify):
        raise UserError(f"{where}, [agent]: 'notify' must be a list of Apprise URLs")
    settings = AgentSettings(defaults=defaults, devices=own, notify=tuple(notify))
    if "prune" in agent:
        settings = replace(settings, prune_every=parse_duration(agent["prune"], f"{where}, [agent] prune"))
    if "check-subset" in agent:
        settings = replace(settings, check_subset=parse_subset(agent["check-subset"], f"{where}, [agent] check-subset"))
    if "retry" in agent:
        settings = replace(settings, retry=parse_duration(agent["retry"], f"{where}, [agent] retry"))
    if "poll" in agent:
        settings = replace(settings, poll=parse_duration(agent["poll"], f"{where}, [agent] poll"))
    if "parallel" in agent:
        n = agent["parallel"]
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
            raise UserError(f"{where}, [agent]: 'parallel' must be a whole number from 1 to 64")
        settings = replace(settings, parallel=n)
    return replace(settings, ui=parse_ui(agent, f"{where}, [agent]"))


def parse_ui(agent: dict[str, Any], where: str) -> UiSettings:
    ui = UiSettings()
    if "ui" in agent:
        if not isinstance(agent["ui"], bool):
            raise UserError(f"{where} ui: expected true or false")
        ui = replace(ui, enabled=agent["ui"])
    for key in ("ui-address", "ui-password", "ui-certificate", "ui-key"):
        if key in agent:
            if not isinstance(agent[key], str) or not agent[key]:
                raise UserError(f"{where} {key}: expected a non-empty string")
            ui = replace(ui, **{key.removeprefix("ui-"): agent[key]})
    if "ui-port" in agent:
        port = agent["ui-port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise UserError(f"{where} ui-port: expected a port number from 0 to 65535")
        ui = replace(ui, port=port)
    if (ui.certificate is None) != (ui.key is None):
        raise UserError(f"{where}: ui-certificate and ui-key go together (the certificate and its private key)")
    return ui


def parse_subset(text: object, where: str) -> tuple[int, int]:
    """``"1/7"``: check one seventh of the data each time, the next seventh the time after."""
    try:
        assert isinstance(text, str)
        n, total = (int(p) for p in text.split("/"))
        if not 1 <= n <= total:
            raise ValueError
    except (AssertionError, ValueError):
        raise UserError(f'{where}: expected a share like "1/7"') from None
    return n, total


def _refuse_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = set(table) - known
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")


def _apply(base: DevicePolicy, table: dict[str, Any], where: str) -> DevicePolicy:
    changes: dict[str, Any] = {}
    for key, value in table.items():
        at = f"{where} {key}"
        match key:
            case "repository" | "healthcheck":
                if not isinstance(value, str) or not value:
                    raise UserError(f"{at}: expected a non-empty string")
                changes[key] = value
            case "interval" | "grace":
                changes[key] = parse_duration(value, at)
            case "window":
                changes["window"] = Window.parse(value, at)
            case "only-when-charging" | "wifi" | "enabled":
                if not isinstance(value, bool):
                    raise UserError(f"{at}: expected true or false")
                changes[key.replace("-", "_")] = value
            case "keep":
                changes["keep"] = parse_keep(value, at)
    return replace(base, **changes)


def parse_keep(value: object, where: str) -> dict[str, object]:
    """``{ daily = 7, weekly = 4 }``: forget's --keep-* rules, checked as forget checks them
    (``within = "1m"`` too; -1 or "unlimited" keeps one per period forever)."""
    from ..maint.forget import RetentionPolicy

    RetentionPolicy.from_mapping(value, where=where)  # type: ignore[arg-type]  # refuses what forget would
    return dict(value)  # type: ignore[call-overload]
