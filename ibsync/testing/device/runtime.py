"""A simulated device while it runs: the state its services share, and what it did.

One :class:`DeviceRuntime` per device connection set (a :class:`~.provider.SimLockdown`, or later a
fake lockdownd): every service thread gets it. Nothing here is global, so several devices can run
side by side in one process.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field

from .crypto import DeviceKeys
from .model import SimDevice
from .wire import Wire

NP_PASSCODE_PRESENTED = "com.apple.LocalAuthentication.ui.presented"
NP_PASSCODE_DISMISSED = "com.apple.LocalAuthentication.ui.dismissed"
#: How long a relayed notification waits for an observer: pymobiledevice3 registers its observers on
#: the notification_proxy connection before it sends "Backup" on mobilebackup2, but the two
#: connections are served by different device threads, so registration may lag behind slightly.
OBSERVER_GRACE = 2.0


@dataclass
class DeviceLog:
    """What the device did, for tests to assert on. Lists only grow (clear() between steps)."""

    sent: list[str] = field(default_factory=list)  # DeviceLink messages the device sent, by name, in order
    uploaded: list[str] = field(default_factory=list)  # host-side names of every file uploaded
    failed_uploads: list[str] = field(default_factory=list)  # uploads sent as CODE_ERROR_REMOTE
    downloaded: list[list[str]] = field(default_factory=list)  # paths asked for, one list per DownloadFiles
    moved: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    backups: list[str] = field(default_factory=list)  # "full" / "incremental", one per Backup request
    operations: list[tuple[str, int]] = field(default_factory=list)  # (MessageName, ErrorCode) answered
    host_notifications: list[str] = field(default_factory=list)  # names the host posted (notification_proxy)
    relayed: list[str] = field(default_factory=list)  # notifications the device relayed to the host
    services: list[str] = field(default_factory=list)  # services started, in order
    errors: list[str] = field(default_factory=list)  # device-side crashes, as tracebacks: expect none
    hostile_answers: list[list] = field(default_factory=list)  # what the host answered to a HostileStep

    def uploaded_payloads(self) -> list[str]:
        """File ids of the payloads uploaded (``.../Snapshot/xx/<fileID>``), in order."""
        out = []
        for name in self.uploaded:
            parts = name.split("/")
            if len(parts) >= 2 and len(parts[-1]) == 40 and parts[-2] == parts[-1][:2]:
                out.append(parts[-1])
        return out

    def clear(self) -> None:
        for value in vars(self).values():
            value.clear()


class NotificationHub:
    """The device's Darwin notifications as notification_proxy exposes them: each connection observes
    some names, and the device relays a notification to every connection observing it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._observers: dict[int, tuple[Wire, set[str]]] = {}
        self._next = 0

    def attach(self, wire: Wire) -> int:
        with self._cond:
            self._next += 1
            self._observers[self._next] = (wire, set())
            return self._next

    def detach(self, conn: int) -> None:
        with self._cond:
            self._observers.pop(conn, None)

    def observe(self, conn: int, name: str) -> None:
        with self._cond:
            if conn in self._observers:
                self._observers[conn][1].add(name)
                self._cond.notify_all()

    def relay(self, name: str, wait: float = OBSERVER_GRACE) -> int:
        """Send ``{"Command": "RelayNotification", "Name": name}`` to every observer; returns how many
        got it (waiting up to ``wait`` seconds for a first one)."""
        with self._cond:
            self._cond.wait_for(lambda: any(name in names for _, names in self._observers.values()), wait)
            targets = [wire for wire, names in self._observers.values() if name in names]
        sent = 0
        for wire in targets:
            try:
                wire.send_plist({"Command": "RelayNotification", "Name": name})
                sent += 1
            except ConnectionError:
                pass  # that host connection is gone; the others still get it
        return sent


class DeviceRuntime:
    """State shared by the services of one running :class:`SimDevice`."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.log = DeviceLog()
        self.notifications = NotificationHub()
        #: Set when the passcode prompt is up (tests wait on it); the user "enters" it with enter_passcode().
        self.passcode_prompt_shown = threading.Event()
        self._passcode_entered = threading.Event()
        self.closing = threading.Event()
        self._keys: dict[tuple[str, str | None, int], DeviceKeys] = {}
        self._keys_lock = threading.Lock()
        #: AFC state shared by all AFC connections: flock()s (path -> owning handle), directories made
        #: with MAKE_DIR, the handle counter; afc_lock_guard guards them and the device's media.
        self.afc_locks: dict[str, int] = {}
        self.afc_dirs: set[str] = set()
        self.afc_lock_guard = threading.Lock()
        self._afc_handles = 0
        self._connections: list[tuple[threading.Thread, Wire]] = []

    # ---- keys ---------------------------------------------------------------------------------------------------

    def keys(self) -> DeviceKeys:
        """The device's backup keys for its current encryption setting (derived once per password)."""
        dev = self.device
        password = dev.password if dev.encrypted else None
        k = (dev.udid, password, dev.keybag_rounds)
        with self._keys_lock:
            if k not in self._keys:
                self._keys[k] = DeviceKeys(dev.udid, password, dev.keybag_rounds)
            return self._keys[k]

    # ---- the passcode prompt ------------------------------------------------------------------------------------

    def ask_for_passcode(self, auto_enter_after: float | None, give_up_after: float | None = None) -> bool:
        """Show the prompt (relay "presented"), wait for the user, relay "dismissed". True when the
        passcode was entered (or auto-entered); False when the device gave up after
        ``give_up_after`` seconds with nobody typing it."""
        self._passcode_entered.clear()
        self.log.relayed.append(NP_PASSCODE_PRESENTED)
        self.notifications.relay(NP_PASSCODE_PRESENTED)
        self.passcode_prompt_shown.set()
        now = time.monotonic()
        enter_at = None if auto_enter_after is None else now + auto_enter_after
        give_up_at = None if give_up_after is None else now + give_up_after
        entered = True
        while not self._passcode_entered.wait(0.05):
            if self.closing.is_set():
                raise ConnectionAbortedError("the simulated device was shut down while asking for the passcode")
            now = time.monotonic()
            if give_up_at is not None and now >= give_up_at and (enter_at is None or enter_at > give_up_at):
                entered = False
                break
            if enter_at is not None and now >= enter_at:
                break
        self.passcode_prompt_shown.clear()
        self.log.relayed.append(NP_PASSCODE_DISMISSED)
        self.notifications.relay(NP_PASSCODE_DISMISSED, wait=0)
        return entered

    def enter_passcode(self) -> None:
        self._passcode_entered.set()

    def next_afc_handle(self) -> int:
        """A new AFC file handle (never 0: pymobiledevice3 treats a 0 handle as a failed open).
        Call with afc_lock_guard held."""
        self._afc_handles += 1
        return self._afc_handles

    # ---- service threads ----------------------------------------------------------------------------------------

    def run_service(self, name: str, wire: Wire, serve) -> threading.Thread:
        """Run ``serve(wire, runtime)`` in a daemon thread; a crash is recorded in ``log.errors``, a host
        that goes away simply ends it."""

        def main() -> None:
            try:
                serve(wire, self)
            except (ConnectionError, TimeoutError):
                pass  # the host went away, or the device was shut down: the conversation is over
            except Exception:
                self.log.errors.append(f"{name}: {traceback.format_exc()}")
            finally:
                wire.close()

        self.log.services.append(name)
        thread = threading.Thread(target=main, name=f"simdevice-{name}", daemon=True)
        self._connections = [(t, w) for t, w in self._connections if t.is_alive()]
        self._connections.append((thread, wire))
        thread.start()
        return thread

    def shutdown(self, timeout: float = 5.0) -> None:
        """End every service connection and wait for their threads."""
        self.closing.set()
        for _, wire in self._connections:
            wire.shutdown()
        deadline = time.monotonic() + timeout
        for thread, _ in self._connections:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t, _ in self._connections if t.is_alive()]
        if alive:
            raise RuntimeError(f"simulated device threads still running: {', '.join(alive)}")
