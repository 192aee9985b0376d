"""A pymobiledevice3 ``LockdownServiceProvider`` backed by a :class:`SimDevice`.

pymobiledevice3's service classes (``Mobilebackup2Service``, ``AfcService``, ...) reach a device only
through ``start_lockdown_service(name, include_escrow_bag)``, which returns a ``ServiceConnection``. Here
that call makes a ``socket.socketpair()``, serves the device's end in a thread
(:func:`~.services.start_service`) and hands pymobiledevice3 the other end through
``ServiceConnection.from_socket``, so the host side runs pymobiledevice3's own code unchanged: framing,
DeviceLink, AFC, everything above the socket. What lies below it (usbmuxd, lockdownd's StartService,
pairing, TLS) is not simulated here.

Use it as a context manager, or call :meth:`SimLockdown.close`, to end the device's threads.
"""

from __future__ import annotations

import socket
from ssl import SSLContext
from typing import Any, Self

from pymobiledevice3.exceptions import InvalidServiceError, MissingValueError
from pymobiledevice3.lockdown_service_provider import LockdownServiceProvider
from pymobiledevice3.service_connection import ServiceConnection

from .lockdownd import BATTERY_DOMAIN
from .model import SimDevice
from .runtime import DeviceLog, DeviceRuntime
from .services import offers, start_service


class SimLockdown(LockdownServiceProvider):
    """The lockdown side of a simulated device, as pymobiledevice3 sees a connected iPhone."""

    def __init__(self, device: SimDevice) -> None:
        super().__init__()
        self.device = device
        self.runtime = DeviceRuntime(device)
        self.udid = device.udid
        self.product_type = device.product_type
        self.all_values = device.lockdown_values()
        #: Values of other lockdown domains (GetValue with a Domain); WillEncrypt follows the device.
        self._domains: dict[str, dict[str, Any]] = {"com.apple.mobile.iTunes": {"MinITunesVersion": "10.0.1"}}

    # ---- what pymobiledevice3 reads -------------------------------------------------------------------------

    @property
    def product_version(self) -> str:
        return self.device.product_version

    @property
    def product_build_version(self) -> str:
        return self.device.build_version

    @property
    def ecid(self) -> int:
        return self.all_values["UniqueChipID"]

    @property
    def log(self) -> DeviceLog:
        """What the device did (uploads, downloads, messages sent, ...)."""
        return self.runtime.log

    def _domain(self, domain: str | None) -> dict[str, Any]:
        if domain is None:
            return self.all_values
        if domain == "com.apple.mobile.backup":
            return {"WillEncrypt": self.device.encrypted, **self._domains.get(domain, {})}
        if domain == BATTERY_DOMAIN:
            return self.device.battery.domain() if self.device.battery is not None else {}
        return self._domains.get(domain, {})

    async def get_value(self, domain: str | None = None, key: str | None = None) -> Any:
        values = self._domain(domain)
        if key is None:
            return dict(values)
        if key not in values:
            raise MissingValueError(f"{domain or 'the default domain'} has no {key}")
        return values[key]

    async def set_value(self, value: Any, domain: str | None = None, key: str | None = None) -> dict[str, Any]:
        target = self.all_values if domain is None else self._domains.setdefault(domain, {})
        if key is None:
            target.update(value)
        else:
            target[key] = value
        return {"Domain": domain, "Key": key, "Value": value}

    async def remove_value(self, domain: str | None = None, key: str | None = None) -> dict[str, Any]:
        target = self.all_values if domain is None else self._domains.setdefault(domain, {})
        if key is not None:
            target.pop(key, None)
        return {"Domain": domain, "Key": key}

    # ---- services -------------------------------------------------------------------------------------------

    async def start_lockdown_service(self, name: str, include_escrow_bag: bool = False) -> ServiceConnection:
        # The escrow bag (sent for mobilebackup2) lets a locked device's services reach its data; the
        # simulator has no locked state, so it is accepted and not checked.
        if not offers(name):
            raise InvalidServiceError(f"the simulated device does not offer {name}")
        host_end, device_end = socket.socketpair()
        try:
            start_service(name, device_end, self.runtime)
        except BaseException:
            host_end.close()
            device_end.close()
            raise
        return await ServiceConnection.from_socket(host_end)

    async def get_service_connection_attributes(self, name: str, include_escrow_bag: bool = False) -> dict[str, Any]:
        raise NotImplementedError("SimLockdown has no lockdownd ports: use start_lockdown_service()")

    async def create_service_connection(
        self, port: int, ssl_context: SSLContext | None = None, strip_ssl: bool = False
    ) -> ServiceConnection:
        raise NotImplementedError("SimLockdown has no lockdownd ports: use start_lockdown_service()")

    # ---- the user at the device -----------------------------------------------------------------------------

    def enter_passcode(self) -> None:
        """The user types the passcode the device is asking for (see :class:`~.model.PasscodePrompt`)."""
        self.runtime.enter_passcode()

    # ---- ending -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """End every service connection of the device and wait for its threads."""
        self.runtime.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
