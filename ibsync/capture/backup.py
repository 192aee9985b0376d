"""Back up a connected device straight into the repository (mobilebackup2, no local copy).

One capture:

1. the previous snapshot of the device (same UDID) becomes the virtual backup folder the
   device sees, so the device backs up incrementally against it; with ``full``, or without a
   usable previous snapshot, the folder starts empty and the request says ``ForceFullBackup``;
2. pymobiledevice3 opens mobilebackup2 and does what it does for its own backups: the
   DeviceLink version exchange and Hello, the notification_proxy + AFC sync lock, Info.plist
   from installation_proxy/springboard/AFC (its helpers, reused);
3. ibsync's :class:`~.devicelink.DeviceLinkHost` answers the device; uploads are chunked and
   stored as they arrive;
4. the snapshot is committed only if the device ended with ErrorCode 0, the Status.plist it
   left says ``SnapshotState = finished`` (and is new: the previous one must not pass for
   it), and no file failed (unless ``allow_partial``). Before that check the write session is
   flushed (every stored blob uploaded and indexed), as a step of its own: the folder is then
   stored by the same Archiver that imports folders, through the same write session, and the
   archiver takes each file's blob ids as they are, requiring them indexed.

A device is not trusted: the DeviceLink host checks every message and bounds every length it
names, and gives up after the idle timeout without a byte from the device (``devicelink``).

Anything else raises :class:`CaptureFailed` with one line saying why; the last good snapshot is
untouched, and what was uploaded stays in the repository (indexed), so the next run sends the
same data at no storage cost.

Local disk: nothing of the backup is written locally except the packs being written (the
session's staged packs: at most ``connections + 1`` shipped and uploading plus the open ones,
one per writing thread, so about ``(connections + 3) * pack_size``: 140 MiB for a remote
repository with 4 connections and the default 20 MiB packs; for a local repository they are
the repository's own files); memory holds at most about two max-size chunks of the file being
received (8 MiB) plus the overlay of this session's changes.
"""

from __future__ import annotations

import asyncio
import logging
import plistlib
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pymobiledevice3.exceptions import AfcException, ConnectionTerminatedError, PyMobileDevice3Exception
from pymobiledevice3.lockdown_service_provider import LockdownServiceProvider
from pymobiledevice3.safe_paths import validate_device_filename
from pymobiledevice3.services.afc import AFC_LOCK_EX, AFC_LOCK_UN, AfcError, AfcService
from pymobiledevice3.services.mobilebackup2 import (
    NP_LOCAL_AUTH_DISMISSED,
    NP_LOCAL_AUTH_PRESENTED,
    NP_SYNC_CANCEL_REQUEST,
    NP_SYNC_DID_FINISH,
    NP_SYNC_DID_START,
    NP_SYNC_LOCK_REQUEST,
    NP_SYNC_WILL_START,
    Mobilebackup2Service,
)
from pymobiledevice3.services.notification_proxy import NotificationProxyService

from ..errors import DeviceDisconnected, DeviceError, PasscodeNotEntered
from ..ingest.archiver import Archiver
from ..model import DeviceInfo, Snapshot, split_entries, utc_iso
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from ..repo.session import WriteSession
from ..source.backup_folder import describe_backup, plist_dict
from .devicelink import DeviceLinkHost, FailedUpload, SessionEnd, TransferStats, idle_timeout_from_env
from .store import FileStore
from .vtree import VirtualTree

logger = logging.getLogger("ibsync.capture")

# What GetFreeDiskSpace answers for a repository on remote storage. The device only checks that
# the host has more than its upload size (every clone and hardlink counted in full) + 128 MiB;
# a bucket or a NAS share has no meaningful "free space", and what the repository really grows
# by is far less (deduplication, compression). 64 TiB is above any device's demand.
REMOTE_FREE_SPACE = 64 << 40
MB_ERROR_NOT_ENOUGH_SPACE = 105
#: "Device locked (MBErrorDomain/208)": the passcode prompt was not answered (about 3 minutes on iOS)
MB_ERROR_DEVICE_LOCKED = 208
INCREMENTAL_NEEDS = ("Status.plist", "Manifest.plist", "Manifest.db")
SYNC_LOCK_FILE = "/com.apple.itunes.lock_sync"
SYNC_FINISH_TIMEOUT = 5.0  # seconds for the last notification on the way out

Notify = Callable[[str], None]


class CaptureFailed(DeviceError):
    """The device did not complete the backup; nothing was committed."""


class CaptureDisconnected(CaptureFailed, DeviceDisconnected):
    """The connection to the device was lost during the backup (cable pulled, device gone);
    nothing was committed. An unattended caller records it as skipped, not failed."""


class CapturePasscodeNotEntered(CaptureFailed, PasscodeNotEntered):
    """The device ended the backup with ErrorCode 208 ("Device locked"): it asked for its
    passcode and nobody entered it. An unattended caller records it as skipped, not failed."""


@dataclass
class CaptureOutcome:
    snapshot: Snapshot
    full: bool  # whether a full backup was asked for
    files_received: int
    bytes_received: int
    failed: list[FailedUpload] = field(default_factory=list)  # only with allow_partial

    def to_dict(self) -> dict:
        s = self.snapshot
        return {
            "id": s.id,
            "udid": s.device.udid,
            "device_name": s.device.name,
            "backup_date": utc_iso(s.backup_date) if s.backup_date else None,
            "ios_encrypted": s.ios_encrypted,
            "parent": s.parent,
            "mode": "full" if self.full else "incremental",
            "files_received": self.files_received,
            "bytes_received": self.bytes_received,
            "failed": [asdict(f) for f in self.failed],
            "summary": asdict(s.summary),
        }


def _log_warning(text: str) -> None:
    logger.warning("%s", text)


async def capture(
    provider: LockdownServiceProvider,
    repo: Repository,
    *,
    full: bool = False,
    allow_partial: bool = False,
    progress: Progress = NULL_PROGRESS,
    notify: Notify = _log_warning,
) -> CaptureOutcome:
    """Back up the device behind ``provider`` into ``repo`` (opened, index loaded, locked by
    the caller) and commit a snapshot; CaptureFailed if the device did not finish.

    ``allow_partial``: commit even if the device could not read some files (each keeps its
    previous version, or is absent); they are listed in the outcome. ``notify`` gets messages
    for the user while the backup runs (the passcode prompt).

    Local disk used: the staged packs of the write session only, at most about
    ``(storage connections + 3) * pack size``; no file of the backup is written locally.
    """
    started = time.monotonic()
    udid = validate_device_filename(provider.udid or "")
    parent = repo.latest_of_device(udid)  # Info.plist capitalises the UDID; lockdown may not
    base = None if full or parent is None else _incremental_base(repo, parent)
    full = base is None
    session = repo.write_session()
    try:
        tree = VirtualTree(repo, udid, base, before_read=session.flush)
        store = FileStore(session, repo.chunker)
        progress.start(None, None)  # the device announces its total batch by batch, not up front
        try:
            end, stats = await _device_session(
                provider,
                udid,
                tree,
                store,
                full=full,
                free_space=lambda: _free_space(repo),
                progress=progress,
                notify=notify,
            )
        finally:
            store.close()  # the storing thread finishes what it was given, whatever happened
            progress.finish()
        # The commit, step 1: every blob stored so far in an uploaded, indexed pack. The plists
        # read next and the archiver's walk (which takes the files' blob ids as they are, and
        # requires them indexed) must not depend on a read having flushed by chance.
        await asyncio.to_thread(session.flush)
        _check_finished(tree, udid, base, end, stats, allow_partial)
        meta = _describe(tree, udid)
        archiver = Archiver(repo)
        archiver.summary.bytes_read = stats.bytes_received
        origin: dict[str, Any] = {"kind": "device", "udid": udid, "mode": "full" if full else "incremental"}
        if stats.failed:  # allow_partial: recorded, and the next capture of the device is full (see _incremental_base)
            origin["failed"] = sorted(f.device_name for f in stats.failed)
        snapshot, _ = await asyncio.to_thread(
            archiver.archive,
            tree.source(origin),
            device=meta.device,
            backup_date=meta.backup_date,
            ios_encrypted=meta.ios_encrypted,
            snapshot_state=meta.snapshot_state,
            parent=parent,
            folder=udid,
            session=session,
            started=started,
        )
    except BaseException as e:
        _keep_uploaded(session)
        session.__exit__(type(e), e, e.__traceback__)  # stops its uploader; never raises
        if _is_disconnect(e):
            raise CaptureDisconnected(
                f"the connection to the device was lost during the backup; nothing was committed ({_kept(session)})"
            ) from e
        if isinstance(e, PyMobileDevice3Exception):
            raise CaptureFailed(
                f"the backup failed: {e or e.__class__.__name__}; nothing was committed ({_kept(session)})"
            ) from e
        if isinstance(e, DeviceError) and not isinstance(e, CaptureFailed):  # a malformed message, a silent device
            raise CaptureFailed(f"{e}; nothing was committed ({_kept(session)})") from e
        raise
    session.__exit__(None, None, None)  # the archiver flushed it; this stops its uploader
    return CaptureOutcome(snapshot, full, stats.files_received, stats.bytes_received, list(stats.failed))


# ---- the device session ------------------------------------------------------------------------


async def _device_session(
    provider: LockdownServiceProvider,
    udid: str,
    tree: VirtualTree,
    store: FileStore,
    *,
    full: bool,
    free_space: Callable[[], int],
    progress: Progress,
    notify: Notify,
) -> tuple[SessionEnd, TransferStats]:
    """Open mobilebackup2 under the sync lock, write Info.plist, request the backup, serve the
    device until it ends the request."""
    async with mobilebackup2_session(
        provider, tree, store, free_space=free_space, progress=progress, notify=notify, failure=CaptureFailed
    ) as (mb2, link, afc):
        info = await mb2.init_mobile_backup_factory_info(afc)
        tree.put_file(f"{udid}/Info.plist", *store.store_bytes(plistlib.dumps(info)))
        request: dict[str, Any] = {"MessageName": "Backup", "TargetIdentifier": udid}
        if full:
            request["Options"] = {"ForceFullBackup": True}
        await link.send_process_message(request)
        end = await link.run()
    return end, link.stats


@asynccontextmanager
async def mobilebackup2_session(
    provider: LockdownServiceProvider,
    tree: VirtualTree,
    store: FileStore | None,
    *,
    free_space: Callable[[], int],
    progress: Progress,
    notify: Notify,
    failure: type[DeviceError],
    count_downloads: bool = False,
    idle_timeout: float | None = None,
) -> AsyncIterator[tuple[Mobilebackup2Service, DeviceLinkHost, AfcService]]:
    """What a backup and a restore share: mobilebackup2 opened, our DeviceLink host on it, the
    version exchange and Hello, pymobiledevice3's sync lock held (syncWillStart, the AFC lock on
    /com.apple.itunes.lock_sync retried 10 s, syncDidStart; syncDidFinish and unlock on the
    way out) and the device's notifications watched (passcode prompt, cancel).

    ``idle_timeout``: seconds the device may stay silent on DeviceLink (default: 600, or
    ``IBSYNC_DEVICE_IDLE_TIMEOUT``); longer than the ~3 minutes a passcode prompt can wait."""
    timeout = idle_timeout_from_env() if idle_timeout is None else idle_timeout
    mb2 = Mobilebackup2Service(provider)
    link: DeviceLinkHost | None = None
    try:
        await mb2.connect()
        link = DeviceLinkHost(
            mb2.service,  # type: ignore[arg-type]  # pymobiledevice3 may hand a lazy connection that behaves the same
            tree,
            store,
            free_space=free_space,
            progress=progress,
            count_downloads=count_downloads,
            idle_timeout=timeout,
        )
        await link.version_exchange()
        try:
            # Hello: pymobiledevice3's, through our link (its DeviceLink's interface, not its class)
            await mb2.version_exchange(link)  # type: ignore[arg-type]
        except (AssertionError, KeyError, IndexError, TypeError) as e:  # how pmd3 checks the answer
            raise failure("the device does not speak mobilebackup2 protocol version 2.0 or 2.1") from e
        try:
            async with NotificationProxyService(provider) as np, AfcService(provider) as afc, _sync_lock(afc, np):
                await mb2._observe_backup_notifications(np)
                watcher = asyncio.create_task(_watch_notifications(np, notify))
                try:
                    yield mb2, link, afc
                finally:
                    watcher.cancel()
                    with suppress(asyncio.CancelledError, Exception):
                        await watcher
        finally:
            # the device may have dropped the link already (often why we are here); a failed
            # Disconnect must not replace that error
            with suppress(ConnectionTerminatedError, OSError):
                await link.disconnect()
    finally:
        if link is not None:
            link.close()
        with suppress(Exception):
            await mb2.close()


@asynccontextmanager
async def _sync_lock(afc: AfcService, np: NotificationProxyService) -> AsyncIterator[None]:
    """pymobiledevice3's ``Mobilebackup2Service._backup_lock``, with a release that never talks
    over a connection that failed.

    Taking the lock is pymobiledevice3's, step for step (syncWillStart, the exclusive flock on
    /com.apple.itunes.lock_sync retried 50 x 0.2 s, syncDidStart). Its release sends the unlock
    and the close over AFC whatever happened; after a cable pull that request races AFC's
    reader, which fails the request's future while the send itself raises, so nobody retrieves
    that future and asyncio prints "Future exception was never retrieved" with a traceback after
    our one-line error. A device drops a connection's locks and handles with the connection, so
    when the body failed (or AFC already saw its connection end) nothing is sent over AFC: closing
    it (AfcService's exit) releases the lock. syncDidFinish is still posted, best effort."""
    await np.notify_post(NP_SYNC_WILL_START)
    lockfile = await afc.fopen(SYNC_LOCK_FILE, "r+")
    if lockfile:
        await np.notify_post(NP_SYNC_LOCK_REQUEST)
        for _ in range(50):
            try:
                await afc.lock(lockfile, AFC_LOCK_EX)
            except AfcException as e:
                if e.status == AfcError.OP_WOULD_BLOCK:
                    await asyncio.sleep(0.2)
                    continue
                await afc.fclose(lockfile)
                raise
            await np.notify_post(NP_SYNC_DID_START)
            break
        else:
            await afc.fclose(lockfile)
            raise PyMobileDevice3Exception(
                "Could not lock the device's sync lock file; another sync or backup may be running."
            )
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok and lockfile and not _afc_ended(afc):
            with suppress(ConnectionTerminatedError, OSError):  # gone just after it finished: the lock went with it
                await afc.lock(lockfile, AFC_LOCK_UN)
                await afc.fclose(lockfile)
        with suppress(ConnectionTerminatedError, OSError, asyncio.TimeoutError):
            # notification_proxy has no reader racing the send: a dead link simply raises here
            await asyncio.wait_for(np.notify_post(NP_SYNC_DID_FINISH), SYNC_FINISH_TIMEOUT)


def _afc_ended(afc: AfcService) -> bool:
    """Whether AFC's reader has seen its connection end (pymobiledevice3 sets this event, never
    clears it; absent in other versions: then assume the connection is alive)."""
    ended = getattr(afc, "_afc_terminated", None)
    return bool(ended is not None and ended.is_set())


async def _watch_notifications(np: NotificationProxyService, notify: Notify) -> None:
    async for event in np.receive_notification():
        name = event.get("Name")
        if name == NP_LOCAL_AUTH_PRESENTED:
            notify("the device is asking for its passcode: unlock it and enter the passcode to let the backup go on")
        elif name == NP_LOCAL_AUTH_DISMISSED:
            logger.info("the device's passcode prompt was dismissed")
        elif name == NP_SYNC_CANCEL_REQUEST:
            notify("the backup was cancelled on the device")


# ---- deciding ----------------------------------------------------------------------------------


def _incremental_base(repo: Repository, parent: Snapshot) -> bytes | None:
    """The parent's root tree if the device can back up incrementally against it: a finished
    backup with the three files the device downloads to compare against, and no file missing
    (a partial capture's Manifest.db lists files it does not hold in that version: only a full
    backup makes the device send them again)."""
    if parent.snapshot_state != "finished" or parent.source.get("failed") or not repo.index.has(parent.tree):
        return None
    root = {e["name"]: e for e in split_entries(repo.load_tree_entries(parent.tree))[0]}
    for name in INCREMENTAL_NEEDS:
        e = root.get(name)
        if e is None or e["type"] != "file" or not e["size"] or not repo.index.has_all_hex(e["content"]):
            return None
    return parent.tree


def _free_space(repo: Repository) -> int:
    """GetFreeDiskSpace: the free space of the filesystem holding a local repository (the
    device refuses when it looks too small, as with any host); a fixed large figure for
    remote storage, which has no such number (REMOTE_FREE_SPACE)."""
    root = getattr(repo.storage, "root", None)
    if repo.storage.properties.local and root is not None:
        with suppress(OSError):
            return shutil.disk_usage(root).free
    return REMOTE_FREE_SPACE


def _check_finished(
    tree: VirtualTree, udid: str, base: bytes | None, end: SessionEnd, stats: TransferStats, allow_partial: bool
) -> None:
    if end.error_code is None:
        raise CaptureFailed(f"the device ended the backup without a result ({end.description}); nothing was committed")
    if end.error_code == MB_ERROR_NOT_ENOUGH_SPACE:
        raise CaptureFailed(f"the device refused the backup: not enough free space on the target ({end.description})")
    if end.error_code == MB_ERROR_DEVICE_LOCKED:
        # the same words as any other error code (what the CLI prints is unchanged); the type says it
        raise CapturePasscodeNotEntered(
            f"the device reported error {end.error_code}: {end.description or 'no description'}; nothing was committed"
        )
    if end.error_code != 0:
        raise CaptureFailed(
            f"the device reported error {end.error_code}: {end.description or 'no description'}; nothing was committed"
        )
    status_path = f"{udid}/Status.plist"
    status = plist_dict(tree.read_bytes(status_path))
    state = status.get("SnapshotState") if status is not None else None
    if state != "finished":
        shown = f"says SnapshotState = {state}" if status is not None else "is missing or unreadable"
        raise CaptureFailed(f"the device reported success but the backup's Status.plist {shown}; nothing was committed")
    if base is not None and _content_of(tree, status_path) == _base_content(tree, base, "Status.plist"):
        raise CaptureFailed("the device reported success but did not write a new Status.plist; nothing was committed")
    if stats.failed and not allow_partial:
        f = stats.failed[0]
        more = f" and {len(stats.failed) - 1} more" if len(stats.failed) > 1 else ""
        raise CaptureFailed(
            f"the device could not read {f.device_name} ({f.reason}){more}; nothing was committed "
            "(allow_partial stores the rest, keeping the previous version of such files)"
        )


def _content_of(tree: VirtualTree, path: str) -> list[str] | None:
    with suppress(OSError):
        return tree.file(path)["content"]
    return None


def _base_content(tree: VirtualTree, base: bytes, name: str) -> list[str] | None:
    e = {x["name"]: x for x in split_entries(tree.repo.load_tree_entries(base))[0]}.get(name)
    return e["content"] if e is not None else None


# ---- the snapshot's metadata -------------------------------------------------------------------


@dataclass(frozen=True)
class _Meta:
    device: DeviceInfo
    backup_date: datetime | None
    ios_encrypted: bool
    snapshot_state: str | None


def _describe(tree: VirtualTree, udid: str) -> _Meta:
    """What an import of the same folder records (the same fields, from the same plists)."""
    info = plist_dict(tree.read_bytes(f"{udid}/Info.plist")) or {}
    manifest = plist_dict(tree.read_bytes(f"{udid}/Manifest.plist")) or {}
    status = plist_dict(tree.read_bytes(f"{udid}/Status.plist")) or {}
    device, backup_date, encrypted = describe_backup(info, manifest, status, udid)
    return _Meta(device, backup_date or datetime.now(UTC), encrypted, status.get("SnapshotState"))


# ---- on the way out of a failure -----------------------------------------------------------------


def _is_disconnect(e: BaseException) -> bool:
    """Whether ``e`` says the connection to the device ended under us (pymobiledevice3's
    ConnectionTerminatedError, which ibsync's DeviceLink host raises too, or the socket's own
    reset/broken pipe/EOF), as opposed to a device that answered badly."""
    return isinstance(e, (ConnectionTerminatedError, ConnectionError, asyncio.IncompleteReadError))


def _keep_uploaded(session: WriteSession) -> None:
    """Index what was uploaded so far, so the next run does not store it again; never mask the
    error that got us here."""
    try:
        session.flush()
    except Exception as e:  # the storage may be what failed
        logger.warning("could not index the data uploaded before the failure: %s", e)


def _kept(session: WriteSession) -> str:
    s = session.stats
    if not s.blobs_added:
        return "no data was stored"
    return f"{s.raw_bytes_added} bytes already stored are kept for the next run"
