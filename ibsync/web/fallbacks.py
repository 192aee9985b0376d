"""Routes mounted after every page module, so a page module defining the same path wins:
``/snapshots`` (the navigation's entry) lists the repositories' device pages."""

from __future__ import annotations

from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route


async def snapshots_index(request: Request) -> Response:
    ctx = request.app.state.ctx
    repos = ctx.repositories()
    if len(repos) == 1:
        return RedirectResponse(f"/repositories/{quote(repos[0].name, safe='')}/devices", status_code=303)
    return request.app.state.templates.TemplateResponse(
        request, "pick_repository.html", {"section": "snapshots", "repos": repos}
    )


ROUTES = [Route("/snapshots", snapshots_index, name="snapshots_index")]
