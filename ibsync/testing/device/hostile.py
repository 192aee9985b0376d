"""A hostile device's side of DeviceLink: what :class:`~.model.HostileStep` describes, sent on
the device's connection in the middle of a backup.

Real devices never send these; a malicious one (or a broken cable, a buggy iOS) may. The host
must answer each with one clear error, hold no more than bounded memory, and commit nothing.
"""

from __future__ import annotations

import struct

from .devicelink import CODE_FILE_DATA, CODE_SUCCESS, DeviceLinkEndpoint, DroppedByDevice, HostDisconnected
from .model import HostileStep, Then
from .wire import HostClosed

_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">IB")
_FILLER = bytes(range(256)) * 4096  # 1 MiB sent over and over for a huge frame


class HostGaveUp(ConnectionError):
    """The host ended the session after the hostile step (as it should): the conversation is over."""


def act(link: DeviceLinkEndpoint, step: HostileStep) -> None:
    """Send ``step``, then do what its ``then`` says. Returns only for Then.CONTINUE with a host
    that answered; raises HostGaveUp when the host disconnected instead."""
    link.log.sent.append("hostile")
    wire = link.wire
    if step.message is not None:
        wire.send_plist(list(step.message))
    elif step.raw_message is not None:
        wire.send(_U32.pack(len(step.raw_message)) + step.raw_message)
    elif step.announce_length is not None:
        wire.send(_U32.pack(step.announce_length))
    elif step.upload_names is not None:
        _upload(link, *step.upload_names, step.upload_data)
    elif step.upload_frame is not None:
        _huge_frame(link, *step.upload_frame)
    if step.then is Then.DROP:
        wire.abort()
        raise DroppedByDevice("dropped the connection after a hostile step")
    if step.then is Then.HANG:
        _hang(link)
    try:
        answer = link.receive()  # the host's answer: an error status, or its Disconnect
    except (HostClosed, HostDisconnected) as e:
        raise HostGaveUp("the host ended the session") from e
    link.log.hostile_answers.append(answer)
    if answer[0] == "DLMessageDisconnect":
        raise HostGaveUp("the host ended the session")


def _upload(link: DeviceLinkEndpoint, device_name: bytes, file_name: bytes, data: bytes) -> None:
    link.wire.send_plist(["DLMessageUploadFiles", {}, 0.0, len(data)])
    out = _U32.pack(len(device_name)) + device_name + _U32.pack(len(file_name)) + file_name
    out += _HEAD.pack(len(data) + 1, CODE_FILE_DATA) + data + _HEAD.pack(1, CODE_SUCCESS) + _U32.pack(0)
    link.wire.send(out)


def _huge_frame(link: DeviceLinkEndpoint, announced: int, sent: int) -> None:
    """One file whose single data frame announces ``announced`` bytes; ``sent`` of them follow,
    then the link drops (a device cannot be made to send 4 GiB in a test)."""
    link.wire.send_plist(["DLMessageUploadFiles", {}, 0.0, announced])
    name = b"HomeDomain-Library/huge"
    target = b"hostile/Snapshot/huge"
    # the frame's length field counts the code byte too: ``announced - 1`` bytes of data
    link.wire.send(
        _U32.pack(len(name)) + name + _U32.pack(len(target)) + target + _HEAD.pack(announced, CODE_FILE_DATA)
    )
    left = min(sent, announced - 1)
    view = memoryview(_FILLER)
    try:
        while left:
            n = min(left, len(view))
            link.wire.send(view[:n])
            left -= n
    finally:
        link.wire.abort()
    raise DroppedByDevice(f"dropped the connection {sent} bytes into a frame announced as {announced}")


def _hang(link: DeviceLinkEndpoint) -> None:
    """Send nothing more; read (and ignore) what the host sends until it closes the connection."""
    while True:
        link.wire.read_exact(1)  # HostClosed ends the conversation
