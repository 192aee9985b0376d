"""A device's battery as lockdown reports it, for "only back up while charging".

lockdown's ``com.apple.mobile.battery`` domain (readable in a paired session; what BBackupp reads):
``BatteryCurrentCapacity`` (percent), ``BatteryIsCharging``, ``ExternalConnected`` (on a charger
or a powered port; a full phone on a charger is connected but not charging). Any of them may be
missing (a device without a battery, an older iOS, a domain lockdown refuses): that field is
None, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DeviceDisconnected

BATTERY_DOMAIN = "com.apple.mobile.battery"


@dataclass(frozen=True)
class BatteryState:
    charging: bool | None  # BatteryIsCharging
    external_power: bool | None  # ExternalConnected
    level: int | None  # BatteryCurrentCapacity, 0-100

    @property
    def on_power(self) -> bool | None:
        """Charging or on external power (None: the device said neither either way)."""
        if self.charging or self.external_power:
            return True
        if self.charging is None and self.external_power is None:
            return None
        return False


async def read_battery(lockdown: Any) -> BatteryState:
    """The battery state of the device behind ``lockdown`` (a pymobiledevice3 lockdown client or
    service provider). A lost connection raises DeviceDisconnected; a domain lockdown will not
    give, or values of the wrong type, read as None."""
    from pymobiledevice3.exceptions import ConnectionTerminatedError, PyMobileDevice3Exception

    try:
        values = await lockdown.get_value(BATTERY_DOMAIN)
    except (ConnectionTerminatedError, ConnectionError) as e:
        raise DeviceDisconnected(f"the connection to the device was lost while reading its battery ({e})") from e
    except PyMobileDevice3Exception:  # GetProhibited, MissingValue, ...: nothing known
        values = None
    if not isinstance(values, dict):
        values = {}
    return BatteryState(
        charging=_bool(values.get("BatteryIsCharging")),
        external_power=_bool(values.get("ExternalConnected")),
        level=_level(values.get("BatteryCurrentCapacity")),
    )


def _bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, int):  # some plists carry 0/1
        return bool(v)
    return None


def _level(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return max(0, min(100, int(v)))
