#!/usr/bin/env python3
"""Benchmark ibsync against restic and borg on one generated iOS backup folder, in one run.

    python bench/run.py                          # 2 GiB day-1 tree, 3 interleaved repetitions
    python bench/run.py --size-gib 0.1 --reps 1  # smoke run, about a minute

Procedure (docs: bench/README.md; method: /work/shared/reference/performance.md sections 0-2):
day 1 is generated once and cached, day 2 is ``cp -a day1 day2`` plus ``mutate_folder``. Every
repetition runs each tool in turn (interleaved), and each tool does, on a fresh repository and
fresh caches: rsync day 1 to live/ (untimed), first import, rsync day 2 to live/ (untimed),
second import, nochange import, restore of the latest snapshot into an empty folder. Every timed
command runs after an untimed ``sync``; wall time comes from perf_counter, CPU time and peak RSS
from os.wait4 on the child. Repository sizes are ``du -sb``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
STEPS = ("first", "second", "nochange", "restore")
#: ibsync only, at the end of a cycle (default on for the many-files profile): see run_extras
EXTRA_STEPS = ("stats", "check", "ls", "ls-all", "find", "diff", "copy", "forget", "prune")
ALL_TOOLS = ("ibsync", "restic", "borg")
PASSWORD = "ibsync-bench-password"
MiB = 1 << 20
GiB = 1 << 30
PROFILES = ("realistic", "many-files")
DATA_PROFILE = {"realistic": "default", "many-files": "many-files"}  # bench/data.py's (the generator's) names
FULL_FILES = 1_000_000  # the many-files profile's target size
RSS_LIMIT = 150_000_000  # issue 9: peak RSS of every ibsync command at 1 M files, bytes (150 MB)
TAIL = 4000  # characters of a command's stderr kept in the results


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# helpers


def run_quiet(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, **kw)


def du_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    out = run_quiet(["du", "-sb", str(path)]).stdout.decode()
    return int(out.split()[0])


def tree_stats(path: Path) -> dict[str, int]:
    files = dirs = size = 0
    for root, dnames, fnames in os.walk(path):
        dirs += len(dnames)
        for f in fnames:
            files += 1
            size += os.lstat(os.path.join(root, f)).st_size
    return {"files": files, "dirs": dirs, "bytes": size}


def rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def mirror(src: Path, dst: Path) -> None:
    """``rsync -a --delete src/ dst/``: unchanged files (same size and mtime) keep inode and ctime.

    --modify-window=-1 compares mtimes to the nanosecond (rsync's default is whole seconds, which
    misses a same-size rewrite within the same second).
    """
    dst.mkdir(parents=True, exist_ok=True)
    run_quiet(["rsync", "-a", "--delete", "--modify-window=-1", f"{src}/", f"{dst}/"])


def sync_disks() -> None:
    subprocess.run(["sync"], check=False)


def tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-TAIL:].decode("utf-8", "replace")


def timed(argv: list[str], *, cwd: Path, env: dict[str, str], out: Path, err: Path) -> dict[str, Any]:
    """Run one command; wall from perf_counter, CPU and peak RSS of the child from wait4.

    The child's ru_maxrss is at least our own high-water mark (exec records the parent's), so this
    process must stay small; ``launcher_maxrss_kib`` is recorded to check that it did.
    """
    launcher = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "maxrss_kib": ru.ru_maxrss,  # KiB on Linux
        "launcher_maxrss_kib": launcher,
        "minflt": ru.ru_minflt,
        "majflt": ru.ru_majflt,
        "inblock": ru.ru_inblock,
        "oublock": ru.ru_oublock,
        "nvcsw": ru.ru_nvcsw,
        "nivcsw": ru.ru_nivcsw,
    }


def clean_env() -> dict[str, str]:
    """The caller's environment without anything that could point a tool at another repository."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("IBSYNC_", "RESTIC_", "BORG_"))}


def cmd_output(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        return p.stdout.decode("utf-8", "replace").strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e})"


# --------------------------------------------------------------------------------------------
# data (made in a child process: see bench/data.py)


def prepare_data(work: Path, profile: str, size_bytes: int, files: int, seed: int, gen_spec: str) -> dict[str, Any]:
    """Run bench/data.py in its own process and return its metadata.

    The generator builds the whole tree in memory. Done in this process, it would raise our peak RSS
    to gigabytes, and every child we start afterwards inherits that peak in its ru_maxrss (exec
    records the parent's high-water mark), so the RSS column would measure us, not the tools.
    """
    argv = [
        sys.executable,
        str(BENCH / "data.py"),
        "--work",
        str(work),
        "--profile",
        DATA_PROFILE[profile],
        "--size-bytes",
        str(size_bytes),
        "--files",
        str(files),
        "--seed",
        str(seed),
        "--generator",
        gen_spec,
    ]
    p = subprocess.run(argv, stdout=subprocess.PIPE)
    if p.returncode != 0:
        raise SystemExit(f"data preparation failed (exit code {p.returncode}): {' '.join(argv)}")
    return json.loads(Path(p.stdout.decode().strip().splitlines()[-1]).read_text())


# --------------------------------------------------------------------------------------------
# tools


class Tool:
    name = "?"

    def __init__(self, run_dir: Path, live_dev: Path, udid: str):
        self.run_dir = run_dir
        self.live_dev = live_dev
        self.udid = udid
        self.repo = run_dir / "repo"
        self.restore_dir = run_dir / "restore"

    def env(self) -> dict[str, str]:
        return clean_env()

    def init(self) -> None:
        raise NotImplementedError

    def command(self, step: str) -> tuple[list[str], Path]:
        raise NotImplementedError

    def restored_device(self) -> Path:
        raise NotImplementedError


class Ibsync(Tool):
    name = "ibsync"
    exe: list[str] = ["ibsync"]

    def env(self):
        return {**clean_env(), "IBSYNC_REPO": str(self.repo), "IBSYNC_PASSWORD": PASSWORD}

    def init(self):
        run_quiet([*self.exe, "init"], env=self.env(), stdin=subprocess.DEVNULL)

    def command(self, step):
        if step == "restore":
            return [*self.exe, "restore", "latest", str(self.restore_dir)], self.run_dir
        return [*self.exe, "import", str(self.live_dev), "--json"], self.run_dir

    def restored_device(self):
        return self.restore_dir / self.udid

    @property
    def copy_target(self) -> Path:
        return self.run_dir / "repo-copy"

    def copy_env(self) -> dict[str, str]:
        """The copy's target is IBSYNC_REPO; the source comes from --from-repo with the same password."""
        return {**self.env(), "IBSYNC_REPO": str(self.copy_target), "IBSYNC_FROM_PASSWORD": PASSWORD}

    def init_copy_target(self) -> None:
        run_quiet([*self.exe, "init"], env=self.copy_env(), stdin=subprocess.DEVNULL)

    def extra_command(self, step: str, first_id: str) -> list[str]:
        return [
            *self.exe,
            *{
                "stats": ["stats", "--json"],
                "check": ["check"],
                "ls": ["ls", "latest"],
                "ls-all": ["ls", "latest", "**"],
                "find": ["find", "*.plist"],
                "diff": ["diff", first_id, "latest"],
                "copy": ["copy", "--from-repo", str(self.repo)],
                "forget": ["forget", "--keep-last", "1"],
                "prune": ["prune"],
            }[step],
        ]


class Restic(Tool):
    name = "restic"

    def base(self):
        return ["restic", "-r", str(self.repo), "--cache-dir", str(self.run_dir / "restic-cache")]

    def env(self):
        return {**clean_env(), "RESTIC_PASSWORD": PASSWORD}

    def init(self):
        run_quiet([*self.base(), "init", "--repository-version", "2"], env=self.env(), stdin=subprocess.DEVNULL)

    def command(self, step):
        if step == "restore":
            return [*self.base(), "restore", "latest", "--target", str(self.restore_dir)], self.run_dir
        return [*self.base(), "backup", "--compression", "auto", str(self.live_dev)], self.run_dir

    def restored_device(self):  # restic restores the absolute source path under the target
        return self.restore_dir / self.live_dev.relative_to(self.live_dev.anchor)


class Borg(Tool):
    name = "borg"

    def __init__(self, *a):
        super().__init__(*a)
        self.archives: list[str] = []

    def env(self):
        return {
            **clean_env(),
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_BASE_DIR": str(self.run_dir / "borgbase"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_DISPLAY_PASSPHRASE": "no",
        }

    def init(self):
        run_quiet(["borg", "init", "-e", "repokey", str(self.repo)], env=self.env(), stdin=subprocess.DEVNULL)

    def command(self, step):
        if step == "restore":  # the last archive we created; run inside the (empty) target
            return ["borg", "extract", f"{self.repo}::{self.archives[-1]}"], self.restore_dir
        name = f"snap-{len(self.archives) + 1}"
        self.archives.append(name)
        return ["borg", "create", "--compression", "zstd,3", f"{self.repo}::{name}", str(self.live_dev)], self.run_dir

    def restored_device(self):  # borg stores the path without its leading slash
        return self.restore_dir / self.live_dev.relative_to(self.live_dev.anchor)


TOOL_CLASSES = {"ibsync": Ibsync, "restic": Restic, "borg": Borg}


def resolve_ibsync(arg: str | None) -> list[str]:
    """The ibsync console script itself, not a pyenv shim (the shim adds ~0.15 s per call)."""
    if arg:
        return shlex.split(arg)
    path = shutil.which("ibsync")
    if path is None:
        return [sys.executable, "-m", "ibsync"]
    if "/.pyenv/shims/" in path:
        real = subprocess.run(
            ["pyenv", "which", "ibsync"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        if real.returncode == 0 and real.stdout.strip():
            return [real.stdout.strip()]
    return [path]


def ibsync_package_location(exe: list[str]) -> str:
    """Where the benchmarked ibsync imports its package from (should be this checkout)."""
    interp = None
    try:
        first = Path(exe[0]).read_bytes()[:200].split(b"\n", 1)[0]
        if first.startswith(b"#!"):
            interp = first[2:].decode().strip().split()[0]
    except OSError:
        pass
    if exe[0] == sys.executable:
        interp = sys.executable
    if not interp or not Path(interp).name.startswith("python"):
        return "unknown"
    return cmd_output([interp, "-c", "import ibsync, os; print(os.path.dirname(ibsync.__file__))"])


# --------------------------------------------------------------------------------------------
# verification


def verify(expected: Path, restored: Path) -> dict[str, Any]:
    """diff -r, then mtimes of every file and folder (nanoseconds, lstat)."""
    if not restored.is_dir():
        return {"ok": False, "content_identical": False, "diff": f"{restored} does not exist"}
    d = subprocess.run(
        ["diff", "-r", "-q", "--no-dereference", str(expected), str(restored)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    diff_lines = d.stdout.decode("utf-8", "replace").splitlines()
    file_bad, dir_bad, examples, max_diff = 0, 0, [], 0
    for root, dnames, fnames in os.walk(expected):
        rel_root = os.path.relpath(root, expected)
        for name, is_dir in [(n, True) for n in dnames] + [(n, False) for n in fnames]:
            rel = os.path.normpath(os.path.join(rel_root, name))
            try:
                a = os.lstat(os.path.join(expected, rel)).st_mtime_ns
                b = os.lstat(os.path.join(restored, rel)).st_mtime_ns
            except FileNotFoundError:
                continue  # reported by diff
            if a != b:
                max_diff = max(max_diff, abs(a - b))
                if is_dir:
                    dir_bad += 1
                else:
                    file_bad += 1
                if len(examples) < 5:
                    examples.append(f"{rel}{'/' if is_dir else ''}: expected {a} ns, got {b} ns")
    a = os.lstat(expected).st_mtime_ns
    b = os.lstat(restored).st_mtime_ns
    top_bad = a != b
    if top_bad:
        max_diff = max(max_diff, abs(a - b))
        examples.insert(0, f"./ (the device folder itself): expected {a} ns, got {b} ns")
    return {
        "content_identical": d.returncode == 0,
        "diff": "\n".join(diff_lines[:20]) + (f"\n... {len(diff_lines) - 20} more" if len(diff_lines) > 20 else ""),
        "file_mtime_mismatches": file_bad,
        "dir_mtime_mismatches": dir_bad + int(top_bad),
        "max_mtime_diff_ns": max_diff,
        "mtime_examples": examples,
    }


# --------------------------------------------------------------------------------------------
# the run


class Results:
    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.doc: dict[str, Any] = {**header, "records": [], "verification": {}, "errors": []}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str))
        tmp.replace(self.path)


@dataclass
class StepRun:
    """One timed command of a cycle, and where its record goes."""

    tool: Tool
    rep: int
    results: Results
    size_before: int
    init_size: int

    def __call__(
        self, step: str, argv: list[str], cwd: Path, env: dict[str, str], in_bytes: int, size_of: Path | None = None
    ) -> dict[str, Any]:
        """Run ``argv`` timed after an untimed sync; record it; return the record. The repository size
        (``size_of``, default the tool's repository) is measured after it, and ``added`` against the
        size before."""
        run_dir = self.tool.run_dir
        sync_disks()
        load1 = os.getloadavg()[0]
        out, err = run_dir / f"{step}.out", run_dir / f"{step}.err"
        m = timed(argv, cwd=cwd, env=env, out=out, err=err)
        measured = size_of or self.tool.repo
        size_after = du_bytes(measured)
        before = self.size_before if measured == self.tool.repo else 0
        rec: dict[str, Any] = {
            "tool": self.tool.name,
            "step": step,
            "rep": self.rep,
            "argv": argv,
            "cwd": str(cwd),
            **m,
            "input_bytes": in_bytes,
            "mb_per_s": in_bytes / m["wall_s"] / 1e6 if m["wall_s"] > 0 and in_bytes else None,
            "repo_bytes_after": size_after,
            "added_bytes": size_after - before,
            "repo_bytes_after_init": self.init_size,
            "loadavg1_before": load1,
            "stderr_tail": tail(err),
        }
        if size_of is not None:
            rec["measured_repository"] = str(size_of)
        if self.tool.name == "ibsync":
            parse_ibsync_output(step, out, rec)
        if m["rc"] != 0:
            rec["stdout_tail"] = tail(out)
        self.results.doc["records"].append(rec)
        self.results.save()
        if measured == self.tool.repo:
            self.size_before = size_after
        log(
            f"  [rep {self.rep}] {self.tool.name:6} {step:8} wall {m['wall_s']:7.2f} s  cpu {m['cpu_s']:7.2f} s  "
            f"rss {m['maxrss_kib'] / 1024:6.0f} MiB  repo {size_after / MiB:8.1f} MiB ({rec['added_bytes'] / MiB:+.1f})"
            f"  load {load1:.1f}" + (f"  rc={m['rc']} FAILED" if m["rc"] else "")
        )
        if m["rc"] != 0:
            msg = f"{self.tool.name} rep {self.rep} {step}: exit code {m['rc']}: {rec['stderr_tail'].strip()[-1500:]}"
            log("ERROR " + msg)
            self.results.doc["errors"].append(msg)
            self.results.save()
        elif (
            rec.get("stderr_tail", "").strip() and self.tool.name == "ibsync" and step not in ("restore", *EXTRA_STEPS)
        ):
            log(f"  note: ibsync {step} wrote to stderr: {rec['stderr_tail'].strip()[-300:]}")
        return rec


def parse_ibsync_output(step: str, out: Path, rec: dict[str, Any]) -> None:
    """Keep what ibsync's --json says: the import summaries, and the blob count from stats."""
    if step in ("first", "second", "nochange"):
        try:
            rep_json = json.loads(out.read_text())
            snaps = rep_json.get("snapshots", [])
            rec["ibsync_report"] = [
                {"status": s.get("status"), "id": s.get("id"), "summary": s.get("summary")} for s in snaps
            ]
        except (OSError, ValueError) as e:
            rec["ibsync_report_error"] = f"{e.__class__.__name__}: {e}; stdout: {tail(out)[:500]}"
    elif step == "stats" and rec["rc"] == 0:
        try:
            st = json.loads(out.read_text())
            rec["blobs"], rec["packs"], rec["stored_bytes"] = st.get("blobs"), st.get("packs"), st.get("stored_bytes")
        except (OSError, ValueError) as e:
            rec["ibsync_report_error"] = f"{e.__class__.__name__}: {e}"


def one_cycle(tool_cls, rep: int, args, meta, work: Path, results: Results) -> None:
    udid = meta["udid"]
    day1 = Path(meta["day1"]["path"])
    day2 = Path(meta["day2"]["path"])
    live = work / "live"
    run_dir = work / "runs" / tool_cls.name
    rmtree(run_dir)
    run_dir.mkdir(parents=True)
    tool = tool_cls(run_dir, live / udid, udid)
    env = tool.env()

    mirror(day1, live)
    try:
        tool.init()
    except subprocess.CalledProcessError as e:
        msg = f"{tool.name} rep {rep}: init failed (rc {e.returncode}): {e.stderr.decode('utf-8', 'replace')[-TAIL:]}"
        log("ERROR " + msg)
        results.doc["errors"].append(msg)
        results.save()
        return
    init_size = du_bytes(tool.repo)
    run = StepRun(tool, rep, results, init_size, init_size)

    restored_ok = False
    first_id = None
    for step in STEPS:
        if step == "second":
            mirror(day2, live)
        if step == "restore":
            rmtree(tool.restore_dir)
            tool.restore_dir.mkdir()
        argv, cwd = tool.command(step)
        in_bytes = meta["day1"]["bytes"] if step == "first" else meta["day2"]["bytes"]
        rec = run(step, argv, cwd, env, in_bytes)
        if rec["rc"] != 0:
            break
        if step == "first" and rec.get("ibsync_report"):
            first_id = rec["ibsync_report"][0].get("id")
        if step == "restore":
            restored_ok = True

    if restored_ok and tool.name not in results.doc["verification"]:
        v = verify(day2 / udid, tool.restored_device())
        need_mtimes = tool.name == "ibsync"
        v["ok"] = v["content_identical"] and (not need_mtimes or v["file_mtime_mismatches"] == 0)
        v["checked"] = f"rep {rep}: diff -r {day2 / udid} {tool.restored_device()}" + (
            " + file mtimes" if need_mtimes else ""
        )
        results.doc["verification"][tool.name] = v
        results.save()
        log(
            f"  [rep {rep}] {tool.name:6} restore check: {'identical' if v['content_identical'] else 'DIFFERENT'} content; "
            f"mtime mismatches: {v['file_mtime_mismatches']} files, {v['dir_mtime_mismatches']} folders"
            + ("" if v["ok"] else "  -> FAIL")
        )
        if v.get("diff"):
            log("    " + v["diff"].replace("\n", "\n    "))

    if restored_ok and args.extras and isinstance(tool, Ibsync) and first_id:
        rmtree(tool.restore_dir)  # disk: a million-file restore is as big as the tree
        run_extras(tool, run, first_id, env)

    if not args.keep:
        rmtree(run_dir)


def run_extras(tool: Ibsync, run: StepRun, first_id: str, env: dict[str, str]) -> None:
    """ibsync's other commands at the end of a cycle (two snapshots in the repository), each timed with its
    peak RSS. Order: what reads both snapshots first, then copy, then forget + prune (which drop the first)."""
    for step in EXTRA_STEPS:
        size_of = None
        step_env = env
        if step == "copy":
            try:
                tool.init_copy_target()
            except subprocess.CalledProcessError as e:
                run.results.doc["errors"].append(
                    f"ibsync rep {run.rep}: init of the copy target failed: "
                    f"{e.stderr.decode('utf-8', 'replace')[-TAIL:]}"
                )
                continue
            size_of, step_env = tool.copy_target, tool.copy_env()
        rec = run(step, tool.extra_command(step, first_id), tool.run_dir, step_env, 0, size_of=size_of)
        if rec["rc"] != 0 and step in ("forget",):
            break  # prune after a failed forget measures nothing


# --------------------------------------------------------------------------------------------
# report


def med(xs):
    return statistics.median(xs) if xs else None


def fmt_range(xs, digits=2, scale=1.0) -> str:
    if not xs:
        return "—"
    xs = [x / scale for x in xs]
    m = statistics.median(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{min(xs):.{digits}f}–{max(xs):.{digits}f}]"


def summarize(records: list[dict]) -> dict[tuple[str, str], dict[str, list[float]]]:
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in records:
        if r["rc"] != 0:
            continue
        g = groups.setdefault(
            (r["tool"], r["step"]), {"wall": [], "cpu": [], "rss": [], "mbs": [], "repo": [], "added": []}
        )
        g["wall"].append(r["wall_s"])
        g["cpu"].append(r["cpu_s"])
        g["rss"].append(r["maxrss_kib"] * 1024)
        g["mbs"].append(r["mb_per_s"] or 0.0)
        g["repo"].append(r["repo_bytes_after"])
        g["added"].append(r["added_bytes"])
    return groups


def table(groups, tools) -> str:
    lines = [
        "| tool | step | n | wall s | CPU s (user+sys) | CPU/wall | peak RSS MiB | MB/s (wall) | repo after, MiB | added, MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(step, tool) for step in STEPS for tool in tools]
    rows += [(step, "ibsync") for step in EXTRA_STEPS if ("ibsync", step) in groups]
    for step, tool in rows:
        g = groups.get((tool, step))
        if not g:
            lines.append(f"| {tool} | {step} | 0 | — | — | — | — | — | — | — |")
            continue
        cw = med(g["cpu"]) / med(g["wall"]) if med(g["wall"]) else 0
        mbs = fmt_range(g["mbs"], 0) if any(g["mbs"]) else "—"
        lines.append(
            f"| {tool} | {step} | {len(g['wall'])} | {fmt_range(g['wall'])} | {fmt_range(g['cpu'], 1)} | {cw:.2f} | "
            f"{fmt_range(g['rss'], 0, MiB)} | {mbs} | {med(g['repo']) / MiB:.0f} | "
            f"{fmt_range(g['added'], 1, MiB)} |"
        )
    return "\n".join(lines)


METRICS = (
    ("wall", "wall s"),
    ("cpu", "CPU s"),
    ("rss", "peak RSS"),
    ("repo", "repo size after"),
    ("added", "added bytes"),
)


def ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def fmt_metric(key, v) -> str:
    if v is None:
        return "—"
    if key in ("rss", "repo", "added"):
        return f"{v / MiB:.1f} MiB"
    return f"{v:.3f} s"


def ratios_table(groups, tools) -> str:
    others = [t for t in ("restic", "borg") if t in tools]
    head = "| step | metric | " + " | ".join(tools) + " | " + " | ".join(f"ibsync/{t}" for t in others) + " |"
    lines = [head, "|" + "---|" * (2 + len(tools) + len(others))]
    for step in STEPS:
        for key, label in METRICS:
            vals = {t: med(groups[(t, step)][key]) if (t, step) in groups else None for t in tools}
            cells = [fmt_metric(key, vals[t]) for t in tools]
            rs = [fmt_ratio(ratio(vals.get("ibsync"), vals.get(t))) for t in others]
            lines.append(f"| {step} | {label} | " + " | ".join(cells) + " | " + " | ".join(rs) + " |")
    return "\n".join(lines)


#: Issue 9's targets, on both profiles: (label, step, metric, factor): ibsync median <= factor x restic median.
#: They replace the older targets of the realistic profile where they overlap (next-day wall ≤ restic, next-day
#: added ≤ 0.8 × restic, restore ≤ restic).
ISSUE_TARGETS = [
    ("first import: ibsync wall ≤ 0.5 × restic", "first", "wall", 0.5),
    ("next-day import: ibsync wall ≤ 0.5 × restic", "second", "wall", 0.5),
    ("unchanged re-import: ibsync wall ≤ 0.4 × restic", "nochange", "wall", 0.4),
    ("full restore: ibsync wall ≤ 0.5 × restic", "restore", "wall", 0.5),
]
#: Older targets of the realistic profile that issue 9 does not replace.
REALISTIC_TARGETS = [
    ("repository size after first import: ibsync ≤ restic", "first", "repo", 1.0),
    *[(f"peak RSS, {s}: ibsync ≤ restic", s, "rss", 1.0) for s in STEPS],
]
EXCESS_FACTOR = 0.25


def ratio_target(groups, label, step, key, factor) -> dict[str, Any]:
    t: dict[str, Any] = {"target": label, "step": step, "metric": key, "factor": factor}
    if (("ibsync", step) not in groups) or (("restic", step) not in groups):
        t.update(verdict="FAIL", detail="no successful measurement")
        return t
    a = med(groups[("ibsync", step)][key])
    b = med(groups[("restic", step)][key])
    limit = factor * b
    t.update(ibsync=a, restic=b, limit=limit, ratio=ratio(a, b), verdict="PASS" if a <= limit else "FAIL")
    t["detail"] = (
        f"ibsync {fmt_metric(key, a)} vs limit {fmt_metric(key, limit)}"
        f" ({factor:g} × restic {fmt_metric(key, b)}); ratio {fmt_ratio(t['ratio'])}"
    )
    return t


def excesses(groups, tools, floor_bytes: int | None) -> dict[str, int]:
    """Median next-day added bytes minus the floor, per tool."""
    if floor_bytes is None:
        return {}
    return {t: med(groups[(t, "second")]["added"]) - floor_bytes for t in tools if (t, "second") in groups}


def excess_target(groups, floor_bytes: int | None) -> dict[str, Any]:
    t: dict[str, Any] = {
        "target": f"next-day bytes above the floor: ibsync ≤ {EXCESS_FACTOR:g} × restic's",
        "step": "second",
        "metric": "excess",
        "factor": EXCESS_FACTOR,
    }
    ex = excesses(groups, ["ibsync", "restic"], floor_bytes)
    if floor_bytes is None:
        t.update(verdict="FAIL", detail="no floor in the data metadata")
    elif len(ex) < 2:
        t.update(verdict="FAIL", detail="no successful measurement")
    else:
        a, b = ex["ibsync"], ex["restic"]
        limit = EXCESS_FACTOR * max(b, 0)
        t.update(ibsync=a, restic=b, limit=limit, ratio=ratio(a, b), verdict="PASS" if a <= limit else "FAIL")
        t["detail"] = (
            f"ibsync {a / MiB:.2f} MiB vs limit {limit / MiB:.2f} MiB ({EXCESS_FACTOR:g} × restic "
            f"{b / MiB:.2f} MiB; floor {floor_bytes / MiB:.2f} MiB); ratio {fmt_ratio(t['ratio'])}"
        )
    return t


def rss_targets(groups, files: int) -> list[dict[str, Any]]:
    """Peak RSS ≤ 150 MB for every ibsync command measured; meant for 1 M files."""
    note = "" if files >= FULL_FILES else f" [at {files:,} files: not the target size, {FULL_FILES:,}]"
    out = []
    for step in (*STEPS, *EXTRA_STEPS):
        if ("ibsync", step) not in groups:
            continue
        rss = med(groups[("ibsync", step)]["rss"])
        out.append(
            {
                "target": f"peak RSS, ibsync {step} ≤ 150 MB{note}",
                "step": step,
                "metric": "rss_abs",
                "ibsync": rss,
                "limit": RSS_LIMIT,
                "verdict": "PASS" if rss <= RSS_LIMIT else "FAIL",
                "detail": f"{rss / 1e6:.0f} MB",
                "target_size": files >= FULL_FILES,
            }
        )
    return out


def evaluate_targets(
    groups, tools, verification, profile: str = "realistic", floor_bytes: int | None = None, files: int = 0
) -> list[dict[str, Any]]:
    out = []
    if "ibsync" not in tools or "restic" not in tools:
        out.append(
            {
                "target": "ibsync against restic",
                "step": "",
                "metric": "",
                "verdict": "SKIP",
                "detail": "needs both ibsync and restic in --tools",
            }
        )
    else:
        out += [ratio_target(groups, *t) for t in ISSUE_TARGETS]
        out.append(excess_target(groups, floor_bytes))
        if profile == "realistic":
            out += [ratio_target(groups, *t) for t in REALISTIC_TARGETS]
    if profile == "many-files" and "ibsync" in tools:
        out += rss_targets(groups, files)
    for tool in tools:
        v = verification.get(tool)
        t = {
            "target": f"restored tree equals day 2 ({tool}{', with file mtimes' if tool == 'ibsync' else ''})",
            "step": "restore",
            "metric": "verify",
        }
        if v is None:
            t.update(verdict="FAIL", detail="not checked (no successful restore)")
        else:
            t.update(
                verdict="PASS" if v["ok"] else "FAIL",
                detail=f"content {'identical' if v['content_identical'] else 'DIFFERENT'}; mtime mismatches: "
                f"{v['file_mtime_mismatches']} files, {v['dir_mtime_mismatches']} folders",
            )
        out.append(t)
    return out


def floor_table(groups, tools, floor: dict[str, Any] | None) -> str:
    """Next-day bytes: each tool's added bytes, the floor, the excess, and excess ratios against restic."""
    if not floor:
        return "(no floor in the data metadata)"
    fb = floor["floor_bytes"]
    ex = excesses(groups, tools, fb)
    lines = [
        f"floor {fb / MiB:.2f} MiB = {floor['new_files']} new files ({floor['new_zstd_bytes'] / MiB:.2f} MiB "
        f"zstd-3 of {floor['new_raw_bytes'] / MiB:.2f}) + {floor['changed_pages']} changed 4 KiB pages of "
        f"{floor['changed_files']} changed files ({floor['changed_page_zstd_bytes'] / MiB:.2f} MiB zstd-3; "
        f"Manifest.db: {floor['manifest_db_pages']} of {floor['manifest_db_pages_total']} pages, "
        f"{floor['manifest_db_zstd_bytes'] / MiB:.2f} MiB); {floor['deleted_files']} deleted",
        "",
        "| tool | added MiB (median) | floor MiB | excess MiB | excess / restic's excess |",
        "|---|---|---|---|---|",
    ]
    for t in tools:
        if t not in ex:
            continue
        lines.append(
            f"| {t} | {(ex[t] + fb) / MiB:.2f} | {fb / MiB:.2f} | {ex[t] / MiB:.2f} | "
            f"{fmt_ratio(ratio(ex[t], ex.get('restic')))} |"
        )
    return "\n".join(lines)


def rss_table(records: list[dict], groups, meta: dict[str, Any]) -> str:
    """ibsync's peak RSS per command, per file (of the day the command handles) and per blob."""
    blobs = [r["blobs"] for r in records if r["tool"] == "ibsync" and r["step"] == "stats" and r.get("blobs")]
    n_blobs = med(blobs)
    lines = ["| ibsync step | n | peak RSS MiB | bytes per file | bytes per blob |", "|---|---|---|---|---|"]
    for step in (*STEPS, *EXTRA_STEPS):
        g = groups.get(("ibsync", step))
        if not g:
            continue
        rss = med(g["rss"])
        files = meta["day1"]["files"] if step == "first" else meta["day2"]["files"]
        per_blob = f"{rss / n_blobs:.0f}" if n_blobs else "—"
        lines.append(f"| {step} | {len(g['rss'])} | {rss / MiB:.0f} | {rss / files:.0f} | {per_blob} |")
    blob_note = (
        f"{n_blobs:,.0f} blobs after the next day (ibsync stats --json)" if n_blobs else "no blob count (stats not run)"
    )
    return "\n".join(lines) + f"\n\nper file: day-1 files for first, day-2 files for the others; {blob_note}"


def report(results: Results, tools: list[str]) -> tuple[str, list[dict]]:
    doc = results.doc
    tools = [t for t in ALL_TOOLS if t in tools]  # show in a fixed order, whatever the run order was
    groups = summarize(doc["records"])
    profile = doc["args"].get("profile", "realistic")
    floor = doc["data"].get("floor")
    files = doc["data"]["day1"]["files"]
    targets = evaluate_targets(groups, tools, doc["verification"], profile, floor and floor["floor_bytes"], files)
    d1, d2 = doc["data"]["day1"], doc["data"]["day2"]
    loads = [r["loadavg1_before"] for r in doc["records"]]
    parts = [
        f"## ibsync vs restic vs borg — {doc['started']} — profile {profile}",
        "",
        f"data: day 1 {d1['files']} files, {d1['bytes'] / MiB:.1f} MiB ({d1['bytes'] / GiB:.3f} GiB); "
        f"day 2 {d2['files']} files, {d2['bytes'] / MiB:.1f} MiB; seed {doc['args']['seed']}, udid {doc['data']['udid']}",
        f"reps: {doc['args']['reps']} (interleaved: {', '.join(doc['tools'])}); wall/CPU in s, median [min–max]; "
        "MB/s = day-1 bytes (first) or day-2 bytes (others) / wall; added = du -sb delta of the repository",
        f"versions: {doc['env']['ibsync_version']} (git {doc['env']['ibsync_git']}), {doc['env']['restic_version']}, "
        f"{doc['env']['borg_version']}; {doc['env']['cpus']} CPUs; 1-min load at step starts: "
        f"{fmt_range(loads, 1)}",
        "",
        table(groups, tools),
        "",
        "### Ratios (medians)",
        "",
        ratios_table(groups, tools),
        "",
        "### Next-day bytes against the floor (the true change, bench/floor.py)",
        "",
        floor_table(groups, tools, floor),
        "",
        *(
            ["### ibsync peak RSS per file and per blob", "", rss_table(doc["records"], groups, doc["data"]), ""]
            if any(r["tool"] == "ibsync" for r in doc["records"])
            else []
        ),
        "### Targets"
        + (
            ""
            if profile == "realistic" or files >= FULL_FILES
            else f" (at {files:,} files; the RSS targets are set for {FULL_FILES:,})"
        ),
        "",
    ]
    width = max(len(t["target"]) for t in targets)
    for t in targets:
        parts.append(f"{t['verdict']:4}  {t['target']:<{width}}  {t.get('detail', '')}")
    launcher = max((r.get("launcher_maxrss_kib", 0) for r in doc["records"]), default=0)
    floor = [
        f"{r['tool']} {r['step']} rep {r['rep']}"
        for r in doc["records"]
        if r["rc"] == 0 and r["maxrss_kib"] <= launcher
    ]
    if floor:
        parts += [
            "",
            f"WARNING: peak RSS of {', '.join(floor)} is not above this harness's own peak "
            f"({launcher / 1024:.0f} MiB), which every child inherits; those RSS values are only a floor.",
        ]
    if doc["errors"]:
        parts += ["", "### Errors", ""] + [f"- {e}" for e in doc["errors"]]
    parts += ["", f"results: {results.path}"]
    return "\n".join(parts), targets


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--profile",
        choices=PROFILES,
        default="realistic",
        help="realistic: a 2 GiB-class phone sized by --size-gib (default); many-files: sized by --files",
    )
    ap.add_argument("--size-gib", type=float, default=2.0, help="day-1 size in GiB, realistic profile (default 2)")
    ap.add_argument(
        "--files",
        type=int,
        default=FULL_FILES,
        help=f"day-1 file count, many-files profile (default {FULL_FILES:,}; quick run: 50000)",
    )
    ap.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after each ibsync cycle also time stats, check, ls, find, diff, copy, forget, prune "
        "(default: on for many-files, off for realistic)",
    )
    ap.add_argument("--reps", type=int, default=3, help="repetitions per tool (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    ap.add_argument(
        "--tools", default=",".join(ALL_TOOLS), help="comma-separated, in run order (default ibsync,restic,borg)"
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=BENCH / "work",
        help="work folder: data cache, live tree, repositories (default bench/work)",
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep each tool's last repository, caches, restore and logs, and live/"
    )
    ap.add_argument(
        "--generator",
        default="ibsync.testing.generator",
        help="module name, or path to a .py with generate() and mutate_folder()",
    )
    ap.add_argument(
        "--ibsync-cmd",
        default=None,
        help="command to run ibsync (default: the installed console script, bypassing a pyenv shim)",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/results/<time>-<size>g-<reps>r.json)"
    )
    ap.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only print the report of an earlier (or interrupted) run's results file",
    )
    args = ap.parse_args(argv)

    if args.report:
        results = Results(args.report, {})
        results.doc = json.loads(args.report.read_text())
        text, _ = report(results, results.doc["tools"])
        print(text)
        return 0

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOL_CLASSES]
    if bad or not tools:
        ap.error(f"unknown tool(s) {bad}; choose from {', '.join(ALL_TOOLS)}")
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.reps < 3:
        log(f"note: {args.reps} repetition(s); the targets are meant for medians of at least 3")
    for exe in ["rsync", "du", "diff", "cp", "sync", *(t for t in tools if t != "ibsync")]:
        if shutil.which(exe) is None:
            raise SystemExit(f"{exe} is not installed" + (" (apt-get install rsync)" if exe == "rsync" else ""))

    Ibsync.exe = resolve_ibsync(args.ibsync_cmd)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    size_bytes = int(round(args.size_gib * GiB))
    started = datetime.now().astimezone()
    if args.extras is None:
        args.extras = args.profile == "many-files"
    label = f"mf{args.files}" if args.profile == "many-files" else f"{args.size_gib:g}g"
    out = args.out or BENCH / "results" / f"{started:%Y%m%d-%H%M%S}-{label}-{args.reps}r.json"

    git_head = cmd_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = cmd_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "ibsync"])
    env_info = {
        "ibsync_cmd": Ibsync.exe,
        "ibsync_version": cmd_output([*Ibsync.exe, "--version"]),
        "ibsync_package": ibsync_package_location(Ibsync.exe),
        "ibsync_git": git_head + (f" + {len(dirty.splitlines())} uncommitted change(s) under ibsync/" if dirty else ""),
        "restic_version": cmd_output(["restic", "version"]) if "restic" in tools else "not run",
        "borg_version": cmd_output(["borg", "--version"]) if "borg" in tools else "not run",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    if "ibsync" in tools:
        log(f"ibsync: {' '.join(Ibsync.exe)} -> {env_info['ibsync_version']}; package {env_info['ibsync_package']}")
        if env_info["ibsync_package"] != "unknown" and not str(env_info["ibsync_package"]).startswith(str(ROOT)):
            log(f"WARNING: the ibsync being benchmarked does not come from {ROOT} (pip install -e {ROOT})")

    meta = prepare_data(work, args.profile, size_bytes, args.files, args.seed, args.generator)

    results = Results(
        out,
        {
            "started": started.isoformat(timespec="seconds"),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "tools": tools,
            "env": env_info,
            "data": meta,
        },
    )
    results.save()
    rmtree(work / "runs")

    t_start = time.perf_counter()
    try:
        for rep in range(1, args.reps + 1):
            log(f"rep {rep}/{args.reps}")
            for name in tools:
                one_cycle(TOOL_CLASSES[name], rep, args, meta, work, results)
    finally:
        results.doc["finished"] = datetime.now().astimezone().isoformat(timespec="seconds")
        results.doc["duration_s"] = round(time.perf_counter() - t_start, 1)
        results.save()
        if not args.keep:
            rmtree(work / "runs")
            rmtree(work / "live")

    text, targets = report(results, tools)
    results.doc["targets"] = targets
    results.doc["report"] = text
    results.save()
    print(text)
    failed_verify = any(t["metric"] == "verify" and t["verdict"] != "PASS" for t in targets)
    if results.doc["errors"] or failed_verify:
        return 2
    return 1 if any(t["verdict"] == "FAIL" for t in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
