"""The platform's per-user folders for ibsync's configuration, cache and state (platformdirs:
~/Library/{Application Support,Caches} on macOS, %APPDATA% / %LOCALAPPDATA% on Windows,
$XDG_CONFIG_HOME / $XDG_CACHE_HOME / $XDG_STATE_HOME elsewhere)."""

from __future__ import annotations

import sys
from pathlib import Path

import platformdirs

_APP = "ibsync"


def user_dir(kind: str) -> Path:
    """``kind`` is "config", "cache" or "state". The state (the agent's history) is kept with
    the configuration on macOS and Windows, where the platform has no separate place for it
    that users back up and find, and in $XDG_STATE_HOME (~/.local/state) elsewhere."""
    if kind == "config":
        return Path(platformdirs.user_config_dir(_APP, appauthor=False, roaming=True))
    if kind == "cache":
        # Windows: %LOCALAPPDATA%\ibsync (platformdirs would add \Cache; kept as ibsync always had it)
        return Path(platformdirs.user_cache_dir(_APP, appauthor=False, opinion=False))
    if kind == "state":
        if sys.platform in ("darwin", "win32"):
            return user_dir("config") / "state"
        return Path(platformdirs.user_state_dir(_APP, appauthor=False))
    raise ValueError(f"unknown kind of user folder: {kind!r}")
