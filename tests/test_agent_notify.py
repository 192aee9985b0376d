"""Notifications (Apprise) and health pings, delivered to a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ibsync.agent.notify import BODY_LIMIT, HealthPing, Notifier
from ibsync.errors import UserError


@dataclass
class Hit:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    port: int
    hits: list[Hit] = field(default_factory=list)
    #: status codes to answer with, in turn; 200 once they are used up
    statuses: list[int] = field(default_factory=list)

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(0)

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urllib.parse.urlsplit(self.path)
            rec.hits.append(
                Hit(
                    self.command,
                    parts.path,
                    urllib.parse.parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
            )
            status = rec.statuses.pop(0) if rec.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        do_GET = do_POST = do_HEAD = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


def _dead_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never answers: a notification server that hangs."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(s.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield s.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    s.close()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ibsync" and r.levelno == logging.WARNING]


# --- notifications ------------------------------------------------------------------------


def test_json_webhook_gets_title_body_and_type(receiver):
    notifier = Notifier([receiver.url("/hook", "json")])
    assert notifier.send("Backup of Anna's iPhone failed", "repository nas: not reachable", "failure") is True
    [hit] = receiver.hits
    assert (hit.method, hit.path) == ("POST", "/hook")
    payload = json.loads(hit.body)
    assert payload["title"] == "Backup of Anna's iPhone failed"
    assert payload["message"] == "repository nas: not reachable"
    assert payload["type"] == "failure"


def test_form_webhook_gets_title_body_and_type(receiver):
    notifier = Notifier([receiver.url("/form", "form")])
    assert notifier.send("Unlock iPad", "Unlock iPad and enter its passcode", "warning")
    [hit] = receiver.hits
    assert hit.path == "/form"
    fields = urllib.parse.parse_qs(hit.body.decode())
    assert fields["title"] == ["Unlock iPad"]
    assert fields["message"] == ["Unlock iPad and enter its passcode"]
    assert fields["type"] == ["warning"]


def test_every_url_gets_it_and_kinds_map(receiver):
    notifier = Notifier([receiver.url("/a", "json"), receiver.url("/b", "json")])
    for kind in ("info", "success", "warning", "failure"):
        assert notifier.send("t", "b", kind)
    # the URLs are sent to at the same time: each gets every kind, in order
    for path in ("/a", "/b"):
        assert [json.loads(h.body)["type"] for h in receiver.hits if h.path == path] == [
            "info",
            "success",
            "warning",
            "failure",
        ]


def test_send_async_delivers_from_the_event_loop(receiver):
    notifier = Notifier([receiver.url("/hook", "json")])

    async def main() -> bool:
        return await notifier.send_async("Backed up", "iPhone: ok, 12 MB in 40 s", "success")

    assert asyncio.run(main()) is True
    assert json.loads(receiver.hits[0].body)["message"] == "iPhone: ok, 12 MB in 40 s"


def test_refused_receiver_does_not_raise_and_is_one_warning(caplog):
    notifier = Notifier([f"json://127.0.0.1:{_dead_port()}/hook"])
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        assert notifier.send("title", "body", "failure") is False
    [line] = _warnings(caplog)
    assert "not sent" in line and "127.0.0.1" in line and "\n" not in line


def test_a_partial_failure_still_delivers_to_the_others(receiver, caplog):
    notifier = Notifier([f"json://127.0.0.1:{_dead_port()}/x", receiver.url("/ok", "json")])
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        assert notifier.send("t", "b", "info") is False
    assert [h.path for h in receiver.hits] == ["/ok"]
    assert len(_warnings(caplog)) == 1


def test_a_server_that_never_answers_cannot_stall_the_agent(silent_server, caplog):
    notifier = Notifier([f"json://127.0.0.1:{silent_server}/hook"], timeout=1.0)
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        started = time.monotonic()
        assert notifier.send("t", "b", "info") is False
        assert time.monotonic() - started < 3

        async def main() -> bool:
            ticks = 0

            async def tick() -> None:  # the event loop keeps running while the send waits
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.05)

            ticker = asyncio.create_task(tick())
            ok = await notifier.send_async("t", "b", "info")
            ticker.cancel()
            assert ticks > 5
            return ok

        started = time.monotonic()
        assert asyncio.run(main()) is False
        assert time.monotonic() - started < 3
    assert all("no answer within 1 s" in w for w in _warnings(caplog)) and len(_warnings(caplog)) == 2


def test_a_hung_service_does_not_hold_up_the_others(silent_server, receiver, caplog):
    notifier = Notifier([f"json://127.0.0.1:{silent_server}/hung", receiver.url("/ok", "json")], timeout=1.0)
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        assert notifier.send("t", "b", "info") is False
    assert [h.path for h in receiver.hits] == ["/ok"]
    [line] = _warnings(caplog)
    assert f"json://127.0.0.1:{silent_server}/hung: no answer within 1 s" in line and "/ok" not in line


@pytest.mark.parametrize(
    "url, secret",
    [
        ("mailto://me:hunter2secret@", "hunter2secret"),  # no host: malformed
        ("tgram://notatoken-s3cr3tvalue", "s3cr3tvalue"),  # no chat id, bad bot token
        ("nosuchservice://user:topsecretpw@example.com/x", "topsecretpw"),
        ("https://hc-ping.com/0a1b2c3d-secret-uuid", "0a1b2c3d"),  # a health URL is not an Apprise URL
    ],
)
def test_a_bad_url_is_refused_without_quoting_its_secret(url, secret):
    with pytest.raises(UserError) as e:
        Notifier(["json://127.0.0.1:9/ok", url])
    message = str(e.value)
    assert "entry 2" in message and secret not in message and "\n" not in message
    assert url.split("://")[0] in message


def test_an_unknown_service_is_named_as_such():
    with pytest.raises(UserError, match="unknown service 'nosuchservice://'"):
        Notifier(["nosuchservice://example.com/x"])
    with pytest.raises(UserError, match="not an Apprise URL"):
        Notifier(["ntfy.sh/topic"])
    with pytest.raises(UserError, match="for a webhook write json://"):
        Notifier(["https://example.com/hook"])


def test_urls_are_listed_with_secrets_masked():
    notifier = Notifier(["mailto://me:hunter2@example.com", "json://127.0.0.1:9/hook"])
    assert len(notifier) == 2
    assert not any("hunter2" in u for u in notifier.urls)
    assert notifier.urls[1] == "json://127.0.0.1:9/hook"


# --- health pings -------------------------------------------------------------------------


def test_health_pings_start_success_fail_and_log(receiver):
    base = receiver.url("/ping/5f1e-uuid")
    ping = HealthPing(base)
    assert ping.start() and ping.success("iPhone: ok, 3 MB in 12 s") and ping.failure("iPhone: failed, cable pulled")
    assert ping.log("iPhone: skipped, passcode not entered")
    assert [(h.method, h.path) for h in receiver.hits] == [
        ("POST", "/ping/5f1e-uuid/start"),
        ("POST", "/ping/5f1e-uuid"),
        ("POST", "/ping/5f1e-uuid/fail"),
        ("POST", "/ping/5f1e-uuid/log"),
    ]
    assert [h.body for h in receiver.hits] == [
        b"",
        b"iPhone: ok, 3 MB in 12 s",
        b"iPhone: failed, cable pulled",
        b"iPhone: skipped, passcode not entered",
    ]
    assert receiver.hits[1].headers["content-type"].startswith("text/plain")
    # one run id ties the start to its end, so concurrent runs into one check are timed apart
    rids = {h.query["rid"][0] for h in receiver.hits}
    assert len(rids) == 1 and HealthPing(base).run_id not in rids


def test_health_ping_keeps_the_urls_query_and_truncates_the_body(receiver):
    ping = HealthPing(receiver.url("/ping/key/slug?create=1"))
    ping.failure("é" * BODY_LIMIT)  # 2 bytes each: cut at 10 kB, on a character boundary
    [hit] = receiver.hits
    assert hit.path == "/ping/key/slug/fail" and hit.query["create"] == ["1"]
    assert (
        len(hit.body) <= BODY_LIMIT
        and len(hit.body) >= BODY_LIMIT - 1
        and hit.body.decode() == "é" * (len(hit.body) // 2)
    )


def test_health_ping_retries_server_errors(receiver):
    receiver.statuses = [503, 502]
    assert HealthPing(receiver.url("/p"), backoff=0.01).success("ok") is True
    assert [h.path for h in receiver.hits] == ["/p", "/p", "/p"]


def test_health_ping_gives_up_after_its_attempts_with_one_warning(receiver, caplog):
    receiver.statuses = [500] * 5
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        assert HealthPing(receiver.url("/p/secret-uuid"), attempts=3, backoff=0.01).failure("x") is False
    assert len(receiver.hits) == 3
    [line] = _warnings(caplog)
    assert "HTTP 500" in line and "secret-uuid" not in line


def test_health_ping_does_not_retry_a_wrong_url(receiver, caplog):
    receiver.statuses = [404]
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        assert HealthPing(receiver.url("/p"), backoff=0.01).start() is False
    assert len(receiver.hits) == 1 and "HTTP 404" in _warnings(caplog)[0]


def test_health_ping_to_a_dead_server_does_not_raise(caplog):
    ping = HealthPing(f"http://127.0.0.1:{_dead_port()}/ping/uuid", attempts=2, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        assert ping.start() is False and ping.success("ok") is False
    lines = _warnings(caplog)
    assert len(lines) == 2 and all("refused" in line.lower() for line in lines)


def test_health_ping_to_a_silent_server_is_bounded(silent_server, caplog):
    ping = HealthPing(f"http://127.0.0.1:{silent_server}/p", timeout=0.5, attempts=2, backoff=0.01)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        assert ping.success("ok") is False
    assert time.monotonic() - started < 3
    assert len(_warnings(caplog)) == 1


def test_uptime_kuma_push_urls_get_status_and_msg(receiver):
    ping = HealthPing(receiver.url("/api/push/AbC123?status=up&msg=OK&ping="))
    assert ping.start() and ping.log("skipped")  # Kuma has neither: nothing is sent
    assert ping.success("iPhone: ok, 3 MB\nin 12 s") and ping.failure("iPhone: failed " + "x" * 500)
    assert [(h.method, h.path) for h in receiver.hits] == [("GET", "/api/push/AbC123")] * 2
    up, down = receiver.hits
    assert up.query["status"] == ["up"] and up.query["msg"] == ["iPhone: ok, 3 MB in 12 s"]
    assert down.query["status"] == ["down"] and len(down.query["msg"][0]) == 200
    assert "rid" not in up.query


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x", "hc-ping.com/uuid", "https:///uuid-only", "", "https://example.com:notaport/secret-uuid"],
)
def test_a_bad_health_url_is_refused(url):
    with pytest.raises(UserError) as e:
        HealthPing(url, where='[devices."iPad"] healthcheck')
    message = str(e.value)
    assert message.startswith('[devices."iPad"] healthcheck') and "\n" not in message
    assert "uuid" not in message.split(":", 1)[1] or "<uuid>" in message
    assert "secret" not in message
