"""The Starlette application: routes of every page, the static assets, the login guard."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..errors import IbsyncError
from . import formatting
from .auth import (
    Auth,
    AuthMiddleware,
    SecurityHeaders,
    install_template_globals,
    login_routes,
)
from .context import WebContext

HERE = Path(__file__).parent
logger = logging.getLogger("ibsync.web")

#: page modules, each with a ROUTES list; the snapshot pages are a colleague's module, mounted
#: when present
PAGE_MODULES = ["events", "dashboard", "repositories", "restore", "snapshots", "fallbacks"]


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    install_template_globals(env)
    formatting.install(env)
    return Jinja2Templates(env=env)


def page_routes() -> list[BaseRoute]:
    routes: list[BaseRoute] = []
    for name in PAGE_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise  # a module that exists but fails to import is a bug, not an absence
            continue
        routes.extend(module.ROUTES)
    return routes


def create_app(ctx: WebContext) -> Starlette:
    auth = ctx.auth if ctx.auth is not None else Auth()
    ctx.auth = auth
    routes = [
        *login_routes(auth),
        *page_routes(),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders), Middleware(AuthMiddleware, auth=auth)],
        exception_handlers={IbsyncError: _user_error},
        lifespan=_lifespan,
    )
    app.state.ctx = ctx
    app.state.auth = auth
    app.state.templates = make_templates()
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    # what the pages keep open (snapshot views hold a shared lock) is let go with the server
    try:
        snapshots = importlib.import_module(f"{__package__}.snapshots")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.snapshots":
            raise
    else:
        close = getattr(snapshots, "close_views", None)
        if close is not None:
            close(app)
    app.state.ctx.close()


async def _user_error(request: Request, exc: Exception) -> Response:
    """Bad input or an unreachable repository: one line on a page, as the CLI prints it."""
    status = 400 if exc.__class__.__name__ == "UserError" else 500
    if "text/html" not in request.headers.get("accept", ""):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": str(exc)}, status_code=status)
    return request.app.state.templates.TemplateResponse(
        request,
        "error.html",
        {"title": "Error", "message": str(exc), "back": request.headers.get("referer")},
        status_code=status,
    )
