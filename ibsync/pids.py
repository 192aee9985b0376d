"""Is a process of this host alive? Asked of a lock's holder (repo/lock.py) and of the writer of
a local staging file (storage/remote.py), whose PIDs come from objects anyone with access to
the storage or to the temporary folder could have written."""

from __future__ import annotations

import os
import sys
from typing import Callable


def _pid_alive_posix(pid: int) -> bool:
    if pid <= 0:
        return False  # 0 and negatives name process groups, never a lock's holder
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OverflowError, OSError):
        return False  # no such PID can exist
    return True


def _pid_alive_windows(pid: int) -> bool:
    # os.kill(pid, 0) on Windows calls TerminateProcess: it would kill the lock's holder.
    import ctypes
    from ctypes import wintypes

    process_query_limited_information = 0x1000
    error_access_denied = 5
    still_active = 259
    if pid <= 0 or pid > 0xFFFFFFFF:
        return False
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return ctypes.get_last_error() == error_access_denied  # exists, owned by someone else
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True  # cannot tell: keep honouring the lock
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def liveness_check(platform: str) -> Callable[[int], bool]:
    """The way to ask whether a PID is alive on ``platform`` (a ``sys.platform`` value)."""
    return _pid_alive_windows if platform == "win32" else _pid_alive_posix


def pid_alive(pid: int) -> bool:
    return liveness_check(sys.platform)(pid)
