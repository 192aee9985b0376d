"""The agent: watch for devices, back up each one when it is due, keep the repositories healthy.

One asyncio loop. Every ``poll`` it lists the devices usbmuxd sees (USB and Network) and, with
``wifi``, those reachable directly over the LAN; each present device that is due, inside its
window, charging if asked, gets a backup task of its own (``parallel`` at once), so a phone that
waits for its passcode, never answers or loses its cable does not hold up another. When no
backup runs, each repository that received backups gets its retention applied, a prune when
``prune`` has passed, and a rotating ``check --read-data-subset``.

An attempt ends as ``ok``; ``skipped`` when nobody was there to let it happen (the passcode was
not entered, "Trust this computer" not answered, the device went away, the repository could not
be reached) and it is retried after a back-off; or ``failed``. SIGTERM and SIGINT cancel running
backups the way Ctrl-C does (nothing committed, uploaded data kept for the next run) and the
agent exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..capture.discovery import ConnectedDevice
from ..errors import (
    DeviceDisconnected,
    DeviceError,
    DeviceUnreachable,
    IbsyncError,
    PasscodeNotEntered,
    RepoError,
    StorageError,
    TrustNotAnswered,
)
from ..opening import RepoSource
from .history import FAILED, OK, SKIPPED, STOPPED, History
from .schedule import format_duration, is_overdue
from .settings import AgentSettings, DevicePolicy

logger = logging.getLogger("ibsync.agent")

#: how long a listed device may take to answer lockdown before it counts as unreachable
PROBE_TIMEOUT = 10.0
#: how long "Trust this computer" may stay unanswered before the attempt is skipped
TRUST_TIMEOUT = 120.0
DAY = 86400.0


@dataclass
class Outcome:
    result: str
    reason: str | None = None
    snapshot: str | None = None
    bytes_added: int | None = None
    bytes_received: int | None = None
    files: int | None = None
    when: float | None = None


@dataclass
class Agent:
    settings: AgentSettings
    history: History
    config_path: str | None = None
    #: Apprise notifier and health pinger factories (ibsync.agent.notify); None: nothing is sent
    notifier: Any = None
    health: Callable[[str], Any] | None = None
    #: lists present devices: ``await discover(wifi) -> (devices, {udid: why unreachable})``
    discover: Callable[..., Any] | None = None
    once: bool = False
    _running: dict[str, asyncio.Task] = field(default_factory=dict)
    _slots: asyncio.Semaphore | None = None
    _stop: asyncio.Event | None = None
    _wake: asyncio.Event | None = None  # set by usbmuxd's Attached/Detached events
    _next_look: datetime | None = None  # the earliest retry or due time of a present device
    #: repositories that got a good backup since their retention last ran
    _retention_pending: dict[str, set[str]] = field(default_factory=dict)
    #: notifications on their way (held so the loop does not drop them half sent)
    _sending: set[asyncio.Task] = field(default_factory=set)
    #: the web app's job registry (ibsync.web.jobs.Jobs): backups report their progress there
    jobs: Any = None
    #: UDIDs asked to be backed up now (request_backup), whether due or not
    _requested: set[str] = field(default_factory=set)
    _requested_lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None

    def request_backup(self, udid: str) -> None:
        """Back this device up at the next look, due or not ("Back up now" in the web app);
        callable from any thread. A device that is absent, disabled or has no repository is
        not backed up (its waiting reason says why)."""
        with self._requested_lock:
            self._requested.add(udid.upper())
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _take_request(self, udid: str) -> bool:
        with self._requested_lock:
            if udid.upper() in self._requested:
                self._requested.discard(udid.upper())
                return True
            return False

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(self.settings.parallel)
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C still raises KeyboardInterrupt
                pass
        stale = self.history.mark_interrupted()
        if stale:
            logger.warning("%d backup(s) were interrupted when the agent last stopped", stale)
        self.history.put("pid", str(os.getpid()))
        self.history.put("started", _now_iso())
        self.history.put("stopped", None)
        logger.info(
            "agent started (pid %d, looking for devices every %s, history %s)",
            os.getpid(),
            format_duration(self.settings.poll),
            self.history.path,
        )
        wake_event = self._wake = asyncio.Event()
        watcher = (
            None if self.once or self.discover is not None else asyncio.create_task(self._watch_usbmuxd(wake_event))
        )
        try:
            while not self._stop.is_set():
                self._wake.clear()
                await self.tick()
                if self.once:
                    await self._wait_for_backups()
                    await self.maintain()
                    break
                stop, wake = asyncio.create_task(self._stop.wait()), asyncio.create_task(self._wake.wait())
                await asyncio.wait({stop, wake}, timeout=self._sleep_for(), return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                wake.cancel()
        finally:
            if watcher is not None:
                watcher.cancel()
            await self._cancel_backups()
            self.history.put("stopped", _now_iso())
            logger.info("agent stopped")

    def _sleep_for(self) -> float:
        """Until the next poll, or sooner when a present device's retry or due time comes first."""
        poll = self.settings.poll.total_seconds()
        if self._next_look is None:
            return poll
        return max(0.2, min(poll, (self._next_look - datetime.now(UTC)).total_seconds()))

    async def _watch_usbmuxd(self, wake: asyncio.Event) -> None:
        """usbmuxd's Attached/Detached events wake the loop at once, so a phone plugged in is
        seen in a second rather than at the next poll; the poll stays for Wi-Fi and schedules."""
        from pymobiledevice3 import usbmux

        while True:
            mux = None
            try:
                mux = await usbmux.create_mux()
                await mux.listen()
                while True:
                    await mux.receive_device_state_update()
                    wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # usbmuxd restarted or absent: listen again after a poll
                logger.debug("usbmuxd events unavailable (%s); polling", e)
            finally:
                if mux is not None:
                    await _close(mux)
            await asyncio.sleep(self.settings.poll.total_seconds())

    async def tick(self) -> None:
        """One look around: devices present, backups started, overdue warnings, maintenance."""
        self.history.put("heartbeat", _now_iso())
        devices, unreachable = await self._discover()
        present = {d.udid for d in devices} | set(unreachable)
        for rec in self.history.devices():
            if rec.connection and rec.udid not in present and rec.udid not in self._running:
                self.history.gone(rec.udid)
        for udid, why in unreachable.items():
            self.history.seen(udid, None, None)
            self.history.set_waiting(udid, f"listed but not answering: {why}")
        self._next_look = None
        for device in devices:
            self.history.seen(device.udid, device.name, device.connection)
            if device.udid in self._running:
                continue
            why_not, later = self._why_not_now(device)
            forced = why_not is not None and self._may_force(device) and self._take_request(device.udid)
            if forced:
                why_not, later = None, None
            if later is not None and (self._next_look is None or later < self._next_look):
                self._next_look = later
            self.history.set_waiting(device.udid, why_not)
            if why_not is None:
                self._take_request(device.udid)
                self._running[device.udid] = asyncio.create_task(
                    self._backup_task(device, forced=forced), name=f"backup {device.udid}"
                )
        await self._warn_overdue()
        if not self._running and not self.once:
            await self.maintain()

    async def _discover(self) -> tuple[list[ConnectedDevice], dict[str, str]]:
        discover = self.discover or discover_devices
        try:
            return await discover(
                wifi=self.settings.defaults.wifi or any(t.get("wifi") for t in self.settings.devices.values())
            )
        except DeviceError as e:  # usbmuxd missing or down: every device is absent, not an agent failure
            if self.history.notice_due("usbmuxd", DAY):
                logger.warning("%s", e)
            return [], {}

    def _policy(self, device: ConnectedDevice) -> DevicePolicy:
        return self.settings.policy(device.udid, device.name)

    def _may_force(self, device: ConnectedDevice) -> bool:
        """Whether "Back up now" may skip the schedule: not the settings that forbid a backup."""
        policy = self._policy(device)
        return (
            policy.enabled
            and bool(policy.repository)
            and (device.connection == "USB" or policy.wifi)
            and (device.connection == "USB" or device.paired)
        )

    def _why_not_now(self, device: ConnectedDevice) -> tuple[str | None, datetime | None]:
        """(None, None) when the device should be backed up now; else what it waits for (shown
        by status; no attempt is recorded for it) and when that wait ends, if it is a time."""
        policy = self._policy(device)
        if not policy.enabled:
            return "disabled in the config file (enabled = false)", None
        if not policy.repository:
            return 'no repository for it: set [agent] repository or [devices."<UDID>"] repository', None
        if device.connection != "USB" and not policy.wifi:
            return f"seen over {device.connection}, but wifi = false for it", None
        if device.connection != "USB" and not device.paired:
            return "not paired with this computer: connect it with a cable once and tap Trust", None
        now = datetime.now(UTC)
        rec = self.history.device(device.udid)
        last_success = rec.last_success if rec else None
        if last_success is not None and last_success + policy.interval > now:
            return f"not due until {_local(last_success + policy.interval)}", last_success + policy.interval
        retry = self.history.retry_after(device.udid, self.settings.retry, policy.interval)
        if retry is not None and retry > now:
            return f"retrying after {_local(retry)}", retry
        if policy.window is not None and not policy.window.contains(now.astimezone()):
            return f"outside its window {policy.window}", policy.window.next_open(now.astimezone())
        return None, None

    async def _wait_for_backups(self) -> None:
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _cancel_backups(self) -> None:
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    # ---- one backup ----------------------------------------------------------------------------

    async def _backup_task(self, device: ConnectedDevice, *, forced: bool = False) -> None:
        assert self._slots is not None
        try:
            async with self._slots:
                await self._backup(device, forced=forced)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not end the agent: log it, record it, go on
            logger.exception("%s: internal error", device.udid)
            self._record(device, self._policy(device), None, time.time(), Outcome(FAILED, f"internal error: {e!r}"))
        finally:
            self._running.pop(device.udid, None)

    async def _backup(self, device: ConnectedDevice, *, forced: bool = False) -> None:
        policy = self._policy(device)
        label = _label(device)
        started = time.time()
        try:
            lockdown = await self._lockdown(device)
        except _Skip as e:
            self._record(device, policy, None, started, Outcome(SKIPPED, str(e)))
            return
        attempt = None
        try:
            if policy.only_when_charging and not await _charging(lockdown):
                self.history.set_waiting(device.udid, "not charging (only-when-charging = true)")
                return
            source = RepoSource(policy.repository, config_path=self.config_path)
            try:
                _require_mounted(source)
                opened = await asyncio.to_thread(source.open, lock="shared", command="agent backup")
            except (StorageError, OSError) as e:
                await self._unreachable(policy.repository or "", e)
                self._record(
                    device,
                    policy,
                    None,
                    started,
                    Outcome(SKIPPED, f"repository {policy.repository} not reachable: {_one_line(e)}"),
                )
                return
            except IbsyncError as e:  # wrong password, damaged repository, locked exclusively...
                self._record(
                    device, policy, None, started, Outcome(FAILED, f"repository {policy.repository}: {_one_line(e)}")
                )
                await self._notify_failure(device, f"repository {policy.repository}: {_one_line(e)}")
                return
            self._reachable(policy.repository or "")
            with opened as repo:
                latest = repo.latest_of_device(device.udid)
                if not forced and latest is not None and latest.time + policy.interval > datetime.now(UTC):
                    # a backup made outside the agent (ibsync backup, an import) already covers it
                    self.history.record_success(device.udid, device.name, latest.time, latest.id)
                    return
                attempt = self.history.begin(device.udid, device.name, policy.repository, device.connection)
                ping = self.health(policy.healthcheck) if self.health and policy.healthcheck else None
                if ping is not None:
                    await asyncio.to_thread(ping.start)
                logger.info("%s: backing up over %s into %s", label, device.connection, policy.repository)
                job = self._start_job(device, policy)
                try:
                    outcome = await self._capture(device, lockdown, repo, job)
                except BaseException:
                    self._end_job(job, Outcome(SKIPPED, STOPPED))
                    raise
                self._end_job(job, outcome)
                self._finish(device, policy, attempt, started, outcome)
                attempt = None
                if ping is not None:
                    line = self._line(device, policy, started, outcome)
                    if outcome.result == OK:
                        await asyncio.to_thread(ping.success, line)
                    elif outcome.result == FAILED:
                        await asyncio.to_thread(ping.failure, line)
                    elif hasattr(ping, "log"):
                        await asyncio.to_thread(ping.log, line)
        except asyncio.CancelledError:
            if attempt is not None:
                self._finish(device, policy, attempt, started, Outcome(SKIPPED, STOPPED))
            raise
        finally:
            await _close(lockdown)

    async def _lockdown(self, device: ConnectedDevice):
        """A paired lockdown session; an unpaired phone on USB shows "Trust this computer?", the
        person is told, and the attempt is skipped if nobody answers within TRUST_TIMEOUT."""
        from ..capture.discovery import open_lockdown

        def notify(text: str) -> None:
            logger.warning("%s: %s", _label(device), text)
            name = device.name or device.udid
            self._spawn(
                self._notify(
                    f"Trust this computer on {name}",
                    f"Unlock {name} and tap Trust to let ibsync back it up.",
                    "warning",
                    key=f"trust:{device.udid}",
                    every=DAY,
                )
            )

        try:
            return await open_lockdown(device, pair_timeout=TRUST_TIMEOUT, notify=notify)
        except (DeviceUnreachable, TrustNotAnswered) as e:
            raise _Skip(_one_line(e)) from e
        except (DeviceError, OSError) as e:
            raise _Skip(f"the device did not answer: {_one_line(e)}") from e

    def _start_job(self, device: ConnectedDevice, policy: DevicePolicy) -> Any:
        """The web app's job for this backup (its progress bar), when the agent serves the app."""
        if self.jobs is None:
            return None
        return self.jobs.start(
            "backup",
            f"Backing up {device.name or device.udid}",
            subject={"udid": device.udid, "repo": policy.repository},
        )

    def _end_job(self, job: Any, outcome: Outcome) -> None:
        if job is None:
            return
        if outcome.result == OK:
            self.jobs.finish(
                job, result={"snapshot": outcome.snapshot, "label": f"New snapshot {(outcome.snapshot or '')[:8]}"}
            )
        else:
            self.jobs.fail(job, f"{outcome.result}: {outcome.reason}")

    async def _capture(self, device: ConnectedDevice, lockdown: Any, repo: Any, job: Any = None) -> Outcome:
        from ..capture.backup import capture
        from ..progress import NULL_PROGRESS

        name = device.name or device.udid
        progress = self.jobs.progress(job) if job is not None else NULL_PROGRESS

        def notify(text: str) -> None:
            if job is not None:
                self.jobs.update(job, message=text, force=True)
            logger.warning("%s: %s", _label(device), text)
            if "passcode" in text:
                self._spawn(
                    self._notify(
                        f"Unlock {name}", f"Unlock {name} and enter its passcode to let the backup start.", "warning"
                    )
                )

        try:
            outcome = await capture(lockdown, repo, notify=notify, progress=progress)
        except DeviceError as e:
            return Outcome(*classify(e))
        except (StorageError, RepoError) as e:
            return Outcome(FAILED, f"repository: {_one_line(e)}")
        s = outcome.snapshot
        return Outcome(
            OK,
            None,
            s.id,
            s.summary.added_bytes,
            outcome.bytes_received,
            outcome.files_received,
            when=s.time.timestamp(),
        )

    def _finish(
        self, device: ConnectedDevice, policy: DevicePolicy, attempt: int, started: float, outcome: Outcome
    ) -> None:
        self.history.end(
            attempt,
            outcome.result,
            outcome.reason,
            snapshot=outcome.snapshot,
            bytes_added=outcome.bytes_added,
            bytes_received=outcome.bytes_received,
            files=outcome.files,
            success_time=outcome.when,
        )
        self._log(device, policy, started, outcome)
        if outcome.result == OK:
            self._retention_pending.setdefault(policy.repository or "", set()).add(device.udid)
            recovered = self.history.clear_notice(f"failed:{device.udid}")
            self.history.clear_notice(f"overdue:{device.udid}")
            if recovered:
                self._spawn(
                    self._notify(
                        f"{device.name or device.udid} backed up again",
                        self._line(device, policy, started, outcome),
                        "success",
                    )
                )
        elif outcome.result == FAILED:
            self._spawn(self._notify_failure(device, outcome.reason or "failed"))

    def _record(
        self, device: ConnectedDevice, policy: DevicePolicy, attempt: int | None, started: float, outcome: Outcome
    ) -> None:
        """An attempt that ended before the device was asked for anything."""
        attempt = self.history.begin(device.udid, device.name, policy.repository, device.connection)
        self._finish(device, policy, attempt, started, outcome)

    def _line(self, device: ConnectedDevice, policy: DevicePolicy, started: float, outcome: Outcome) -> str:
        parts = [f"{_label(device)}: {outcome.result}"]
        if outcome.result == OK:
            parts.append(
                f"snapshot {(outcome.snapshot or '')[:8]}, {_size(outcome.bytes_added)} added, "
                f"{outcome.files} files received ({_size(outcome.bytes_received)})"
            )
        parts.append(f"{time.time() - started:.0f} s")
        parts.append(f"repository {policy.repository}")
        if outcome.reason:
            parts.append(outcome.reason)
        return ", ".join(parts)

    def _log(self, device: ConnectedDevice, policy: DevicePolicy, started: float, outcome: Outcome) -> None:
        level = (
            logging.INFO if outcome.result == OK else logging.WARNING if outcome.result == SKIPPED else logging.ERROR
        )
        logger.log(level, "%s", self._line(device, policy, started, outcome))

    # ---- telling the person --------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _notify(
        self, title: str, body: str, kind: str, *, key: str | None = None, every: float | None = None
    ) -> None:
        if key is not None and not self.history.notice_due(key, every):
            return
        if self.notifier is not None:
            await self.notifier.send_async(title, body, kind)

    async def _notify_failure(self, device: ConnectedDevice, reason: str) -> None:
        await self._notify(
            f"Backup of {device.name or device.udid} failed", reason, "failure", key=f"failed:{device.udid}", every=None
        )

    async def _unreachable(self, repository: str, e: BaseException) -> None:
        logger.warning("repository %s not reachable: %s", repository, _one_line(e))
        await self._notify(
            f"Repository {repository} not reachable",
            f"ibsync cannot reach {repository} ({_one_line(e)}); it will keep trying.",
            "warning",
            key=f"unreachable:{repository}",
            every=None,
        )

    def _reachable(self, repository: str) -> None:
        self.history.clear_notice(f"unreachable:{repository}")

    async def _warn_overdue(self) -> None:
        now = datetime.now(UTC)
        for rec in self.history.devices():
            policy = self.settings.policy(rec.udid, rec.name)
            if not policy.enabled or not policy.repository:
                continue
            if is_overdue(rec.last_success, rec.first_seen, policy.interval, policy.grace, now):
                since = rec.last_success or rec.first_seen
                assert since is not None
                text = f"{rec.name or rec.udid} has had no good backup for {format_duration(now - since)}" + (
                    f" (last: {_local(rec.last_success)})" if rec.last_success else " (never backed up)"
                )
                if self.history.notice_due(f"overdue:{rec.udid}", DAY):
                    logger.warning("%s", text)
                    await self._notify(f"{rec.name or rec.udid}: backup overdue", text, "warning")

    # ---- maintenance ---------------------------------------------------------------------------

    async def maintain(self) -> None:
        """Retention, prune and the rotating check, for each repository that got backups, while
        no backup runs (they take the repository's exclusive lock)."""
        for repository, udids in list(self._retention_pending.items()):
            if self._running or (self._stop is not None and self._stop.is_set()):
                return
            await asyncio.to_thread(self._maintain_one, repository, udids)
            self._retention_pending.pop(repository, None)

    def _maintain_one(self, repository: str, udids: set[str]) -> None:
        from .maintenance import maintain_repository

        maintain_repository(
            RepoSource(repository, config_path=self.config_path), repository, udids, self.settings, self.history
        )


class _Skip(Exception):
    pass


def _require_mounted(source: RepoSource) -> None:
    """A repository on a local path whose folder is missing is a drive not plugged in or a share
    not mounted: unreachable for now (retried), not a misconfiguration."""
    url = source.repo_config().url
    if "://" in url and not url.startswith("file://"):
        return
    path = Path(url.removeprefix("file://")).expanduser()
    if not path.exists():
        raise StorageError(f"{path} does not exist (is the drive connected, the share mounted?)")


def classify(e: DeviceError) -> tuple[str, str]:
    """An unfinished capture: ``skipped`` when nobody was there to let it happen (retried
    later, not a failure), else ``failed``."""
    text = _one_line(e)
    if isinstance(e, (PasscodeNotEntered, DeviceDisconnected, DeviceUnreachable, TrustNotAnswered)):
        return SKIPPED, text
    return FAILED, text


async def discover_devices(*, wifi: bool) -> tuple[list[ConnectedDevice], dict[str, str]]:
    from ..capture.discovery import list_connected

    return await list_connected(wifi=wifi, tolerant=True)


async def _charging(lockdown: Any) -> bool:
    from ..capture.battery import read_battery

    state = await read_battery(lockdown)
    return bool(state.charging or state.external_power)


async def _close(lockdown: Any) -> None:
    close = getattr(lockdown, "close", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


def _label(device: ConnectedDevice) -> str:
    return f"{device.name or '?'} ({device.udid})"


def _one_line(e: BaseException) -> str:
    text = str(e) or e.__class__.__name__
    return " ".join(text.split())


def _size(n: int | None) -> str:
    from ..ui.text import size

    return "?" if n is None else size(n)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _local(dt: datetime | None) -> str:
    return "?" if dt is None else dt.astimezone().strftime("%Y-%m-%d %H:%M")


def lock_state_folder(folder: Path):
    """Hold ``agent.lock`` in the state folder for the agent's lifetime: a second agent for the
    same user is refused instead of backing the same phones up twice."""
    from ..errors import UserError

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = open(folder / "agent.lock", "a+")
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"another ibsync agent is running for this user (lock {folder / 'agent.lock'})") from None
    return f
