"""The snapshot browser: domains by app, folders and files (paged), search, downloads of a file
or of a folder or selection as a streamed ZIP, previews (images, text, plists) and thumbnails.

Every handler reaches the snapshot through a lease on a shared open SnapshotView
(``snapshots_http.reach_view``) and releases it when done; a streamed download releases it
after its last byte. Content is always sent as an attachment or re-encoded (images to JPEG,
text escaped into a page): nothing from a backup is served as a page of this site.
"""

from __future__ import annotations

import functools
import hashlib
import plistlib
from collections.abc import Iterable, Iterator
from itertools import groupby
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import NotFound
from ..reader.browse import Item, SnapshotView
from ..reader.ios_crypto import WrongBackupPassword
from .snapshots_http import (
    NeedPassword,
    Reached,
    as_bytes,
    base_url,
    check_path,
    int_param,
    reached,
    render,
    repo_name,
    snapshot_id,
    stat_or_404,
    state_of,
    unlock_url,
    url,
)
from .snapshots_state import Lease, StillOpening
from .thumbs import (
    MAX_IMAGE_BYTES,
    PREVIEW_SIDE,
    THUMB_SIDE,
    ImageProblem,
    is_image_name,
    to_jpeg,
)
from .zipstream import Member, member_name, stream_zip

PAGE = 200  # items of a folder per page
SEARCH_LIMIT = 200
OPENING_WAIT = 2.0  # seconds a page waits for a snapshot being opened before showing progress
MAX_QUERY = 200
TEXT_PREVIEW_BYTES = 256 << 10
PLIST_PREVIEW_BYTES = 8 << 20  # a binary plist is read whole to be rendered as XML
PLIST_TEXT_LIMIT = 512 << 10
PLIST_MAX_VALUES = 200_000
SECTION = "snapshots"


def _render(request: Request, template: str, context: dict[str, Any], status: int = 200) -> Response:
    context.setdefault("section", SECTION)
    return render(request, template, context, status)


async def _reach(request: Request, wait: float | None = None) -> tuple[str, str, Reached | Response]:
    """The snapshot's view, or the response to send instead: the password form, or (``wait``
    given, for pages) a page saying how far opening a large snapshot has got."""
    repo = repo_name(request)
    sid = snapshot_id(request)
    state_of(request)  # made on the event loop thread
    try:
        return repo, sid, await reached(request, repo, sid, wait)
    except (NeedPassword, WrongBackupPassword):  # none yet, or one that stopped working: ask
        return repo, sid, RedirectResponse(unlock_url(request, repo, sid), status_code=303)
    except StillOpening as e:
        return (
            repo,
            sid,
            _render(
                request,
                "browse_opening.html",
                {
                    "repo": repo,
                    "base": base_url(repo),
                    "done": e.done,
                    "total": e.total,
                    "percent": int(100 * e.done / e.total) if e.total else None,
                },
            ),
        )


class _Links:
    """URLs of one snapshot's pages, for templates."""

    def __init__(self, repo: str, sid: str) -> None:
        self.repo, self.sid = repo, sid

    def __call__(self, page: str, **params: Any) -> str:
        return url(self.repo, self.sid, page, **params)

    def browse(self, path: str = "", **params: Any) -> str:
        return url(self.repo, self.sid, "browse", path=path, **params)


# ---- the browser page -------------------------------------------------------------------------


def _crumbs(view: SnapshotView, path: str) -> list[tuple[str, str]]:
    """(label, path) from the top to ``path``; the domain shown by its title."""
    if not path:
        return []
    parts = path.split("/")
    titles = {d.name: d.title for d in view.domains()}
    out = [(titles.get(parts[0], parts[0]), parts[0])]
    for i in range(1, len(parts)):
        out.append((parts[i], "/".join(parts[: i + 1])))
    return out


def _browse_data(view: SnapshotView, path: str, query: str, offset: int) -> dict[str, Any]:
    if query:
        found = view.search(query, limit=SEARCH_LIMIT + 1)
        return {"mode": "search", "items": found[:SEARCH_LIMIT], "more": len(found) > SEARCH_LIMIT}
    if path == "":
        domains = view.domains()
        groups = [(g, list(ds)) for g, ds in groupby(domains, key=lambda d: d.group)]
        return {
            "mode": "top",
            "groups": groups,
            "files": sum(d.files for d in domains),
            "bytes": sum(d.bytes for d in domains),
        }
    item = stat_or_404(view, path)
    if item.kind != "dir":
        return {"mode": "file", "item": item}
    total = view.count(path)
    items = view.list(path, offset=offset, limit=PAGE)
    return {
        "mode": "folder",
        "item": item,
        "items": items,
        "total": total,
        "offset": offset,
        "images": any(i.kind == "file" and is_image_name(i.name) for i in items),
        "crumbs": _crumbs(view, path),
    }


async def browse(request: Request) -> Response:
    repo, sid, got = await _reach(request, wait=OPENING_WAIT)
    if isinstance(got, Response):
        return got
    try:
        path = check_path(request.query_params.get("path"))
        query = (request.query_params.get("q") or "").strip()
        if len(query) > MAX_QUERY or "\0" in query:
            raise HTTPException(400, "the search text is too long")
        offset = int_param(request, "offset")
        data = await run_in_threadpool(_browse_data, got.view, path, query, offset)
    finally:
        got.lease.release()
    links = _Links(repo, sid)
    if data["mode"] == "file":
        return RedirectResponse(links("preview", path=path), status_code=303)
    return _render(
        request,
        "browse.html",
        {
            "repo": repo,
            "base": base_url(repo),
            "snap": got.snap,
            "path": path,
            "q": query,
            "link": links,
            "page_size": PAGE,
            "is_image": is_image_name,
            "device_url": f"{base_url(repo)}/devices/{got.snap.device.udid}",
            **data,
        },
    )


# ---- one file -----------------------------------------------------------------------------------


def content_disposition(name: str, disposition: str = "attachment") -> str:
    """The header naming a download: an ASCII fallback and the real name per RFC 5987/6266."""
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\;' else "_" for ch in name) or "download"
    real = quote(as_bytes(name), safe="")
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{real}"


class _Releasing:
    """An iterator of a response body that releases the view's lease when it ends, fails, is
    closed, or is dropped unread (a generator never started would skip its ``finally``)."""

    def __init__(self, chunks: Iterable[bytes], lease: Lease) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._lease = lease

    def __iter__(self) -> _Releasing:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._it)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
        finally:
            self._lease.release()

    def __del__(self) -> None:
        self.close()


def _file_item(view: SnapshotView, path: str) -> Item:
    item = stat_or_404(view, path)
    if item.kind != "file":
        raise HTTPException(400, f"{item.kind}s cannot be downloaded as a file")
    return item


def _open(view: SnapshotView, item: Item) -> Iterator[bytes]:
    try:
        return view.open(item)
    except NotFound:
        raise HTTPException(404, "the backup holds no content for this file") from None


async def download(request: Request) -> Response:
    _, _, got = await _reach(request)
    if isinstance(got, Response):
        return got
    try:
        path = check_path(request.query_params.get("path"), allow_top=False)
        item = await run_in_threadpool(_file_item, got.view, path)
        chunks = await run_in_threadpool(_open, got.view, item)
    except BaseException:
        got.lease.release()
        raise
    return StreamingResponse(
        _Releasing(chunks, got.lease),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": content_disposition(item.name),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
        },
    )


def _read_capped(view: SnapshotView, item: Item, limit: int) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of a file, and whether there was more."""
    parts: list[bytes] = []
    n = 0
    chunks = _open(view, item)
    try:
        for chunk in chunks:
            parts.append(chunk)
            n += len(chunk)
            if n > limit:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    data = b"".join(parts)
    return data[:limit], n > limit


def _plist_text(data: bytes) -> str | None:
    """A binary plist as XML text (UIDs, which XML plists cannot hold, as CF$UID dicts)."""
    try:
        value = plistlib.loads(data)
    except Exception:  # not a plist after all: shown as a binary file
        return None

    budget = [PLIST_MAX_VALUES]  # shared references can make a small plist expand hugely

    def xmlable(v: Any) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError("too many values to show")
        if isinstance(v, plistlib.UID):
            return {"CF$UID": v.data}
        if isinstance(v, dict):
            return {str(k): xmlable(x) for k, x in v.items()}
        if isinstance(v, list):
            return [xmlable(x) for x in v]
        return v

    try:
        return plistlib.dumps(xmlable(value), fmt=plistlib.FMT_XML, sort_keys=False).decode("utf-8")
    except Exception:  # a value XML cannot carry (an integer beyond 64 bits, ...)
        return None


def _preview_data(view: SnapshotView, path: str) -> dict[str, Any]:
    item = stat_or_404(view, path)
    if item.kind != "file":
        return {"item": item, "kind": item.kind}
    if is_image_name(item.name):
        return {"item": item, "kind": "image"}
    head, more = _read_capped(view, item, TEXT_PREVIEW_BYTES)
    if head.startswith(b"bplist00"):
        if more and item.size <= PLIST_PREVIEW_BYTES:  # a binary plist is only readable whole
            head, more = _read_capped(view, item, PLIST_PREVIEW_BYTES)
        if not more:
            text = _plist_text(head)
            if text is not None:
                cut = len(text) > PLIST_TEXT_LIMIT
                return {"item": item, "kind": "plist", "text": text[:PLIST_TEXT_LIMIT], "cut": cut}
        return {"item": item, "kind": "binary", "reason": "a binary plist too large or damaged to show"}
    sample = head
    if b"\0" in sample[:8192]:
        return {"item": item, "kind": "binary", "reason": "not text"}
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(sample) - 4:  # not just a character cut at the limit
            return {"item": item, "kind": "binary", "reason": "not UTF-8 text"}
        text = sample[: e.start].decode("utf-8")
    return {"item": item, "kind": "text", "text": text, "cut": more}


async def preview(request: Request) -> Response:
    repo, sid, got = await _reach(request)
    if isinstance(got, Response):
        return got
    try:
        path = check_path(request.query_params.get("path"), allow_top=False)
        data = await run_in_threadpool(_preview_data, got.view, path)
        crumbs = await run_in_threadpool(_crumbs, got.view, path)
    finally:
        got.lease.release()
    if data["kind"] == "dir":
        return RedirectResponse(_Links(repo, sid).browse(path), status_code=303)
    return _render(
        request,
        "browse_preview.html",
        {
            "repo": repo,
            "base": base_url(repo),
            "snap": got.snap,
            "path": path,
            "link": _Links(repo, sid),
            "crumbs": crumbs,
            "device_url": f"{base_url(repo)}/devices/{got.snap.device.udid}",
            **data,
        },
    )


def _content_key(view: SnapshotView, item: Item) -> tuple:
    """What a thumbnail is cached by: the file's stored content (its blob ids), so one photo
    is decoded once across folders and snapshots; the row's identity when that is unknown."""
    try:
        node = view.manifest.payload(item.file_id or "")
    except Exception:  # the payload tree cannot be read: the row's identity will do
        node = None
    if node is None:
        return ("row", view.snapshot.id, item.path, item.size, item.mtime)
    h = hashlib.sha256()
    for blob in node.content:
        h.update(blob)
    return ("content", view.snapshot.ios_encrypted, h.hexdigest(), node.size)


def _jpeg(view: SnapshotView, path: str, side: int, cache: Any) -> bytes:
    item = _file_item(view, path)
    if not is_image_name(item.name):
        raise HTTPException(415, "not an image")
    if item.size > MAX_IMAGE_BYTES:
        raise HTTPException(413, "the image is too large to preview")
    key = (_content_key(view, item), side) if cache is not None else None
    if key is not None:
        got = cache.get(key)
        if got is not None:
            return got
    data, more = _read_capped(view, item, MAX_IMAGE_BYTES)
    if more:
        raise HTTPException(413, "the image is too large to preview")
    try:
        jpeg = to_jpeg(data, side)
    except ImageProblem as e:
        raise HTTPException(415, str(e)) from None
    if key is not None:
        cache.put(key, jpeg)
    return jpeg


async def _image(request: Request, side: int, cached: bool) -> Response:
    _, _, got = await _reach(request)
    if isinstance(got, Response):
        return got
    try:
        path = check_path(request.query_params.get("path"), allow_top=False)
        cache = state_of(request).thumbs if cached else None
        jpeg = await run_in_threadpool(_jpeg, got.view, path, side, cache)
    finally:
        got.lease.release()
    return Response(
        jpeg,
        media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


async def thumb(request: Request) -> Response:
    return await _image(request, THUMB_SIDE, cached=True)


async def image(request: Request) -> Response:
    return await _image(request, PREVIEW_SIDE, cached=False)


# ---- ZIP of a folder or a selection -------------------------------------------------------------


def _selection(paths: list[str]) -> list[str]:
    """The selected paths without duplicates and without those inside another selected folder
    (walked with it), so that each file is in the archive once and no path set is held."""
    chosen = sorted(set(paths))
    if "" in chosen:
        return [""]
    out: list[str] = []
    for p in chosen:  # a selection is one page of a folder (PAGE items): quadratic is fine
        if not any(p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def _zip_plan(view: SnapshotView, paths: list[str]) -> list[Item]:
    """The selected items, each checked to exist before the first byte is sent."""
    return [stat_or_404(view, p) for p in paths]


def _members(view: SnapshotView, tops: list[Item]) -> Iterator[Member]:
    for top in tops:
        for item in view.walk(top.path):
            if item.kind != "file":
                continue  # symlinks: an archive entry for one would need the extractor's trust
            name = member_name(item.path)
            if name is None:
                continue
            yield Member(name, item.size, item.mtime, functools.partial(_open, view, item))


def _zip_name(snap_short: str, tops: list[Item]) -> str:
    if len(tops) == 1:
        top = tops[0]
        return f"{top.name or 'snapshot-' + snap_short}.zip"
    return f"snapshot-{snap_short}-selection.zip"


async def download_zip(request: Request) -> Response:
    """GET ?path=P (a folder, a file, or "" for the whole snapshot) or POST path=...&path=...
    (a selection): a ZIP sent as it is made, chunked, without a Content-Length."""
    if request.method == "POST":
        form = await request.form()
        raw = [v for v in form.getlist("path") if isinstance(v, str)]
        if not raw:
            raise HTTPException(400, "select files or folders first")
    else:
        raw = request.query_params.getlist("path") or [""]
    paths = _selection([check_path(p) for p in raw])
    _, _, got = await _reach(request)
    if isinstance(got, Response):
        return got
    try:
        tops = await run_in_threadpool(_zip_plan, got.view, paths)
    except BaseException:
        got.lease.release()
        raise
    body = stream_zip(_members(got.view, tops))
    return StreamingResponse(
        _Releasing(body, got.lease),
        media_type="application/zip",
        headers={
            "Content-Disposition": content_disposition(_zip_name(got.snap.short_id, tops)),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
        },
    )


ROUTES = [
    Route("/repositories/{repo:path}/snapshots/{id}/browse", browse, name="snapshot_browse"),
    Route("/repositories/{repo:path}/snapshots/{id}/file", download, name="snapshot_file"),
    Route("/repositories/{repo:path}/snapshots/{id}/preview", preview, name="snapshot_preview"),
    Route("/repositories/{repo:path}/snapshots/{id}/image", image, name="snapshot_image"),
    Route("/repositories/{repo:path}/snapshots/{id}/thumb", thumb, name="snapshot_thumb"),
    Route("/repositories/{repo:path}/snapshots/{id}/zip", download_zip, methods=["GET", "POST"], name="snapshot_zip"),
]
