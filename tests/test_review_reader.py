"""Review of the readers (r2-reader): defects found reviewing the crafted-snapshot changes."""

from __future__ import annotations

import os
from pathlib import Path

from ibsync.reader.paths import BadName, output_parts

from test_restore_safety import FOLDER, open_repository, repo_path, save_snapshot  # noqa: F401  (fixture)


def _copy_target(repo_path: Path, cli, target: Path, monkeypatch) -> None:
    if os.environ.get("IBSYNC_PASSWORD"):
        monkeypatch.setenv("IBSYNC_FROM_PASSWORD", os.environ["IBSYNC_PASSWORD"])
        cli("init", "--repo", target)
    else:
        cli("init", "--no-encryption", "--repo", target)


def test_copy_carries_no_data_of_the_entries_it_leaves_out(repo_path, cli, tmp_path, monkeypatch):
    """Before: copy left a refused entry out of the copied tree but still sent its data (prune's
    rule, 'keep what refused entries name'), and failed the whole copy when a refused entry
    named a blob the source does not have."""
    missing = "ab" * 32
    snap = save_snapshot(
        repo_path,
        lambda w: [
            w.file("Info.plist", b"kept"),
            w.file("../escape.txt", b"left out, never sent " * 50),
            {"name": "../ghost", "type": "file", "mode": 0o100644, "mtime_ns": 0, "size": 1, "content": [missing]},
        ],
    )
    repo = open_repository(repo_path)
    left_out = next(e for e in repo.load_tree_entries(snap.tree) if e["name"] == "../escape.txt")["content"][0]
    repo.close()
    target = tmp_path / "copy-target"
    _copy_target(repo_path, cli, target, monkeypatch)
    cli("copy", "--from-repo", repo_path, "--repo", target)
    copied = open_repository(target)
    try:
        assert copied.index.get(bytes.fromhex(left_out)) is None
    finally:
        copied.close()
    cli("restore", "latest", tmp_path / "out", "--repo", target)
    assert os.listdir(tmp_path / "out" / FOLDER) == ["Info.plist"]


def test_extract_names_keep_their_rule_and_bytes_limit():
    """output_parts applies model.name_problem (one rule for every reader); a backslash is a
    separator only where the system says so, since iOS file names may hold one."""
    assert output_parts("HomeDomain", "Library/a\\b.txt" if os.sep == "/" else "Library/ab.txt")[-1]
    for rel, needle in (("Library/../x", "'..'"), ("Library//x", "empty"), ("a\0b", "NUL"), ("n" * 256, "256 bytes")):
        try:
            output_parts("HomeDomain", rel)
        except BadName as e:
            assert needle in str(e) and "its path" in str(e), (rel, str(e))
        else:
            raise AssertionError(f"{rel!r} was accepted")
    assert output_parts("HomeDomain", "é" * 127) == ("HomeDomain", "é" * 127)  # 254 bytes


def test_diff_of_a_damaged_manifest_prints_one_line_and_no_traceback(env, cli, tmp_path):
    """Before: diff's merge stopped at the damaged Manifest.db of A with B's row generator still
    suspended; collected after B's database closed, it closed its cursor, which raised, and the
    interpreter printed 'Exception ignored in: <generator ...>' and a traceback after the error."""
    import sqlite3
    import struct

    from conftest import one_line_error, run_subprocess
    from test_browse_hostile import backup_with, good

    rows = [good("HomeDomain", f"Library/f{i:04d}.txt", b"x", file_id=f"{i:040x}") for i in range(400)]
    src = backup_with(tmp_path / "sample_backup", rows)
    con = sqlite3.connect(src / "Manifest.db")
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'Files'").fetchone()[0]
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    db = bytearray((src / "Manifest.db").read_bytes())
    base = (root - 1) * page  # an interior table page; its right-most child (offset 8) is read last
    start = (struct.unpack_from(">I", db, base + 8)[0] - 1) * page
    db[start : start + page] = b"\xa5" * page
    (src / "Manifest.db").write_bytes(bytes(db))
    cli("init", "-q")
    cli("import", src, "--allow-unfinished", "-q")
    done = run_subprocess(["diff", "latest", "latest"], dict(os.environ))
    assert done.returncode == 1
    one_line_error(done.stderr, "Manifest.db")
