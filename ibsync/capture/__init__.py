"""Capture: back up a live device over mobilebackup2 straight into the repository.

Modules: ``vtree`` (the backup folder the device sees: the previous snapshot with this session's
changes over it, and the archiver's Source for it), ``store`` (received files chunked and stored
as they arrive), ``devicelink`` (the host side of the DeviceLink message loop), ``backup`` (one
capture: pymobiledevice3's session set-up, the loop, the commit rule), ``restore`` (a
snapshot pushed back onto a device, its folder served from the repository), ``api`` (what the
``ibsync.backup_device``/``restore_to_device`` entry points share: repository by URL, sync and
async), ``discovery``
(finding connected devices and opening a lockdown session, for the command line).
"""
