"""Finding connected devices and opening a lockdown session to one, through pymobiledevice3.

usbmuxd (Apple's on macOS and Windows, the usbmuxd package on Linux) lists the devices reachable
over USB or the network; ``USBMUXD_SOCKET_ADDRESS`` points pymobiledevice3 elsewhere (the tests'
simulated device). Listing never pairs: on a real phone pairing shows the "Trust this
computer?" prompt, which only ``backup`` (the user's explicit request) may trigger.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DeviceError, UserError

BACKUP_DOMAIN = "com.apple.mobile.backup"


@dataclass(frozen=True)
class ConnectedDevice:
    udid: str
    name: str | None
    model: str | None  # ProductType, e.g. iPhone15,2
    ios: str | None
    connection: str  # "USB" | "Network"
    paired: bool
    encrypts_backups: bool | None  # None: unknown until paired

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _usbmux_error(e: BaseException) -> DeviceError:
    return DeviceError(
        f"cannot reach usbmuxd ({e.__class__.__name__}: {e}); is a device connected and, on Linux, the usbmuxd service running?"
    )


async def list_connected() -> list[ConnectedDevice]:
    from pymobiledevice3 import usbmux
    from pymobiledevice3.lockdown import create_using_usbmux

    try:
        found = await usbmux.list_devices()
    except Exception as e:  # no usbmuxd socket, refused, ...
        raise _usbmux_error(e) from e
    seen: dict[str, ConnectedDevice] = {}
    for mux in found:
        if mux.serial in seen:  # the same phone over USB and Wi-Fi: USB is listed first
            continue
        try:
            client = await create_using_usbmux(serial=mux.serial, autopair=False, connection_type=mux.connection_type)
        except Exception as e:
            raise DeviceError(f"device {mux.serial}: lockdown refused ({e.__class__.__name__}: {e})") from e
        try:
            values = client.all_values
            encrypts = None
            if client.paired:
                encrypts = bool(await client.get_value(BACKUP_DOMAIN, "WillEncrypt"))
            seen[mux.serial] = ConnectedDevice(
                udid=values.get("UniqueDeviceID") or mux.serial,
                name=values.get("DeviceName"),
                model=values.get("ProductType"),
                ios=values.get("ProductVersion"),
                connection=mux.connection_type,
                paired=bool(client.paired),
                encrypts_backups=encrypts,
            )
        finally:
            await client.close()
    return list(seen.values())


def choose(devices: list[ConnectedDevice], wanted: str | None) -> ConnectedDevice:
    """The device named by UDID (or a unique prefix) or by name; the only one if none is named."""
    if not devices:
        raise DeviceError("no device connected (connect it with a cable, unlock it, and trust this computer)")
    if wanted is None:
        if len(devices) > 1:
            names = ", ".join(f"{d.name or '?'} ({d.udid})" for d in devices)
            raise UserError(f"several devices are connected ({names}); choose one with --device UDID|NAME, or use --all")
        return devices[0]
    exact = [d for d in devices if d.udid.lower() == wanted.lower() or (d.name or "") == wanted]
    if len(exact) == 1:
        return exact[0]
    prefix = [d for d in devices if d.udid.lower().startswith(wanted.lower())]
    if len(prefix) == 1:
        return prefix[0]
    raise UserError(f"no single connected device matches '{wanted}' (connected: {', '.join(d.udid for d in devices)})")


async def open_lockdown(device: ConnectedDevice):
    """A paired lockdown session (pairing now if needed: the phone asks the user to trust us)."""
    from pymobiledevice3.lockdown import create_using_usbmux

    try:
        return await create_using_usbmux(serial=device.udid, autopair=True, connection_type=device.connection)
    except Exception as e:
        raise DeviceError(
            f"{device.name or device.udid}: pairing failed ({e.__class__.__name__}: {e}); unlock the phone and tap 'Trust'"
        ) from e


def run(coro):
    """Run a coroutine from synchronous code (the CLI)."""
    return asyncio.run(coro)
