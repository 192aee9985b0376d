"""The web app's guard, over plain HTTP(S) with urllib: no route answers without the session,
the login link works once, cross-site and forged requests are refused, a foreign Host header
is refused (DNS rebinding), and other addresses than loopback need a password and get TLS."""

from __future__ import annotations

import http.cookies
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from starlette.routing import Mount, Route

from conftest import run_subprocess
from webtools import serve_app, start_ui


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):
        return None


def request(
    url: str,
    *,
    method: str = "GET",
    data: bytes | None = None,
    headers: dict | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict, str]:
    """(status, headers, body) without following redirects."""
    handlers = [_NoRedirect()] + ([urllib.request.HTTPSHandler(context=context)] if context else [])
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode("utf-8", "replace")


def session_cookie(headers: dict) -> tuple[str, str]:
    """(cookie name=value, the raw Set-Cookie header) of a login answer."""
    raw = headers.get("set-cookie", "")
    jar = http.cookies.SimpleCookie(raw)
    [(name, morsel)] = [(k, v) for k, v in jar.items() if k.startswith("ibsync_session_")]
    return f"{name}={morsel.value}", raw


def csrf_of(page: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)">', page).group(1)


@pytest.fixture
def app(env, cli, tmp_path, monkeypatch):
    cli("init")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nrepository = "{env}"\n')
    with serve_app(config) as running:
        yield running


def logged_in(app) -> tuple[str, str]:
    """A session: (Cookie header value, its CSRF token)."""
    status, headers, _ = request(app.login_url)
    assert status == 303 and headers["location"] == "/"
    cookie, _ = session_cookie(headers)
    status, _, page = request(app.base_url + "/", headers={"Cookie": cookie})
    assert status == 200
    return cookie, csrf_of(page)


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_no_route_answers_without_the_session(app):
    routes = []
    for route in app.app.routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or {"GET"}):
                routes.append((method, _concrete(route.path)))
        elif isinstance(route, Mount):
            routes.append(("GET", route.path + "/app.js"))
    assert len(routes) >= 10, routes  # the test must have something to try
    tried = 0
    for method, path in routes:
        if path == "/login" or method == "HEAD":
            continue
        tried += 1
        status, headers, body = request(app.base_url + path, method=method, data=b"" if method == "POST" else None)
        assert status == 401, (method, path, status, body[:200])
        # a browser asking for a page is sent to the login page instead
        status, headers, _ = request(
            app.base_url + path, method=method, headers={"Accept": "text/html"}, data=b"" if method == "POST" else None
        )
        assert status in (303, 401), (method, path, status)
        if status == 303:
            assert headers["location"] == "/login"
    assert tried >= 8
    # not vacuous: with the session the same app answers
    cookie, _ = logged_in(app)
    assert request(app.base_url + "/api/jobs", headers={"Cookie": cookie})[0] == 200
    assert request(app.base_url + "/static/app.js", headers={"Cookie": cookie})[0] == 200
    assert request(app.base_url + "/static/app.css")[0] == 200  # the login page's own look


def test_the_login_link_works_once_and_the_cookie_is_strict(app):
    assert request(app.base_url + "/login?token=wrong")[0] == 403
    status, headers, _ = request(app.login_url)
    assert status == 303
    cookie, raw = session_cookie(headers)
    assert "HttpOnly" in raw and "SameSite=strict" in raw.replace("Strict", "strict")
    assert "Secure" not in raw  # plain HTTP on loopback: a Secure cookie would never come back
    status, headers, body = request(app.login_url)
    assert status == 403 and "set-cookie" not in headers
    assert "already used" in body
    assert request(app.base_url + "/", headers={"Cookie": cookie})[0] == 200
    assert request(app.base_url + "/", headers={"Cookie": "ibsync_session_1=forged"})[0] == 401
    for name, value in (("x-frame-options", "DENY"), ("x-content-type-options", "nosniff")):
        assert headers[name] == value


def test_cross_site_and_forged_posts_are_refused(app):
    cookie, csrf = logged_in(app)
    form = "application/x-www-form-urlencoded"
    url = app.base_url + "/logout"  # harmless to try, and visible: the session ends if one gets through
    tries = [
        ({"Origin": app.base_url}, b""),  # no token
        ({"Origin": app.base_url}, b"csrf=wrong"),
        ({"Origin": app.base_url, "X-CSRF-Token": "wrong"}, b""),
        ({"Origin": "http://evil.example"}, f"csrf={csrf}".encode()),  # a foreign page with a stolen token
        ({"Origin": "null"}, f"csrf={csrf}".encode()),
        ({"Sec-Fetch-Site": "cross-site"}, f"csrf={csrf}".encode()),
        ({}, f"csrf={csrf}".encode()),  # neither Origin nor Sec-Fetch-Site
    ]
    for extra, body in tries:
        status, _, text = request(
            url, method="POST", data=body, headers={"Cookie": cookie, "Content-Type": form, **extra}
        )
        assert status == 403, (extra, body, status, text)
        assert request(app.base_url + "/", headers={"Cookie": cookie})[0] == 200, (extra, body)
    # "Back up now" and a restore likewise
    for path, body in (("/devices/ABC/backup", b""), ("/restore", b"repo=repo&snapshot=x&to=folder&folder=/tmp")):
        status, _, _ = request(
            app.base_url + path,
            method="POST",
            data=body,
            headers={"Cookie": cookie, "Content-Type": form, "Origin": "http://evil.example"},
        )
        assert status == 403
    assert app.ctx.jobs.list() == []
    # the real thing passes: same origin and the session's token (form field or header)
    status, headers, _ = request(
        url,
        method="POST",
        data=f"csrf={csrf}".encode(),
        headers={"Cookie": cookie, "Content-Type": form, "Origin": app.base_url},
    )
    assert status == 303 and headers["location"] == "/login"
    assert request(app.base_url + "/", headers={"Cookie": cookie})[0] == 401  # logged out
    cookie, csrf = logged_in_again(app)
    status, _, _ = request(
        url, method="POST", headers={"Cookie": cookie, "X-CSRF-Token": csrf, "Sec-Fetch-Site": "same-origin"}
    )
    assert status == 303


def logged_in_again(app) -> tuple[str, str]:
    """A second session (the printed link is used up): as a password-less server cannot give
    one, make a new login link the way a restart would."""
    app.ctx.auth.token = "test-token-second-login"
    status, headers, _ = request(app.base_url + "/login?token=test-token-second-login")
    assert status == 303
    cookie, _ = session_cookie(headers)
    return cookie, csrf_of(request(app.base_url + "/", headers={"Cookie": cookie})[2])


def test_a_foreign_host_header_is_refused(app):
    cookie, _ = logged_in(app)
    port = app.base_url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", ""):
        status, _, _ = request(app.base_url + "/", headers={"Cookie": cookie, "Host": host})
        assert status in (400, 421), host  # the empty one: uvicorn's own refusal
        assert request(app.base_url + "/login", headers={"Host": host})[0] in (400, 421)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert request(app.base_url + "/", headers={"Cookie": cookie, "Host": host})[0] == 200


def test_other_addresses_need_a_password_and_get_tls(env, cli, tmp_path):
    import os

    cli("init")
    state = tmp_path / "state"
    e = {**os.environ, "XDG_STATE_HOME": str(state)}
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nrepository = "{env}"\n')
    r = run_subprocess(["ui", "--no-browser", "--address", "0.0.0.0", "--port", "0", "--config", config], e)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "ui-password" in r.stderr, r.stderr

    config.write_text(f'[agent]\nrepository = "{env}"\nui-password = "${{UI_PW}}"\n')
    proc, login_url = start_ui({**e, "UI_PW": "correct horse"}, "--address", "0.0.0.0", "--config", str(config))
    try:
        assert login_url.startswith("https://127.0.0.1:"), login_url
        base = login_url.split("/login")[0]
        cert = state / "ibsync" / "ui-certificate.pem"
        assert cert.exists() and (state / "ibsync" / "ui-key.pem").stat().st_mode & 0o077 == 0
        tls = ssl.create_default_context(cafile=str(cert))  # the generated certificate, verified for 127.0.0.1
        # plain HTTP gets no page
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            status, _, _ = request(base.replace("https://", "http://") + "/login")
            assert status >= 400
            raise OSError("answered plain HTTP with an error")
        status, _, page = request(base + "/login", context=tls)
        assert status == 200 and 'type="password"' in page
        assert request(base + "/", context=tls)[0] == 401
        origin = {"Origin": base, "Content-Type": "application/x-www-form-urlencoded"}
        status, headers, page = request(
            base + "/login", method="POST", data=b"password=wrong", headers=origin, context=tls
        )
        assert status == 403 and "set-cookie" not in headers and "Wrong password" in page
        status, headers, _ = request(
            base + "/login",
            method="POST",
            data=b"password=correct+horse",
            headers={**origin, "Origin": "https://evil.example"},
            context=tls,
        )
        assert status == 403 and "set-cookie" not in headers
        status, headers, _ = request(
            base + "/login", method="POST", data=b"password=correct+horse", headers=origin, context=tls
        )
        assert status == 303
        cookie, raw = session_cookie(headers)
        assert "Secure" in raw and "HttpOnly" in raw
        assert request(base + "/", headers={"Cookie": cookie}, context=tls)[0] == 200
        # the printed link works too, once
        assert request(login_url, context=tls)[0] == 303
        assert request(login_url, context=tls)[0] == 403
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err, err


def test_the_agent_refuses_an_open_address_without_a_password_and_ui_false_serves_nothing(env, cli, tmp_path):
    import os
    import signal
    import time

    cli("init")
    e = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nrepository = "{env}"\nui-address = "0.0.0.0"\nui-port = 0\n')
    r = run_subprocess(["agent", "--config", config], e, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert "ui-password" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "state" / "ibsync" / "ui-login.url").exists()

    config.write_text(f'[agent]\nrepository = "{env}"\nui = false\nui-address = "0.0.0.0"\n')
    agent = subprocess.Popen(
        [sys.executable, "-m", "ibsync", "agent", "--config", str(config)],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "state" / "ibsync" / "agent.db").exists():  # it has started
            assert time.monotonic() < deadline and agent.poll() is None
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    assert out == "" and "web app" not in err
    assert not (tmp_path / "state" / "ibsync" / "ui-login.url").exists()


@pytest.mark.parametrize(
    "table, message",
    [
        ({"ui-port": "8765"}, "ui-port: expected a port number"),
        ({"ui-port": 70000}, "ui-port: expected a port number"),
        ({"ui": "yes"}, "ui: expected true or false"),
        ({"ui-password": ""}, "ui-password: expected a non-empty string"),
        ({"ui-certificate": "/x.pem"}, "ui-certificate and ui-key go together"),
        ({"ui-adress": "0.0.0.0"}, "unknown key(s) ui-adress"),
    ],
)
def test_bad_ui_settings_are_one_line_errors(table, message):
    from ibsync.agent.settings import parse_agent_settings
    from ibsync.errors import UserError

    with pytest.raises(UserError) as e:
        parse_agent_settings({"agent": table}, "config file x.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_ui_settings_are_read():
    from ibsync.agent.settings import parse_agent_settings

    ui = parse_agent_settings(
        {
            "agent": {
                "ui": False,
                "ui-address": "::1",
                "ui-port": 9000,
                "ui-password": "${PW}",
                "ui-certificate": "~/c.pem",
                "ui-key": "~/k.pem",
            }
        },
        "x",
    ).ui
    assert (ui.enabled, ui.address, ui.port, ui.password, ui.certificate, ui.key) == (
        False,
        "::1",
        9000,
        "${PW}",
        "~/c.pem",
        "~/k.pem",
    )
    default = parse_agent_settings({}, "x").ui
    assert (default.enabled, default.address, default.port, default.password) == (True, "127.0.0.1", 8765, None)
