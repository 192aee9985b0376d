"""Which storage errors are retried, and how the policy behaves (the real servers' faults are in
test_remote_faults.py)."""

from __future__ import annotations

import errno

import pytest

from ibsync.storage.retry import RetryPolicy, is_transient


class _Response:
    def __init__(self, status: int) -> None:
        self.status_code = status


class _HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"received {status}")
        self.response = _Response(status)


def _wrapped(inner: BaseException) -> OSError:
    try:
        raise inner
    except BaseException as e:
        try:
            raise OSError("the client's own wrapper") from e
        except OSError as outer:
            return outer


@pytest.mark.parametrize(
    "error, transient",
    [
        (ConnectionRefusedError(), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(errno.EBUSY, "SlowDown"), True),  # how s3fs reports 503
        (_HttpError(503), True),
        (_HttpError(423), True),
        (_HttpError(429), True),
        (_wrapped(ConnectionResetError()), True),  # found through the cause chain
        (PermissionError(), False),
        (FileNotFoundError(), False),
        (OSError(errno.EINVAL, "bad request"), False),
        (_HttpError(404), False),
        (_HttpError(403), False),
        (ValueError("not a network problem"), False),
    ],
)
def test_transient_errors(error, transient):
    assert is_transient(error) is transient


def test_transient_errors_are_retried_and_reconnected():
    calls, reconnects = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("dropped")
        return "done"

    policy = RetryPolicy(seconds=10, first_wait=0.01, max_wait=0.02)
    assert policy.call(flaky, on_retry=reconnects.append) == "done"
    assert len(calls) == 3 and len(reconnects) == 2


def test_permanent_errors_fail_at_once_and_budget_ends_retries():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("access denied")

    with pytest.raises(PermissionError):
        RetryPolicy(seconds=10, first_wait=0.01).call(denied)
    assert len(calls) == 1

    def down():
        calls.append(1)
        raise ConnectionRefusedError("down")

    calls.clear()
    with pytest.raises(ConnectionRefusedError):
        RetryPolicy(seconds=0.3, first_wait=0.01, max_wait=0.05).call(down)
    assert len(calls) > 2  # tried again and again, then gave up with the last error
