"""Which storage failures are worth another try, and the policy for trying again.

Remote storage fails in passing: a NAS reboots, Wi-Fi drops, S3 answers 503 SlowDown. Each
client library reports this differently (botocore, aiohttp, asyncssh, smbprotocol, httpx), and
often wraps it once or twice (s3fs turns a 503 into ``OSError(EBUSY)``, sshfs an SFTP failure
into ``OSError``), so the whole cause chain is inspected. Class names are matched instead of
importing every client: only the clients actually in use are loaded.

The backoff itself is tenacity's (exponential with full jitter, capped); what is ours is only the
decision "transient or not" and the time budget, after which the last error is reported.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import tenacity

T = TypeVar("T")
_log = logging.getLogger("ibsync.storage")


def one_line(e: BaseException | None) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


# errno values that mean "the connection, not the request, failed"; EBUSY and EREMOTEIO are
# how s3fs reports 503 (SlowDown, ServiceUnavailable) and 500 (InternalError).
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.EBUSY,
        errno.EREMOTEIO,
        errno.EAGAIN,
        errno.ENOTCONN,
        errno.ESHUTDOWN,
    }
)

# "<top-level module>.<class>" anywhere in the exception's MRO.
_TRANSIENT_CLASSES = frozenset(
    {
        "botocore.ConnectionError",  # EndpointConnectionError, ConnectionClosedError, ...
        "botocore.HTTPClientError",
        "botocore.ReadTimeoutError",
        "botocore.ConnectTimeoutError",
        "botocore.ResponseStreamingError",
        "aiohttp.ClientConnectionError",  # ServerDisconnectedError, ClientOSError, ...
        "aiohttp.ClientPayloadError",
        "aiohttp.ServerTimeoutError",
        "asyncssh.DisconnectError",  # ConnectionLost, ...
        "asyncssh.ChannelOpenError",
        "asyncssh.SFTPNoConnection",  # a channel on a connection that has gone
        "asyncssh.SFTPConnectionLost",
        "smbprotocol.SMBConnectionClosed",
        "httpx.TransportError",  # ConnectError, ReadError, RemoteProtocolError, timeouts
        "httpcore.ConnectError",
        "httpcore.ReadError",
        "httpcore.RemoteProtocolError",
    }
)


# Subclasses of a transient class that are answers, not outages: asyncssh reports a refused
# login or an unknown host key as a DisconnectError, like a dropped connection. Retrying them
# (now that connecting is retried too) would only delay the message for minutes.
_PERMANENT_CLASSES = frozenset(
    {
        "asyncssh.PermissionDenied",
        "asyncssh.HostKeyNotVerifiable",
        "asyncssh.KeyExchangeFailed",
        "asyncssh.ProtocolNotSupported",
        "asyncssh.IllegalUserName",
        "asyncssh.ServiceNotAvailable",
    }
)


def _class_names(x: BaseException) -> set[str]:
    return {f"{cls.__module__.split('.')[0]}.{cls.__name__}" for cls in type(x).__mro__}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]


def _http_status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return getattr(response, "status_code", None)  # httpx / webdav4


def is_transient(e: BaseException) -> bool:
    if any(_class_names(x) & _PERMANENT_CLASSES for x in _chain(e)):
        return False
    for x in _chain(e):
        if isinstance(x, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if isinstance(x, OSError) and x.errno in _TRANSIENT_ERRNOS:
            return True
        status = _http_status(x)
        # 423 Locked: WebDAV servers (rclone) answer it to concurrent MKCOLs of one folder
        if status is not None and (status >= 500 or status in (408, 423, 429)):
            return True
        if _class_names(x) & _TRANSIENT_CLASSES:
            return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How long one storage operation keeps trying before its error is reported."""

    seconds: float = 300.0  # long enough for a NAS or router to reboot
    first_wait: float = 0.5
    max_wait: float = 30.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        value = os.environ.get("IBSYNC_RETRY_SECONDS")
        return cls(seconds=float(value)) if value else cls()

    def call(
        self, fn: Callable[[], T], *, what: str = "storage", on_retry: Callable[[BaseException], None] | None = None
    ) -> T:
        """Run ``fn``; on a transient error call ``on_retry`` (to reconnect) and try again."""

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            if state.attempt_number == 1:
                _log.warning("%s: %s; retrying for up to %.0f s", what, one_line(error), self.seconds)
            if on_retry is not None and error is not None:
                on_retry(error)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=tenacity.stop_after_delay(self.seconds),
            wait=tenacity.wait_random_exponential(multiplier=self.first_wait, max=self.max_wait),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn)
