"""A ZIP archive produced while it is sent: no temporary copy of what it holds.

``zipfile`` writes to a stream it cannot seek by giving every member a data descriptor (the
sizes and CRC after the data instead of in the local header); :func:`stream_zip` hands it a
pipe with no ``tell``/``seek`` and yields what it wrote after each chunk of each member, so
memory stays at about one chunk whatever the archive's size.

Names inside the archive come from a snapshot (the backup's own words): :func:`member_name`
keeps only relative names made of real components, never absolute or with ``..``, in UTF-8.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

#: Files that are compressed already: stored as they are (deflating them costs CPU for nothing).
STORED_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".heic",
        ".heif",
        ".png",
        ".gif",
        ".webp",
        ".mov",
        ".mp4",
        ".m4v",
        ".m4a",
        ".mp3",
        ".aac",
        ".caf",
        ".amr",
        ".3gp",
        ".zip",
        ".gz",
        ".bz2",
        ".xz",
        ".zst",
        ".ipa",
        ".pdf",
    }
)
YIELD_AT = 256 << 10  # bytes gathered before they are handed on
_DOS_EPOCH = 315532800  # 1980-01-01: the earliest time a ZIP header can hold
_DOS_END = 4354819199  # 2107-12-31


@dataclass(frozen=True)
class Member:
    name: str  # "/"-separated, relative (see member_name)
    size: int  # expected size (decides ZIP64 up front; the real length is what is recorded)
    mtime: int  # seconds since the epoch
    read: Callable[[], Iterable[bytes]]  # opened only when the member is written


def member_name(path: str) -> str | None:
    """``path`` as a name inside an archive, or None when it cannot be one safely: every
    component must be a real name (not empty, ``.`` or ``..``, no NUL). A backslash, which an
    extractor on Windows would take for a separator, becomes ``_``."""
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") or "\0" in p for p in parts):
        return None
    try:
        path.encode("utf-8")  # a name read from a non-UTF-8 row cannot be a ZIP name
    except UnicodeEncodeError:
        return None
    return "/".join(p.replace("\\", "_") for p in parts)


class _Pipe:
    """What zipfile writes to. No tell/seek on purpose: zipfile then writes data descriptors."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.pending = 0

    def write(self, data: bytes, /) -> int:
        b = bytes(data)
        self._parts.append(b)
        self.pending += len(b)
        return len(b)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Never called (zipfile leaves a file it was given open); part of the writable file
        interface zipfile's type hints ask for."""

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts, self.pending = [], 0
        return out


def _date_time(mtime: int) -> tuple[int, int, int, int, int, int]:
    t = min(max(mtime, _DOS_EPOCH), _DOS_END)
    return time.gmtime(t)[:6]


def stream_zip(members: Iterable[Member]) -> Iterator[bytes]:
    """The archive of ``members`` in pieces of about YIELD_AT bytes. A member whose content
    fails to read raises (the archive is then cut short, which a client sees as a failed
    download, rather than a complete-looking archive with a damaged file)."""
    pipe = _Pipe()
    zf = zipfile.ZipFile(pipe, "w", allowZip64=True)
    first = True  # the first member goes out at once: the download shows as started
    for m in members:
        info = zipfile.ZipInfo(m.name, date_time=_date_time(m.mtime))
        info.external_attr = 0o100644 << 16
        stored = any(m.name.lower().endswith(s) for s in STORED_SUFFIXES)
        info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
        if not stored:
            info._compresslevel = 1  # type: ignore[attr-defined]  # speed over size: this is a download
        info.file_size = m.size
        with zf.open(info, "w", force_zip64=m.size >= zipfile.ZIP64_LIMIT // 2) as out:
            for data in m.read():
                out.write(data)
                if pipe.pending >= YIELD_AT:
                    yield pipe.take()
        if pipe.pending >= YIELD_AT or first:
            first = False
            yield pipe.take()
    zf.close()
    yield pipe.take()
