"""The browsing layer's index (ibsync/reader/browse.py) on a large Manifest.db.

    python bench/browse_index.py                  # 1,000,000 files (about 1.02 M rows, ~80 s to generate)
    python bench/browse_index.py --files 200000   # quicker

Writes a Manifest.db only (no payloads: the index reads nothing else) with the many-files
profile's domains, folders and file names (``ibsync.testing.many_files``), then times the index
build (CPU and wall: the CPU figure is the one to compare on a shared machine), opening the
built index again, and the queries the web app and the mount make. The Manifest.db is kept in
--work and reused.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import threading
import time
from pathlib import Path

from ibsync.reader import browse
from ibsync.reader.manifest import SnapshotManifest
from ibsync.testing import generator as g
from ibsync.testing import many_files as m


def write_manifest(path: Path, files: int, seed: int = 1) -> int:
    lex = g._lexicon(f"many-{seed}")
    day1 = int(g.DAY1.timestamp())
    db = m._ManifestWriter(path)
    n = 0
    try:
        for plan in m._domain_plans(files, seed, lex):
            rnd = random.Random(plan.name)
            stubs = [
                g.BackupFile(plan.name, p, g.FLAG_FILE, day1 - g._age(rnd), g.MODE_FILE, m._size(k, rnd))
                for p, k in m._domain_paths(plan, seed, lex)
            ]
            for f in g._with_directories(stubs) + stubs:
                db.add(f)
                n += 1
    finally:
        db.close()
    return n


class _Snap:
    short_id = "bench"


def _view(index: browse._Index, manifest: SnapshotManifest) -> browse.SnapshotView:
    v = browse.SnapshotView.__new__(browse.SnapshotView)
    v.manifest, v._index, v._lock, v._apps, v._cache, v.snapshot = manifest, index, threading.RLock(), {}, None, _Snap()
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=Path("bench/work/browse"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.work / f"Manifest-{args.files}.db"
    if not src.exists():
        t = time.perf_counter()
        rows = write_manifest(src.with_suffix(".tmp"), args.files)
        os.replace(src.with_suffix(".tmp"), src)
        print(f"generated {rows} rows in {time.perf_counter() - t:.0f} s")
    manifest = SnapshotManifest(None, None, file=src)  # type: ignore[arg-type]
    n_rows = manifest._con.execute("SELECT count(*) FROM Files").fetchone()[0]
    out = args.work / "index.db"
    out.unlink(missing_ok=True)
    cpu, wall = time.process_time(), time.perf_counter()
    index = browse._Index.build(manifest, str(out))
    index.db.close()
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"{n_rows} Manifest.db rows: build {cpu:.1f} s CPU ({cpu / n_rows * 1e6:.1f} µs a row), {wall:.1f} s wall; "
        f"index {out.stat().st_size / 1e6:.0f} MB; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        f"; load average {os.getloadavg()[0]:.1f}"
    )
    t = time.perf_counter()
    v = _view(browse._Index.load(out, manifest), manifest)
    print(f"  open the built index again: {(time.perf_counter() - t) * 1000:.1f} ms")

    def timed(label: str, fn, reps: int = 5) -> None:
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            got = fn()
            best = min(best, time.perf_counter() - t)
        print(f"  {label}: {best * 1000:.1f} ms ({len(got) if hasattr(got, '__len__') else got})")

    big, big_files = max(v._query("SELECT name, files FROM domains"), key=lambda r: r[1])
    number, count = v._query(
        "SELECT parent, count(*) c FROM nodes WHERE leaf = 1 GROUP BY parent ORDER BY c DESC LIMIT 1"
    )[0]
    folder = v._query("SELECT path FROM nodes WHERE folder = ?", (number,))[0][0]
    print(f"  biggest domain {big} ({big_files} files); biggest folder {folder} ({count} files)")
    timed("domains()", v.domains)
    timed("list('')", lambda: v.list(""))
    timed("list(biggest folder, limit=100)", lambda: v.list(folder, limit=100))
    timed(
        f"list(biggest folder, offset={count - 100}, limit=100)", lambda: v.list(folder, offset=count - 100, limit=100)
    )
    timed("count(biggest folder)", lambda: v.count(folder))
    paths = [r[0] for r in v._query("SELECT path FROM nodes ORDER BY random() LIMIT 100")]
    timed("100 x stat(random path)", lambda: [v.stat(p) for p in paths])
    timed("search('sqlite'), first 200", lambda: v.search("sqlite"))
    timed("search('zzqqxx'): no hit, the whole scan", lambda: v.search("zzqqxx"), reps=3)
    timed("search('äöü'): no hit, non-ASCII", lambda: v.search("äöü"), reps=3)
    timed("walk(biggest domain)", lambda: sum(1 for _ in v.walk(big)), reps=1)


if __name__ == "__main__":
    main()
