"""Restore a snapshot onto a connected device, served straight from the repository.

The device pulls a restore from the host: after the ``Restore`` request it asks for
``<source>/Status.plist``, ``Manifest.plist``, ``Manifest.db`` and then the payloads
(``<source>/xx/<fileID>``) with ``DLMessageDownloadFiles``. Here the backup folder it reads is a
:class:`~.vtree.VirtualTree` over the snapshot's tree: every file is streamed from the
repository's blobs as the device asks for it, and nothing of the backup is written locally.
Whatever the device changes in that folder during the session (moves, removals, copies) lives in
the tree's in-memory overlay and is dropped at the end: the snapshot is never modified, which
is what ``copy`` (restore from a copy of the backup) asks for anyway.

The session is opened as pymobiledevice3 11.45.0's ``Mobilebackup2Service.restore`` does it
(DeviceLink version exchange and Hello, the notification_proxy + AFC sync lock, the request with
the same ``Options``, ``/iTunesRestore/RestoreApplications.plist`` from the snapshot's
``Info.plist`` over AFC so the device reinstalls its apps), with ibsync's
:class:`~.devicelink.DeviceLinkHost` answering the device. The device's final ProcessMessage
decides: ErrorCode 0 is success, anything else raises :class:`RestoreFailed` (one line).

A snapshot holding names no folder may hold (``..``, a separator, a name stored twice: see
``model.split_entries``), or whose device folder name is such a name, is refused before the
device is asked anything, naming them.

A snapshot of another device may be restored: the request's ``SourceIdentifier`` is the
snapshot's UDID (the backup folder's name), ``TargetIdentifier`` the connected device's.
"""

from __future__ import annotations

import asyncio
import logging
import plistlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymobiledevice3.exceptions import ConnectionTerminatedError, PyMobileDevice3Exception
from pymobiledevice3.lockdown_service_provider import LockdownServiceProvider

from ..errors import DeviceDisconnected, DeviceError, UserError
from ..model import Snapshot, name_problem
from ..progress import NULL_PROGRESS, Progress
from ..reader.walk import rejected_entries
from ..repo.repository import Repository
from ..source.backup_folder import plist_dict
from .api import ProviderArg, RepoArg, run_sync, session_for
from .backup import Notify, _free_space, _log_warning, mobilebackup2_session
from .devicelink import SessionEnd, TransferStats
from .vtree import VirtualTree, VTreeError

logger = logging.getLogger("ibsync.capture")

RESTORE_NEEDS = ("Info.plist", "Manifest.plist", "Manifest.db", "Status.plist")
RESTORE_APPLICATIONS = "/iTunesRestore/RestoreApplications.plist"


class RestoreFailed(DeviceError):
    """The device did not complete the restore (or it could not be started)."""


class RestoreDisconnected(RestoreFailed, DeviceDisconnected):
    """The connection to the device was lost during the restore (cable pulled, device gone)."""


@dataclass
class RestoreOutcome:
    snapshot: Snapshot
    target_udid: str  # the device restored onto
    source_udid: str  # the SourceIdentifier sent: the snapshot's device folder
    files_sent: int
    bytes_sent: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "snapshot": self.snapshot.id,
            "source_udid": self.source_udid,
            "target_udid": self.target_udid,
            "files_sent": self.files_sent,
            "bytes_sent": self.bytes_sent,
            "seconds": round(self.seconds, 3),
        }


def source_identifier(snapshot: Snapshot) -> str:
    """The name of the snapshot's device folder as the device addresses it: the folder it was
    captured or imported as when that is its UDID (lockdown's spelling), else the UDID."""
    udid = snapshot.device.udid
    if snapshot.folder and (not udid or snapshot.folder.upper() == udid.upper()):
        return snapshot.folder
    return udid or snapshot.folder


async def restore(
    provider: LockdownServiceProvider,
    repo: Repository,
    snapshot: Snapshot,
    *,
    system: bool = False,
    reboot: bool = True,
    copy: bool = True,
    settings: bool = False,
    remove: bool = False,
    password: str | None = None,
    progress: Progress = NULL_PROGRESS,
    notify: Notify = _log_warning,
) -> RestoreOutcome:
    """Restore ``snapshot`` of ``repo`` (opened, index loaded, locked by the caller) onto the
    device behind ``provider``; RestoreFailed (one line) unless the device reports success."""
    started = time.monotonic()
    if snapshot.snapshot_state != "finished":
        raise RestoreFailed(
            f"snapshot {snapshot.short_id} is not a finished backup "
            f"(SnapshotState {snapshot.snapshot_state!r}); the device would refuse it"
        )
    if snapshot.source.get("failed"):
        raise RestoreFailed(
            f"snapshot {snapshot.short_id} is a partial capture (files the device could not read "
            "are missing); restore another snapshot"
        )
    source = source_identifier(snapshot)
    if not source:
        raise RestoreFailed(f"snapshot {snapshot.short_id} names no device folder to restore from")
    await asyncio.to_thread(_refuse_unsafe, repo, snapshot, source)
    tree = VirtualTree(repo, source, snapshot.tree, lookups=True)  # checked by _refuse_unsafe above
    for name in RESTORE_NEEDS:
        try:
            tree.file(f"{source}/{name}")
        except VTreeError as e:
            raise RestoreFailed(f"snapshot {snapshot.short_id} has no {name}; it is not a restorable backup") from e
    info = plist_dict(await asyncio.to_thread(tree.read_bytes, f"{source}/Info.plist")) or {}
    manifest = plist_dict(await asyncio.to_thread(tree.read_bytes, f"{source}/Manifest.plist"))
    if manifest is None:
        raise RestoreFailed(f"snapshot {snapshot.short_id}: its Manifest.plist is unreadable")
    encrypted = bool(manifest.get("IsEncrypted", False))
    if encrypted and not password:
        raise RestoreFailed(
            f"snapshot {snapshot.short_id} is an encrypted iOS backup: the restore needs its backup password"
        )
    options: dict[str, Any] = {
        "RestoreShouldReboot": reboot,
        "RestoreDontCopyBackup": not copy,
        "RestorePreserveSettings": settings,
        "RestoreSystemFiles": system,
        "RemoveItemsNotRestored": remove,
    }
    if encrypted:
        options["Password"] = password
    target = provider.udid or ""
    request = {"MessageName": "Restore", "TargetIdentifier": target, "SourceIdentifier": source, "Options": options}
    progress.start(
        snapshot.summary.total_bytes or None, snapshot.summary.files or None
    )  # at most: the device asks for what it needs
    try:
        end, stats = await _device_session(
            provider,
            tree,
            request,
            info.get("Applications"),
            free_space=lambda: _free_space(repo),
            progress=progress,
            notify=notify,
        )
    except (ConnectionTerminatedError, ConnectionError, asyncio.IncompleteReadError) as e:
        raise RestoreDisconnected("the connection to the device was lost during the restore") from e
    except PyMobileDevice3Exception as e:
        raise RestoreFailed(f"the restore failed: {e or e.__class__.__name__}") from e
    except DeviceError as e:  # a malformed message or a silent device, from the DeviceLink host
        if isinstance(e, RestoreFailed):
            raise
        raise RestoreFailed(f"the restore failed: {e}") from e
    finally:
        progress.finish()
    _check_finished(end, encrypted)
    return RestoreOutcome(snapshot, target, source, stats.files_sent, stats.bytes_sent, time.monotonic() - started)


def _refuse_unsafe(repo: Repository, snapshot: Snapshot, source: str) -> None:
    """Refuse, before the device is asked anything, a snapshot whose folder name or entries no
    folder may hold. The device would never be served them (the virtual tree leaves them out),
    but a restore replaces the device's data: better none than one silently missing files.
    This reads every tree once more; next to streaming every payload, that is little."""
    problem = name_problem(source)
    if problem:
        raise RestoreFailed(
            f"snapshot {snapshot.short_id}: refusing to restore: its device folder "
            f"'{source[:300]}' is unsafe ({problem})"
        )
    rejected = rejected_entries(repo, snapshot.tree)
    if rejected:
        named = "; ".join(f"'{path[:300]}': {why}" for path, why in rejected[:3])
        more = f" (and {len(rejected) - 3} more)" if len(rejected) > 3 else ""
        raise RestoreFailed(
            f"snapshot {snapshot.short_id}: refusing to restore: {len(rejected)} entr"
            f"{'y' if len(rejected) == 1 else 'ies'} cannot be restored: {named}{more}; "
            "'ibsync check' lists them"
        )


async def _device_session(
    provider: LockdownServiceProvider,
    tree: VirtualTree,
    request: dict,
    applications: Any,
    *,
    free_space: Callable[[], int],
    progress: Progress,
    notify: Notify,
) -> tuple[SessionEnd, TransferStats]:
    async with mobilebackup2_session(
        provider,
        tree,
        None,
        free_space=free_space,
        progress=progress,
        notify=notify,
        failure=RestoreFailed,
        count_downloads=True,
    ) as (_, link, afc):
        await link.send_process_message(request)
        if applications is not None:
            # as pymobiledevice3 does: the device reinstalls these apps once the restore is done
            await afc.makedirs("/iTunesRestore")
            await afc.set_file_contents(RESTORE_APPLICATIONS, plistlib.dumps(applications))
        end = await link.run()
    return end, link.stats


def _check_finished(end: SessionEnd, encrypted: bool) -> None:
    if end.error_code is None:
        raise RestoreFailed(f"the device ended the restore without a result ({end.description})")
    if end.error_code != 0:
        why = (end.description or "no description").rstrip(".")
        hint = ""
        if encrypted and "password" in why.lower():
            hint = " (check the iOS backup password)"
        raise RestoreFailed(f"the device refused the restore: error {end.error_code}: {why}{hint}")


def resolve_snapshot(repo: Repository, snapshot: Snapshot | str) -> Snapshot:
    """A Snapshot as is, or an id, a unique id prefix or 'latest' (one device only)."""
    if isinstance(snapshot, Snapshot):
        return snapshot
    if not isinstance(snapshot, str):
        raise UserError("snapshot: give a Snapshot, or an id, id prefix or 'latest'")
    return repo.find_snapshot(snapshot)


# ---- the library entry points (as ibsync.backup_device) ----------------------------------------


async def restore_to_device_async(
    provider: ProviderArg,
    repo: RepoArg,
    snapshot: Snapshot | str,
    *,
    system: bool = False,
    reboot: bool = True,
    copy: bool = True,
    settings: bool = False,
    remove: bool = False,
    backup_password: str | None = None,
    password: str | None = None,
    password_file: str | None = None,
    progress: Progress = NULL_PROGRESS,
    notify: Notify = _log_warning,
) -> RestoreOutcome:
    """Restore a snapshot onto a connected device, its files streamed from the repository
    (nothing written locally); returns what was sent, or raises ``RestoreFailed`` (one line).

    ``provider``: a pymobiledevice3 ``LockdownServiceProvider`` or a coroutine function
    returning one (created here and closed when done). ``repo``: a repository path, URL or
    config name (opened with ``password``/``password_file`` or the environment, as
    the CLI does, and locked shared for the duration), or an open ``Repository`` (the caller's
    to lock and close). ``snapshot``: a ``Snapshot`` of that repository, or an id, unique id
    prefix or 'latest'; it may be of another device (its UDID is sent as the source).
    ``backup_password``: the iOS backup password, needed for an encrypted snapshot (``password``
    is the repository's, as for ``backup_device``).
    ``system``/``reboot``/``copy``/``settings``/``remove``: the Restore request's options, as
    pymobiledevice3's ``restore()`` (RestoreSystemFiles, RestoreShouldReboot, not
    RestoreDontCopyBackup, RestorePreserveSettings, RemoveItemsNotRestored).
    ``notify``: messages for the user while it runs (default: logged as warnings).
    """
    async with session_for(provider, repo, password, password_file, "restore-device") as (lockdown, repository):
        snap = await asyncio.to_thread(resolve_snapshot, repository, snapshot)
        return await restore(
            lockdown,
            repository,
            snap,
            system=system,
            reboot=reboot,
            copy=copy,
            settings=settings,
            remove=remove,
            password=backup_password,
            progress=progress,
            notify=notify,
        )


def restore_to_device(provider: ProviderArg, repo: RepoArg, snapshot: Snapshot | str, **options) -> RestoreOutcome:
    """:func:`restore_to_device_async` for code without an event loop (same arguments)."""
    return run_sync(restore_to_device_async, provider, repo, snapshot, **options)
