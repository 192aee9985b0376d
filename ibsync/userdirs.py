"""The platform's per-user folders for ibsync's configuration and cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def user_dir(kind: str) -> Path:
    """``kind`` is "config", "cache" or "state": ~/Library/{Application Support,Caches} on macOS,
    %APPDATA% / %LOCALAPPDATA% on Windows, $XDG_CONFIG_HOME / $XDG_CACHE_HOME elsewhere. The
    state (the agent's history) is kept with the configuration on macOS and Windows, and in
    $XDG_STATE_HOME (~/.local/state) elsewhere."""
    home = Path.home()
    if kind == "state":
        if sys.platform in ("darwin", "win32"):
            return user_dir("config") / "state"
        return Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "ibsync"
    if sys.platform == "darwin":
        base = home / "Library" / ("Application Support" if kind == "config" else "Caches")
    elif sys.platform == "win32":
        var = "APPDATA" if kind == "config" else "LOCALAPPDATA"
        base = Path(os.environ.get(var) or home / "AppData" / ("Roaming" if kind == "config" else "Local"))
    else:
        var = "XDG_CONFIG_HOME" if kind == "config" else "XDG_CACHE_HOME"
        base = Path(os.environ.get(var) or home / (".config" if kind == "config" else ".cache"))
    return base / "ibsync"
