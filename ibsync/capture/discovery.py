"""Finding connected devices and opening a lockdown session to one, through pymobiledevice3.

usbmuxd (Apple's on macOS and Windows, the usbmuxd package on Linux) lists the devices reachable
over USB and, with Apple's usbmuxd (not stock Linux usbmuxd), over the network ("Network");
``USBMUXD_SOCKET_ADDRESS`` points pymobiledevice3 elsewhere (the tests' simulated device). With
``wifi``, paired phones on the LAN are found without usbmuxd too ("Wi-Fi", :mod:`.wifi`). The
same phone on several paths is listed once: USB first, then Network, then Wi-Fi.

Listing never pairs: on a real phone pairing shows the "Trust this computer?" prompt, which only
``backup`` (the user's explicit request) may trigger. Every step is bounded in time: a device
usbmuxd lists that does not answer lockdown within ``connect_timeout`` (default
:data:`CONNECT_TIMEOUT` s, or ``IBSYNC_DEVICE_CONNECT_TIMEOUT``) is unreachable; Wi-Fi discovery
adds at most its Bonjour browse (:data:`.wifi.DEFAULT_BROWSE_TIMEOUT` s, ``IBSYNC_WIFI_TIMEOUT``)
plus that connect timeout per phone found, and none at all when no phone was ever paired here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, overload

from ..errors import DeviceError, DeviceUnreachable, TrustNotAnswered, UserError

logger = logging.getLogger("ibsync.capture")

BACKUP_DOMAIN = "com.apple.mobile.backup"
CONNECT_TIMEOUT_ENV = "IBSYNC_DEVICE_CONNECT_TIMEOUT"
#: Seconds a listed device gets to answer lockdown (a paired session with TLS takes ~20 ms over
#: USB, well under a second over Wi-Fi).
CONNECT_TIMEOUT = 10.0
#: Where each path ranks when the same phone is on several
_PREFERENCE = {"USB": 0, "Network": 1, "Wi-Fi": 2}

Notify = Callable[[str], None]


class UsbmuxdUnavailable(DeviceError):
    """usbmuxd cannot be reached (not installed, not running, no permission)."""


@dataclass(frozen=True)
class ConnectedDevice:
    udid: str
    name: str | None
    model: str | None  # ProductType, e.g. iPhone15,2
    ios: str | None
    connection: str  # "USB" | "Network" (usbmuxd) | "Wi-Fi" (direct over the LAN, see .wifi)
    paired: bool
    encrypts_backups: bool | None  # None: unknown until paired
    address: str | None = None  # "host:port" of a Wi-Fi-direct device; None for usbmuxd's

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["address"] is None:  # usbmuxd's devices print as they always did
            del d["address"]
        return d


def connect_timeout_from_env(environ: Mapping[str, str] = os.environ) -> float:
    raw = environ.get(CONNECT_TIMEOUT_ENV)
    if raw is None or raw == "":
        return CONNECT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{CONNECT_TIMEOUT_ENV}={raw!r}: give a number of seconds above 0")
    return value


def _usbmux_error(e: BaseException) -> DeviceError:
    return UsbmuxdUnavailable(
        f"cannot reach usbmuxd ({e.__class__.__name__}: {e}); is a device connected and, on Linux, the usbmuxd service running?"
    )


async def _describe(client: Any, connection: str, fallback_udid: str, address: str | None = None) -> ConnectedDevice:
    values = client.all_values
    encrypts = None
    if client.paired:
        encrypts = bool(await client.get_value(BACKUP_DOMAIN, "WillEncrypt"))
    return ConnectedDevice(
        udid=values.get("UniqueDeviceID") or fallback_udid,
        name=values.get("DeviceName"),
        model=values.get("ProductType"),
        ios=values.get("ProductVersion"),
        connection=connection,
        paired=bool(client.paired),
        encrypts_backups=encrypts,
        address=address,
    )


async def _describe_mux(mux: Any) -> ConnectedDevice:
    from pymobiledevice3.lockdown import create_using_usbmux

    client = await create_using_usbmux(serial=mux.serial, autopair=False, connection_type=mux.connection_type)
    try:
        return await _describe(client, mux.connection_type, mux.serial)
    finally:
        await client.close()


@overload
async def list_connected(
    wifi: bool = ..., *, tolerant: Literal[False] = ..., connect_timeout: float | None = ...
) -> list[ConnectedDevice]: ...
@overload
async def list_connected(
    wifi: bool = ..., *, tolerant: Literal[True], connect_timeout: float | None = ...
) -> tuple[list[ConnectedDevice], dict[str, str]]: ...
async def list_connected(wifi: bool = False, *, tolerant: bool = False, connect_timeout: float | None = None):
    """The devices reachable now: usbmuxd's (USB, Network) and, with ``wifi``, paired phones found
    directly on the LAN (Wi-Fi); one entry per phone, by its best path (USB, Network, Wi-Fi).

    A device usbmuxd lists that does not answer lockdown (refused, or silent for
    ``connect_timeout`` s): by default a DeviceError naming it, as the commands want; with
    ``tolerant``, the result is ``(devices, {udid: why it is unreachable})``, for callers that
    carry on with the others (the agent). usbmuxd missing is a DeviceError
    (:class:`UsbmuxdUnavailable`) unless ``wifi`` found a phone; with ``tolerant`` it is still
    raised then, so the caller can tell "no usbmuxd" from "no device"."""
    from pymobiledevice3 import usbmux

    timeout = connect_timeout_from_env() if connect_timeout is None else connect_timeout
    mux_error: DeviceError | None = None
    try:
        found = await usbmux.list_devices()
    except Exception as e:  # no usbmuxd socket, refused, ...
        if not wifi:
            raise _usbmux_error(e) from e
        mux_error, found = _usbmux_error(e), []
    seen: dict[str, ConnectedDevice] = {}
    unreachable: dict[str, str] = {}
    for mux in sorted(found, key=lambda m: _PREFERENCE.get(m.connection_type, 9)):  # stable: USB first
        if mux.serial in seen:  # the same phone over USB and the network
            continue
        try:
            device = await asyncio.wait_for(_describe_mux(mux), timeout)
        except TimeoutError:
            why = f"listed by usbmuxd ({mux.connection_type}) but lockdown did not answer within {timeout:g} s"
        except Exception as e:
            why = f"lockdown refused ({e.__class__.__name__}: {e})"
        else:
            seen[mux.serial] = device
            unreachable.pop(mux.serial, None)
            continue
        if not tolerant:
            raise DeviceUnreachable(f"device {mux.serial}: {why}")
        unreachable.setdefault(mux.serial, why)
    if wifi:
        await _add_wifi(seen, unreachable, timeout)
    if mux_error is not None and not seen:
        raise mux_error
    devices = list(seen.values())
    return (devices, unreachable) if tolerant else devices


async def _add_wifi(seen: dict[str, ConnectedDevice], unreachable: dict[str, str], timeout: float) -> None:
    from . import wifi

    async for endpoint, client in wifi.find_paired(connect_timeout=timeout):
        try:
            udid = client.udid or endpoint.udid or ""
            if any(udid.lower() == k.lower() for k in seen):
                continue  # already reachable over usbmuxd, which is preferred
            seen[udid] = await asyncio.wait_for(_describe(client, "Wi-Fi", udid, endpoint.address), timeout)
            for k in [k for k in unreachable if k.lower() == udid.lower()]:
                del unreachable[k]  # listed by usbmuxd but silent there; answers over Wi-Fi
        except Exception as e:  # noqa: BLE001 - one phone that fails half-way is left out, not fatal
            logger.info("Wi-Fi: %s: %s", endpoint.address, e)
        finally:
            try:
                await client.close()
            except Exception:  # noqa: BLE001
                pass


async def list_for(wanted: str | None, wifi: bool | None) -> list[ConnectedDevice]:
    """The devices a command picks from: usbmuxd's, plus Wi-Fi-direct phones with ``wifi=True``.
    ``wifi=None`` (the commands' default) looks on Wi-Fi only when usbmuxd has nothing to offer:
    no device (or no usbmuxd), or none matching ``wanted``. ``wifi=False``: usbmuxd only."""
    if wifi is not None:
        return await list_connected(wifi=wifi)
    try:
        found = await list_connected(wifi=False)
    except UsbmuxdUnavailable:
        found = []
    if found and (wanted is None or _match(found, wanted)):
        return found
    return await list_connected(wifi=True)


def _match(devices: list[ConnectedDevice], wanted: str) -> list[ConnectedDevice]:
    exact = [d for d in devices if d.udid.lower() == wanted.lower() or (d.name or "") == wanted]
    if exact:
        return exact
    return [d for d in devices if d.udid.lower().startswith(wanted.lower())]


def choose(devices: list[ConnectedDevice], wanted: str | None) -> ConnectedDevice:
    """The device named by UDID (or a unique prefix) or by name; the only one if none is named."""
    if not devices:
        raise DeviceError("no device connected (connect it with a cable, unlock it, and trust this computer)")
    if wanted is None:
        if len(devices) > 1:
            names = ", ".join(f"{d.name or '?'} ({d.udid})" for d in devices)
            raise UserError(
                f"several devices are connected ({names}); choose one with --device UDID|NAME, or use --all"
            )
        return devices[0]
    exact = [d for d in devices if d.udid.lower() == wanted.lower() or (d.name or "") == wanted]
    if len(exact) == 1:
        return exact[0]
    prefix = [d for d in devices if d.udid.lower().startswith(wanted.lower())]
    if len(prefix) == 1:
        return prefix[0]
    raise UserError(f"no single connected device matches '{wanted}' (connected: {', '.join(d.udid for d in devices)})")


def _log_warning(text: str) -> None:
    logger.warning("%s", text)


async def open_lockdown(
    device: ConnectedDevice,
    *,
    pair_timeout: float | None = None,
    connect_timeout: float | None = None,
    notify: Notify = _log_warning,
):
    """A paired lockdown session with ``device`` over the path it was listed on.

    USB/Network (usbmuxd): pairs now if needed. The phone then asks the user to trust this
    computer: ``notify`` is told so once, and the pairing waits ``pair_timeout`` seconds (None:
    as long as it takes) before TrustNotAnswered. Wi-Fi: never pairs (a phone pairs over USB);
    a phone that no longer answers there raises DeviceUnreachable. Every connection attempt is
    bounded by ``connect_timeout`` (default :data:`CONNECT_TIMEOUT`)."""
    timeout = connect_timeout_from_env() if connect_timeout is None else connect_timeout
    if device.connection == "Wi-Fi":
        from .wifi import WifiEndpoint
        from .wifi import open_lockdown as open_wifi

        if device.address is None:
            raise DeviceError(f"{device.name or device.udid}: listed over Wi-Fi without an address")
        return await open_wifi(WifiEndpoint.parse(device.address, device.udid), timeout=timeout)
    return await _open_usbmux(device, pair_timeout, timeout, notify)


async def _open_usbmux(device: ConnectedDevice, pair_timeout: float | None, timeout: float, notify: Notify):
    from pymobiledevice3.exceptions import PairingDialogResponsePendingError, UserDeniedPairingError
    from pymobiledevice3.lockdown import create_using_usbmux

    label = device.name or device.udid

    async def attempt(autopair: bool, wait: float | None):
        return await create_using_usbmux(
            serial=device.udid, autopair=autopair, connection_type=device.connection, pair_timeout=wait
        )

    try:
        # 1. an existing pairing (the usual case), with a bound: a silent device must not hang us
        client = await asyncio.wait_for(attempt(False, 0), timeout)
        if client.paired:
            return client
        await client.close()
        # 2. pair; pymobiledevice3 fails at once while the phone shows "Trust this computer?"
        try:
            return await asyncio.wait_for(attempt(True, 0), timeout)
        except PairingDialogResponsePendingError:
            notify(f"{label} asks whether to trust this computer: unlock it and tap Trust")
        # 3. wait for the user's answer (pymobiledevice3 asks again every second)
        try:
            return await attempt(True, pair_timeout)
        except PairingDialogResponsePendingError as e:
            raise TrustNotAnswered(
                f"{label}: 'Trust this computer' was not answered on the device"
                + (f" within {pair_timeout:g} s" if pair_timeout is not None else "")
            ) from e
    except TimeoutError as e:
        raise DeviceUnreachable(f"{label}: the device did not answer within {timeout:g} s") from e
    except UserDeniedPairingError as e:
        raise DeviceError(
            f"{label}: the device does not trust this computer ('Don't Trust' was tapped); "
            "unplug it, plug it in again and tap 'Trust'"
        ) from e
    except DeviceError:
        raise
    except Exception as e:
        raise DeviceError(
            f"{label}: pairing failed ({e.__class__.__name__}: {e}); unlock the phone and tap 'Trust'"
        ) from e


def run(coro):
    """Run a coroutine from synchronous code (the CLI)."""
    return asyncio.run(coro)
