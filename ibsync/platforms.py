"""Which platforms ibsync runs on, and a clear refusal where one lacks what a command needs.

Linux is supported and tested in CI; macOS is supported (F_FULLFSYNC for durable writes,
launchd for the agent) but its code paths are not run in CI. On Windows the repository side,
backups from a device, the agent, status and the web app's pages are written to work, but
writing files into a folder safely needs calls Windows does not have: opening each folder
relative to its parent without following links (``dir_fd``, ``O_NOFOLLOW``) and positional
writes (``os.pwrite``, in Python before 3.13 not there). Rather than write through a link
planted in the target or fail half way, restore to a folder, extract, export and mount refuse
there in one line."""

from __future__ import annotations

import os
import sys

from .errors import UserError

#: the calls safe writing into a folder needs (restore, extract, export, the mount's spill file)
_FOLDER_WRITING_CALLS = ("pwrite", "pread")


def folder_writing_missing() -> str | None:
    """What this platform lacks for writing files into a folder safely, or None."""
    if sys.platform == "win32" or os.open not in os.supports_dir_fd:
        return "opening files relative to a folder (dir_fd)"
    missing = [name for name in _FOLDER_WRITING_CALLS if not hasattr(os, name)]
    return f"os.{missing[0]}" if missing else None


def require_folder_writing(what: str) -> None:
    """Refuse ``what`` (e.g. "restore to a folder") on a platform that lacks the calls."""
    missing = folder_writing_missing()
    if missing is not None:
        raise UserError(
            f"{what} is not supported on this platform ({sys.platform}: it lacks {missing}); "
            "use Linux or macOS, or WSL on Windows"
        )
