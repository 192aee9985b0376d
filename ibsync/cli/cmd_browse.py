"""Browsing snapshots by iOS domain and path: ls, find, extract, diff.

Paths are ``Domain/relative/path`` as in Manifest.db; patterns are globs (see
``ibsync.reader.paths.PathPattern``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import IbsyncError, UserError
from ..model import Snapshot, utc_iso
from ..opening import read_password_file
from ..ui.text import printable, size, table, when
from .app import App, common_options

if TYPE_CHECKING:  # the reader modules are imported when their command runs
    from ..reader.find import FindResult, Version

BACKUP_PASSWORD_ENV = "IBSYNC_BACKUP_PASSWORD"


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
    return click.option("--device", metavar="UDID|NAME", help="With 'latest': the latest snapshot of this device.")(
        func
    )


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
    return datetime.fromtimestamp(seconds, UTC)


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
        click.echo(
            f"ibsync: cannot read the Manifest.db row {printable(b.path)} (snapshot {snap.short_id}): "
            f"{printable(b.reason)}",
            err=True,
        )
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
    from ..reader.manifest_cache import ManifestCache
    from ..reader.paths import PathPattern

    repo = app.open_repo()
    snap = repo.find_snapshot(snapshot, device)
    with SnapshotManifest(
        repo, snap, _keyring(backup_password_file), cache=ManifestCache.for_repository(repo)
    ) as manifest:
        if pattern is None:
            domains = manifest.domains()
            bad = [(snap, b) for b in manifest.bad_rows]
            if app.json:
                app.emit_json(
                    {
                        "snapshot": _snap_ref(snap),
                        "domains": [
                            {
                                "domain": d,
                                "files": st.files,
                                "dirs": st.dirs,
                                "symlinks": st.symlinks,
                                "bytes": st.bytes,
                            }
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

    def __init__(self, headers: list[str], right: frozenset[int] | set[int] = frozenset()) -> None:
        self.headers = headers
        self.right = right
        self.widths = [len(h) for h in headers]
        self._file = tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n")

    def __enter__(self) -> SpilledTable:
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
    from ..reader.find import find_history
    from ..reader.manifest_cache import ManifestCache
    from ..reader.paths import PathPattern

    PathPattern(pattern)  # a bad pattern is refused before the repository is opened
    repo = app.open_repo()
    with find_history(
        repo, pattern, device=device, keyring=_keyring(backup_password_file), cache=ManifestCache.for_repository(repo)
    ) as found:
        _echo_found(app, found)
    _fail_on_bad_rows(found.bad)


def _version_dict(v: Version) -> dict[str, Any]:
    s = v.snapshot
    return {
        "snapshot": s.id,
        "short_id": s.short_id,
        "backup_date": utc_iso(s.backup_date) if s.backup_date else None,
        "size": v.size,
        "mtime": v.mtime,
        "status": v.status,
    }


def _echo_found(app: App, found: FindResult) -> None:
    """find's output, path by path as ``FindResult.paths`` lists them."""
    if app.json:
        _emit_json_stream(
            iter(
                [
                    ("pattern", found.pattern),
                    (
                        "paths",
                        JsonItems(
                            {
                                "device": {"udid": h.udid, "name": h.device_name},
                                "domain": h.domain,
                                "relative_path": h.relative_path,
                                "path": h.path,
                                "versions": [_version_dict(v) for v in h.versions],
                            }
                            for h in found.paths()
                        ),
                    ),
                    ("unreadable_rows", _bad_rows_dicts(found.bad)),
                ]
            )
        )
        return
    counts = found.counts()
    if not counts.paths:
        click.echo(f"no snapshot holds a file matching '{printable(found.pattern)}'")
        return
    out = _Out()
    for n, h in enumerate(found.paths()):
        title = h.path
        if counts.devices > 1:
            title += f"  ({h.device_name or h.udid}, {h.udid})"
        rows = [
            [
                v.snapshot.short_id,
                when(v.snapshot.backup_date),
                size(v.size) if v.size is not None else "-",
                when(_ts_iso(v.mtime)) if v.mtime else "-",
                v.status,
            ]
            for v in h.versions
        ]
        out.write(
            ("\n" if n else "")
            + printable(title)
            + "\n"
            + _indent(table(["Snapshot", "Backup date", "Size", "Modified", "Content"], rows, right={2}))
            + "\n"
        )
    out.write(f"\n{counts.paths} path(s) in {found.snapshots} snapshot(s); {counts.versions} version row(s)\n")
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
    from ..reader.extract import extract
    from ..reader.manifest_cache import ManifestCache

    out = out.expanduser()
    repo = app.open_repo()
    snap = repo.find_snapshot(snapshot, device)
    done = extract(
        repo,
        snap,
        pattern,
        out,
        keyring=_keyring(backup_password_file),
        cache=ManifestCache.for_repository(repo),
        overwrite=overwrite,
        progress=app.progress(f"extract {snap.short_id}"),
    )
    if app.json:
        app.emit_json(
            {
                "snapshot": _snap_ref(snap),
                "pattern": pattern,
                "target": str(out),
                "files": done.files,
                "bytes": done.bytes,
                "seconds": round(done.seconds, 3),
                "failed": [{"path": f.path, "file_id": f.file_id, "reason": f.reason} for f in done.failed],
            }
        )
    else:
        app.say(
            f"extracted {done.files} file(s), {size(done.bytes)} from snapshot {snap.short_id} "
            f"to {printable(out)} in {done.seconds:.1f} s"
        )
    if done.failed:
        for f in done.failed:
            click.echo(f"ibsync: cannot extract {printable(f.path)}: {printable(f.reason)}", err=True)
        raise ExtractIncomplete(f"{len(done.failed)} file(s) could not be extracted")


# ---- diff -----------------------------------------------------------------------------------


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
    from ..reader.diff import compare_snapshots
    from ..reader.manifest_cache import ManifestCache

    repo = app.open_repo()
    snaps = repo.snapshots()
    a = repo.find_snapshot(snapshot_a, device, snaps)
    b = repo.find_snapshot(snapshot_b, device, snaps)
    d = compare_snapshots(repo, a, b, _keyring(backup_password_file), ManifestCache.for_repository(repo))
    if app.json:
        result: dict[str, Any] = {
            "a": _snap_ref(a),
            "b": _snap_ref(b),
            "domains": {k: v.as_dict() for k, v in d.domains.items()},
            "total": d.total.as_dict(),
        }
        if list_files:
            result["files"] = [
                {
                    "status": c.kind,
                    "domain": c.domain,
                    "relative_path": c.relative_path,
                    "path": f"{c.domain}/{c.relative_path}",
                    "size": c.size,
                }
                for c in d.changes
            ]
        result["unreadable_rows"] = _bad_rows_dicts(d.bad)
        app.emit_json(result)
        _fail_on_bad_rows(d.bad)
        return
    click.echo(f"from {a.short_id} ({when(a.backup_date)}) to {b.short_id} ({when(b.backup_date)})")
    if d.different_devices:
        names = f"{a.device.name or a.device.udid} and {b.device.name or b.device.udid}"
        click.echo(f"note: different devices ({printable(names)})")
    if not d.domains:
        click.echo("no file differs")
        _fail_on_bad_rows(d.bad)
        return
    if list_files:
        mark = {"added": "+", "removed": "-", "changed": "M"}
        for c in d.changes:
            click.echo(f"{mark[c.kind]} {printable(c.domain + '/' + c.relative_path)}  {size(c.size)}")
        click.echo("")

    def row(name: str, x) -> list[str]:
        return [
            name,
            str(x.added),
            size(x.added_bytes),
            str(x.removed),
            size(x.removed_bytes),
            str(x.changed),
            size(x.changed_bytes),
        ]

    rows = [row(name, x) for name, x in d.domains.items()]
    rows.append(row("total", d.total))
    click.echo(table(["Domain", "Added", "Size", "Removed", "Size", "Changed", "Size"], rows, right={1, 2, 3, 4, 5, 6}))
    _fail_on_bad_rows(d.bad)
