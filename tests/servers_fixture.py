"""Session-scoped pytest fixtures for the real storage servers of :mod:`ibsync.testing.servers`.

In a test module::

    from servers_fixture import server_fixture

    seaweedfs_server = server_fixture("seaweedfs")

    def test_something(seaweedfs_server):
        url, options = seaweedfs_server.new_url("something"), seaweedfs_server.options

A server that is not installed or does not start skips the test with the reason, except on CI (environment
variable ``CI`` set), where it fails: CI must never pass by skipping the real servers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from ibsync.testing.servers import STARTERS, Server, ServerUnavailable


def unavailable(kind: str, err: ServerUnavailable) -> NoReturn:
    """Skip, or fail on CI, because the ``kind`` server could not be started."""
    message = f"{kind} server unavailable: {err}"
    if os.environ.get("CI"):
        pytest.fail(
            f"{message}\n(CI is set: the storage servers must be installed, tests never skip them)", pytrace=False
        )
    pytest.skip(message)


def start_or_skip(kind: str, workdir: Path) -> Server:
    """``STARTERS[kind](workdir)``, skipping (or failing on CI) when the server is unavailable."""
    try:
        return STARTERS[kind](workdir)
    except ServerUnavailable as err:
        unavailable(kind, err)


def server_fixture(kind: str, name: str | None = None) -> Callable[..., Iterator[Server]]:
    """A session-scoped fixture, named ``name`` or ``<kind>_server`` (dashes as underscores), running one server."""
    if kind not in STARTERS:
        raise ValueError(f"unknown server kind {kind!r}; known: {', '.join(STARTERS)}")

    @pytest.fixture(scope="session", name=name or f"{kind.replace('-', '_')}_server")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
        with start_or_skip(kind, tmp_path_factory.mktemp(kind)) as server:
            yield server

    return fixture


def configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server, name: str, url: str) -> None:
    """Name a repository on ``server`` in a config file (appended to), as a user would."""
    path = tmp_path / "config.toml"
    with open(path, "a") as f:
        f.write(server.config_toml(name, url))
    monkeypatch.setenv("IBSYNC_CONFIG", str(path))
