"""Checking a snapshot page's parameters and reaching its snapshot: the repository named, the
snapshot id, a path inside the snapshot, and the open SnapshotView (asking for the iOS backup
password of an encrypted backup when the session has none).

Every parameter is the user's (or another site's) words: a repository must be one the app
lists, an id 64 hex digits, a path ``Domain/relative/path`` made of real names only (no
empty, ``.`` or ``..`` component, no NUL, not absolute). Paths are only ever looked up in the
snapshot's index, never joined to a local path; refusing odd ones up front is defence in depth
and gives a clear 400 instead of a confusing 404.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ..errors import NotFound
from ..model import Snapshot
from ..reader.browse import Item, SnapshotView
from ..reader.manifest_cache import ManifestCache
from .snapshots_state import Lease, PagesState, pages_state, password_digest

SNAPSHOT_ID = re.compile(r"[0-9a-f]{64}")
UDID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,99}")
MAX_PATH = 4096
MAX_OFFSET = 1 << 31


def ctx_of(request: Request) -> Any:
    return request.app.state.ctx


def state_of(request: Request) -> PagesState:
    return pages_state(request.app)


def repo_name(request: Request) -> str:
    """The repository of the URL, which must be one the app lists (else 404)."""
    name = request.path_params["repo"]
    names = {r.name for r in ctx_of(request).repositories()}
    if name not in names:
        raise HTTPException(404, "no such repository")
    return name


def snapshot_id(request: Request) -> str:
    sid = request.path_params["id"]
    if not SNAPSHOT_ID.fullmatch(sid):
        raise HTTPException(400, "a snapshot id is 64 hexadecimal digits")
    return sid


def udid_param(request: Request) -> str:
    udid = request.path_params["udid"]
    if not UDID.fullmatch(udid):
        raise HTTPException(400, "malformed device id")
    return udid


def check_path(text: str | None, *, allow_top: bool = True) -> str:
    """A path inside a snapshot: "" (the top) or ``Domain/relative/path``; 400 for anything
    that is not made of real names."""
    path = text or ""
    if path == "":
        if not allow_top:
            raise HTTPException(400, "a path is needed")
        return ""
    if len(path) > MAX_PATH:
        raise HTTPException(400, "the path is too long")
    if path.startswith("/") or "\0" in path:
        raise HTTPException(400, "a path inside the snapshot is Domain/relative/path")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise HTTPException(400, "a path inside the snapshot has no empty, '.' or '..' part")
    return path


def int_param(request: Request, name: str, default: int = 0, *, high: int = MAX_OFFSET) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 12 or int(raw) > high:
        raise HTTPException(400, f"'{name}' must be a number from 0 to {high}")
    return int(raw)


def base_url(repo: str, sid: str | None = None) -> str:
    """The URL of a repository's pages (its name escaped as one path segment, '/' kept so
    route matching sees what a name with slashes spells)."""
    out = "/repositories/" + quote(repo, safe="/")
    return out + f"/snapshots/{sid}" if sid else out


def url(repo: str, sid: str, page: str, **params: Any) -> str:
    query = urlencode(
        [(k, as_bytes(v) if isinstance(v, str) else v) for k, v in params.items() if v not in (None, "")], doseq=True
    )
    return f"{base_url(repo, sid)}/{page}" + (f"?{query}" if query else "")


def as_bytes(text: str) -> bytes:
    """UTF-8, also for a name that holds lone surrogates (a row that was not UTF-8, or a
    snapshot's JSON escape): links and headers must not fail on the backup's odd names."""
    return text.encode("utf-8", "surrogatepass")


def render(request: Request, template: str, context: dict[str, Any], status: int = 200) -> Response:
    """A page, encoded so that text with lone surrogates (see as_bytes) shows as '?' rather
    than failing the whole page."""
    context.setdefault("section", "snapshots")
    context.setdefault("request", request)
    html = request.app.state.templates.get_template(template).render(context)
    return HTMLResponse(html.encode("utf-8", "replace"), status_code=status)


# ---- reaching a snapshot ---------------------------------------------------------------------


class NeedPassword(Exception):
    """An encrypted iOS backup and no password in this session: the page redirects to the form."""


def session_of(request: Request) -> Any:
    from .auth import current_session

    return current_session(request)


def password_key(snap: Snapshot) -> str:
    """What the session's iOS backup passwords are keyed by: the device's UDID."""
    return snap.device.udid.upper()


def load_snapshot(ctx: Any, state: PagesState, repo: str, sid: str) -> Snapshot:
    """The snapshot (from the catalog, else read alone); 404 when the repository has none such.
    Runs in a worker thread."""

    def load() -> Snapshot:
        with ctx.open_repo(repo, lock="none", load_index=False) as r:
            return r.load_snapshot(sid)

    try:
        return state.catalog.snapshot(repo, sid, load)
    except NotFound:
        raise HTTPException(404, "no such snapshot") from None


@dataclass
class Reached:
    snap: Snapshot
    lease: Lease

    @property
    def view(self) -> SnapshotView:
        return self.lease.view


def reach_view(ctx: Any, state: PagesState, session: Any, repo: str, sid: str, wait: float | None = None) -> Reached:
    """The snapshot and a lease on its open view (release it!). Runs in a worker thread.
    NeedPassword when it is an encrypted iOS backup and the session has no password; a wrong
    one stored in the session raises WrongBackupPassword and is forgotten."""
    from ..reader.ios_crypto import WrongBackupPassword

    snap = load_snapshot(ctx, state, repo, sid)
    keyring = None
    digest = ""
    if snap.ios_encrypted:
        key = password_key(snap)
        password = session.backup_passwords.get(key)
        if password is None:
            raise NeedPassword(key)
        digest = password_digest(password)
        keyring = session.keyring(key)

    def opener(stack: ExitStack, progress: Callable[[int, int], None]) -> SnapshotView:
        r = stack.enter_context(ctx.open_repo(repo, lock="shared"))
        view = stack.enter_context(SnapshotView(r, snap, keyring, cache=ManifestCache.for_repository(r)))
        view.prepare(progress)  # here, once: requests waiting for this view wait for the index too
        return view

    # a decrypted view is shared only by sessions that gave the same password
    try:
        lease = state.views.acquire((repo, sid, digest), opener, wait=wait)
    except WrongBackupPassword:
        forget_password(session, password_key(snap))
        raise
    return Reached(snap, lease)


def forget_password(session: Any, key: str) -> None:
    session.backup_passwords.pop(key, None)


async def reached(request: Request, repo: str, sid: str, wait: float | None = None) -> Reached:
    """``reach_view`` from a handler (in a worker thread)."""
    ctx, state, session = ctx_of(request), state_of(request), session_of(request)
    return await run_in_threadpool(reach_view, ctx, state, session, repo, sid, wait)


def unlock_url(request: Request, repo: str, sid: str) -> str:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return url(repo, sid, "unlock", next=here)


def stat_or_404(view: SnapshotView, path: str) -> Item:
    item = view.stat(path)
    if item is None:
        raise HTTPException(404, "the snapshot has nothing at this path")
    return item


def in_thread(fn: Callable, *args: Any) -> Any:
    return run_in_threadpool(fn, *args)
