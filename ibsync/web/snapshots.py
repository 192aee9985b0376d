"""The snapshot pages: each repository's devices, a device's snapshots (paged), the diff of two
snapshots, the iOS backup password form; the browser itself is in ``snapshots_browse``.

``ROUTES`` is what ``create_app`` mounts; ``close_views(app)`` closes the snapshot views kept
open between requests (call it when the app shuts down).
"""

from __future__ import annotations

import plistlib
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..model import Snapshot
from ..reader.apps import GROUPS, build_apps, describe
from . import snapshots_browse
from .snapshots_http import (
    SNAPSHOT_ID,
    NeedPassword,
    base_url,
    check_path,
    ctx_of,
    int_param,
    load_snapshot,
    password_key,
    reach_view,
    render,
    repo_name,
    session_of,
    snapshot_id,
    state_of,
    udid_param,
    unlock_url,
    url,
)
from .snapshots_state import password_digest

SNAPSHOTS_PER_PAGE = 50
DIFF_FILES_SHOWN = 500  # files listed on the diff's summary page (a domain's own page lists more)
DIFF_DOMAIN_FILES = 5000
SECTION = "snapshots"


def close_views(app: Any) -> None:
    """Close the snapshot views kept open between requests (each holds an open repository and
    its shared lock). Idempotent; for the app's shutdown."""
    state = getattr(app.state, "snapshot_pages", None)
    if state is not None:
        state.views.close_all()


def _render(request: Request, template: str, context: dict[str, Any], status: int = 200) -> Response:
    context.setdefault("section", SECTION)
    return render(request, template, context, status)


# ---- devices and their snapshots --------------------------------------------------------------


@dataclass
class Device:
    udid: str
    name: str
    product_type: str
    ios_version: str
    snapshots: list[Snapshot] = field(default_factory=list)

    @property
    def latest(self) -> Snapshot:
        return self.snapshots[-1]


def _devices(snaps: list[Snapshot]) -> list[Device]:
    """Snapshots by device (UDIDs in any case are one device), each oldest first; the device's
    name and iOS version as its latest snapshot gives them."""
    by_udid: dict[str, Device] = {}
    for s in snaps:
        d = by_udid.get(s.device.udid.upper())
        if d is None:
            d = by_udid[s.device.udid.upper()] = Device(s.device.udid, "", "", "")
        d.snapshots.append(s)
        d.name, d.product_type, d.ios_version = s.device.name, s.device.product_type, s.device.ios_version
    return sorted(by_udid.values(), key=lambda d: (d.name.casefold(), d.udid))


def _list_snapshots(request: Request, repo: str) -> list[Snapshot]:
    ctx, state = ctx_of(request), state_of(request)
    with ctx.open_repo(repo, lock="none", load_index=False) as r:
        return state.catalog.snapshots(repo, r)


async def all_devices(request: Request) -> Response:
    """/snapshots: every repository with its devices."""
    ctx = ctx_of(request)
    state_of(request)  # made here, on the event loop thread
    repos = []
    for ref in ctx.repositories():
        try:
            snaps = await run_in_threadpool(_list_snapshots, request, ref.name)
            repos.append({"name": ref.name, "base": base_url(ref.name), "devices": _devices(snaps), "error": None})
        except Exception as e:  # one unreachable repository must not hide the others
            repos.append(
                {"name": ref.name, "base": base_url(ref.name), "devices": [], "error": str(e) or e.__class__.__name__}
            )
    return _render(request, "snapshots_index.html", {"repos": repos})


async def repo_devices(request: Request) -> Response:
    repo = repo_name(request)
    state_of(request)
    snaps = await run_in_threadpool(_list_snapshots, request, repo)
    return _render(
        request, "snapshots_devices.html", {"repo": repo, "base": base_url(repo), "devices": _devices(snaps)}
    )


async def device_snapshots(request: Request) -> Response:
    repo = repo_name(request)
    udid = udid_param(request)
    page = max(int_param(request, "page", 1, high=1 << 20), 1)
    state_of(request)
    snaps = await run_in_threadpool(_list_snapshots, request, repo)
    mine = [s for s in snaps if s.device.udid.upper() == udid.upper()]
    if not mine:
        raise HTTPException(404, "no snapshot of this device in this repository")
    newest_first = mine[::-1]
    pages = (len(newest_first) + SNAPSHOTS_PER_PAGE - 1) // SNAPSHOTS_PER_PAGE
    page = min(page, pages)
    start = (page - 1) * SNAPSHOTS_PER_PAGE
    rows = []
    for i in range(start, min(start + SNAPSHOTS_PER_PAGE, len(newest_first))):
        s = newest_first[i]
        previous = newest_first[i + 1] if i + 1 < len(newest_first) else None
        rows.append(
            {
                "snap": s,
                "browse": url(repo, s.id, "browse"),
                "diff": url(repo, s.id, "diff", **{"from": previous.id}) if previous else None,
                "restore": "/restore?" + _query(repo=repo, snapshot=s.id),
            }
        )
    device = _devices(mine)[0]
    return _render(
        request,
        "snapshots.html",
        {
            "repo": repo,
            "base": base_url(repo),
            "device": device,
            "rows": rows,
            "page": page,
            "pages": pages,
            "total": len(mine),
            "page_url": lambda n: f"{base_url(repo)}/devices/{udid}?page={n}",
        },
    )


def _query(**params: str) -> str:
    from urllib.parse import urlencode

    return urlencode(params)


# ---- diff -------------------------------------------------------------------------------------


@dataclass
class DomainDiff:
    name: str
    title: str
    group: str
    added: int = 0
    added_bytes: int = 0
    removed: int = 0
    removed_bytes: int = 0
    changed: int = 0
    changed_bytes: int = 0


@dataclass
class DiffResult:
    domains: list[DomainDiff]
    changes: list[Any]  # history.Change, by domain and path
    unreadable: int


def _plists(repo: Any, snap: Snapshot) -> tuple[dict, dict]:
    """Manifest.plist and Info.plist of a snapshot (empty when missing or unreadable): where
    the app names come from."""
    from ..reader.files import read_file_bytes

    found: dict[str, dict] = {}
    for node in repo.load_tree(snap.tree):
        if node.name in ("Manifest.plist", "Info.plist") and node.type == "file" and node.size < 64 << 20:
            try:
                got = plistlib.loads(read_file_bytes(repo, node))
            except Exception:  # the backup's own plist: unreadable costs only the app names
                got = {}
            found[node.name] = got if isinstance(got, dict) else {}
    return found.get("Manifest.plist", {}), found.get("Info.plist", {})


def _compute_diff(ctx: Any, repo_name_: str, a: Snapshot, b: Snapshot, keyring: Any) -> DiffResult:
    from ..reader.history import diff_snapshots
    from ..reader.manifest_cache import ManifestCache

    with ctx.open_repo(repo_name_, lock="shared") as repo:
        changes, bad = diff_snapshots(repo, a, b, keyring, ManifestCache.for_repository(repo))
        manifest_plist, info_plist = _plists(repo, b)
    names = sorted({c.domain for c in changes})
    apps = build_apps(manifest_plist, info_plist, names)
    by_domain = {d: app for app in apps.values() for d in app.domains}
    per: dict[str, DomainDiff] = {}
    for c in changes:
        d = per.get(c.domain)
        if d is None:
            title, group = describe(c.domain, by_domain.get(c.domain))
            d = per[c.domain] = DomainDiff(c.domain, title, group)
        setattr(d, c.kind, getattr(d, c.kind) + 1)
        setattr(d, f"{c.kind}_bytes", getattr(d, f"{c.kind}_bytes") + c.size)
    domains = sorted(
        per.values(),
        key=lambda d: (GROUPS.index(d.group) if d.group in GROUPS else len(GROUPS), d.title.casefold(), d.name),
    )
    return DiffResult(domains, changes, len(bad))


def _previous_of(snaps: list[Snapshot], b: Snapshot) -> Snapshot | None:
    mine = [s for s in snaps if s.device.udid.upper() == b.device.udid.upper()]
    for i, s in enumerate(mine):
        if s.id == b.id:
            return mine[i - 1] if i > 0 else None
    return None


async def diff(request: Request) -> Response:
    """Files added, removed and changed from snapshot ``from`` (default: the device's previous
    one) to this one, by app and domain."""
    repo = repo_name(request)
    sid = snapshot_id(request)
    from_id = request.query_params.get("from") or ""
    domain = request.query_params.get("domain") or ""
    if domain:
        domain = check_path(domain)
        if "/" in domain:
            raise HTTPException(400, "'domain' is a domain name")
    ctx, state, session = ctx_of(request), state_of(request), session_of(request)
    b = await run_in_threadpool(load_snapshot, ctx, state, repo, sid)
    a: Snapshot | None
    if from_id:
        if not SNAPSHOT_ID.fullmatch(from_id):
            raise HTTPException(400, "'from' is a snapshot id (64 hexadecimal digits)")
        a = await run_in_threadpool(load_snapshot, ctx, state, repo, from_id)
    else:
        snaps = await run_in_threadpool(_list_snapshots, request, repo)
        a = _previous_of(snaps, b)
        if a is None:
            return _render(
                request,
                "diff.html",
                {
                    "repo": repo,
                    "base": base_url(repo),
                    "a": None,
                    "b": b,
                    "result": None,
                    "domain": "",
                    "link": _linker(repo),
                },
            )
    keyring = None
    digest = ""
    for s in (b, a):
        if s.ios_encrypted:
            key = password_key(s)
            if key not in session.backup_passwords:
                return RedirectResponse(unlock_url(request, repo, s.id), status_code=303)
            digest += password_digest(session.backup_passwords[key])
            keyring = keyring or session.keyring(key)
    cache_key = (repo, a.id, b.id, digest)
    result = state.diffs.get(cache_key)
    if result is None:
        result = await run_in_threadpool(_compute_diff, ctx, repo, a, b, keyring)
        state.diffs.put(cache_key, result)
    if domain:
        files = [c for c in result.changes if c.domain == domain]
        shown = files[:DIFF_DOMAIN_FILES]
    else:
        files = result.changes
        shown = files[:DIFF_FILES_SHOWN]
    groups = [(g, list(ds)) for g, ds in groupby(result.domains, key=lambda d: d.group)]
    totals = DomainDiff("total", "Total", "")
    for d in result.domains:
        for k in ("added", "added_bytes", "removed", "removed_bytes", "changed", "changed_bytes"):
            setattr(totals, k, getattr(totals, k) + getattr(d, k))
    return _render(
        request,
        "diff.html",
        {
            "repo": repo,
            "base": base_url(repo),
            "a": a,
            "b": b,
            "result": result,
            "groups": groups,
            "totals": totals,
            "files": shown,
            "more": len(files) - len(shown),
            "domain": domain,
            "link": _linker(repo),
            "domain_url": lambda name: url(repo, b.id, "diff", **{"from": a.id, "domain": name}),
            "all_url": url(repo, b.id, "diff", **{"from": a.id}),
        },
    )


def _linker(repo: str):
    def link(sid: str, page: str, **params: Any) -> str:
        return url(repo, sid, page, **params)

    return link


# ---- the iOS backup password ------------------------------------------------------------------


def _safe_next(target: str | None, fallback: str) -> str:
    """Where to go after the form: a path on this site only (never another origin)."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(ch) < 32 for ch in target)
    ):
        return fallback
    return target


async def unlock(request: Request) -> Response:
    """The iOS backup password form of an encrypted snapshot (GET), and its check (POST): a
    password that unlocks the backup is remembered for the session; a wrong one is refused."""
    from ..reader.ios_crypto import WrongBackupPassword

    repo = repo_name(request)
    sid = snapshot_id(request)
    ctx, state, session = ctx_of(request), state_of(request), session_of(request)
    snap = await run_in_threadpool(load_snapshot, ctx, state, repo, sid)
    fallback = url(repo, sid, "browse")
    if request.method == "GET":
        target = _safe_next(request.query_params.get("next"), fallback)
        if not snap.ios_encrypted:
            return RedirectResponse(target, status_code=303)
        return _render(
            request,
            "snapshots_unlock.html",
            {"repo": repo, "base": base_url(repo), "snap": snap, "next": target, "message": None},
        )
    form = await request.form()
    target = _safe_next(str(form.get("next") or ""), fallback)
    password = form.get("password")
    if not snap.ios_encrypted:
        return RedirectResponse(target, status_code=303)
    if not isinstance(password, str) or not password:
        return _render(
            request,
            "snapshots_unlock.html",
            {"repo": repo, "base": base_url(repo), "snap": snap, "next": target, "message": "Type the password."},
            400,
        )
    key = password_key(snap)
    session.set_backup_password(key, password)
    try:
        reached = await run_in_threadpool(reach_view, ctx, state, session, repo, sid)
    except WrongBackupPassword:
        return _render(
            request,
            "snapshots_unlock.html",
            {
                "repo": repo,
                "base": base_url(repo),
                "snap": snap,
                "next": target,
                "message": "Wrong iOS backup password: this is not the password of this backup.",
            },
            403,
        )
    except NeedPassword:  # pragma: no cover - set just above
        return RedirectResponse(unlock_url(request, repo, sid), status_code=303)
    reached.lease.release()
    return RedirectResponse(target, status_code=303)


ROUTES = [
    Route("/snapshots", all_devices, name="snapshots"),
    Route("/repositories/{repo:path}/devices", repo_devices, name="repo_devices"),
    Route("/repositories/{repo:path}/devices/{udid}", device_snapshots, name="device_snapshots"),
    Route("/repositories/{repo:path}/snapshots/{id}/diff", diff, name="snapshot_diff"),
    Route("/repositories/{repo:path}/snapshots/{id}/unlock", unlock, methods=["GET", "POST"], name="snapshot_unlock"),
    *snapshots_browse.ROUTES,
]
