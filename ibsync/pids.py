"""Is a process of this host alive? Asked of a lock's holder (repo/lock.py), of the agent
(agent/history.py, agent/status.py) and of the writer of a local staging file
(storage/remote.py), whose PIDs come from objects anyone with access to the storage or to the
temporary folder could have written.

psutil answers correctly on each platform: ``os.kill(pid, 0)``, the POSIX idiom, calls
TerminateProcess on Windows and would kill the lock's holder it asks about."""

from __future__ import annotations

import psutil

_MAX_PID = 0xFFFFFFFF  # no platform has larger ones; a forged lock may hold any integer


def pid_alive(pid: int) -> bool:
    if pid <= 0 or pid > _MAX_PID:
        return False  # 0 and negatives name process groups (or nothing), never a lock's holder
    try:
        return psutil.pid_exists(pid)
    except (OverflowError, OSError):
        return False
