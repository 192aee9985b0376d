"""Paired phones on the LAN, reached without usbmuxd ("Wi-Fi direct").

Stock usbmuxd on Linux does not see phones over Wi-Fi (libimobiledevice #1473, usbmuxd #173).
pymobiledevice3's ``--mobdev2`` reaches them anyway, and this module does what it does:

1. browse Bonjour for ``_apple-mobdev2._tcp`` (pymobiledevice3's own mDNS browser) for a bounded
   time (:data:`DEFAULT_BROWSE_TIMEOUT` seconds, or ``IBSYNC_WIFI_TIMEOUT``);
2. match each advert to the pair records this computer holds (pymobiledevice3's lookup: its home
   folder, ``/var/lib/lockdown``, usbmuxd): by the Wi-Fi MAC address in the instance name, else by
   the advert's ``authTag``s (an HMAC of each trusting host's HostID), which is what keeps phones
   with private Wi-Fi addresses recognisable (pymobiledevice3 PRs #1969-#1973). An advert no record
   matches is not ours and is never contacted;
3. open lockdown over TCP (port 62078) with the matching record; services are further TCP
   connections to the ports lockdownd names, on the same address.

Nothing here pairs: a phone must have been paired over USB first (and have "Show this iPhone when
on Wi-Fi", ``EnableWifiConnections``, turned on).

``IBSYNC_WIFI_DEVICES="UDID=HOST:PORT,..."`` replaces the Bonjour browse with a fixed list (the
tests point it at the simulated phone on 127.0.0.1; also useful for a phone with a fixed address
on a network where multicast does not pass). Set but empty: no phone, and no multicast sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

from ..errors import DeviceError, DeviceUnreachable, UserError

logger = logging.getLogger("ibsync.capture")

WIFI_DEVICES_ENV = "IBSYNC_WIFI_DEVICES"
BROWSE_TIMEOUT_ENV = "IBSYNC_WIFI_TIMEOUT"
#: Seconds a Bonjour browse listens for adverts (pymobiledevice3's own default is about 4 s).
DEFAULT_BROWSE_TIMEOUT = 3.0
#: Seconds a phone found on the LAN gets to answer lockdown (TCP connect, TLS session, values).
CONNECT_TIMEOUT = 5.0
LOCKDOWN_PORT = 62078

#: ``browse(timeout)`` -> pymobiledevice3 ``ServiceInstance``s as they are complete; an async
#: generator (iter_browse_mobdev2, or the tests' adverts), which find_paired closes when it stops early
Browse = Callable[[float], AsyncGenerator[Any, None]]


@dataclass(frozen=True)
class WifiEndpoint:
    """Where a phone answers lockdown over TCP."""

    host: str
    port: int = LOCKDOWN_PORT
    udid: str | None = None  # known up front only from IBSYNC_WIFI_DEVICES; else after connecting

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, address: str, udid: str | None = None) -> WifiEndpoint:
        """``host:port``, ``[v6]:port`` or a bare host (port 62078)."""
        host, port = address, LOCKDOWN_PORT
        if address.startswith("["):
            host, _, rest = address[1:].partition("]")
            if rest:
                port = _port(rest.removeprefix(":"), address)
        elif address.count(":") == 1:
            host, raw = address.split(":")
            port = _port(raw, address)
        if not host:
            raise UserError(f"{WIFI_DEVICES_ENV}: '{address}' names no host")
        return cls(host, port, udid)


def _port(raw: str, whole: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise UserError(f"{WIFI_DEVICES_ENV}: '{whole}' has no valid port")
    return int(raw)


def static_endpoints(value: str) -> list[WifiEndpoint]:
    """``UDID=HOST[:PORT],...`` (the value of IBSYNC_WIFI_DEVICES); empty items are ignored."""
    out = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        udid, sep, address = item.partition("=")
        if not sep or not udid.strip() or not address.strip():
            raise UserError(f"{WIFI_DEVICES_ENV}: '{item}' is not UDID=HOST:PORT")
        out.append(WifiEndpoint.parse(address.strip(), udid.strip()))
    return out


def browse_timeout_from_env(environ: Mapping[str, str] = os.environ) -> float:
    raw = environ.get(BROWSE_TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_BROWSE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 60:
        raise UserError(f"{BROWSE_TIMEOUT_ENV}={raw!r}: give a number of seconds above 0, at most 60")
    return value


# ---- pair records --------------------------------------------------------------------------------------------


async def known_pair_records(udid: str | None) -> list[dict[str, Any]]:
    """The pair records this computer holds (for ``udid``, or all it can find): pymobiledevice3's
    own lookup for mobdev2 (its home folder, the system lockdown folder, usbmuxd)."""
    from pymobiledevice3.lockdown import _known_lockdown_pair_records

    with suppress(OSError):
        return await _known_lockdown_pair_records(udid, None)
    return []


def candidate_records(advert: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records worth offering the phone behind a Bonjour advert: the one whose Wi-Fi MAC the
    instance name carries, else those whose HostID matches one of the advert's authTags
    (pymobiledevice3's rule; an advert without tags rules nothing out)."""
    from pymobiledevice3.lockdown import _mobdev2_pair_record_candidates

    mac = advert.instance.split("@", 1)[0] if "@" in advert.instance else None
    by_mac = [r for r in records if mac is not None and r.get("WiFiMACAddress") == mac]
    return _mobdev2_pair_record_candidates(advert, by_mac or records)


# ---- connecting ----------------------------------------------------------------------------------------------


async def open_lockdown(
    endpoint: WifiEndpoint,
    records: list[dict[str, Any]] | None = None,
    *,
    timeout: float = CONNECT_TIMEOUT,
    keep_alive: bool = True,
):
    """A paired lockdown client over TCP to ``endpoint`` (pymobiledevice3's ``TcpLockdownClient``:
    its services are TCP connections to the same host), with the first of ``records`` the phone
    accepts (default: the records held for ``endpoint.udid``).

    DeviceUnreachable when nothing answers in ``timeout`` seconds; DeviceError when the phone
    answers but accepts none of our records (pair it over USB first); DeviceError when it turns
    out to be another phone than ``endpoint.udid``."""
    from pymobiledevice3.lockdown import create_using_tcp

    if records is None:
        records = await known_pair_records(endpoint.udid)
    who = endpoint.udid or endpoint.address
    if not records:
        raise DeviceError(
            f"{who}: this computer holds no pair record for it; connect it with a cable once "
            "and tap Trust (Wi-Fi needs an existing pairing)"
        )
    for record in records:
        try:
            lockdown = await asyncio.wait_for(
                create_using_tcp(
                    hostname=endpoint.host,
                    port=endpoint.port,
                    autopair=False,
                    pair_record=record,
                    keep_alive=keep_alive,
                ),
                timeout,
            )
        except TimeoutError as e:
            raise DeviceUnreachable(f"{who}: no answer over Wi-Fi at {endpoint.address} within {timeout:g} s") from e
        except Exception as e:  # refused, reset, not lockdownd, ...: pymobiledevice3 raises many kinds
            raise DeviceUnreachable(
                f"{who}: cannot reach it over Wi-Fi at {endpoint.address} ({e.__class__.__name__}: {e})"
            ) from e
        if lockdown.paired:
            if endpoint.udid is not None and (lockdown.udid or "").lower() != endpoint.udid.lower():
                await lockdown.close()
                raise DeviceError(f"{endpoint.address} is {lockdown.udid}, not {endpoint.udid}")
            return lockdown
        await lockdown.close()
    raise DeviceError(
        f"{who}: the device at {endpoint.address} does not accept this computer's pairing; "
        "connect it with a cable and tap Trust again"
    )


async def find_paired(
    *,
    timeout: float | None = None,
    environ: Mapping[str, str] = os.environ,
    browse: Browse | None = None,
    use_advert_port: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> AsyncIterator[tuple[WifiEndpoint, Any]]:
    """Yield ``(endpoint, paired lockdown client)`` for each phone paired with this computer that
    answers on the LAN; the caller closes each client. One per phone.

    Where phones are looked for: ``IBSYNC_WIFI_DEVICES`` when set (no multicast at all), else a
    Bonjour browse of ``timeout`` seconds (default :data:`DEFAULT_BROWSE_TIMEOUT`, or
    ``IBSYNC_WIFI_TIMEOUT``); no browse at all when this computer holds no pair record. ``browse``
    replaces pymobiledevice3's browser (tests hand it simulated adverts); ``use_advert_port``
    connects to the advert's SRV port instead of 62078 (only the simulated phones listen
    elsewhere). Phones that do not answer within ``connect_timeout`` are left out (logged)."""
    static = environ.get(WIFI_DEVICES_ENV)
    if static is not None and browse is None:
        for endpoint in static_endpoints(static):
            try:
                lockdown = await open_lockdown(endpoint, timeout=connect_timeout)
            except DeviceError as e:
                logger.info("Wi-Fi: %s", e)
                continue
            yield replace(endpoint, udid=lockdown.udid), lockdown
        return
    records = await known_pair_records(None)
    if not records:
        return  # nothing paired here: no phone on the LAN could be ours, so no multicast either
    if timeout is None:
        timeout = browse_timeout_from_env(environ)
    if browse is None:
        from pymobiledevice3.bonjour import iter_browse_mobdev2

        browse = iter_browse_mobdev2
    seen: set[str] = set()
    adverts = browse(timeout)
    try:
        async for advert in adverts:
            candidates = candidate_records(advert, records)
            if not candidates:
                continue  # paired with none of our hosts: not ours
            for address in advert.addresses:
                endpoint = WifiEndpoint(address.full_ip, advert.port if use_advert_port else LOCKDOWN_PORT)
                try:
                    lockdown = await open_lockdown(endpoint, candidates, timeout=connect_timeout)
                except DeviceError as e:
                    logger.info("Wi-Fi: %s", e)
                    continue
                if lockdown.udid in seen:  # the same phone under another address or advert
                    await lockdown.close()
                    break
                seen.add(lockdown.udid)
                yield replace(endpoint, udid=lockdown.udid), lockdown
                break  # one client per phone: its other addresses lead to the same place
    except OSError as e:  # no interface for multicast, no network at all
        logger.info("Wi-Fi: Bonjour browse failed: %s", e)
    finally:
        with suppress(Exception):
            await adverts.aclose()
