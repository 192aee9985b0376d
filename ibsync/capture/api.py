"""``ibsync.backup_device``: capture a device into a repository named by URL, path or name.

pymobiledevice3 is asyncio throughout, so the work is a coroutine, :func:`backup_device_async`,
for callers that run an event loop (``await ibsync.backup_device_async(lockdown, repo)``).
:func:`backup_device` runs it with ``asyncio.run`` for plain scripts, and refuses to run
inside a running loop (blocking it would stall the device's connections, which live in that
loop). A pymobiledevice3 lockdown client belongs to the loop it was created in: sync callers
pass a coroutine function that makes one (``create_using_usbmux``), which is then created,
used and closed in the loop ``backup_device`` runs.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

from pymobiledevice3.lockdown_service_provider import LockdownServiceProvider

from ..errors import UserError
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from .backup import CaptureOutcome, Notify, _log_warning, capture

ProviderArg = LockdownServiceProvider | Callable[[], Awaitable[LockdownServiceProvider]]
RepoArg = str | os.PathLike | Repository


def open_repository(
    url: str | os.PathLike, *, password: str | None = None, password_file: str | None = None
) -> Repository:
    """Open a repository as the CLI does, without locking it or loading its index.

    ``url``: a path, any storage URL, or a repository name from the config file. The password:
    ``password``, else ``password_file``, else the config file's source for this repository,
    else ``IBSYNC_PASSWORD`` / ``IBSYNC_PASSWORD_FILE`` / ``IBSYNC_PASSWORD_COMMAND``, else a
    prompt on a terminal (as every command resolves it: :class:`ibsync.opening.RepoSource`)."""
    from ..opening import RepoSource

    source = RepoSource(str(url), password_file)
    # the commands' own opening, so the library gets the same downgrade checks (design.md §3)
    return source.open_unlocked((lambda: password) if password else None, password_given=bool(password))


async def backup_device_async(
    provider: ProviderArg,
    repo: RepoArg,
    *,
    password: str | None = None,
    password_file: str | None = None,
    full: bool = False,
    allow_partial: bool = False,
    progress: Progress = NULL_PROGRESS,
    notify: Notify = _log_warning,
) -> CaptureOutcome:
    """Back up a connected device into a repository; returns the new snapshot and transfer
    figures, or raises ``CaptureFailed`` (one line: why) with nothing committed.

    ``provider``: a pymobiledevice3 ``LockdownServiceProvider`` (``await create_using_usbmux()``),
    or a coroutine function returning one (created here, and closed when done).
    ``repo``: a repository path, URL or config name (opened with ``password``/``password_file``
    or the environment, as the CLI does, and locked shared for the duration), or an open
    ``Repository`` (the caller's to lock and close).
    ``full``: ask the device for a full backup (default: incremental against the last
    snapshot of this device, when there is one). ``allow_partial``: commit even if the device
    could not read some files (listed in the outcome). ``notify``: messages for the user while
    it runs (default: logged as warnings on the ``ibsync`` logger), e.g. to unlock the device.

    Local disk used: at most about ``(storage connections + 3) * pack size`` of staged packs;
    nothing of the backup itself is copied locally.
    """
    async with session_for(provider, repo, password, password_file, "backup-device") as (lockdown, repository):
        return await capture(
            lockdown, repository, full=full, allow_partial=allow_partial, progress=progress, notify=notify
        )


@asynccontextmanager
async def session_for(
    provider: ProviderArg, repo: RepoArg, password: str | None, password_file: str | None, command: str
) -> AsyncIterator[tuple[LockdownServiceProvider, Repository]]:
    """What the library entry points share: the repository opened (if given by URL or name),
    locked shared and its index loaded; the lockdown provider made (if given as a coroutine
    function); all of it released at the end, whatever happens."""
    from ..repo.lock import RepoLock

    if isinstance(repo, Repository):
        opened = False
    else:
        opened = True
        repo = await asyncio.to_thread(open_repository, repo, password=password, password_file=password_file)
    assert isinstance(repo, Repository)
    lock = None
    created: LockdownServiceProvider | None = None
    try:
        if opened:
            lock = await asyncio.to_thread(RepoLock(repo, exclusive=False, command=command).acquire)
        await asyncio.to_thread(repo.load_index)
        if not isinstance(provider, LockdownServiceProvider):
            provider = created = await provider()
        yield provider, repo
    finally:
        if created is not None:
            await _close(created)
        if lock is not None:
            lock.release()
        if opened:
            repo.close()


def run_sync(coro_fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, **options: Any) -> Any:
    """Run a library coroutine from code without an event loop (refused inside one: blocking it
    would stall the device's connections, which live in that loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn(*args, **options))
    raise UserError(
        f"{coro_fn.__name__.removesuffix('_async')}() was called inside a running event loop; "
        f"use 'await {coro_fn.__name__}(...)'"
    )


def backup_device(provider: ProviderArg, repo: RepoArg, **options) -> CaptureOutcome:
    """:func:`backup_device_async` for code without an event loop (same arguments)."""
    return run_sync(backup_device_async, provider, repo, **options)


async def _close(provider: object) -> None:
    close = getattr(provider, "close", None)
    if close is None:
        return
    with suppress(Exception):
        result = close()
        if inspect.isawaitable(result):
            await result
