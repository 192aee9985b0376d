"""ibsync: back up iPhones and iPads to storage you own, with history, deduplication and encryption.

Library use: :func:`backup_device` / :func:`backup_device_async` back up a connected device
(a pymobiledevice3 lockdown provider) into a repository (path, URL or config name);
:func:`restore_to_device` / :func:`restore_to_device_async` push a snapshot back onto one. They
are imported on first use, so the command line does not pay for pymobiledevice3 at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from .capture.backup import CaptureOutcome
    from .capture.restore import RestoreOutcome


def backup_device(provider: Any, repo: Any, **options: Any) -> CaptureOutcome:
    """Back up a device into a repository, from code without a running event loop.

    Options: ``password``, ``password_file`` (else the environment, as the CLI), ``full``,
    ``allow_partial``, ``progress``, ``notify``. See ``ibsync.capture.api.backup_device_async``;
    inside an event loop, ``await backup_device_async(...)`` instead."""
    from .capture.api import backup_device as run

    return run(provider, repo, **options)


async def backup_device_async(provider: Any, repo: Any, **options: Any) -> CaptureOutcome:
    """:func:`backup_device` as a coroutine, for callers running an event loop (pymobiledevice3
    is asyncio: a lockdown client made in a loop is used in that loop)."""
    from .capture.api import backup_device_async as run

    return await run(provider, repo, **options)


def restore_to_device(provider: Any, repo: Any, snapshot: Any, **options: Any) -> RestoreOutcome:
    """Restore a snapshot (a ``Snapshot``, an id or id prefix, or 'latest') onto a device, its
    files served straight from the repository, from code without a running event loop.

    Options: ``system``, ``reboot``, ``copy``, ``settings``, ``remove`` (the Restore request's),
    ``backup_password`` (the iOS backup password of an encrypted snapshot), ``password``,
    ``password_file`` (the repository's, else the environment, as the CLI), ``progress``, ``notify``. See
    ``ibsync.capture.restore.restore_to_device_async``; inside an event loop,
    ``await restore_to_device_async(...)`` instead."""
    from .capture.restore import restore_to_device as run

    return run(provider, repo, snapshot, **options)


async def restore_to_device_async(provider: Any, repo: Any, snapshot: Any, **options: Any) -> RestoreOutcome:
    """:func:`restore_to_device` as a coroutine, for callers running an event loop."""
    from .capture.restore import restore_to_device_async as run

    return await run(provider, repo, snapshot, **options)
