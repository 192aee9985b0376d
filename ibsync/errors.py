"""The exception tree. Only ``ibsync.cli`` turns these into messages and exit codes."""

from __future__ import annotations


class IbsyncError(Exception):
    """Base of every error ibsync raises on purpose; its message is meant for the user."""

    exit_code = 1


class UserError(IbsyncError):
    """Bad input or a request that cannot be carried out as asked."""

    exit_code = 2


class StorageError(IbsyncError):
    """The storage backend failed."""


class NotFound(StorageError):
    """An object that was asked for does not exist."""


class AlreadyExists(StorageError):
    """An exclusive create found the object already there."""


class RepoError(IbsyncError):
    """The repository is missing, damaged or of an unknown kind."""


class WrongPassword(RepoError):
    """No key in the repository opens with the given password."""


class InvalidData(RepoError):
    """Stored bytes do not match their id or fail authentication."""


class UnsupportedVersion(RepoError):
    """The repository was written by a newer ibsync."""


class SourceError(IbsyncError):
    """A backup folder is not what it should be."""


class DeviceError(IbsyncError):
    """A device could not be talked to."""


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
