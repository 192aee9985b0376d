"""Fixtures shared by the tests that drive the simulated device through a SimLockdown.

from simdevice_fixtures import FAST_ROUNDS, connect, repo  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ibsync.testing.device import SimDevice, SimLockdown

FAST_ROUNDS = 1_000  # keybag PBKDF2 rounds (real devices: 10,000,000, about 2 s)


@pytest.fixture
def connect() -> Iterator:
    """SimLockdown(device), closed after the test, which also fails if a device thread crashed."""
    opened: list[SimLockdown] = []

    def make(device: SimDevice) -> SimLockdown:
        opened.append(SimLockdown(device))
        return opened[-1]

    yield make
    for lockdown in opened:
        lockdown.close()
        assert lockdown.log.errors == [], "\n".join(lockdown.log.errors)


@pytest.fixture
def repo(env, cli) -> str:
    """An initialised repository (the conftest's env: path, password, fast key derivation)."""
    cli("init")
    return str(env)
