"""Who may use the web app: the person holding the login link the server printed (or, on a
non-loopback address, knowing the configured password), in the browser they opened it in.

- A one-time token in the printed URL (``/login?token=...``) is exchanged at the first visit
  for a session cookie (HttpOnly, SameSite=Strict, Secure under TLS); a used token is refused.
  With ``ui-password`` set, ``/login`` also asks for the password.
- Sessions live in memory: a restart logs everybody out.
- Every page, API and asset needs the session (except the login page and its stylesheet).
- Every state-changing request (anything but GET/HEAD/OPTIONS) needs the session's CSRF token
  (form field ``csrf`` or header ``X-CSRF-Token``) and a same-origin ``Origin`` (or, without
  one, ``Sec-Fetch-Site: same-origin``).
- The Host header must name the loopback address the server is bound to (a DNS-rebinding page
  would send its own host name); on a non-loopback address any host name is accepted and the
  password is the guard.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
#: a session unused this long is dropped
SESSION_IDLE = 12 * 3600
#: form bodies read to find the CSRF field (forms here are small; uploads do not exist)
MAX_FORM_BODY = 1 << 20
#: wrong passwords allowed before /login pauses
FAILED_LOGINS = 5
LOCKOUT = 60.0
#: paths anyone may fetch: the login page and what it needs to look right
PUBLIC_PATHS = {"/login", "/static/app.css", "/favicon.ico"}


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


class NeedBackupPassword(Exception):
    """An encrypted iOS backup was opened in a session that has no password for it yet: the
    page asks for it (once per session) and tries again."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the iOS backup password of {key} is needed")
        self.key = key


@dataclass
class WebSession:
    id: str
    csrf: str
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    #: iOS backup passwords given in this session, by whatever key the pages use (a device UDID)
    backup_passwords: dict[str, str] = field(default_factory=dict)
    _keyrings: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def keyring(self, key: str):
        """A BackupKeyring (ibsync.reader.ios_crypto) for encrypted backups of ``key`` (a UDID):
        keybags stay unlocked for the session. Raises NeedBackupPassword when it must unlock one
        and no password was given yet."""
        from ..reader.ios_crypto import BackupKeyring

        with self._lock:
            ring = self._keyrings.get(key)
            if ring is None:

                def password() -> str:
                    pw = self.backup_passwords.get(key)
                    if pw is None:
                        raise NeedBackupPassword(key)
                    return pw

                ring = self._keyrings[key] = BackupKeyring(password)
            return ring

    def set_backup_password(self, key: str, password: str) -> None:
        """Remember a password (a wrong one shows as WrongBackupPassword from the keyring)."""
        with self._lock:
            self.backup_passwords[key] = password
            self._keyrings.pop(key, None)  # a ring that failed keeps its first password


@dataclass
class Auth:
    """The login settings of one server and its sessions."""

    address: str = "127.0.0.1"
    port: int = 8765
    tls: bool = False
    password: str | None = None  # ``ui-password``: required off loopback
    token: str | None = field(default_factory=lambda: secrets.token_urlsafe(24))
    sessions: dict[str, WebSession] = field(default_factory=dict)
    #: called with a fresh login URL when the token has been used (the agent keeps one ready)
    on_new_token: Callable[[str], None] | None = None
    _failed: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def cookie_name(self) -> str:
        # cookies do not tell ports apart: the agent and `ibsync ui` on one host keep their own
        return f"ibsync_session_{self.port}"

    def base_url(self) -> str:
        host = self.address
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if host != "::" else "[::1]"
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    def login_url(self) -> str:
        return f"{self.base_url()}/login?token={self.token}" if self.token else f"{self.base_url()}/login"

    # ---- checks ---------------------------------------------------------------------------------

    def host_allowed(self, host: str | None) -> bool:
        if not is_loopback(self.address):
            return True  # any name the network gives this machine; the password guards it
        if not host:
            return False
        allowed = {f"{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]")}
        if self.address not in ("127.0.0.1", "localhost", "::1"):
            allowed.add(f"{self.address}:{self.port}")
        return host.lower() in allowed

    def take_token(self, token: str) -> bool:
        """True once for the valid token; it is then used up (and a new one made if the server
        wants one ready: the agent writes it where the user can find it)."""
        with self._lock:
            if not self.token or not hmac.compare_digest(token.encode(), self.token.encode()):
                return False
            self.token = secrets.token_urlsafe(24) if self.on_new_token is not None else None
            new_url = self.login_url() if self.token else None
        if new_url and self.on_new_token is not None:
            self.on_new_token(new_url)
        return True

    def check_password(self, password: str) -> bool | None:
        """True/False; None while locked out after too many wrong passwords."""
        now = time.time()
        with self._lock:
            self._failed = [t for t in self._failed if now - t < LOCKOUT]
            if len(self._failed) >= FAILED_LOGINS:
                return None
            ok = self.password is not None and hmac.compare_digest(password.encode(), self.password.encode())
            if not ok:
                self._failed.append(now)
            return ok

    def new_session(self) -> WebSession:
        session = WebSession(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32))
        with self._lock:
            self._expire()
            self.sessions[session.id] = session
        return session

    def session_of(self, request_cookies: dict[str, str]) -> WebSession | None:
        sid = request_cookies.get(self.cookie_name)
        if not sid:
            return None
        with self._lock:
            session = self.sessions.get(sid)
            if session is None:
                return None
            now = time.time()
            if now - session.last_seen > SESSION_IDLE:
                del self.sessions[sid]
                return None
            session.last_seen = now
            return session

    def end_session(self, session: WebSession) -> None:
        with self._lock:
            self.sessions.pop(session.id, None)

    def _expire(self) -> None:
        now = time.time()
        for sid in [s for s, v in self.sessions.items() if now - v.last_seen > SESSION_IDLE]:
            del self.sessions[sid]

    def set_cookie(self, response: Response, session: WebSession) -> None:
        response.set_cookie(self.cookie_name, session.id, httponly=True, samesite="strict", secure=self.tls, path="/")

    def same_origin(self, request: Request) -> bool:
        """The request comes from a page of this server: its Origin is ours (or, when a browser
        sends none, Sec-Fetch-Site says same-origin). A client sending neither is refused."""
        origin = request.headers.get("origin")
        if origin is not None:
            host = request.headers.get("host", "")
            return origin.lower() == f"{self.scheme}://{host}".lower()
        return request.headers.get("sec-fetch-site") == "same-origin"


def current_session(request: Request) -> WebSession:
    """The session of a request the middleware let through."""
    return request.scope["ibsync.session"]


# ---- the middleware -----------------------------------------------------------------------------


class AuthMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware): streamed responses (ZIP downloads, server-sent
    events) pass through untouched."""

    def __init__(self, app, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not self.auth.host_allowed(request.headers.get("host")):
            await PlainTextResponse("unexpected Host header\n", status_code=421)(scope, receive, send)
            return
        if scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        session = self.auth.session_of(request.cookies)
        if session is None:
            await _refuse_no_session(request)(scope, receive, send)
            return
        if request.method not in SAFE_METHODS:
            if not self.auth.same_origin(request):
                await PlainTextResponse("cross-site request refused\n", status_code=403)(scope, receive, send)
                return
            token = request.headers.get("x-csrf-token")
            if token is None:
                body, receive = await _buffer_body(receive)
                if body is None:
                    await PlainTextResponse("request body too large\n", status_code=413)(scope, receive, send)
                    return
                token = await _form_field(scope, body, "csrf")
            if not token or not hmac.compare_digest(token.encode(), session.csrf.encode()):
                await PlainTextResponse("missing or wrong CSRF token: reload the page\n", status_code=403)(
                    scope, receive, send
                )
                return
        scope["ibsync.session"] = session
        await self.app(scope, receive, send)


#: on every response: no framing by other sites (clickjacking a button), no MIME sniffing, no Referer
#: to other sites (the login URL carries its token; "no-referrer" would make Chromium send "Origin: null")
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeaders:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _refuse_no_session(request: Request) -> Response:
    wants_page = request.method == "GET" and "text/html" in request.headers.get("accept", "")
    if wants_page:
        return RedirectResponse("/login", status_code=303)
    return PlainTextResponse("log in first: open the login link ibsync printed\n", status_code=401)


async def _buffer_body(receive) -> tuple[bytes | None, Any]:
    """Read the whole (small) body and hand the app a receive that replays it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BODY:
            return None, receive
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _form_field(scope, body: bytes, name: str) -> str | None:
    content_type = Request(scope).headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        values = parse_qs(body.decode("latin-1"), keep_blank_values=True).get(name)
        return values[0] if values else None
    if content_type.startswith("multipart/form-data"):

        async def once():
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(scope, receive=once).form()
        value = form.get(name)
        return value if isinstance(value, str) else None
    return None


# ---- Jinja globals ------------------------------------------------------------------------------


def install_template_globals(env) -> None:
    import jinja2

    @jinja2.pass_context
    def csrf_token(context) -> str:
        request = context.get("request")
        session = request.scope.get("ibsync.session") if request is not None else None
        return session.csrf if session is not None else ""

    @jinja2.pass_context
    def csrf_input(context) -> Markup:
        return Markup('<input type="hidden" name="csrf" value="%s">') % escape(csrf_token(context))

    env.globals["csrf_token"] = csrf_token
    env.globals["csrf_input"] = csrf_input


# ---- /login and /logout ---------------------------------------------------------------------------


def login_routes(auth: Auth) -> list[Route]:
    async def login(request: Request) -> Response:
        templates = request.app.state.templates
        if request.method == "POST":
            if not auth.same_origin(request):
                return PlainTextResponse("cross-site request refused\n", status_code=403)
            form = await request.form()
            if auth.password is None:
                return _login_page(templates, request, "Open the login link ibsync printed.", 400)
            ok = auth.check_password(str(form.get("password", "")))
            if ok is None:
                return _login_page(templates, request, "Too many wrong passwords: wait a minute.", 429)
            if not ok:
                await asyncio.sleep(1.0)  # guessing costs time
                return _login_page(templates, request, "Wrong password.", 403)
            return _start_session(auth, request)
        token = request.query_params.get("token")
        if token:
            if auth.take_token(token):
                return _start_session(auth, request)
            return _login_page(
                templates,
                request,
                "This login link was already used or is not valid. "
                + (
                    "Enter the password, or restart ibsync for a new link."
                    if auth.password
                    else "Restart `ibsync ui` (or the agent) for a new link."
                ),
                403,
            )
        if auth.session_of(request.cookies) is not None:
            return RedirectResponse("/", status_code=303)
        return _login_page(templates, request, None, 200 if auth.password else 401)

    async def logout(request: Request) -> Response:
        auth.end_session(current_session(request))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(auth.cookie_name, path="/")
        return response

    return [
        Route("/login", login, methods=["GET", "POST"], name="login"),
        Route("/logout", logout, methods=["POST"], name="logout"),
    ]


def _start_session(auth: Auth, request: Request) -> Response:
    session = auth.new_session()
    response = RedirectResponse("/", status_code=303)
    auth.set_cookie(response, session)
    return response


def _login_page(templates, request: Request, message: str | None, status: int) -> Response:
    if templates is None:
        return HTMLResponse(str(escape(message or "log in")), status_code=status)
    auth: Auth = request.app.state.auth
    return templates.TemplateResponse(
        request, "login.html", {"message": message, "ask_password": bool(auth.password)}, status_code=status
    )
