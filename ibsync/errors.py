"""The exception tree and the exit statuses they end a command with.

Only ``ibsync.cli`` turns these into messages and exit codes; the code each error ends with is
its class's ``exit_code``, set here for every class (the ones defined elsewhere derive from one
of these and inherit it), so a script can tell "try again later" from "wrong password" from a
bug. The table is documented in README "Exit codes" and in ``ibsync --help``.
"""

from __future__ import annotations

# The exit statuses. 0-2 are click's and the shell's conventions; 70 is sysexits' EX_SOFTWARE.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_PASSWORD = 4
EXIT_NOT_FOUND = 5
EXIT_STORAGE = 6
EXIT_DEVICE = 7
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

# status -> what it means; the one table README, docs and `ibsync --help` describe
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_FAILED: "the command ran but something failed: a file not restored or extracted, damage found "
    "by check, a device overdue (status), storage that refused an operation",
    EXIT_USAGE: "bad input: a wrong option or argument, an unreadable password or config file",
    EXIT_LOCKED: "the repository is locked by another command: try again later",
    EXIT_PASSWORD: "wrong password: no key of the repository opens with it, or the iOS backup password is wrong",
    EXIT_NOT_FOUND: "not found: no repository at that location, no such snapshot, no snapshot of that device",
    EXIT_STORAGE: "the storage could not be reached (no answer for as long as ibsync retries, "
    "IBSYNC_RETRY_SECONDS, default 300 s): try again later",
    EXIT_DEVICE: "device problem: none connected, usbmuxd not reachable, Trust or the passcode not answered, "
    "the device went away or refused",
    EXIT_INTERNAL: "internal error: a bug in ibsync (IBSYNC_DEBUG=1 shows the traceback; please report it)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGTERM): what was stored so far is kept",
}


class IbsyncError(Exception):
    """Base of every error ibsync raises on purpose; its message is meant for the user."""

    exit_code = EXIT_FAILED


class UserError(IbsyncError):
    """Bad input or a request that cannot be carried out as asked."""

    exit_code = EXIT_USAGE


class NameNotFound(UserError):
    """Something the user named does not exist: a snapshot id, a device without snapshots."""

    exit_code = EXIT_NOT_FOUND


class WrongBackupPassword(UserError):
    """The iOS backup password does not unlock the backup's keybag."""

    exit_code = EXIT_PASSWORD


class StorageError(IbsyncError):
    """The storage backend failed: refused an operation, an I/O error, a missing object."""

    exit_code = EXIT_FAILED


class StorageUnreachable(StorageError):
    """The storage did not answer (connection refused, reset, timed out, 5xx) for as long as
    operations are retried: the network, the server or the drive is away; try again later."""

    exit_code = EXIT_STORAGE


class NotFound(StorageError):
    """An object that was asked for does not exist."""


class AlreadyExists(StorageError):
    """An exclusive create found the object already there."""


class RepoError(IbsyncError):
    """The repository is missing, damaged or of an unknown kind."""

    exit_code = EXIT_FAILED


class RepoNotFound(RepoError):
    """There is no ibsync repository at the given location (no config object)."""

    exit_code = EXIT_NOT_FOUND


class RepoLocked(RepoError):
    """Another process holds a conflicting lock (``repo.lock.Locked``)."""

    exit_code = EXIT_LOCKED


class WrongPassword(RepoError):
    """No key in the repository opens with the given password."""

    exit_code = EXIT_PASSWORD


class InvalidData(RepoError):
    """Stored bytes do not match their id or fail authentication."""


class UnsupportedVersion(RepoError):
    """The repository was written by a newer ibsync."""


class SourceError(IbsyncError):
    """A backup folder is not what it should be."""


class DeviceError(IbsyncError):
    """A device could not be talked to."""

    exit_code = EXIT_DEVICE


class DeviceDisconnected(DeviceError):
    """The device went away in the middle of a conversation (cable pulled, out of Wi-Fi range,
    switched off): nobody did anything wrong; try again when it is back."""


class DeviceUnreachable(DeviceError):
    """The device is listed (by usbmuxd, or on the LAN) but lockdown does not answer in time
    (asleep, out of range, refused): absent for now, not a failure."""


class PasscodeNotEntered(DeviceError):
    """The device asked for its passcode to start the backup (iOS 16.1+) and nobody typed it: the
    device gave up (MBErrorDomain 208, "Device locked"). Try again when someone is there."""


class TrustNotAnswered(DeviceError):
    """The device shows "Trust this computer?" and nobody answered it in time."""
