"""How a mobilebackup2 request ends badly: the ErrorCode (MBErrorDomain) of the device's final
DLMessageProcessMessage, and the exception that carries it out of an operation."""

from __future__ import annotations

# ---- codes seen from real devices ------------------------------------------------------------------------------
#: The host has too little free space; pymobiledevice3 raises NotEnoughDiskSpaceError for it
#: (MB_ERROR_INSUFFICIENT_DISK_SPACE in its device_link.py).
NOT_ENOUGH_SPACE = 105
#: "Error reading backup properties": an incremental request whose Manifest.plist is missing or empty
#: (pymobiledevice3 #1709, Netimobiledevice #80).
BAD_BACKUP_PROPERTIES = 205
#: "Device locked (MBErrorDomain/208)": the passcode prompt was not answered in time (about 3 minutes;
#: libimobiledevice #1380).
DEVICE_LOCKED = 208
DEVICE_LOCKED_DESCRIPTION = "Device locked (MBErrorDomain/208)"

# ---- the simulator's own choices (what a real device answers in these cases is not known) ----------------------
UNSUPPORTED = 1  # a request the simulator does not implement, or no common protocol version
HOST_FAILED = 2  # the host answered one of the device's requests with an error
BAD_BACKUP = 3  # a restore source that is unfinished, incomplete or unreadable
WRONG_PASSWORD = 4  # Restore or ChangePassword with the wrong backup password


class Refusal(Exception):
    """Raised inside an operation (Backup, Restore, ...): the device ends it with this non-zero ErrorCode."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description
