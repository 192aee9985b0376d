"""Peak memory of check, prune, stats and copy on a repository of many small blobs.

    python bench/maint_memory.py [--files 100000] [--work bench/work/maint_memory]

Builds (once, then reuses) a generated phone plus FILES small distinct files spread over the
256 fileID folders, imports it, touches 0.5 % of the files and imports again (two snapshots
sharing most trees), then runs each command in its own process and reports its peak RSS
(``os.wait4``'s ru_maxrss) in MB and per blob of the repository. ``--baseline`` also runs a
process that only opens the repository and loads its index, so the per-blob cost of the
command itself can be told apart from the index's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's ibsync, whatever the installed copy points at

PASSWORD = "bench password"
FAST_KDF = '{"name": "argon2id", "memory_kib": 8192, "iterations": 1, "lanes": 1}'


def _env(repo: Path, cache: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        IBSYNC_REPO=str(repo),
        IBSYNC_PASSWORD=PASSWORD,
        IBSYNC_FROM_PASSWORD=PASSWORD,
        IBSYNC_CACHE_DIR=str(cache),
        PYTHONPATH=str(ROOT),
    )
    env.pop("IBSYNC_PASSWORD_FILE", None)
    return env


def _spawn(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    started = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(args)} exited {code}: {err.decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.monotonic() - started, out.decode()


def _ibsync(*args: str) -> list[str]:
    # the same FAST_KDF the tests use, so building the repository does not spend seconds in Argon2
    code = (
        "import sys, json, ibsync.format.crypto as c; c.DEFAULT_KDF = json.loads(sys.argv[1]); "
        "from ibsync.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    return [sys.executable, "-c", code, FAST_KDF, *args]


def _add_small_files(device: Path, count: int, seed: int) -> list[Path]:
    rnd = random.Random(seed)
    made = []
    for _ in range(count):
        name = f"{rnd.getrandbits(160):040x}"
        path = device / name[:2] / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(rnd.randbytes(rnd.randint(64, 400)))
        made.append(path)
    return made


def build(work: Path, files: int) -> tuple[Path, Path]:
    from ibsync.testing.generator import generate

    repo, marker = work / "repo", work / f"built-{files}"
    live_parent = work / "live"
    if marker.exists():
        return repo, next(live_parent.iterdir())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device = generate(live_parent, seed=7, size_bytes=8 << 20)
    made = _add_small_files(device, files, seed=7)
    env = _env(repo, work / "cache")
    _spawn(_ibsync("init"), env)
    _spawn(_ibsync("import", str(device)), env)
    rnd = random.Random(8)
    for path in rnd.sample(made, max(1, files // 200)):  # the next day: 0.5 % of the files change
        path.write_bytes(rnd.randbytes(rnd.randint(64, 400)))
    _spawn(_ibsync("import", str(device)), env)
    marker.touch()
    return repo, device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "maint_memory")
    ap.add_argument("--commands", default="baseline,check,prune,stats,copy")
    args = ap.parse_args()
    repo, _ = build(args.work, args.files)
    env = _env(repo, args.work / "cache")
    from ibsync.repo.repository import Repository
    from ibsync.storage import LocalStorage

    r = Repository.open(LocalStorage(repo), lambda: PASSWORD)
    r.load_index()
    blobs = len(r.index)
    results: dict[str, dict[str, float]] = {}
    commands = {
        "baseline": [
            sys.executable,
            "-c",
            "import sys; from ibsync.repo.repository import Repository; from ibsync.storage import LocalStorage; "
            "r = Repository.open(LocalStorage(sys.argv[1]), lambda: sys.argv[2]); r.load_index()",
            str(repo),
            PASSWORD,
        ],
        "check": _ibsync("check"),
        "prune": _ibsync("prune", "--dry-run"),
        "stats": _ibsync("stats", "--json"),
    }
    for name in args.commands.split(","):
        if name == "copy":
            target = args.work / "copy-target"
            shutil.rmtree(target, ignore_errors=True)
            _spawn(_ibsync("init", "--repo", str(target)), env)
            # the first snapshot (a full copy), then the next day against it
            first = json.loads(_spawn(_ibsync("snapshots", "--json"), env)[2])[0]["id"]
            rss, wall, _ = _spawn(_ibsync("copy", first, "--from-repo", str(repo), "--repo", str(target)), env)
            results["copy-full"] = {"rss_mb": round(rss, 1), "wall_s": round(wall, 2)}
            rss, wall, _ = _spawn(_ibsync("copy", "--from-repo", str(repo), "--repo", str(target)), env)
            results["copy-next-day"] = {"rss_mb": round(rss, 1), "wall_s": round(wall, 2)}
            continue
        rss, wall, _ = _spawn(commands[name], env)
        results[name] = {"rss_mb": round(rss, 1), "wall_s": round(wall, 2)}
    base = results.get("baseline", {}).get("rss_mb")
    for name, r_ in results.items():
        r_["bytes_per_blob"] = round(r_["rss_mb"] * 1024 * 1024 / blobs, 1)
        if base is not None and name != "baseline":
            r_["above_baseline_bytes_per_blob"] = round((r_["rss_mb"] - base) * 1024 * 1024 / blobs, 1)
    print(json.dumps({"files": args.files, "blobs": blobs, "results": results}, indent=1))


if __name__ == "__main__":
    main()
