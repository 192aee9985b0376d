"""Restore from the browser: a snapshot into a folder (a standard backup folder
``<folder>/<UDID>``, as ``ibsync restore SNAPSHOT FOLDER``) or onto a connected device (as
``ibsync restore --to-device``), each as a job with a progress bar."""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..errors import IbsyncError, UserError
from .auth import current_session

logger = logging.getLogger("ibsync.web")


def _find(ctx, repo_name: str, snapshot: str):
    with ctx.open_repo(repo_name) as repo:
        return repo.find_snapshot(snapshot)


async def restore_page(request: Request) -> Response:
    from .backup import present_devices

    ctx = request.app.state.ctx
    repo_name, snap_id = request.query_params.get("repo"), request.query_params.get("snapshot")
    templates = request.app.state.templates
    if not repo_name or not snap_id:
        return templates.TemplateResponse(
            request, "restore.html", {"section": "snapshots", "snap": None, "repos": ctx.repositories()}
        )
    ref = ctx.repo_ref(repo_name)
    snap = await run_in_threadpool(_find, ctx, ref.name, snap_id)
    job = ctx.jobs.get(request.query_params.get("job", "")) if request.query_params.get("job") else None
    devices = list((await present_devices(ctx)).values())
    session = current_session(request)
    return templates.TemplateResponse(
        request,
        "restore.html",
        {
            "section": "snapshots",
            "snap": snap,
            "ref": ref,
            "job": job,
            "devices": devices,
            "default_folder": str(Path.home() / "ibsync-restore"),
            "has_backup_password": f"{ref.name}/{snap.device.udid.upper()}" in session.backup_passwords,
            "error": request.query_params.get("error"),
        },
    )


async def restore_start(request: Request) -> Response:
    ctx = request.app.state.ctx
    form = await request.form()
    ref = ctx.repo_ref(str(form.get("repo", "")))
    snap_id = str(form.get("snapshot", ""))
    page = "/restore?" + urllib.parse.urlencode({"repo": ref.name, "snapshot": snap_id})
    try:
        snap = await run_in_threadpool(_find, ctx, ref.name, snap_id)
        if form.get("to") == "device":
            job = await _start_to_device(request, ctx, ref, snap, form)
        else:
            job = _start_to_folder(ctx, ref, snap, str(form.get("folder", "")), form.get("overwrite") == "on")
    except UserError as e:
        return RedirectResponse(page + "&" + urllib.parse.urlencode({"error": str(e)}), status_code=303)
    return RedirectResponse(f"{page}&job={job.id}", status_code=303)


def check_folder(text: str) -> Path:
    """The folder the standard backup folder goes into: absolute, and its parent must exist
    (a typo should not create a tree of folders somewhere)."""
    text = text.strip()
    if not text:
        raise UserError("give the folder to restore into")
    path = Path(os.path.expanduser(text))
    if not path.is_absolute():
        raise UserError(f"'{text}' is a relative path: give a full path, like {Path.home() / 'ibsync-restore'}")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} does not exist: the folder to restore into must be in an existing folder")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder")
    return path


def _start_to_folder(ctx, ref, snap, folder: str, overwrite: bool):
    from ..reader.restorer import restore_folder

    target = check_folder(folder)
    if ctx.jobs.running(kind="restore", target=str(target)) is not None:
        raise UserError(f"a restore into {target} is already running")

    def work(job, progress):
        with ctx.open_repo(ref.name) as repo:
            result = restore_folder(repo, snap, target, progress=progress, overwrite=overwrite)
        if result.failed:
            where = f"the {result.files} restored files are in {result.partial}" if result.partial else ""
            raise IbsyncError(
                f"{len(result.failed)} file(s) could not be restored (damaged or missing data, or "
                f"not writable: 'ibsync restore' names each); {where}; restoring again retries them"
            )
        return {
            "label": f"Restored {result.files} files into {result.target}",
            "path": str(result.target),
            "files": result.files,
            "bytes": result.bytes,
        }

    return ctx.jobs.run_in_thread(
        "restore",
        f"Restoring {snap.short_id} into {target}",
        work,
        subject={"repo": ref.name, "snapshot": snap.id, "target": str(target)},
    )


async def _start_to_device(request: Request, ctx, ref, snap, form):
    from .backup import present_devices

    udid = str(form.get("device", ""))
    device = (await present_devices(ctx)).get(udid.upper())
    if device is None:
        raise UserError("choose a connected device to restore onto")
    if form.get("confirm") != device.udid:
        raise UserError("confirm by ticking the box: the device's data will be replaced by the snapshot's")
    if ctx.jobs.running(udid=device.udid) is not None:
        raise UserError(f"{device.name or device.udid} is busy with another job")
    password = None
    if snap.ios_encrypted:
        key = f"{ref.name}/{snap.device.udid.upper()}"
        session = current_session(request)
        given = str(form.get("backup_password", ""))
        if given:
            session.backup_passwords[key] = given
        password = session.backup_passwords.get(key)
        if not password:
            raise UserError("this snapshot is an encrypted iOS backup: give its backup password")
    options = {
        "system": form.get("system") == "on",
        "reboot": form.get("reboot") == "on",
        "copy": form.get("copy") == "on",
        "settings": form.get("settings") == "on",
        "remove": form.get("remove") == "on",
    }
    job = ctx.jobs.start(
        "restore",
        f"Restoring {snap.short_id} onto {device.name or device.udid}",
        subject={"repo": ref.name, "snapshot": snap.id, "udid": device.udid},
    )
    task = asyncio.get_running_loop().create_task(_to_device(ctx, job, ref, snap, device, password, options))
    ctx._tasks.add(task)
    task.add_done_callback(ctx._tasks.discard)
    return job


async def _to_device(ctx, job, ref, snap, device, password, options) -> None:
    """In the server's event loop: the device's connection belongs to it."""
    from ..capture.discovery import open_lockdown
    from ..capture.restore import restore
    from .backup import borrowed_repo

    def notify(text: str) -> None:
        ctx.jobs.update(job, message=text, force=True)

    try:
        async with borrowed_repo(ctx, ref.name) as repo:
            lockdown = await open_lockdown(device, notify=notify)
            try:
                outcome = await restore(
                    lockdown, repo, snap, password=password, progress=ctx.jobs.progress(job), notify=notify, **options
                )
            finally:
                try:
                    await lockdown.close()
                except Exception:  # noqa: BLE001, S110  (a connection already gone: nothing to close)
                    pass
    except (IbsyncError, OSError) as e:
        ctx.jobs.fail(job, " ".join(str(e).split()) or e.__class__.__name__)
        return
    except Exception as e:  # a bug: on the page and in the log; the server goes on
        logger.exception("restore onto %s from the web app", device.udid)
        ctx.jobs.fail(job, f"internal error: {e!r}")
        return
    ctx.jobs.finish(
        job,
        result={
            "label": f"Restored onto {device.name or device.udid}: {outcome.files_sent} files",
            "files": outcome.files_sent,
        },
    )


ROUTES = [
    Route("/restore", restore_page, name="restore"),
    Route("/restore", restore_start, methods=["POST"], name="restore_start"),
]
