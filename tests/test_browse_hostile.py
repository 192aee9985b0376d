"""ls, find, extract and diff against hostile Manifest.db rows (issue 11, defects 8 and 10).

Each test builds a real backup folder (the MIT sample plus rows added with sqlite3 and their
payload files), imports it into a real repository and runs the commands in-process: every odd
row must be named (escaped) as a per-row failure while every other row is still listed and
extracted, and nothing a backup chose may reach the terminal raw.
"""

from __future__ import annotations

import json
import os
import plistlib
import sqlite3
import struct
import tracemalloc
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ibsync.errors import InvalidData
from ibsync.reader import mbfile
from ibsync.reader.mbfile import _decode_mbfile_fast, _decode_mbfile_plistlib, decode_mbfile
from ibsync.testing.generator import BackupFile, mbfile_blob

from conftest import MIT_BACKUP, copy_folder, one_line_error


@dataclass
class Row:
    """A Files row as it goes into sqlite (any types), and the payload file to write for it."""

    file_id: object
    domain: object
    rel: object
    flags: object = 1
    file: object = None
    payload: bytes | None = None


def good(domain: str, rel: str, data: bytes, mtime: int = 1_700_000_000, file_id: str | None = None) -> Row:
    f = BackupFile(domain, rel, 1, mtime, 0o100644, len(data))
    return Row(file_id or f.file_id, domain, rel, 1, mbfile_blob(f), data)


def odd(domain: object, rel: object, data: bytes = b"odd", **kw) -> Row:
    """A file row whose domain or path is odd, with a valid MBFile and a payload."""
    fid = sha1(f"{domain!r}-{rel!r}-{sorted(kw.items())!r}".encode()).hexdigest()
    f = BackupFile("D", "x", 1, 1_700_000_000, 0o100644, len(data))
    row = Row(fid, domain, rel, 1, mbfile_blob(f), data)
    for k, v in kw.items():
        setattr(row, k, v)
    return row


def backup_with(folder: Path, rows: list[Row], device_name: str | None = None, untyped: bool = False) -> Path:
    """The MIT sample with ``rows`` added to Files. ``untyped``: Files re-declared without column
    types first, so that sqlite stores each value as given (an integer fileID stays one)."""
    src = copy_folder(MIT_BACKUP, folder)
    con = sqlite3.connect(src / "Manifest.db")
    with con:
        if untyped:
            con.execute("ALTER TABLE Files RENAME TO Typed")
            con.execute("CREATE TABLE Files (fileID PRIMARY KEY, domain, relativePath, flags, file)")
            con.execute("INSERT INTO Files SELECT * FROM Typed")
            con.execute("DROP TABLE Typed")
        con.executemany(
            "INSERT INTO Files VALUES (?, ?, ?, ?, ?)", [(r.file_id, r.domain, r.rel, r.flags, r.file) for r in rows]
        )
    con.close()
    for r in rows:
        if r.payload is not None and isinstance(r.file_id, str):
            (src / r.file_id[:2]).mkdir(exist_ok=True)
            (src / r.file_id[:2] / r.file_id).write_bytes(r.payload)
    if device_name is not None:
        info = plistlib.loads((src / "Info.plist").read_bytes())
        info["Device Name"] = device_name
        (src / "Info.plist").write_bytes(plistlib.dumps(info, fmt=plistlib.FMT_BINARY))
    return src


def imported(cli, tmp_path: Path, rows: list[Row], device_name: str | None = None, untyped: bool = False) -> Path:
    src = backup_with(tmp_path / "sample_backup", rows, device_name, untyped)
    cli("init", "-q")
    cli("import", src, "--allow-unfinished", "-q")
    return src


def no_raw_controls(text: str) -> None:
    assert "Traceback" not in text
    bad = [
        c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F or 0x202A <= ord(c) <= 0x202E
    ]
    assert not bad, f"raw control characters reach the terminal: {bad!r}\n{text}"


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


# ---- defect 8: odd rows are per-row failures ------------------------------------------------

GOOD = [
    good("HomeDomain", "Library/good.txt", b"good one"),
    good("HomeDomain", "Library/Notes/deep.txt", b"deep"),
    good("MediaDomain", "a.jpg", b"jpeg bytes"),
]
BAD_EXTRACT = [
    odd("Home\0Domain", "nul.txt"),  # a NUL in a domain
    odd("HomeDomain", "Library/" + "x" * 6000),  # a 6 KB path (one 6 KB name)
    odd("HomeDomain", ""),  # the domain's own folder as a file
    odd("HomeDomain", "."),
    odd("HomeDomain", "Library/../../escape.txt"),
    odd("HomeDomain", "Library//twice.txt"),
]


def test_extract_survives_odd_rows(env, cli, tmp_path):
    """Before: the first odd row ended extract in an internal error with the rest unextracted
    (a NUL or 6 KB name), or a '' / '.' row made HomeDomain a file and failed every other row."""
    imported(cli, tmp_path, GOOD + BAD_EXTRACT)
    out = tmp_path / "out"
    _, err = cli("extract", "latest", "**", out, expect=1)
    no_raw_controls(err)
    got = files_under(out)
    assert got["HomeDomain/Library/good.txt"] == b"good one"
    assert got["HomeDomain/Library/Notes/deep.txt"] == b"deep"
    assert got["MediaDomain/a.jpg"] == b"jpeg bytes"
    assert got["AppDomain-com.google.Translate/Library/Preferences/com.google.Translate.plist"]
    assert len(got) == 4, got  # nothing else, no temporary file
    assert not (tmp_path / "escape.txt").exists()
    for name in (
        "Home\\x00Domain/nul.txt",
        "HomeDomain/Library/" + "x" * 6000,
        "cannot extract HomeDomain:",
        "HomeDomain/.:",
        "HomeDomain/Library/../../escape.txt",
        "HomeDomain/Library//twice.txt",
    ):
        assert name in err, name
    assert "6 file(s) could not be extracted" in err
    # ls and find list every row, the odd names escaped
    text, err = cli("ls", "latest", "**")
    no_raw_controls(text + err)
    assert "Home\\x00Domain" in text and "good.txt" in text
    text, _ = cli("find", "good.txt")
    assert "HomeDomain/Library/good.txt" in text


def test_duplicate_rows_write_one_file_and_report_the_rest(env, cli, tmp_path):
    """Before: rows naming one file raced on one temporary name (the winner varied, or the
    command exited 0 with one file). Now the first row by fileID is written, the others named."""
    rows = [
        good("HomeDomain", "Library/dup.txt", bytes([65 + i]) * 1000, file_id=f"{i:02x}" + "0" * 38) for i in range(6)
    ]
    imported(cli, tmp_path, rows + [good("HomeDomain", "Library/fine.txt", b"fine")])
    for n in range(4):
        out = tmp_path / f"out{n}"
        _, err = cli("extract", "latest", "HomeDomain/**", out, expect=1)
        assert files_under(out) == {"HomeDomain/Library/dup.txt": b"A" * 1000, "HomeDomain/Library/fine.txt": b"fine"}
        assert err.count("HomeDomain/Library/dup.txt") == 5 and "5 file(s) could not be extracted" in err


def test_file_and_folder_of_one_name(env, cli, tmp_path):
    """A file row 'a' and a file row 'a/b': whatever the thread order, the folder wins and the
    file row is named."""
    imported(cli, tmp_path, [good("HomeDomain", "a", b"file a"), good("HomeDomain", "a/b", b"file b")])
    for n in range(3):
        out = tmp_path / f"out{n}"
        _, err = cli("extract", "latest", "HomeDomain/**", out, expect=1)
        assert files_under(out) == {"HomeDomain/a/b": b"file b"}
        assert "cannot extract HomeDomain/a:" in err and "1 file(s) could not be extracted" in err


def test_unreadable_mbfile_fails_its_row_only(env, cli, tmp_path):
    """Before: one undecodable MBFile blob made ls and extract of the whole snapshot fail."""
    broken = Row("ab" + "1" * 38, "HomeDomain", "Library/broken.txt", 1, b"bplist00 not really", b"payload")
    imported(cli, tmp_path, GOOD + [broken])
    text, err = cli("ls", "latest", expect=1)
    assert "HomeDomain" in text and "MediaDomain" in text
    assert "HomeDomain/Library/broken.txt" in err and "Traceback" not in err
    text, err = cli("ls", "latest", "**", expect=1)
    assert "good.txt" in text and "a.jpg" in text and "HomeDomain/Library/broken.txt" in err
    out = tmp_path / "out"
    _, err = cli("extract", "latest", "**", out, expect=1)
    assert files_under(out)["HomeDomain/Library/good.txt"] == b"good one"
    assert "cannot extract HomeDomain/Library/broken.txt" in err and "1 file(s) could not be extracted" in err
    # a pattern that does not select it is not disturbed by it
    cli("extract", "latest", "MediaDomain/**", tmp_path / "out2")
    assert files_under(tmp_path / "out2") == {"MediaDomain/a.jpg": b"jpeg bytes"}


LYING = [
    Row(1234, "HomeDomain", "Library/int-id.txt", 1, None),  # fileID an integer
    Row(b"\x01\x02blob-id", "HomeDomain", "Library/blob-id.txt", 1, None),  # fileID a blob
    odd("HomeDomain", "Library/text-flags.txt", flags="file"),  # flags as text
    odd("HomeDomain", "Library/text-file.txt", file="not a plist"),  # file column as text
    odd(None, "Library/null-domain.txt"),  # NULL domain
    odd(b"Blob\xffDomain", "blob-domain.txt"),  # domain a blob
    odd("HomeDomain", 42),  # path an integer
]


def test_manifest_rows_that_lie_about_their_types(env, cli, tmp_path):
    """Before: the first such row ended ls, find, extract and diff in an internal error."""
    imported(cli, tmp_path, GOOD + LYING, untyped=True)
    text, err = cli("ls", "latest", expect=1)
    no_raw_controls(text + err)
    assert "HomeDomain" in text and "MediaDomain" in text
    assert "7 row(s) of Manifest.db could not be read" in err
    text, err = cli("ls", "latest", "**", expect=1)
    assert "good.txt" in text and "a.jpg" in text and "Traceback" not in err
    for name in ("int-id.txt", "blob-id.txt", "text-flags.txt", "text-file.txt", "null-domain.txt", "blob-domain.txt"):
        assert name in err, name
    out = tmp_path / "out"
    _, err = cli("extract", "latest", "**", out, expect=1)
    no_raw_controls(err)
    got = files_under(out)
    assert got["HomeDomain/Library/good.txt"] == b"good one" and got["MediaDomain/a.jpg"] == b"jpeg bytes"
    assert "7 file(s) could not be extracted" in err
    text, err = cli("find", "good.txt")  # a pattern that selects none of them is not disturbed
    assert "HomeDomain/Library/good.txt" in text
    text, err = cli("find", "**/*-id.txt", expect=1)
    assert "int-id.txt" in err and "blob-id.txt" in err and "2 row(s) of Manifest.db could not be read" in err
    text, err = cli("diff", "latest", "latest", "--files", expect=1)
    # diff decodes no MBFile of a row whose flags say it is a file: the text file column goes unseen
    assert "no file differs" in text and "6 row(s) of Manifest.db could not be read" in err


def test_invalid_utf8_names_are_listed_and_extracted(env, cli, tmp_path):
    """Text that is not UTF-8 in a TEXT column: before, sqlite3 raised while fetching and the
    whole command failed."""
    src = backup_with(tmp_path / "sample_backup", GOOD)
    fid = "cd" + "2" * 38
    con = sqlite3.connect(src / "Manifest.db")
    with con:  # CAST(x AS TEXT) keeps the bytes as they are: an invalid UTF-8 name
        con.execute(
            "INSERT INTO Files VALUES (?, 'HomeDomain', CAST(? AS TEXT), 1, ?)",
            (fid, b"Library/caf\xe9.txt", mbfile_blob(BackupFile("D", "x", 1, 1_700_000_000, 0o100644, 4))),
        )
    con.close()
    (src / fid[:2]).mkdir(exist_ok=True)
    (src / fid[:2] / fid).write_bytes(b"cafe")
    cli("init", "-q")
    cli("import", src, "--allow-unfinished", "-q")
    text, err = cli("ls", "latest", "**")
    no_raw_controls(text + err)
    assert "caf\\udce9.txt" in text
    out = tmp_path / "out"
    cli("extract", "latest", "**", out)
    assert (out / "HomeDomain" / "Library").joinpath(os.fsdecode(b"caf\xe9.txt")).read_bytes() == b"cafe"


def test_damaged_manifest_db_is_one_clear_error(env, cli, tmp_path):
    """A Manifest.db whose last table page is garbage (its header and schema intact, so import
    stores it): one line naming it, not a traceback (before: an internal error mid-listing)."""
    rows = [good("HomeDomain", f"Library/f{i:04d}.txt", b"x", file_id=f"{i:040x}") for i in range(400)]
    src = backup_with(tmp_path / "sample_backup", rows)
    con = sqlite3.connect(src / "Manifest.db")
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'Files'").fetchone()[0]
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    db = bytearray((src / "Manifest.db").read_bytes())
    # the root is an interior page: its children are the leaves a full scan must read
    base = (root - 1) * page
    assert db[base] == 0x05  # an interior table page; its right-most child is at offset 8
    last_child = struct.unpack_from(">I", db, base + 8)[0]
    start = (last_child - 1) * page  # the first rows still read: the damage is met mid-query
    db[start : start + page] = b"\xa5" * page
    (src / "Manifest.db").write_bytes(bytes(db))
    cli("init", "-q")
    cli("import", src, "--allow-unfinished", "-q")
    for args in (
        ("ls", "latest"),
        ("ls", "latest", "**"),
        ("extract", "latest", "**", tmp_path / "out"),
        ("find", "sms.db"),
        ("diff", "latest", "latest"),
    ):
        _, err = cli(*args, expect=1)
        one_line_error(err, "Manifest.db")


def test_manifest_db_without_the_files_columns(env, cli, tmp_path):
    src = copy_folder(MIT_BACKUP, tmp_path / "sample_backup")
    (src / "Manifest.db").unlink()
    con = sqlite3.connect(src / "Manifest.db")
    with con:
        con.execute("CREATE TABLE Files (flags INTEGER)")
        con.execute("INSERT INTO Files VALUES (1)")
    con.close()
    cli("init", "-q")
    cli("import", src, "--allow-unfinished", "-q")
    for args in (("ls", "latest"), ("extract", "latest", "**", tmp_path / "out")):
        _, err = cli(*args, expect=1)
        one_line_error(err, "Manifest.db")


# ---- extract never follows a symlink planted in OUT -----------------------------------------


def test_extract_does_not_follow_symlinks_in_out(env, cli, tmp_path):
    imported(cli, tmp_path, GOOD)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(b"keep me")
    out = tmp_path / "out"
    (out / "HomeDomain").mkdir(parents=True)
    (out / "HomeDomain" / "Library").symlink_to(outside)  # a folder on the way is a symlink
    (out / "MediaDomain").mkdir()
    (out / "MediaDomain" / "a.jpg").symlink_to(outside / "victim.txt")  # the file itself is a symlink
    _, err = cli("extract", "latest", "**", out, "--overwrite", expect=1)
    assert (outside / "victim.txt").read_bytes() == b"keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]  # nothing written through the link
    assert "cannot extract HomeDomain/Library/good.txt" in err and "symlink" in err
    assert "cannot extract HomeDomain/Library/Notes/deep.txt" in err
    link = out / "MediaDomain" / "a.jpg"
    assert not link.is_symlink() and link.read_bytes() == b"jpeg bytes"  # the link replaced, not followed
    assert "2 file(s) could not be extracted" in err


def test_extract_refuses_existing_files_without_overwrite(env, cli, tmp_path):
    imported(cli, tmp_path, GOOD + [odd("Home\0Domain", "nul.txt")])
    out = tmp_path / "out"
    (out / "MediaDomain").mkdir(parents=True)
    (out / "MediaDomain" / "a.jpg").write_bytes(b"mine")
    _, err = cli("extract", "latest", "**", out, expect=2)
    one_line_error(err, "a.jpg exists", "--overwrite")
    assert (out / "MediaDomain" / "a.jpg").read_bytes() == b"mine"


# ---- defect 10: names from a backup are escaped ---------------------------------------------

EVIL = "\x1b]0;pwned\x07\x1b[2J\u202e"


def test_names_from_the_backup_reach_the_terminal_escaped(env, cli, tmp_path):
    rows = GOOD + [odd("HomeDomain", f"Library/{EVIL}.txt", b"evil"), odd(f"Evil{EVIL}Domain", "f.txt", b"e2")]
    src = backup_with(tmp_path / "sample_backup", rows, device_name=f"Phone{EVIL}")
    cli("init", "-q")
    outputs = []
    outputs += cli("import", src, "--allow-unfinished")  # names the device
    outputs += cli("forget", "--keep-last", "1", "--dry-run")
    outputs += cli("ls", "latest")
    outputs += cli("ls", "latest", "**")
    outputs += cli("find", "**/*.txt")
    out = tmp_path / "out"
    outputs += cli("extract", "latest", "**", out)
    assert (out / "HomeDomain" / "Library" / f"{EVIL}.txt").read_bytes() == b"evil"  # the real name on disk
    outputs += cli("diff", "latest", "latest", "--files")
    outputs += cli("stats")
    text = "".join(outputs)
    no_raw_controls(text)
    assert "\\x1b]0;pwned\\x07" in text


def test_diff_files_escapes_names(env, cli, tmp_path):
    cli("init", "-q")
    src = backup_with(tmp_path / "a" / "sample_backup", GOOD)
    cli("import", src, "--allow-unfinished", "-q")
    src = backup_with(
        tmp_path / "b" / "sample_backup",
        GOOD + [odd("HomeDomain", f"Library/{EVIL}.txt", b"evil")],
        device_name=f"Other{EVIL}",
    )
    cli("import", src, "--allow-unfinished", "-q")
    out, err = cli("snapshots", "--json")
    first, second = (s["id"] for s in json.loads(out))
    text, err = cli("diff", first[:8], second[:8], "--files")
    no_raw_controls(text + err)
    assert "\\x1b]0;pwned" in text


# ---- the MBFile decoder against plistlib ----------------------------------------------------

_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_values = st.recursive(
    st.none() | st.booleans() | _ints | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def keyed_archives(draw) -> dict:
    """NSKeyedArchiver-like MBFile archives: the real shape, with fields missing, mistyped,
    behind UIDs or dangling."""
    objects: list = ["$null"]
    mb: dict = {}
    objects.append(mb)
    for name in ("Size", "LastModified", "Mode", "Flags", "InodeNumber", "Birth"):
        kind = draw(st.sampled_from(["int", "int", "int", "missing", "value", "uid"]))
        if kind == "int":
            mb[name] = draw(_ints)
        elif kind == "value":
            mb[name] = draw(_values)
        elif kind == "uid":
            objects.append(draw(_ints | _values))
            mb[name] = plistlib.UID(len(objects) - 1 if draw(st.booleans()) else draw(st.integers(0, 50)))
    key = draw(st.sampled_from(["none", "nsdata", "nsdata-uid", "bytes", "dangling", "odd"]))
    if key != "none":
        data = draw(st.binary(max_size=48))
        if key == "nsdata":
            objects.append({"NS.data": data, "$class": plistlib.UID(0)})
            mb["EncryptionKey"] = plistlib.UID(len(objects) - 1)
        elif key == "nsdata-uid":
            objects.append(data)
            objects.append({"NS.data": plistlib.UID(len(objects) - 1)})
            mb["EncryptionKey"] = plistlib.UID(len(objects) - 1)
        elif key == "bytes":
            mb["EncryptionKey"] = data
        elif key == "dangling":
            mb["EncryptionKey"] = plistlib.UID(draw(st.integers(len(objects), 255)))
        else:
            objects.append({"NS.data": draw(_values)})
            mb["EncryptionKey"] = plistlib.UID(len(objects) - 1)
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=16), _values, max_size=3))
    for k, v in extra.items():
        mb.setdefault(k, v)
    root = plistlib.UID(1) if draw(st.integers(0, 9)) else plistlib.UID(draw(st.integers(0, 20)))
    return {"$version": 100000, "$archiver": "NSKeyedArchiver", "$top": {"root": root}, "$objects": objects}


def reference(blob: bytes):
    """What the MBFile means, read by plistlib alone: the fields or InvalidData."""
    try:
        return mbfile.checked_fields(*_decode_mbfile_plistlib(blob))
    except InvalidData:
        return InvalidData


def fast(blob: bytes):
    """The fast path alone (range checks included): its answer, or None when it gives up (and
    the caller falls back)."""
    try:
        fields = _decode_mbfile_fast(blob)
    except Exception as e:  # which exceptions it may give up with is what the decoder catches
        assert isinstance(e, mbfile.FAST_PATH_GIVES_UP), repr(e)
        return None
    try:
        return mbfile.checked_fields(*fields)
    except InvalidData:
        return InvalidData


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keyed_archives(), st.booleans())
def test_mbfile_fast_decoder_agrees_with_plistlib(archive, sort_keys):
    blob = plistlib.dumps(archive, fmt=plistlib.FMT_BINARY, sort_keys=sort_keys)
    want = reference(blob)
    got = fast(blob)
    if got is not None:
        assert got == want, (got, want)
    try:
        assert decode_mbfile(blob) == want
    except InvalidData:
        assert want is InvalidData


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mbfile_generated_rows_decode_exactly(data):
    f = BackupFile(
        data.draw(st.sampled_from(["HomeDomain", "CameraRollDomain"])),
        data.draw(st.text(min_size=1, max_size=300)),
        1,
        data.draw(st.integers(-(2**31), 2**37)),  # up to year 6325
        data.draw(st.sampled_from([0o100644, 0o40755, 0o120755])),
        data.draw(st.integers(0, 2**62)),
    )
    blob = mbfile_blob(f)
    assert _decode_mbfile_fast(blob) == (f.size, f.mtime, f.mode, None) == reference(blob) == decode_mbfile(blob)


_SAMPLE = mbfile_blob(BackupFile("HomeDomain", "Library/SMS/sms.db", 1, 1_700_000_000, 0o100644, 123_456))


@settings(max_examples=1500, deadline=2000)
@given(
    st.one_of(
        st.binary(max_size=600),
        st.integers(0, len(_SAMPLE)).map(lambda n: _SAMPLE[:n]),
        st.lists(st.tuples(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
            lambda edits: _mutate(_SAMPLE, edits)
        ),
        st.binary(max_size=64).map(lambda tail: b"bplist00" + tail),
    )
)
def test_mbfile_decoder_on_random_and_damaged_bytes(blob):
    """Random, truncated and mutated bytes: an answer or InvalidData, nothing else, quickly
    (the deadline) and without allocating beyond the blob (a huge count is refused, not read)."""
    try:
        size, mtime, mode, key = decode_mbfile(blob)
    except InvalidData:
        return
    assert all(isinstance(v, int) for v in (size, mtime, mode)) and (key is None or isinstance(key, bytes))


def _mutate(blob: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(blob)
    for i, v in edits:
        b[i] = v
    return bytes(b)


@pytest.mark.parametrize(
    "trailer",
    [
        struct.pack(">6xBBQQQ", 1, 1, 2**62, 0, 8),  # an object table of 2**62 entries
        struct.pack(">6xBBQQQ", 8, 8, 2**40, 0, 8),
        struct.pack(">6xBBQQQ", 3, 1, 5, 0, 8),  # offsets of 3 bytes
        struct.pack(">6xBBQQQ", 1, 1, 3, 2**63, 8),  # top object out of range
    ],
)
def test_mbfile_decoder_refuses_absurd_trailers(trailer):
    with bounded_memory():
        with pytest.raises(InvalidData):
            decode_mbfile(b"bplist00" + b"\xdf" + b"\x00" * 40 + trailer)


@pytest.mark.parametrize("count", [2**60, 2**31, 10**6])
def test_mbfile_huge_counts_are_not_allocated(count):
    """A dict or array claiming many entries in a tiny blob: refused before anything that size
    is built (by the fast path and by plistlib alike)."""
    for marker in (b"\xdf", b"\xaf"):
        body = b"bplist00" + marker + b"\x13" + count.to_bytes(8, "big")
        blob = body + bytes([8]) + struct.pack(">6xBBQQQ", 1, 1, 1, 0, len(body))
        with bounded_memory():
            with pytest.raises(InvalidData):
                decode_mbfile(blob)


class bounded_memory:
    """Fails if the block allocates more than ``limit`` bytes at its peak (tracemalloc)."""

    def __init__(self, limit: int = 4 << 20) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        tracemalloc.start()

    def __exit__(self, *exc) -> None:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < self.limit, f"peak allocation {peak} bytes"
