"""Browsing snapshots by iOS domain and path: ls, find, extract, diff.

Paths are ``Domain/relative/path`` as in Manifest.db; patterns are globs (see
``ibsync.reader.paths.PathPattern``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import click

from ..errors import IbsyncError, UserError
from ..model import Snapshot, utc_iso
from ..ui.text import printable, size, table, when
from ..opening import read_password_file
from .app import App, common_options

BACKUP_PASSWORD_ENV = "IBSYNC_BACKUP_PASSWORD"
EXTRACT_WORKERS = 4


class ExtractIncomplete(IbsyncError):
    pass


class UnreadableRows(IbsyncError):
    """Some Manifest.db rows could not be used: what could be read was shown, these were named."""


def backup_password_option(func: Callable) -> Callable:
    return click.option(
        "--backup-password-file",
        metavar="FILE",
        help=f"Read the iOS backup password (encrypted iPhone backups) from FILE (also ${BACKUP_PASSWORD_ENV}; "
        "asked for on a terminal). It is never stored.",
    )(func)


def _device_option(func: Callable) -> Callable:
    return click.option("--device", metavar="UDID|NAME", help="With 'latest': the latest snapshot of this device.")(func)


def backup_password_source(password_file: str | None) -> Callable[[], str]:
    """Where the iOS backup password comes from: FILE, else $IBSYNC_BACKUP_PASSWORD, else a
    prompt on a terminal; looked for only when called."""

    def password() -> str:
        if password_file:
            return read_password_file(password_file)
        if os.environ.get(BACKUP_PASSWORD_ENV):
            return os.environ[BACKUP_PASSWORD_ENV]
        if not sys.stdin.isatty():
            raise UserError(
                "this is an encrypted iOS backup: give its password with --backup-password-file FILE "
                f"or ${BACKUP_PASSWORD_ENV}"
            )
        import getpass

        pw = getpass.getpass("iOS backup password: ")
        if not pw:
            raise UserError("no iOS backup password given")
        return pw

    return password


def _keyring(password_file: str | None):
    """Keybags unlocked on demand: the password is only looked for when an encrypted iOS
    backup is met, and asked for at most once."""
    from ..reader.ios_crypto import BackupKeyring

    return BackupKeyring(backup_password_source(password_file))


def _ts(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def _snap_ref(s: Snapshot) -> dict[str, Any]:
    return {
        "id": s.id,
        "short_id": s.short_id,
        "backup_date": utc_iso(s.backup_date) if s.backup_date else None,
        "device": {"udid": s.device.udid, "name": s.device.name},
        "ios_encrypted": s.ios_encrypted,
    }


def _entry_dict(e) -> dict[str, Any]:
    return {
        "domain": e.domain,
        "relative_path": e.relative_path,
        "path": e.path,
        "file_id": e.file_id,
        "size": e.size,
        "mtime": utc_iso(_ts(e.mtime)),
        "mode": e.mode,
    }


def _bad_rows_dicts(bad: list[tuple[Snapshot, Any]]) -> list[dict[str, Any]]:
    return [{"snapshot": snap.id, "path": b.path, "file_id": b.file_id, "reason": b.reason} for snap, b in bad]


def _fail_on_bad_rows(bad: list[tuple[Snapshot, Any]]) -> None:
    """Name each row that could not be used (escaped: they are the backup's words) and fail."""
    if not bad:
        return
    for snap, b in bad:
        click.echo(f"ibsync: cannot read the Manifest.db row {printable(b.path)} (snapshot {snap.short_id}): "
                   f"{printable(b.reason)}", err=True)
    raise UnreadableRows(f"{len(bad)} row(s) of Manifest.db could not be read")


# ---- ls -------------------------------------------------------------------------------------


@click.command("ls")
@click.argument("snapshot")
@click.argument("pattern", required=False)
@_device_option
@backup_password_option
@common_options
def ls_cmd(app: App, snapshot: str, pattern: str | None, device: str | None, backup_password_file: str | None) -> None:
    """List a snapshot's domains, or its files matching PATTERN.

    \b
    Without PATTERN: each domain with its number of files and their size.
    With PATTERN: each matching file (domain, path, size, modification time), as the
    backup's Manifest.db records it. PATTERN is a glob over Domain/relative/path: '*' stays
    within a folder, '**' crosses folders, a folder selects what it holds, and a bare file name
    (sms.db) matches anywhere. Examples:
      ibsync ls latest
      ibsync ls latest 'CameraRollDomain/Media/DCIM/**'
      ibsync ls latest 'HomeDomain/Library/SMS'
    """
    from ..reader.manifest import SnapshotManifest
    from ..reader.paths import PathPattern

    from ..reader.manifest_cache import ManifestCache

    repo = app.open_repo()
    snap = repo.find_snapshot(snapshot, device)
    with SnapshotManifest(repo, snap, _keyring(backup_password_file), cache=ManifestCache.for_repository(repo)) as manifest:
        if pattern is None:
            domains = manifest.domains()
            bad = [(snap, b) for b in manifest.bad_rows]
            if app.json:
                app.emit_json(
                    {
                        "snapshot": _snap_ref(snap),
                        "domains": [
                            {"domain": d, "files": st.files, "dirs": st.dirs, "symlinks": st.symlinks, "bytes": st.bytes}
                            for d, st in domains.items()
                        ],
                        "unreadable_rows": _bad_rows_dicts(bad),
                    }
                )
            else:
                rows = [[d, str(st.files), size(st.bytes)] for d, st in domains.items()]
                click.echo(table(["Domain", "Files", "Size"], rows, right={1, 2}))
                files = sum(st.files for st in domains.values())
                total = sum(st.bytes for st in domains.values())
                click.echo(f"snapshot {snap.short_id}: {len(domains)} domain(s), {files} file(s), {size(total)}")
            _fail_on_bad_rows(bad)
            return
        entries = manifest.entries(PathPattern(pattern))
        if app.json:
            _emit_json_stream(_ls_document(snap, pattern, entries, manifest))
        else:
            _echo_files_table(entries)
        bad = [(snap, b) for b in manifest.bad_rows]
    _fail_on_bad_rows(bad)


def _ls_document(snap: Snapshot, pattern: str, entries: Iterator, manifest) -> Iterator[tuple[str, Any]]:
    """ls --json's keys in order; the rows stream, and the unreadable rows are asked for only
    once every row has been read."""
    yield "snapshot", _snap_ref(snap)
    yield "pattern", pattern
    yield "files", JsonItems(_entry_dict(e) for e in entries)
    yield "unreadable_rows", _bad_rows_dicts([(snap, b) for b in manifest.bad_rows])


def _echo_files_table(entries: Iterable) -> None:
    """ls's table and total line, holding no row in memory (they go through a spill file)."""
    files = total = 0
    with SpilledTable(["Domain", "Path", "Size", "Modified"], right={2}) as t:
        for e in entries:
            t.add([e.domain, e.relative_path, size(e.size), when(_ts(e.mtime))])
            files += 1
            total += e.size
        t.echo()
    click.echo(f"{files} file(s), {size(total)}")


# ---- bounded-memory output ------------------------------------------------------------------
#
# A listing of a million rows must not be a million rows in memory: tables are written to an
# unlinked temporary file while their column widths are measured, JSON arrays are written as
# their items come. Both give byte for byte what ``table`` and ``json.dumps(indent=2)`` give.

ECHO_BATCH = 1 << 18  # characters gathered before each write to stdout


class _Out:
    """Text for stdout gathered into batches (one write per ECHO_BATCH characters, not per row)."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._n = 0

    def write(self, text: str) -> None:
        self._parts.append(text)
        self._n += len(text)
        if self._n >= ECHO_BATCH:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            click.echo("".join(self._parts), nl=False)
            self._parts, self._n = [], 0


class SpilledTable:
    """``ui.text.table`` for rows that do not fit in memory: each row is made printable, measured
    and written to an unlinked temporary file (printable cells hold no tab or newline, so a line
    of tab-separated cells reads back exactly); ``echo`` then prints the aligned table."""

    def __init__(self, headers: list[str], right: set[int] = frozenset()) -> None:
        self.headers = headers
        self.right = right
        self.widths = [len(h) for h in headers]
        self._file = tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n")

    def __enter__(self) -> "SpilledTable":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def add(self, cells: list[str]) -> None:
        cells = [printable(c) for c in cells]
        for i, cell in enumerate(cells):
            if len(cell) > self.widths[i]:
                self.widths[i] = len(cell)
        self._file.write("\t".join(cells) + "\n")

    def _fmt(self, cells: list[str]) -> str:
        w = self.widths
        return "  ".join(c.rjust(w[i]) if i in self.right else c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()

    def echo(self) -> None:
        out = _Out()
        out.write(self._fmt(self.headers) + "\n" + "  ".join("-" * w for w in self.widths))
        self._file.seek(0)
        for line in self._file:
            out.write("\n" + self._fmt(line[:-1].split("\t")))
        out.write("\n")
        out.flush()


@dataclass(frozen=True)
class JsonItems:
    """A JSON array to be written item by item by ``_emit_json_stream``."""

    items: Iterable[Any]


def _emit_json_stream(pairs: Iterable[tuple[str, Any]]) -> None:
    """Print the JSON object of ``pairs`` exactly as ``App.emit_json`` prints the same dict
    (``json.dumps(indent=2, default=str)`` and a newline), writing each pair as it comes and each
    ``JsonItems`` value item by item, so that no value is held whole."""
    out = _Out()
    first = True
    for key, value in pairs:
        out.write(("{\n  " if first else ",\n  ") + json.dumps(key) + ": ")
        first = False
        if isinstance(value, JsonItems):
            _write_json_array(out, value.items)
        else:
            out.write(json.dumps(value, indent=2, default=str).replace("\n", "\n  "))
    out.write("{}\n" if first else "\n}\n")
    out.flush()


def _write_json_array(out: _Out, items: Iterable[Any]) -> None:
    """An array one level down (the value of a top-level key), as json.dumps(indent=2) nests it."""
    empty = True
    for item in items:
        out.write(("[\n    " if empty else ",\n    ") + json.dumps(item, indent=2, default=str).replace("\n", "\n    "))
        empty = False
    out.write("[]" if empty else "\n  ]")


# ---- find -----------------------------------------------------------------------------------


class _Histories:
    """Each matching path's versions, kept in a private temporary sqlite database rather than in
    memory: ``find`` across a year of snapshots of a phone where the pattern matches most files
    holds paths x snapshots versions. Names are stored as UTF-32-BE (surrogates passed through),
    whose byte order is the code point order Python sorts ``str`` by, so ``ORDER BY`` lists
    paths exactly as sorting them in Python did."""

    def __init__(self) -> None:
        self.db = sqlite3.connect("")  # "": a private temporary file, removed on close
        self.db.executescript(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
            "CREATE TABLE paths(id INTEGER PRIMARY KEY, device BLOB, domain BLOB, rel BLOB, name BLOB,"
            " last BLOB, present INTEGER, seen INTEGER, UNIQUE(device, domain, rel));"
            "CREATE TABLE versions(path INTEGER, snap INTEGER, size INTEGER, mtime TEXT, status TEXT);"
        )
        self.snaps: list[Snapshot] = []  # by the number versions refer to them with

    def close(self) -> None:
        self.db.close()

    def record(self, holding, snap: Snapshot, seen_device: bool) -> None:
        """Add one snapshot's rows to each path's history: first, new, changed, unchanged, or
        removed (a path the device's previous snapshot held and this one does not)."""
        n = len(self.snaps)
        self.snaps.append(snap)
        udid = _u32(snap.device.udid)
        db = self.db
        with db:
            for e, content in holding.entries:
                key = (udid, _u32(e.domain), _u32(e.relative_path))
                last = _content_key(content)
                got = db.execute("SELECT id, last, present FROM paths WHERE device = ? AND domain = ? AND rel = ?",
                                 key).fetchone()
                if got is None:
                    pid = db.execute("INSERT INTO paths(device, domain, rel, name, last, present, seen) "
                                     "VALUES (?, ?, ?, ?, ?, 1, ?)", key + (_u32(snap.device.name), last, n)).lastrowid
                    status = "new" if seen_device else "first"
                else:
                    pid = got[0]
                    if not got[2]:
                        status = "new" if seen_device else "first"
                    else:
                        status = "changed" if last != got[1] else "unchanged"
                    db.execute("UPDATE paths SET last = ?, present = 1, seen = ? WHERE id = ?", (last, n, pid))
                db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?)",
                           (pid, n, e.size, utc_iso(_ts(e.mtime)), status))
            gone = "FROM paths WHERE device = ? AND present = 1 AND seen <> ?"
            db.execute(f"INSERT INTO versions SELECT id, ?, NULL, NULL, 'removed' {gone} ORDER BY id", (n, udid, n))
            db.execute(f"UPDATE paths SET present = 0 WHERE id IN (SELECT id {gone})", (udid, n))

    def counts(self) -> tuple[int, int, int]:
        """Paths, devices among them, version rows."""
        paths, devices = self.db.execute("SELECT count(*), count(DISTINCT device) FROM paths").fetchone()
        return paths, devices, self.db.execute("SELECT count(*) FROM versions").fetchone()[0]

    def paths(self) -> Iterator[tuple[str, str | None, str, str, list[dict[str, Any]]]]:
        """``(udid, device name, domain, relative path, versions)`` by device, domain and path;
        versions oldest first (one path's versions in memory at a time)."""
        rows = self.db.execute(
            "SELECT p.id, p.device, p.name, p.domain, p.rel, v.snap, v.size, v.mtime, v.status "
            "FROM paths p JOIN versions v ON v.path = p.id ORDER BY p.device, p.domain, p.rel, p.id, v.rowid"
        )
        current: int | None = None
        head: tuple = ()
        versions: list[dict[str, Any]] = []
        for pid, device, name, domain, rel, n, size_, mtime, status in rows:
            if pid != current:
                if current is not None:
                    yield head + (versions,)
                current, versions = pid, []
                head = (_from_u32(device), _from_u32(name), _from_u32(domain), _from_u32(rel))
            versions.append(_version(self.snaps[n], size_, mtime, status))
        if current is not None:
            yield head + (versions,)


def _u32(text: str | None) -> bytes | None:
    return None if text is None else text.encode("utf-32-be", "surrogatepass")


def _from_u32(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-32-be", "surrogatepass")


def _content_key(content: object) -> bytes | None:
    """A short digest standing for a payload's content (blob ids and size): only compared."""
    if content is None:
        return None
    return hashlib.blake2b(repr(content).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _version(snap: Snapshot, size: int | None, mtime: str | None, status: str) -> dict[str, Any]:
    return {
        "snapshot": snap.id,
        "short_id": snap.short_id,
        "backup_date": utc_iso(snap.backup_date) if snap.backup_date else None,
        "size": size,
        "mtime": mtime,
        "status": status,
        "_date": snap.backup_date,
    }


@click.command("find")
@click.argument("pattern")
@click.option("--device", metavar="UDID|NAME", help="Only snapshots of this device.")
@backup_password_option
@common_options
def find_cmd(app: App, pattern: str, device: str | None, backup_password_file: str | None) -> None:
    """Which snapshots hold the files matching PATTERN, and when they changed.

    For each matching path: every snapshot of its device that holds it, oldest first, marked
    first (in the device's first snapshot), new, changed (its content differs from the
    previous snapshot's), unchanged, or removed (gone from that snapshot on). PATTERN is a glob
    as for 'ls'; a bare file name such as sms.db matches anywhere.
    """
    from ..reader.history import DeviceHistory
    from ..reader.manifest_cache import ManifestCache
    from ..reader.paths import PathPattern

    pat = PathPattern(pattern)
    repo = app.open_repo()
    snaps = repo.snapshots()
    if device:
        snaps = [s for s in snaps if s.of_device(device)]
        if not snaps:
            raise UserError(f"no snapshot of a device '{device}'")
    keyring = _keyring(backup_password_file)
    cache = ManifestCache.for_repository(repo)
    histories = _Histories()
    bad: list[tuple[Snapshot, Any]] = []
    earlier: set[str] = set()  # devices with a snapshot already looked at
    followed: dict[str, DeviceHistory] = {}  # each device's rows, followed from snapshot to snapshot
    try:
        try:
            for snap in snaps:
                udid = snap.device.udid
                follow = followed.get(udid)
                if follow is None:
                    follow = followed[udid] = DeviceHistory(repo, pat, keyring, cache)
                holding = follow.step(snap)
                histories.record(holding, snap, udid in earlier)
                bad += [(snap, b) for b in holding.bad]
                earlier.add(udid)
        finally:
            for follow in followed.values():
                follow.close()
        _echo_found(app, pattern, histories, len(snaps), bad)
    finally:
        histories.close()
    _fail_on_bad_rows(bad)


def _echo_found(app: App, pattern: str, histories: _Histories, n_snaps: int, bad: list[tuple[Snapshot, Any]]) -> None:
    """find's output, path by path as the history database lists them."""
    if app.json:
        _emit_json_stream(iter([
            ("pattern", pattern),
            ("paths", JsonItems(
                {
                    "device": {"udid": udid, "name": name},
                    "domain": domain,
                    "relative_path": rel,
                    "path": f"{domain}/{rel}",
                    "versions": [{k: v for k, v in ver.items() if not k.startswith("_")} for ver in versions],
                }
                for udid, name, domain, rel, versions in histories.paths()
            )),
            ("unreadable_rows", _bad_rows_dicts(bad)),
        ]))
        return
    n_paths, n_devices, n_versions = histories.counts()
    if not n_paths:
        click.echo(f"no snapshot holds a file matching '{printable(pattern)}'")
        return
    out = _Out()
    for n, (udid, name, domain, rel, versions) in enumerate(histories.paths()):
        title = f"{domain}/{rel}"
        if n_devices > 1:
            title += f"  ({name or udid}, {udid})"
        rows = [
            [
                v["short_id"],
                when(v["_date"]),
                size(v["size"]) if v["size"] is not None else "-",
                when(_ts_iso(v["mtime"])) if v["mtime"] else "-",
                v["status"],
            ]
            for v in versions
        ]
        out.write(("\n" if n else "") + printable(title) + "\n"
                  + _indent(table(["Snapshot", "Backup date", "Size", "Modified", "Content"], rows, right={2})) + "\n")
    out.write(f"\n{n_paths} path(s) in {n_snaps} snapshot(s); {n_versions} version row(s)\n")
    out.flush()


def _ts_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# ---- extract --------------------------------------------------------------------------------


@click.command("extract")
@click.argument("snapshot")
@click.argument("pattern")
@click.argument("out", type=click.Path(path_type=Path))
@_device_option
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in OUT.")
@backup_password_option
@common_options
def extract_cmd(
    app: App,
    snapshot: str,
    pattern: str,
    out: Path,
    device: str | None,
    overwrite: bool,
    backup_password_file: str | None,
) -> None:
    """Write the files matching PATTERN to OUT/<Domain>/<relative path>.

    Files get their real names and folders (not the backup's hashed file ids) and their
    modification times; files of an encrypted iOS backup are decrypted (the backup password is
    needed). Every block read is verified. A file that cannot be read or written, and a
    Manifest.db row that cannot name a file below OUT (an empty, '.' or '..' name, a NUL, a
    name too long), is named and the command fails after extracting all the others; of rows
    naming one file, the first (by fileID) is extracted and the others are named. Existing
    files are kept unless --overwrite; a symlink found in OUT is never followed.

    \b
    Examples:
      ibsync extract latest 'HomeDomain/Library/SMS/sms.db' ./out
      ibsync extract 3f2a 'CameraRollDomain/**' ./photos --backup-password-file pw
    """
    import time

    from ..reader.extractor import Failure, plan_extract
    from ..reader.manifest import SnapshotManifest
    from ..reader.paths import PathPattern

    out = out.expanduser()
    repo = app.open_repo()
    snap = repo.find_snapshot(snapshot, device)
    started = time.monotonic()
    from ..reader.manifest_cache import ManifestCache

    with SnapshotManifest(repo, snap, _keyring(backup_password_file), cache=ManifestCache.for_repository(repo)) as manifest:
        entries = list(manifest.entries(PathPattern(pattern)))
        failed = [Failure(b.path, b.file_id, b.reason) for b in manifest.bad_rows]
        if not entries and not failed:
            raise UserError(f"no file in snapshot {snap.short_id} matches '{printable(pattern)}'")
        plan = plan_extract(entries, manifest.payload)
        failed += plan.failed
        if not overwrite:
            _refuse_existing(out, plan.jobs)
        done_files, done_bytes, write_failed = _write_jobs(app, manifest, plan.jobs, out, f"extract {snap.short_id}")
        failed += write_failed
    elapsed = time.monotonic() - started
    failed.sort(key=lambda f: (f.path, f.file_id))
    if app.json:
        app.emit_json(
            {
                "snapshot": _snap_ref(snap),
                "pattern": pattern,
                "target": str(out),
                "files": done_files,
                "bytes": done_bytes,
                "seconds": round(elapsed, 3),
                "failed": [{"path": f.path, "file_id": f.file_id, "reason": f.reason} for f in failed],
            }
        )
    else:
        app.say(f"extracted {done_files} file(s), {size(done_bytes)} from snapshot {snap.short_id} "
                f"to {printable(out)} in {elapsed:.1f} s")
    if failed:
        for f in failed:
            click.echo(f"ibsync: cannot extract {printable(f.path)}: {printable(f.reason)}", err=True)
        raise ExtractIncomplete(f"{len(failed)} file(s) could not be extracted")


def _refuse_existing(out: Path, jobs) -> None:
    """Without --overwrite, nothing in OUT is replaced: refuse before writing anything."""
    from ..reader.extractor import exists_below

    existing = [job for job in jobs if exists_below(str(out), job.parts)]
    if existing:
        first = out.joinpath(*existing[0].parts)
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{printable(first)} exists{more}; extract elsewhere or pass --overwrite")


def _write_jobs(app: App, manifest, jobs, out: Path, description: str):
    """Write every job below OUT on EXTRACT_WORKERS threads: ``(files, bytes, failures)``.
    A job that fails leaves nothing behind and costs only itself."""
    from concurrent.futures import ThreadPoolExecutor

    from ..reader.extractor import Failure, write_file

    done_files = done_bytes = 0
    failed: list[Failure] = []
    if not jobs:
        return done_files, done_bytes, failed
    try:
        out.mkdir(parents=True, exist_ok=True)
        out_fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise UserError(f"cannot use {printable(out)} as the output folder ({e.strerror})") from None
    progress = app.progress(description)
    progress.start(sum(job.entry.size for job in jobs), len(jobs))
    lock = threading.Lock()

    def extract_one(job) -> None:
        nonlocal done_files, done_bytes
        try:
            written = write_file(out_fd, str(out), job.parts, manifest.read(job.entry, job.node), job.entry.mtime,
                                 progress.advance)
        except (IbsyncError, OSError, ValueError, OverflowError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            with lock:
                failed.append(Failure(job.entry.path, job.entry.file_id, reason))
            return
        progress.advance(0, files=1)
        with lock:
            done_files += 1
            done_bytes += written

    pool = ThreadPoolExecutor(max_workers=EXTRACT_WORKERS, thread_name_prefix="ibsync-extract")
    try:
        for fut in [pool.submit(extract_one, job) for job in jobs]:
            fut.result()
    finally:  # on Ctrl-C, files not started are dropped; those under way finish or are removed
        pool.shutdown(wait=True, cancel_futures=True)
        progress.finish()
        os.close(out_fd)
    return done_files, done_bytes, failed


# ---- diff -----------------------------------------------------------------------------------


@dataclass
class _DomainDiff:
    added: int = 0
    added_bytes: int = 0
    removed: int = 0
    removed_bytes: int = 0
    changed: int = 0
    changed_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@click.command("diff")
@click.argument("snapshot_a")
@click.argument("snapshot_b")
@_device_option
@click.option("--files", "list_files", is_flag=True, help="Also list each added (+), removed (-) and changed (M) file.")
@backup_password_option
@common_options
def diff_cmd(
    app: App,
    snapshot_a: str,
    snapshot_b: str,
    device: str | None,
    list_files: bool,
    backup_password_file: str | None,
) -> None:
    """Files added, removed and changed from snapshot A to snapshot B, per domain.

    A file changed when its stored content differs (other blobs or another size). Sizes are
    the backup's recorded file sizes: of B for added and changed files, of A for removed ones.
    """
    from ..reader.history import diff_snapshots
    from ..reader.manifest_cache import ManifestCache

    repo = app.open_repo()
    snaps = repo.snapshots()
    a = repo.find_snapshot(snapshot_a, device, snaps)
    b = repo.find_snapshot(snapshot_b, device, snaps)
    found, bad = diff_snapshots(repo, a, b, _keyring(backup_password_file), ManifestCache.for_repository(repo))
    changes = [(c.domain, c.relative_path, c.kind, c.file_id, c.size) for c in found]
    per_domain: dict[str, _DomainDiff] = {}
    for domain, _rel, kind, _fid, n in changes:
        d = per_domain.setdefault(domain, _DomainDiff())
        setattr(d, kind, getattr(d, kind) + 1)
        setattr(d, f"{kind}_bytes", getattr(d, f"{kind}_bytes") + n)
    per_domain = dict(sorted(per_domain.items()))
    total = _DomainDiff()
    for d in per_domain.values():
        for k, v in d.__dict__.items():
            setattr(total, k, getattr(total, k) + v)
    if app.json:
        result: dict[str, Any] = {
            "a": _snap_ref(a),
            "b": _snap_ref(b),
            "domains": {k: v.as_dict() for k, v in per_domain.items()},
            "total": total.as_dict(),
        }
        if list_files:
            result["files"] = [
                {"status": kind, "domain": domain, "relative_path": rel, "path": f"{domain}/{rel}", "size": n}
                for domain, rel, kind, _fid, n in changes
            ]
        result["unreadable_rows"] = _bad_rows_dicts(bad)
        app.emit_json(result)
        _fail_on_bad_rows(bad)
        return
    click.echo(f"from {a.short_id} ({when(a.backup_date)}) to {b.short_id} ({when(b.backup_date)})")
    if a.device.udid != b.device.udid:
        names = f"{a.device.name or a.device.udid} and {b.device.name or b.device.udid}"
        click.echo(f"note: different devices ({printable(names)})")
    if not per_domain:
        click.echo("no file differs")
        _fail_on_bad_rows(bad)
        return
    if list_files:
        mark = {"added": "+", "removed": "-", "changed": "M"}
        for domain, rel, kind, _fid, n in changes:
            click.echo(f"{mark[kind]} {printable(domain + '/' + rel)}  {size(n)}")
        click.echo("")

    def row(name: str, d: _DomainDiff) -> list[str]:
        return [name, str(d.added), size(d.added_bytes), str(d.removed), size(d.removed_bytes), str(d.changed), size(d.changed_bytes)]

    rows = [row(name, d) for name, d in per_domain.items()]
    rows.append(row("total", total))
    click.echo(table(["Domain", "Added", "Size", "Removed", "Size", "Changed", "Size"], rows, right={1, 2, 3, 4, 5, 6}))
    _fail_on_bad_rows(bad)
