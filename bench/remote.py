#!/usr/bin/env python3
"""Benchmark: import into an S3 repository (SeaweedFS on 127.0.0.1) vs `rclone copy` of the raw
folder to the same server, in one run.

    python bench/remote.py                          # 1 GiB folder, 3 interleaved repetitions
    python bench/remote.py --size-gib 0.1 --reps 1  # smoke run

Each repetition, in turn: ibsync init + first import of day 1 (timed) + import of day 2 (timed);
rclone copy of day 1 to a fresh prefix (timed) + copy of day 2 over it (timed). After each step
the objects under the tool's prefix are counted with a separate client. ibsync reports its own
storage operations (``import --json``: ``storage_operations``). Debian's rclone 1.60 runs with
AWS_CA_BUNDLE unset (it fails to load this machine's bundle otherwise). Prints medians, the
ratio ibsync/rclone, and PASS/FAIL for the targets: ibsync faster than rclone on the first
import, at most 70 objects per GiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run import ROOT, GiB, MiB, clean_env, log, prepare_data, rmtree, timed

sys.path.insert(0, str(ROOT))
from ibsync.testing.servers import BUCKET, start_seaweedfs  # noqa: E402

PASSWORD = "ibsync-bench-password"
MAX_OBJECTS_PER_GIB = 70


def count_objects(options: dict, prefix: str) -> tuple[int, int]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    found = fs.find(f"{BUCKET}/{prefix}", detail=True)
    objects = [v for k, v in found.items() if not k.endswith("/") and v.get("type") != "directory"]
    return len(objects), sum(int(v.get("size") or 0) for v in objects)


def rclone_remote(server) -> str:
    o = server.options
    endpoint = o["client_kwargs"]["endpoint_url"]
    return (
        f":s3,provider=SeaweedFS,access_key_id={o['key']},secret_access_key={o['secret']},"
        f"endpoint='{endpoint}',region=us-east-1:{BUCKET}"
    )


def step(argv: list[str], env: dict[str, str], work: Path, name: str) -> dict[str, Any]:
    out, err = work / f"{name}.out", work / f"{name}.err"
    r = timed(argv, cwd=work, env=env, out=out, err=err)
    if r["rc"] != 0:
        raise SystemExit(f"{name} failed (exit {r['rc']}): {err.read_text()[-2000:]}")
    r["stdout"] = out.read_text()
    return r


def one_rep(rep: int, server, day1: Path, day2: Path, work: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    # ibsync: a named repository in a config file, as a user would set it up
    prefix = f"ibsync-{rep}-{time.monotonic_ns()}"
    config = work / f"config-{rep}.toml"
    config.write_text(server.config_toml("bench", f"s3://{BUCKET}/{prefix}"))
    env = {
        **clean_env(),
        "IBSYNC_CONFIG": str(config),
        "IBSYNC_PASSWORD": PASSWORD,
        "IBSYNC_CACHE_DIR": str(work / f"cache-{rep}"),
    }
    exe = [sys.executable, "-m", "ibsync"]
    subprocess.run([*exe, "init", "--repo", "bench", "--quiet"], env=env, check=True)
    for day, folder in (("first", day1), ("second", day2)):
        r = step([*exe, "import", str(folder), "--repo", "bench", "--json"], env, work, f"ibsync-{day}-{rep}")
        report = json.loads(r["stdout"])
        r["objects"], r["stored_bytes"] = count_objects(server.options, prefix)
        r["operations"] = report.get("storage_operations", {})
        results[f"ibsync-{day}"] = r
    # rclone: the same folders, file for file
    rprefix = f"rclone-{rep}-{time.monotonic_ns()}"
    renv = {k: v for k, v in clean_env().items() if k != "AWS_CA_BUNDLE"}
    for day, folder in (("first", day1), ("second", day2)):
        argv = ["rclone", "--config", "/dev/null", "copy", str(folder), f"{rclone_remote(server)}/{rprefix}"]
        r = step(argv, renv, work, f"rclone-{day}-{rep}")
        r["objects"], r["stored_bytes"] = count_objects(server.options, rprefix)
        results[f"rclone-{day}"] = r
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work")
    args = ap.parse_args(argv)
    if shutil.which("rclone") is None:
        raise SystemExit("rclone is not installed (apt-get install rclone)")
    args.work.mkdir(parents=True, exist_ok=True)
    meta = prepare_data(args.work, int(args.size_gib * GiB), args.seed, "ibsync.testing.generator")
    udid = meta["udid"]
    day1, day2 = Path(meta["day1"]["path"]) / udid, Path(meta["day2"]["path"]) / udid
    size_gib = meta["day1"]["bytes"] / GiB
    run_dir = Path(tempfile.mkdtemp(prefix="remote-", dir=args.work))
    records: list[dict[str, dict[str, Any]]] = []
    try:
        with start_seaweedfs(run_dir / "seaweedfs") as server:
            for rep in range(args.reps):
                log(f"rep {rep + 1}/{args.reps} ...")
                records.append(one_rep(rep, server, day1, day2, run_dir))
    finally:
        rmtree(run_dir)
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results_dir / f"remote-{stamp}.json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=1, default=str)
    )

    def med(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in records)

    print(
        f"\nS3 (SeaweedFS on 127.0.0.1), day 1 = {meta['day1']['files']} files, {meta['day1']['bytes'] / MiB:.0f} MiB; "
        f"day 2 adds/changes {meta['mutate_summary'].get('new_bytes', 0) / MiB + meta['mutate_summary'].get('rewritten_bytes', 0) / MiB:.0f} MiB; "
        f"medians of {args.reps}"
    )
    print(
        f"{'step':<8} {'ibsync s':>9} {'rclone s':>9} {'ratio':>6} {'ibsync objects':>15} {'rclone objects':>15} {'ibsync ops':>11}"
    )
    for day in ("first", "second"):
        ops = statistics.median(r[f"ibsync-{day}"]["operations"].get("total", 0) for r in records)
        print(
            f"{day:<8} {med(f'ibsync-{day}', 'wall_s'):9.2f} {med(f'rclone-{day}', 'wall_s'):9.2f} "
            f"{med(f'ibsync-{day}', 'wall_s') / med(f'rclone-{day}', 'wall_s'):6.2f} "
            f"{med(f'ibsync-{day}', 'objects'):15.0f} {med(f'rclone-{day}', 'objects'):15.0f} {ops:11.0f}"
        )
    per_gib = med("ibsync-first", "objects") / size_gib
    ops_first = records[len(records) // 2]["ibsync-first"]["operations"]
    print(
        f"ibsync objects per GiB after the first import: {per_gib:.1f} (rclone: {med('rclone-first', 'objects') / size_gib:.0f})"
    )
    print(f"ibsync storage operations in the first import (median rep): {ops_first}")
    faster = med("ibsync-first", "wall_s") < med("rclone-first", "wall_s")
    print(
        f"{'PASS' if faster else 'FAIL'}: first import faster than rclone copy "
        f"({med('ibsync-first', 'wall_s'):.2f} s vs {med('rclone-first', 'wall_s'):.2f} s)"
    )
    print(
        f"{'PASS' if per_gib <= MAX_OBJECTS_PER_GIB else 'FAIL'}: at most {MAX_OBJECTS_PER_GIB} objects per GiB ({per_gib:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
