#!/usr/bin/env python3
"""Per-file cost of `ibsync import` on a many-small-files phone, side by side with restic.

    python bench/import_profile.py make --files 200000        # build WORK/folder/<udid> once
    python bench/import_profile.py run --reps 3               # first / nextday / unchanged, ibsync and restic
    python bench/import_profile.py run --tools ibsync --reps 1 --profile   # + cProfile of each ibsync step

A quick stand-in for the "many files" benchmark profile (bench/run.py's generator profile is the official
one): a small generated phone (``ibsync.testing.generator``) plus N small app files under the 256 fileID
folders with a Manifest.db row each. Kinds: XML-ish plists and text (compressible), random bytes
(thumbnails, caches), and 2-4-block sqlite files; sizes log-uniform 0.5-20 KiB (sqlite 33-128 KiB).

Per repetition, each tool on a fresh repository: **first** import; then the folder's next day (0.5 % of
the app files rewritten with new content and a later mtime, through a temporary file and a rename, and
their Manifest.db rows updated in place by sqlite) and the **nextday** import; then **unchanged** (the same
folder again). Wall from perf_counter, CPU and peak RSS from wait4 on the child, load average at the start
of each step. The folder is left in its mutated state; the next repetition's first import reads it as is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(ROOT))  # this checkout's ibsync, whatever the installed copy points at
from run import clean_env, timed  # noqa: E402  (the same measuring as the main benchmark)

PASSWORD = "ibsync-bench-password"
SQLITE_MAGIC = b"SQLite format 3\x00"
KINDS = (("plist", 0.35), ("text", 0.25), ("random", 0.35), ("sqlite", 0.05))
NEXT_DAY_SHARE = 0.005


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the folder ------------------------------------------------------------------------------


def _text_pool(rnd: random.Random, size: int) -> bytes:
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10))) for _ in range(4000)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choices(words, k=64)) + b"\n"
    return bytes(out)


def _plist_pool(rnd: random.Random, size: int) -> bytes:
    keys = [f"Key{n}".encode() for n in range(300)]
    out = bytearray(b'<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0">\n<dict>\n')
    while len(out) < size:
        out += b"\t<key>" + rnd.choice(keys) + b"</key>\n\t<string>" + rnd.randbytes(12).hex().encode() + b"</string>\n"
        out += (
            b"\t<key>" + rnd.choice(keys) + b"</key>\n\t<integer>" + str(rnd.getrandbits(40)).encode() + b"</integer>\n"
        )
    return bytes(out)


class Content:
    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.text = _text_pool(self.rnd, 4 << 20)
        self.plist = _plist_pool(self.rnd, 4 << 20)

    def size(self, kind: str) -> int:
        if kind == "sqlite":
            return self.rnd.randint((32 << 10) + 1, 128 << 10)
        return int(512 * 40 ** self.rnd.random())  # log-uniform 512 B - 20 KiB

    def make(self, kind: str, size: int) -> bytes:
        rnd = self.rnd
        if kind == "random":
            return rnd.randbytes(size)
        if kind == "sqlite":
            body = bytearray(SQLITE_MAGIC + rnd.randbytes(84))
            while len(body) < size:
                start = rnd.randrange(len(self.text) - 4096)
                body += self.text[start : start + 2048] + bytes(1024) + rnd.randbytes(1024)
            return bytes(body[:size])
        pool = self.plist if kind == "plist" else self.text
        start = rnd.randrange(len(pool) - size)
        return pool[start : start + size] + rnd.randbytes(16)  # unique per file


def _mbfile(rnd: random.Random, size: int) -> bytes:
    return rnd.randbytes(rnd.randint(250, 450))  # stands in for an MBFile archive of about that size


def make_folder(work: Path, files: int, seed: int) -> Path:
    from ibsync.testing.generator import generate

    folder = work / "folder"
    if folder.exists():
        shutil.rmtree(folder)
    device = generate(folder, seed=seed, size_bytes=16 << 20)
    content = Content(seed)
    kinds, weights = zip(*KINDS)
    rows = []
    mtime = 1_704_067_200
    for i in range(files):
        kind = content.rnd.choices(kinds, weights)[0]
        domain = f"AppDomain-com.example.app{i % 400:03d}"
        rel = f"Library/Caches/{kind}/f{i:07d}.{'db' if kind == 'sqlite' else 'dat'}"
        file_id = hashlib.sha1(f"{domain}-{rel}".encode()).hexdigest()
        path = device / file_id[:2] / file_id
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content.make(kind, content.size(kind)))
        os.utime(path, (mtime + i, mtime + i))
        rows.append((file_id, domain, rel, 1, _mbfile(content.rnd, 0)))
    db = sqlite3.connect(device / "Manifest.db", isolation_level=None)
    try:
        st = os.stat(device / "Manifest.db")
        db.execute("BEGIN")
        db.executemany("INSERT INTO Files VALUES (?, ?, ?, ?, ?)", rows)
        db.execute("COMMIT")
    finally:
        db.close()
    os.utime(device / "Manifest.db", ns=(st.st_atime_ns, st.st_mtime_ns))
    log(f"{device}: {files} app files added")
    return device


def device_folder(work: Path) -> Path:
    found = [p for p in (work / "folder").iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def next_day(device: Path, seed: int) -> int:
    """Rewrite 0.5 % of the app files (new content, same kind, mtime a day later) and their rows."""
    db = sqlite3.connect(device / "Manifest.db", isolation_level=None)
    try:
        ids = [
            r[0]
            for r in db.execute("SELECT fileID FROM Files WHERE flags = 1 AND domain LIKE 'AppDomain-com.example.app%'")
        ]
        rnd = random.Random(seed)
        picked = rnd.sample(ids, max(1, int(len(ids) * NEXT_DAY_SHARE)))
        content = Content(seed)
        db.execute("BEGIN")
        for file_id in picked:
            path = device / file_id[:2] / file_id
            old = path.read_bytes()
            kind = "sqlite" if old.startswith(SQLITE_MAGIC) else "random"
            st = path.stat()
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(content.make(kind, content.size(kind)))
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 86_400 * 10**9))
            os.replace(tmp, path)
            db.execute("UPDATE Files SET file = ? WHERE fileID = ?", (_mbfile(rnd, 0), file_id))
        db.execute("COMMIT")
    finally:
        db.close()
    return len(picked)


def count_files(device: Path) -> int:
    return sum(len(f) for _, _, f in os.walk(device))


# ---- running ---------------------------------------------------------------------------------


def ibsync_cmd() -> list[str]:
    exe = shutil.which("ibsync")
    pyenv_real = (
        subprocess.run(["pyenv", "which", "ibsync"], capture_output=True, text=True) if shutil.which("pyenv") else None
    )
    if pyenv_real is not None and pyenv_real.returncode == 0:
        exe = pyenv_real.stdout.strip()
    assert exe, "ibsync is not installed"
    return [exe]


# ibsync variants by tool name ("ibsync" is this checkout; --code NAME=DIR adds e.g. a `git archive` of
# an older commit, so before and after run interleaved in the same session)
CODE: dict[str, Path] = {"ibsync": ROOT}


def bench_env(tool: str = "ibsync") -> dict[str, str]:
    env = clean_env()
    env["PYTHONPATH"] = str(CODE.get(tool, ROOT))
    return env


def run_step(tool: str, step: str, device: Path, run: Path, profile: bool) -> dict:
    env = bench_env(tool)
    repo, cache = run / "repo", run / "cache"
    logs = run / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if tool in CODE:
        env.update(IBSYNC_REPO=str(repo), IBSYNC_PASSWORD=PASSWORD, IBSYNC_CACHE_DIR=str(cache))
        argv = ibsync_cmd() + ["import", str(device), "--json", "--quiet"]
        if profile:
            argv = [sys.executable, "-m", "cProfile", "-o", str(logs / f"{step}.prof"), "-m", "ibsync"] + argv[1:]
    else:
        env.update(RESTIC_PASSWORD=PASSWORD)
        argv = ["restic", "-r", str(repo), "--cache-dir", str(cache), "backup", "--compression", "auto", str(device)]
    subprocess.run(["sync"], check=True)
    load = os.getloadavg()[0]
    rec = timed(argv, cwd=run, env=env, out=logs / f"{step}.out", err=logs / f"{step}.err")
    rec.update(tool=tool, step=step, load1=load)
    if rec["rc"] != 0:
        log((logs / f"{step}.err").read_text()[-2000:])
    return rec


def init_repo(tool: str, run: Path) -> None:
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    env = bench_env(tool)
    if tool in CODE:
        env.update(IBSYNC_REPO=str(run / "repo"), IBSYNC_PASSWORD=PASSWORD, IBSYNC_CACHE_DIR=str(run / "cache"))
        subprocess.run(ibsync_cmd() + ["init", "--quiet"], env=env, check=True, stdout=subprocess.DEVNULL)
    else:
        env.update(RESTIC_PASSWORD=PASSWORD)
        subprocess.run(
            ["restic", "-r", str(run / "repo"), "--cache-dir", str(run / "cache"), "init", "--repository-version", "2"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def run_bench(work: Path, tools: list[str], reps: int, seed: int, profile: bool) -> list[dict]:
    device = device_folder(work)
    files = count_files(device)
    log(f"{device}: {files} files")
    records = []
    for rep in range(reps):
        for tool in tools:
            init_repo(tool, work / "runs" / tool)
        for step in ("first", "nextday", "unchanged"):
            if step == "nextday":
                log(f"next day: {next_day(device, seed * 1000 + rep)} files rewritten")
            for tool in tools:
                rec = run_step(tool, step, device, work / "runs" / tool, profile)
                rec.update(
                    rep=rep,
                    files=files,
                    us_per_file=rec["wall_s"] / files * 1e6,
                    cpu_us_per_file=rec["cpu_s"] / files * 1e6,
                )
                records.append(rec)
                log(
                    f"rep {rep} {tool:6} {step:9} wall {rec['wall_s']:6.2f} s  cpu {rec['cpu_s']:6.2f} s  "
                    f"rss {rec['maxrss_kib'] / 1024:6.1f} MiB  {rec['us_per_file']:5.1f} us/file  load {rec['load1']:.2f}"
                )
    return records


def report(records: list[dict]) -> str:
    lines = [
        "| tool | step | n | wall s (median [min-max]) | CPU s | µs/file wall | µs/file CPU | peak RSS MiB | B/file RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    med: dict[tuple[str, str], float] = {}
    for step in ("first", "nextday", "unchanged"):
        for tool in sorted({r["tool"] for r in records}):
            rs = [r for r in records if r["tool"] == tool and r["step"] == step and r["rc"] == 0]
            if not rs:
                continue
            walls = [r["wall_s"] for r in rs]
            files = rs[0]["files"]
            w = statistics.median(walls)
            c = statistics.median(r["cpu_s"] for r in rs)
            rss = statistics.median(r["maxrss_kib"] for r in rs) / 1024
            med[tool, step] = w
            lines.append(
                f"| {tool} | {step} | {len(rs)} | {w:.2f} [{min(walls):.2f}-{max(walls):.2f}] | {c:.2f} | "
                f"{w / files * 1e6:.1f} | {c / files * 1e6:.1f} | {rss:.1f} | {rss * 1048576 / files:.0f} |"
            )
    for step in ("first", "nextday", "unchanged"):
        for tool in CODE:
            if (tool, step) in med and ("restic", step) in med:
                lines.append(f"\n{step}: {tool} / restic wall = {med[tool, step] / med['restic', step]:.2f}")
    loads = [r["load1"] for r in records]
    if loads:
        lines.append(f"\n1-minute load at step starts: {min(loads):.2f}-{max(loads):.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "import-profile")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--files", type=int, default=200_000)
    mk.add_argument("--seed", type=int, default=1)
    rn = sub.add_parser("run")
    rn.add_argument("--reps", type=int, default=3)
    rn.add_argument("--tools", default="ibsync,restic")
    rn.add_argument("--seed", type=int, default=1)
    rn.add_argument("--profile", action="store_true", help="run ibsync under cProfile (WORK/runs/ibsync/logs/*.prof)")
    rn.add_argument("--out", type=Path)
    rn.add_argument(
        "--code",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another ibsync to run as tool NAME (DIR holds its ibsync/ package)",
    )
    args = ap.parse_args()
    work = args.work.resolve()
    if args.cmd == "make":
        make_folder(work, args.files, args.seed)
        return
    for spec in getattr(args, "code", []):
        name, _, path = spec.partition("=")
        CODE[name] = Path(path).resolve()
    records = run_bench(work, args.tools.split(","), args.reps, args.seed, args.profile)
    text = report(records)
    print(text)
    out = args.out or work / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"records": records, "report": text}, indent=1))
    log(f"results: {out}")


if __name__ == "__main__":
    main()
