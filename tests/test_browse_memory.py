"""ls, find and diff hold no per-row state for the rows they print (issue 9: 1 M files in 150 MB).

One generated device with ROWS extra file rows in its Manifest.db. Each command runs in its own
process under tracemalloc (real process, real repository); what is compared is the peak of
Python allocations, which is deterministic enough to bound loosely per row. The exact RSS
figures are in the benchmark (bench/run.py --profile many-files), not here.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from ibsync.cli import main
from ibsync.testing.generator import BackupFile, generate, mbfile_blob, mutate_folder

from conftest import FAST_KDF, PASSWORD

ROWS = 20_000

PEAK_SCRIPT = """
import sys, tracemalloc
tracemalloc.start()
from ibsync.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(tracemalloc.get_traced_memory()[1], file=sys.stderr)
sys.exit(code or 0)
"""


@pytest.fixture(scope="module")
def phone(tmp_path_factory):
    base = tmp_path_factory.mktemp("memory")
    live = generate(base / "live", seed=11, size_bytes=1 << 20)
    con = sqlite3.connect(live / "Manifest.db")
    with con:  # file rows without payloads: ls and find list what Manifest.db says
        rows = []
        for i in range(ROWS):
            f = BackupFile(
                "AppDomain-com.example.many",
                f"Library/Caches/c{i // 100:03d}/f{i:05d}.plist",
                1,
                1_700_000_000 + i,
                0o100644,
                1000 + i,
            )
            rows.append((f.file_id, f.domain, f.relative_path, 1, mbfile_blob(f)))
        con.executemany("INSERT INTO Files VALUES (?, ?, ?, ?, ?)", rows)
    con.close()
    env = dict(
        os.environ, IBSYNC_REPO=str(base / "repo"), IBSYNC_PASSWORD=PASSWORD, IBSYNC_CACHE_DIR=str(base / "cache")
    )
    env.pop("IBSYNC_PASSWORD_FILE", None)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("IBSYNC_REPO", "IBSYNC_PASSWORD", "IBSYNC_CACHE_DIR"):
            mp.setenv(k, env[k])
        mp.setattr("ibsync.format.crypto.DEFAULT_KDF", FAST_KDF)
        assert main(["init", "-q"]) == 0
        assert main(["import", str(live), "-q"]) == 0
    return {"live": live, "env": env}


def _peak(env: dict, *args: str) -> int:
    """Peak bytes of Python allocations of one ibsync command in its own process (stdout to
    /dev/null: the output itself must not be held either)."""
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.strip().splitlines()[-1])


def _import_again(phone: dict, times: int, total: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        for k in ("IBSYNC_REPO", "IBSYNC_PASSWORD", "IBSYNC_CACHE_DIR"):
            mp.setenv(k, phone["env"][k])
        for day in range(times):  # a next day each time: an unchanged folder makes no snapshot
            mutate_folder(phone["live"], seed=50 + day)
            assert main(["import", str(phone["live"]), "-q"]) == 0
        out = subprocess.run(
            [sys.executable, "-m", "ibsync", "snapshots", "-q"], env=phone["env"], capture_output=True, text=True
        ).stdout
        assert f"{total} snapshot(s)" in out, out


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_ls_of_every_row_holds_no_row(phone, as_json):
    """`ls latest '**'` of ROWS rows peaks no higher than `ls latest` (which reads every row too,
    keeping only per-domain sums) plus a small fraction of a row each: rows are printed as they
    come (JSON) or through a spill file (text), never listed in memory (before: ~1.2 KB a row)."""
    extra = ("--json",) if as_json else ()
    domains = _peak(phone["env"], "ls", "latest", *extra)
    every = _peak(phone["env"], "ls", "latest", "**", *extra)
    assert every - domains < ROWS * 100, f"{(every - domains) / ROWS:.0f} bytes per row"


def test_find_versions_are_not_held_in_memory(phone):
    """find's versions (paths x snapshots) go to a temporary database: going from two to five
    snapshots of the same ROWS paths adds less than 200 bytes per path and snapshot to the peak (measured: ~60)
    (before: a dict per version and the whole JSON document, ~2.3 KB)."""
    _import_again(phone, 1, total=2)
    two = _peak(phone["env"], "find", "**", "--json")
    _import_again(phone, 3, total=5)
    five = _peak(phone["env"], "find", "**", "--json")
    assert five - two < ROWS * 3 * 200, f"{(five - two) / (ROWS * 3):.0f} bytes per path and snapshot"
