#!/usr/bin/env python3
"""Make (or reuse) the benchmark's day-1 and day-2 trees; run by bench/run.py in a child process.

    python bench/data.py --work bench/work --size-bytes 2147483648 --seed 1

Day 1 is ``generate(parent, seed=, size_bytes=)`` into WORK/data/day1-<size>-<seed>/, day 2 is
``cp -a day1 day2`` plus ``mutate_folder(day2/<udid>, seed=)``. Both are cached, keyed by size and
seed, and made again when the generator's source changes. Prints the path of the metadata JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from run import GiB, MiB, ROOT, log, rmtree, run_quiet, tree_stats


def load_generator(spec: str):
    """A module name (default ibsync.testing.generator) or a path to a .py file with the same API."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        mod_spec = importlib.util.spec_from_file_location("bench_generator", path)
        if mod_spec is None or mod_spec.loader is None:
            raise SystemExit(f"cannot load generator {spec}")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        try:
            module = importlib.import_module(spec)
        except ImportError as e:
            raise SystemExit(
                f"cannot import the data generator {spec!r} ({e}).\n"
                f"It is expected at {ROOT}/ibsync/testing/generator.py; pass --generator FILE.py to use another one."
            ) from None
    for name in ("generate", "mutate_folder"):
        if not callable(getattr(module, name, None)):
            raise SystemExit(f"generator {spec} has no {name}()")
    return module


def generator_fingerprint(module) -> str:
    """sha256 of the generator's source, so cached data is rebuilt when the generator changes."""
    try:
        return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()
    except (OSError, TypeError):
        return "unknown"


def only_subdir(path: Path) -> Path:
    subs = [p for p in path.iterdir() if p.is_dir()]
    if len(subs) != 1:
        raise SystemExit(f"{path}: expected exactly one device folder, found {[p.name for p in subs]}")
    return subs[0]


def prepare_data(work: Path, size_bytes: int, seed: int, gen, gen_spec: str) -> dict[str, Any]:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    key = f"{size_bytes}-{seed}"
    day1, day2, meta_path = data / f"day1-{key}", data / f"day2-{key}", data / f"data-{key}.json"
    fingerprint = generator_fingerprint(gen)
    if meta_path.exists() and day1.is_dir() and day2.is_dir():
        meta = json.loads(meta_path.read_text())
        if meta.get("generator_sha256") == fingerprint:
            log(f"data: reusing {day1.name} and {day2.name} (generator unchanged)")
            meta["meta_path"] = str(meta_path)
            return meta
        log(f"data: the generator changed since {day1.name} was made; generating again")
    for p in (day1, day2, meta_path, data / f"{day1.name}.tmp", data / f"{day2.name}.tmp"):
        rmtree(p)

    tmp1 = data / f"{day1.name}.tmp"
    tmp1.mkdir()
    log(f"data: generating day 1 ({size_bytes / GiB:.3g} GiB, seed {seed}) ...")
    t0 = time.perf_counter()
    dev = Path(gen.generate(tmp1, seed=seed, size_bytes=size_bytes))
    gen_s = time.perf_counter() - t0
    udid = dev.name
    if only_subdir(tmp1).name != udid:
        raise SystemExit(f"generate() returned {dev}, which is not the only folder in {tmp1}")
    tmp1.rename(day1)

    log("data: day 2 = cp -a day1 + mutate_folder ...")
    tmp2 = data / f"{day2.name}.tmp"
    run_quiet(["cp", "-a", str(day1), str(tmp2)])
    t0 = time.perf_counter()
    summary = gen.mutate_folder(tmp2 / udid, seed=seed)
    mutate_s = time.perf_counter() - t0
    tmp2.rename(day2)

    meta = {
        "size_bytes": size_bytes,
        "seed": seed,
        "udid": udid,
        "generator": gen_spec,
        "generator_file": str(getattr(gen, "__file__", "")),
        "generator_sha256": fingerprint,
        "generate_s": round(gen_s, 2),
        "mutate_s": round(mutate_s, 2),
        "mutate_summary": summary,
        "day1": {"path": str(day1), **tree_stats(day1 / udid)},
        "day2": {"path": str(day2), **tree_stats(day2 / udid)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "meta_path": str(meta_path),
    }
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    log(f"data: day 1 {meta['day1']['files']} files {meta['day1']['bytes'] / MiB:.1f} MiB ({gen_s:.1f} s); "
        f"day 2 {meta['day2']['files']} files {meta['day2']['bytes'] / MiB:.1f} MiB ({mutate_s:.1f} s)")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--size-bytes", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--generator", default="ibsync.testing.generator")
    args = ap.parse_args(argv)
    gen = load_generator(args.generator)
    meta = prepare_data(args.work.resolve(), args.size_bytes, args.seed, gen, args.generator)
    print(meta["meta_path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
