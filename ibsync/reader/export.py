"""``ibsync export``: what people most want out of a phone backup, under real names.

A preset names one or more sources, each a folder of a domain (its *base*) and a glob of the
files below it; a file is written to ``OUT/<path below the base>``, so a preset keeps its own
sub-folders (``100APPLE/IMG_0001.HEIC``) and nothing of the backup's layout above them. Files are
read through the browsing layer (verified, decrypted for encrypted iOS backups) and written by
the extractor's safe writers: no symbolic link in OUT is followed, every name is checked, and a
file that fails costs only itself.

Photos get their capture time as their file time: the EXIF ``DateTimeOriginal`` of a JPEG or
HEIC photo when the photo also records its UTC offset (``OffsetTimeOriginal``, written by
iPhones since iOS 13), which makes the time exact; otherwise, and for videos, the file's
modification time from the backup (MBFile ``LastModified``).
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from ..errors import IbsyncError, UserError
from ..platforms import require_folder_writing
from .browse import Item, SnapshotView
from .extractor import Refused, exists_below, open_folder, write_file
from .paths import BadName, output_parts, translate_glob


@dataclass(frozen=True)
class Source:
    domain: str
    base: str  # a folder of the domain; files are written by their path below it
    include: str  # a glob below the base ("**" crosses folders, "*" stays in one)
    exclude: tuple[str, ...] = ()  # globs of file names left out

    @property
    def folder(self) -> str:
        return f"{self.domain}/{self.base}"

    def describe(self) -> str:
        text = f"{self.folder}/{self.include}"
        if self.exclude:
            text += " (not " + ", ".join(self.exclude) + ")"
        return text

    def matches(self, below: str) -> bool:
        """Whether a file at ``below`` (its path below the base) is one of this source's (any
        case: ``*.m4a`` takes ``MEMO.M4A`` too)."""
        if not _glob(self.include).fullmatch(below):
            return False
        name = below.rsplit("/", 1)[-1]
        return not any(_glob(x).fullmatch(name) for x in self.exclude)

    def may_match(self, below: str) -> bool:
        """For a row that cannot be used (its path may climb out with '..'): whether it matches,
        or its file name matches the last part of the glob."""
        name = below.rsplit("/", 1)[-1]
        return self.matches(below) or (
            bool(_glob(self.include.rsplit("/", 1)[-1]).fullmatch(name))
            and not any(_glob(x).fullmatch(name) for x in self.exclude)
        )


@functools.lru_cache(maxsize=64)
def _glob(pattern: str) -> re.Pattern:
    return re.compile(translate_glob(pattern), re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    sources: tuple[Source, ...]
    capture_dates: bool = False  # file times from the photo's EXIF capture time where exact


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "photos",
            "camera roll photos and videos (originals), capture dates as file times",
            (Source("CameraRollDomain", "Media/DCIM", "**", ("*.AAE",)),),
            capture_dates=True,
        ),
        Preset(
            "voice-memos",
            "Voice Memos recordings, by their stored names",
            (
                Source("MediaDomain", "Media/Recordings", "*.m4a"),
                Source("AppDomainGroup-group.com.apple.VoiceMemos.shared", "Recordings", "*.m4a"),
            ),
        ),
        Preset("voicemail", "visual voicemail messages", (Source("HomeDomain", "Library/Voicemail", "*.amr"),)),
        Preset(
            "whatsapp-media",
            "WhatsApp photos, videos, voice notes and documents",
            (Source("AppDomainGroup-group.net.whatsapp.WhatsApp.shared", "Message/Media", "**"),),
        ),
        Preset(
            "sms-attachments",
            "Messages (SMS/iMessage) attachments",
            (Source("MediaDomain", "Library/SMS/Attachments", "**"),),
        ),
    )
}


def preset(name: str) -> Preset:
    got = PRESETS.get(name)
    if got is None:
        raise UserError(f"no export preset '{name}'; presets: {', '.join(PRESETS)} (see --list)")
    return got


@dataclass(frozen=True)
class Job:
    item: Item
    parts: tuple[str, ...]  # folders and file name below OUT


@dataclass(frozen=True)
class Failure:
    path: str  # Domain/relative/path (raw: escape before printing)
    reason: str


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)


def plan_export(view: SnapshotView, chosen: Preset) -> Plan:
    """One job per file of the preset, in path order per source; a file whose name cannot be
    written below OUT, that names the same file as an earlier one, or that names a file where
    other files need a folder is a failure, decided before anything is written."""
    plan = Plan()
    by_parts: dict[tuple[str, ...], Job] = {}
    for source in chosen.sources:
        top = view.stat(source.folder)
        if top is None or top.kind != "dir":
            continue
        base_parts = len(source.folder.split("/"))
        for item in view.walk(source.folder):
            if item.kind != "file":
                continue
            below = item.path[len(source.folder) + 1 :]
            if not source.matches(below):
                continue
            domain, _, rel = item.path.partition("/")
            try:
                parts = output_parts(domain, rel)[base_parts:]
            except BadName as e:
                plan.failed.append(Failure(item.path, str(e)))
                continue
            first = by_parts.get(parts)
            if first is not None:
                plan.failed.append(Failure(item.path, f"{first.item.path} has the same name and was exported"))
                continue
            by_parts[parts] = Job(item, parts)
    folders = {job.parts[:i] for job in by_parts.values() for i in range(1, len(job.parts))}
    for parts, job in by_parts.items():
        if parts in folders:
            plan.failed.append(Failure(job.item.path, "other files need a folder of this name"))
        else:
            plan.jobs.append(job)
    # rows the browsing layer left out (a '..' or empty name, a damaged MBFile) that lie below a
    # preset's folder are named: they may be some of the files asked for
    for b in view.bad_rows:
        if any(b.path.startswith(s.folder + "/") and s.may_match(b.path[len(s.folder) + 1 :]) for s in chosen.sources):
            plan.failed.append(Failure(b.path, b.reason))
    return plan


def existing(out: str, jobs: Iterable[Job]) -> list[Job]:
    """Jobs whose file (or anything, a link included) is already in OUT."""
    return [job for job in jobs if exists_below(out, job.parts)]


@dataclass
class Outcome:
    files: int = 0
    bytes: int = 0
    failed: list[Failure] = field(default_factory=list)


EXPORT_WORKERS = 4  # files written at once: reading, decrypting and writing overlap (as extract)


def run_export(
    view: SnapshotView,
    chosen: Preset,
    plan: Plan,
    out: str,
    advance: Callable[..., None],
    workers: int = EXPORT_WORKERS,
) -> Outcome:
    """Write the plan's files below ``out`` (created if needed) on ``workers`` threads;
    ``advance(n, files=0)`` reports progress. A file that fails leaves nothing behind and is
    named; the others are written."""
    require_folder_writing("export")
    outcome = Outcome(failed=list(plan.failed))
    if not plan.jobs:
        return outcome
    try:
        os.makedirs(out, exist_ok=True)
        out_fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise UserError(f"cannot use {out} as the output folder ({e.strerror})") from None
    lock = threading.Lock()

    def export_one(job: Job) -> None:
        try:
            written = write_file(out_fd, out, job.parts, view.open(job.item), job.item.mtime, advance)
            if chosen.capture_dates:
                _set_capture_time(out_fd, out, job.parts)
        except (IbsyncError, OSError, ValueError, OverflowError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            with lock:
                outcome.failed.append(Failure(job.item.path, reason))
            return
        advance(0, files=1)
        with lock:
            outcome.files += 1
            outcome.bytes += written

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ibsync-export")
    try:
        for fut in [pool.submit(export_one, job) for job in plan.jobs]:
            fut.result()
    finally:  # on Ctrl-C, files not started are dropped; those under way finish or are removed
        pool.shutdown(wait=True, cancel_futures=True)
        os.close(out_fd)
    return outcome


# ---- capture dates --------------------------------------------------------------------------

_EXIF_IFD, _DATE_TIME_ORIGINAL, _OFFSET_TIME_ORIGINAL = 0x8769, 0x9003, 0x9011
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".heic", ".heif")


def exif_capture_time(fileobj) -> int | None:
    """Unix seconds of a photo's EXIF DateTimeOriginal with its OffsetTimeOriginal, or None
    (no EXIF, no offset, not a photo Pillow reads). Only the header is read."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return None
    try:
        try:
            from pillow_heif import register_heif_opener

            register_heif_opener()
        except ImportError:  # pragma: no cover - HEIC then keeps the backup's time
            pass
        with Image.open(fileobj) as img:
            exif = img.getexif().get_ifd(_EXIF_IFD)
        return parse_exif_time(exif.get(_DATE_TIME_ORIGINAL), exif.get(_OFFSET_TIME_ORIGINAL))
    except Exception:  # the photo is the backup's bytes: an odd one keeps the backup's time
        return None


def parse_exif_time(when: object, offset: object) -> int | None:
    """``"2023:06:01 12:34:56"`` and ``"+02:00"`` as unix seconds; None unless both are sound."""
    if not isinstance(when, str) or not isinstance(offset, str):
        return None
    m = re.fullmatch(r"\s*([+-])(\d\d):(\d\d)\s*\x00*", offset)
    if m is None:
        return None
    try:
        local = datetime.strptime(when.strip("\x00 "), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    sign = 1 if m.group(1) == "+" else -1
    tz = timezone(sign * timedelta(hours=int(m.group(2)), minutes=int(m.group(3))))
    return int(local.replace(tzinfo=tz).timestamp())


def _set_capture_time(out_fd: int, shown: str, parts: tuple[str, ...]) -> None:
    """Give a written photo its EXIF capture time, reading it through descriptors (no link
    followed: the file is the one just written, or nothing is changed)."""
    if not parts[-1].lower().endswith(_PHOTO_SUFFIXES):
        return
    folder = open_folder(out_fd, parts[:-1], shown)
    try:
        try:
            fd = os.open(
                parts[-1], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), dir_fd=folder
            )
        except OSError as e:
            raise Refused(e.errno, f"{os.path.join(shown, *parts)} changed while it was written") from None
        with os.fdopen(fd, "rb") as f:
            when = exif_capture_time(f)
            if when is not None:
                os.utime(f.fileno(), (when, when))
    finally:
        os.close(folder)
