#!/usr/bin/env python3
"""Make (or reuse) the benchmark's day-1 and day-2 trees; run by bench/run.py in a child process.

    python bench/data.py --work bench/work --size-bytes 2147483648 --seed 1
    python bench/data.py --work bench/work --profile many-files --files 50000 --seed 1

Default profile: day 1 is ``generate(parent, seed=, size_bytes=)`` into WORK/data/day1-<size>-<seed>/,
day 2 is ``cp -a day1 day2`` plus ``mutate_folder(day2/<udid>, seed=)``.
Many-files profile: day 1 is ``generate_many_files(parent, seed=, files=)`` into
WORK/data/day1-mf<files>-<seed>/, day 2 is ``cp -al day1 day2`` (hard links: a million files would
otherwise be stored twice; the mutation gives every file it changes its own inode) plus
``mutate_many_files(day2/<udid>, seed=)``.
Both are cached, keyed by profile, size and seed, and made again when the generator's source changes.
The metadata JSON also holds the next day's floor (bench/floor.py). Prints the path of the metadata JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from floor import next_day_floor
from run import ROOT, GiB, MiB, log, rmtree, run_quiet, tree_stats

#: profile -> (generate function, mutate function) that the generator module must have
PROFILE_API = {"default": ("generate", "mutate_folder"), "many-files": ("generate_many_files", "mutate_many_files")}


def load_generator(spec: str, profile: str = "default"):
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
    for name in PROFILE_API[profile]:
        if not callable(getattr(module, name, None)):
            raise SystemExit(f"generator {spec} has no {name}()")
    return module


def generator_fingerprint(module, profile: str = "default") -> str:
    """sha256 of the generator's source (and of many_files.py beside it for that profile), so cached data
    is rebuilt when the generator changes."""
    try:
        src = Path(module.__file__)
        data = src.read_bytes()
        if profile == "many-files":
            data += src.with_name("many_files.py").read_bytes()
        return hashlib.sha256(data).hexdigest()
    except (OSError, TypeError):
        return "unknown"


def only_subdir(path: Path) -> Path:
    subs = [p for p in path.iterdir() if p.is_dir()]
    if len(subs) != 1:
        raise SystemExit(f"{path}: expected exactly one device folder, found {[p.name for p in subs]}")
    return subs[0]


@dataclass(frozen=True)
class DataSpec:
    profile: str  # "default" or "many-files"
    size_bytes: int  # default profile
    files: int  # many-files profile
    seed: int

    @property
    def key(self) -> str:
        return f"mf{self.files}-{self.seed}" if self.profile == "many-files" else f"{self.size_bytes}-{self.seed}"

    def describe(self) -> str:
        if self.profile == "many-files":
            return f"many-files profile, {self.files:,} files, seed {self.seed}"
        return f"{self.size_bytes / GiB:.3g} GiB, seed {self.seed}"


def prepare_data(work: Path, spec: DataSpec, gen, gen_spec: str) -> dict[str, Any]:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    day1, day2, meta_path = data / f"day1-{spec.key}", data / f"day2-{spec.key}", data / f"data-{spec.key}.json"
    fingerprint = generator_fingerprint(gen, spec.profile)
    if meta_path.exists() and day1.is_dir() and day2.is_dir():
        meta = json.loads(meta_path.read_text())
        if meta.get("generator_sha256") == fingerprint:
            log(f"data: reusing {day1.name} and {day2.name} (generator unchanged)")
            meta["meta_path"] = str(meta_path)
            if "floor" not in meta:  # data cached before the floor was part of it
                meta["floor"] = compute_floor(day1 / meta["udid"], day2 / meta["udid"])
                meta_path.write_text(json.dumps(meta, indent=2, default=str))
            return meta
        log(f"data: the generator changed since {day1.name} was made; generating again")
    for p in (day1, day2, meta_path, data / f"{day1.name}.tmp", data / f"{day2.name}.tmp"):
        rmtree(p)
    generate_fn, mutate_fn = (getattr(gen, name) for name in PROFILE_API[spec.profile])

    tmp1 = data / f"{day1.name}.tmp"
    tmp1.mkdir()
    log(f"data: generating day 1 ({spec.describe()}) ...")
    t0 = time.perf_counter()
    if spec.profile == "many-files":
        dev = Path(generate_fn(tmp1, seed=spec.seed, files=spec.files))
    else:
        dev = Path(generate_fn(tmp1, seed=spec.seed, size_bytes=spec.size_bytes))
    gen_s = time.perf_counter() - t0
    udid = dev.name
    if only_subdir(tmp1).name != udid:
        raise SystemExit(f"generate() returned {dev}, which is not the only folder in {tmp1}")
    tmp1.rename(day1)

    copy = ["cp", "-al"] if spec.profile == "many-files" else ["cp", "-a"]
    log(f"data: day 2 = {' '.join(copy)} day1 + {mutate_fn.__name__} ...")
    tmp2 = data / f"{day2.name}.tmp"
    t0 = time.perf_counter()
    run_quiet([*copy, str(day1), str(tmp2)])
    copy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = mutate_fn(tmp2 / udid, seed=spec.seed)
    mutate_s = time.perf_counter() - t0
    tmp2.rename(day2)

    meta = {
        "profile": spec.profile,
        "size_bytes": spec.size_bytes if spec.profile == "default" else None,
        "files_requested": spec.files if spec.profile == "many-files" else None,
        "seed": spec.seed,
        "udid": udid,
        "generator": gen_spec,
        "generator_file": str(getattr(gen, "__file__", "")),
        "generator_sha256": fingerprint,
        "generate_s": round(gen_s, 2),
        "copy_s": round(copy_s, 2),
        "mutate_s": round(mutate_s, 2),
        "mutate_summary": summary,
        "day1": {"path": str(day1), **tree_stats(day1 / udid)},
        "day2": {"path": str(day2), **tree_stats(day2 / udid)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "meta_path": str(meta_path),
    }
    meta["floor"] = compute_floor(day1 / udid, day2 / udid)
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    log(
        f"data: day 1 {meta['day1']['files']} files {meta['day1']['bytes'] / MiB:.1f} MiB ({gen_s:.1f} s); "
        f"day 2 {meta['day2']['files']} files {meta['day2']['bytes'] / MiB:.1f} MiB ({copy_s:.1f} + {mutate_s:.1f} s); "
        f"next-day floor {meta['floor']['floor_bytes'] / MiB:.2f} MiB"
    )
    return meta


def compute_floor(day1_dev: Path, day2_dev: Path) -> dict[str, Any]:
    log("data: next-day floor (bench/floor.py) ...")
    t0 = time.perf_counter()
    floor = next_day_floor(day1_dev, day2_dev).as_dict()
    floor["compute_s"] = round(time.perf_counter() - t0, 2)
    return floor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--profile", choices=sorted(PROFILE_API), default="default")
    ap.add_argument("--size-bytes", type=int, default=2 * GiB, help="day-1 size (default profile)")
    ap.add_argument("--files", type=int, default=1_000_000, help="day-1 file count (many-files profile)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--generator", default="ibsync.testing.generator")
    args = ap.parse_args(argv)
    gen = load_generator(args.generator, args.profile)
    spec = DataSpec(args.profile, args.size_bytes, args.files, args.seed)
    meta = prepare_data(args.work.resolve(), spec, gen, args.generator)
    print(meta["meta_path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
