"""Telling people what the agent did: notifications through Apprise, and health pings.

``Notifier`` sends a title and a body to every configured Apprise URL (``[agent] notify``): one
URL per service, for about a hundred of them (ntfy, email, Telegram, Pushover, Matrix, generic
``json://``/``form://`` webhooks...). ``HealthPing`` is the dead-man's switch
(``healthcheck``): Healthchecks-style URLs are pinged at ``/start``, on success and at ``/fail``,
so that the monitor raises the alarm when backups stop happening at all, which no push message
can do. Uptime Kuma push URLs (``.../api/push/<token>``) are recognised and sent
``?status=up|down&msg=...`` instead.

Neither ever raises once built: a notification or ping that cannot be delivered is one warning
line on the ``ibsync`` logger, and the agent goes on. Both are bounded in time, so a dead server
cannot stall the agent. Bad URLs are refused when they are built (``UserError``), without quoting
the secrets URLs of this kind carry (passwords, tokens, the ping UUID).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UserError

logger = logging.getLogger("ibsync")

KINDS = ("info", "success", "warning", "failure")
#: a whole notification (all URLs) gets this long; Apprise's own per-request timeouts (4 s for
#: HTTP services, ``cto=``/``rto=`` in a URL to change them) apply inside it
SEND_TIMEOUT = 10.0
#: each health ping request; retried PING_ATTEMPTS times in all, PING_BACKOFF seconds apart (doubled)
PING_TIMEOUT = 5.0
PING_ATTEMPTS = 3
PING_BACKOFF = 1.0
#: Healthchecks keeps the first 10 kB of a ping body (its default PING_BODY_LIMIT)
BODY_LIMIT = 10_000
#: Uptime Kuma takes the message in the query string: keep it short
KUMA_MSG_LIMIT = 200


def _start_bounded(fn: Callable[[], Any], name: str) -> tuple[threading.Thread, list[Any]]:
    """Start ``fn`` in a daemon thread; its result (or exception) lands in the list. A thread
    that overruns its caller's deadline is left behind rather than joined, and being a daemon it
    cannot hold up the agent's exit either (asyncio.run waits for its default executor's threads)."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # noqa: BLE001 - reported to the caller, never raised in a thread
            box.append(e)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread, box


async def _run_bounded_async(fn: Callable[[], Any], timeout: float, name: str) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread and await it for at most ``timeout`` seconds: (finished,
    result or exception), without blocking the event loop or taking a default executor slot."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[bool, Any]] = loop.create_future()

    def target() -> None:
        try:
            out: tuple[bool, Any] = (True, fn())
        except BaseException as e:  # noqa: BLE001
            out = (True, e)

        def settle() -> None:
            if not done.done():
                done.set_result(out)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop closed while we were sending
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(done), timeout)
    except TimeoutError:
        return (False, None)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


_HOSTNAME = re.compile(r"^(localhost|(\d{1,3}\.){3}\d{1,3}|([a-z0-9-]{1,63}\.)+[a-z]{2,24})$")


def _redacted(url: str) -> str:
    """``scheme://host/...`` and nothing more: for URLs we could not parse into a service (so
    cannot ask which parts are secret) and for ping URLs, whose path is the secret. The host is
    kept only when it looks like a host name or address, since some services take a token there
    (``tgram://<bot token>/...``, ``pover://user@<token>``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return "a URL without a scheme (service://...)"
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        host = port = ""
    if host and _HOSTNAME.match(host):
        more = "/..." if rest.rstrip("/") != f"{host}{port}" else ""
        return f"{scheme}://{host}{port}{more}"
    return f"{scheme}://..."


class Notifier:
    """Sends notifications to Apprise URLs. Built once when the agent starts, which is when a
    wrong URL is refused."""

    def __init__(self, urls: Sequence[str], *, where: str = "[agent] notify", timeout: float = SEND_TIMEOUT) -> None:
        import apprise  # imported here: commands that never notify do not pay for it

        self.timeout = timeout
        self._apprise = apprise
        self._services: list[tuple[str, Any]] = []  # (redacted URL for messages, plugin)
        for i, url in enumerate(urls, 1):
            entry = f"{where}, entry {i}"
            if not isinstance(url, str) or not url.strip():
                raise UserError(f"{entry}: an Apprise URL must be a non-empty string")
            schema = url.split("://", 1)[0].lower() if "://" in url else ""
            if not schema:
                raise UserError(f"{entry}: not an Apprise URL (expected service://..., e.g. ntfy://ntfy.sh/TOPIC)")
            try:
                plugin = apprise.Apprise.instantiate(url.strip(), suppress_exceptions=True)
            except Exception:  # noqa: BLE001 - a plugin that chokes on the URL is a bad URL
                plugin = None
            if plugin is None:
                # Apprise's own reason is not shown: it may quote the token it found invalid
                if schema in ("http", "https"):
                    why = (
                        "a web address is not an Apprise URL: for a webhook write json://, form:// or xml:// "
                        "(jsons:// ... for https); a health check URL goes in 'healthcheck'"
                    )
                elif schema in _known_schemas(apprise):
                    why = f"the {schema}:// URL is incomplete or malformed"
                else:
                    why = f"unknown service '{schema}://' (see https://github.com/caronc/apprise/wiki)"
                raise UserError(f"{entry} ({_redacted(url)}): {why}")
            self._services.append((_private_url(plugin), plugin))

    def __len__(self) -> int:
        return len(self._services)

    @property
    def urls(self) -> list[str]:
        """The configured URLs with their secrets hidden, for logs and ``--help``-style listings."""
        return [name for name, _ in self._services]

    def send(self, title: str, body: str, kind: str = "info") -> bool:
        """Send to every URL at once; True when all accepted it. Never raises, returns within
        ``timeout``; each URL that failed is named in one warning."""
        if not self._services:
            return True
        notify_type = kind if kind in KINDS else "info"
        deadline = time.monotonic() + self.timeout
        # one thread per service, so a dead server does not hold up the others
        sends = [
            (name, _start_bounded(functools.partial(self._deliver, plugin, title, body, notify_type), "ibsync-notify"))
            for name, plugin in self._services
        ]
        failed = []
        for name, (thread, box) in sends:
            thread.join(max(0.0, deadline - time.monotonic()))
            if not box:
                failed.append(f"{name}: no answer within {self.timeout:g} s")
            elif isinstance(box[0], BaseException):
                failed.append(f"{name}: {_one_line(box[0]) or type(box[0]).__name__}")
            elif box[0]:
                failed.append(f"{name}: {box[0]}")
        if failed:
            logger.warning("notification %r not sent to %s", title, "; ".join(failed))
        return not failed

    async def send_async(self, title: str, body: str, kind: str = "info") -> bool:
        """``send`` for the agent's event loop: it runs in a thread of its own, and the loop goes
        on meanwhile."""
        if not self._services:
            return True
        finished, result = await _run_bounded_async(
            lambda: self.send(title, body, kind), self.timeout + 1.0, "ibsync-notify"
        )
        return finished and result is True

    def _deliver(self, plugin: Any, title: str, body: str, notify_type: str) -> str:
        """Send to one service: "" when it accepted, else why not."""
        box = self._apprise.Apprise()
        box.add(plugin)
        result = box.notify(body=body or title, title=title, notify_type=notify_type)
        return "" if result else _reason(result)


def _known_schemas(apprise: Any) -> set[str]:
    """Every scheme Apprise has a service for (to tell "unknown service" from "bad URL")."""
    out: set[str] = set()
    try:
        for service in apprise.Apprise().details().get("schemas", []):
            for key in ("protocols", "secure_protocols"):
                for s in service.get(key) or ():
                    out.add(str(s).lower())
    except Exception:  # noqa: BLE001, S110 - only used to word a message
        pass
    return out


def _private_url(plugin: Any) -> str:
    """The plugin's URL with Apprise's own privacy masking, without the query string (defaults)."""
    try:
        return plugin.url(privacy=True).split("?", 1)[0]
    except Exception:  # noqa: BLE001
        return f"{getattr(plugin, 'service_name', 'a service')}"


def _reason(result: Any) -> str:
    """Apprise's warning for a failed send, when it keeps one (Apprise 1.9+ returns a result
    object with its logs); these name the service and host, not the URL's secrets."""
    logs = getattr(result, "logs", None)
    if callable(logs):
        try:
            lines = [e.message for e in logs() if getattr(e, "level", "") in ("WARNING", "ERROR", "CRITICAL")]
        except Exception:  # noqa: BLE001
            lines = []
        if lines:
            return _one_line(lines[-1])
    return "the service did not accept it"


class HealthPing:
    """One monitored run, pinged to a Healthchecks-style URL: ``start()`` at ``<url>/start``,
    ``success(body)`` at the URL itself, ``failure(body)`` at ``<url>/fail``, ``log(body)`` at
    ``<url>/log`` (a message that changes nothing, for an attempt that was skipped). Each ping
    carries the same ``rid`` (Healthchecks run id), so two devices backing up at once into one
    check are timed apart.

    Uptime Kuma push monitors (``https://kuma.example/api/push/<token>``) have no start or log:
    ``success`` sends ``?status=up&msg=<first 200 characters>``, ``failure`` ``?status=down``.

    Never raises after construction. Each request has a ``timeout`` and is tried ``attempts``
    times (connection errors, 5xx and 429); one warning if they all fail.
    """

    def __init__(
        self,
        url: str,
        *,
        where: str = "[agent] healthcheck",
        timeout: float = PING_TIMEOUT,
        attempts: int = PING_ATTEMPTS,
        backoff: float = PING_BACKOFF,
    ) -> None:
        self.url = check_health_url(url, where)
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.kuma = "/api/push/" in urllib.parse.urlsplit(self.url).path
        self.run_id = str(uuid.uuid4())

    def start(self) -> bool:
        return self._ping("start", "")

    def success(self, body: str = "") -> bool:
        return self._ping("", body)

    def failure(self, body: str = "") -> bool:
        return self._ping("fail", body)

    def log(self, body: str = "") -> bool:
        return self._ping("log", body)

    def request_for(self, suffix: str, body: str) -> urllib.request.Request | None:
        """The request a ping sends (None: this kind of monitor has no such ping)."""
        parts = urllib.parse.urlsplit(self.url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if self.kuma:
            if suffix not in ("", "fail"):
                return None
            msg = _one_line(body)[:KUMA_MSG_LIMIT] or "OK"
            query = [(k, v) for k, v in query if k not in ("status", "msg")]
            query += [("status", "up" if suffix == "" else "down"), ("msg", msg)]
            url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
            return urllib.request.Request(url, method="GET", headers={"User-Agent": _user_agent()})
        path = parts.path.rstrip("/") + (f"/{suffix}" if suffix else "")
        query = [(k, v) for k, v in query if k != "rid"] + [("rid", self.run_id)]
        url = urllib.parse.urlunsplit(parts._replace(path=path or "/", query=urllib.parse.urlencode(query)))
        data = _truncate(body, BODY_LIMIT)
        return urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={"Content-Type": "text/plain; charset=utf-8", "User-Agent": _user_agent()},
        )

    def _ping(self, suffix: str, body: str) -> bool:
        try:
            request = self.request_for(suffix, body)
            if request is None:
                return True
            last = ""
            for attempt in range(self.attempts):
                if attempt:
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                try:
                    with urllib.request.urlopen(request, timeout=self.timeout) as response:
                        response.read(1024)
                    return True
                except urllib.error.HTTPError as e:
                    last = f"HTTP {e.code} {e.reason}"
                    if e.code < 500 and e.code != 429:
                        break  # a wrong URL or a deleted check: asking again will not help
                except (urllib.error.URLError, OSError) as e:
                    reason = getattr(e, "reason", e)
                    last = _one_line(getattr(reason, "strerror", None) or reason) or type(e).__name__
            logger.warning("health ping %s to %s failed: %s", suffix or "success", _redacted(self.url), last)
        except Exception as e:  # noqa: BLE001 - a ping must never stop a backup
            logger.warning(
                "health ping %s to %s failed: %s",
                suffix or "success",
                _redacted(self.url),
                _one_line(e) or type(e).__name__,
            )
        return False


def check_health_url(url: str, where: str = "[agent] healthcheck") -> str:
    """The URL, stripped, if it is an http(s) URL with a host; else a UserError that does not
    quote its path (a ping URL's UUID or token is what lets anyone ping it)."""
    if not isinstance(url, str) or not url.strip():
        raise UserError(f"{where}: must be an http:// or https:// URL")
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise UserError(f"{where} ({_redacted(url)}): not a valid URL") from None
    if "://" not in url:
        raise UserError(f"{where}: must be an http:// or https:// URL, e.g. https://hc-ping.com/<uuid>")
    if parts.scheme not in ("http", "https") or not host:
        raise UserError(
            f"{where} ({_redacted(url)}): must be an http:// or https:// URL with a host, "
            "e.g. https://hc-ping.com/<uuid>"
        )
    return url


def _truncate(text: str, limit: int) -> bytes:
    data = (text or "").encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def _user_agent() -> str:
    from .._version import __version__

    return f"ibsync/{__version__}"
