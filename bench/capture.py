#!/usr/bin/env python3
"""Benchmark: capture from a (simulated) device running in its own process.

    python bench/capture.py            # 20,000 small files + 4 x 256 MiB, 3 interleaved repetitions (~5-10 min)
    python bench/capture.py --quick    # smoke run: 2,000 small files + 2 x 32 MiB, 1 repetition (< 1 min)

For each scenario ("small": many 4-16 KiB files; "large": a few incompressible big files) one child
process builds a SimDevice and serves it over a simulated usbmuxd on a UNIX socket
(``run_sim_usbmuxd``, paired). Every measured step is another child process that finds the device
through ``USBMUXD_SOCKET_ADDRESS`` (and a private HOME), so the host's CPU time (os.wait4 rusage of
that child) is the host's only; the device's work is in the server process. Per repetition, in turn:

* ibsync:  ``ibsync backup --device UDID --full --json`` into a fresh local repository (``ibsync init``
  untimed; encrypted, the default);
* pmd3:    pymobiledevice3's ``Mobilebackup2Service(lockdown).backup(full=True, backup_directory=D)``;
* restic:  ``restic backup --compression auto D/<udid>`` into a fresh repository (init untimed,
  repository version 2, RESTIC_PASSWORD), its cache in the run folder;

and, for ibsync's fixed cost, ``ibsync backup`` of a second device on the same usbmuxd holding only the
256 KiB base phone (its CPU and wall are subtracted for the "marginal" figures). Then everything is
deleted. ``sync`` runs (untimed) before each step. Local disk: the two-step
workflow's peak is the pmd3 folder plus the restic repository (and cache), all present at the end of
its second step (``du -sb``); ibsync's is the repository (sampled while it runs, and ``du -sb`` at the
end) plus its TMPDIR (a private, sampled folder). Prints medians, ranges and PASS/FAIL lines for the
targets, and saves JSON to bench/results/capture-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from run import (
    BENCH,
    ROOT,
    MiB,
    clean_env,
    cmd_output,
    du_bytes,
    log,
    resolve_ibsync,
    rmtree,
    sync_disks,
    timed,
)

PASSWORD = "ibsync-bench-password"
MAX_CPU_US_PER_FILE = 100.0
MIN_LARGE_MB_S = 300.0
TOOLS = ("ibsync", "pmd3", "restic")
# UDIDs no real device has (pymobiledevice3 also reads /var/lib/lockdown/<udid>.plist)
UDIDS = {
    "small": "00008120-5111BE0C000000A1",
    "large": "00008120-5111BE0C000000B2",
    "base": "00008120-5111BE0C000000C3",
    "many": "00008120-5111BE0C000000D4",
    "blank": "00008120-5111BE0C000000E5",
}


# --------------------------------------------------------------------------------------------
# child: the device process


def build_device(scenario: str, args: argparse.Namespace):
    """The scenario's device: a small generated phone (256 KiB of content) plus the scenario's files;
    ``base`` is that phone alone (the baseline that gives ibsync's fixed cost per run)."""
    import random

    from ibsync.testing.device import SimDevice
    from ibsync.testing.device.model import GeneratedPayloads
    from ibsync.testing.generator import generate_content

    content = generate_content(
        seed=args.seed, size_bytes=256 << 10, udid=UDIDS[scenario], device_name=f"Bench {scenario}"
    )
    device = SimDevice.from_content(content)
    rnd = random.Random(args.seed * 1000 + (1 if scenario == "small" else 2))
    t = 1_700_000_000
    if scenario == "base":
        pass
    elif scenario in ("many", "blank"):
        # payloads made on demand from the seed and each row: the device holds rows, not bytes
        device.generated = GeneratedPayloads(args.seed)
        if scenario == "many":
            device.add_generated_files(
                args.files, seed=args.seed, min_size=args.many_min_kib << 10, max_size=args.many_max_kib << 10
            )
        else:
            device.files = {}  # the device a snapshot is restored onto
    elif scenario == "small":
        words = b"the quick brown fox jumps over a lazy dog while messages sync and photos wait ".split()
        for i in range(args.small_files):
            n = rnd.randint(4 << 10, 16 << 10)
            # half random bytes, half text: compressible about 2:1 like many small app files
            half = n // 2
            text = b" ".join(rnd.choice(words) for _ in range(half // 4 + 1))[: n - half]
            device.write_file(
                "HomeDomain", f"Library/Bench/d{i % 100:02d}/f{i:06d}.dat", rnd.randbytes(half) + text, mtime=t + i
            )
    else:
        for i in range(args.large_count):
            # randbytes() takes at most 2**31 bits per call
            data = b"".join(rnd.randbytes(16 * MiB) for _ in range(args.large_mib // 16))
            data += rnd.randbytes(args.large_mib * MiB - len(data))
            device.write_file("CameraRollDomain", f"Media/DCIM/100APPLE/IMG_{i:04d}.MOV", data, mtime=t + i)
    return device


def serve(args: argparse.Namespace) -> int:
    """Build the scenario's device, serve it, print one JSON line, run until stdin closes."""
    sys.path.insert(0, str(ROOT))
    from ibsync.testing.device import run_sim_usbmuxd
    from ibsync.testing.device.model import FLAG_FILE

    device, base = build_device(args.scenario, args), build_device("base", args)
    devices = [device, base]
    if args.scenario == "many":
        devices.append(build_device("blank", args))
    regular = [f for f in device.files.values() if f.flags == FLAG_FILE]
    base_regular = [f for f in base.files.values() if f.flags == FLAG_FILE]
    with run_sim_usbmuxd(devices, Path(args.folder)) as mux:
        print(
            json.dumps(
                {
                    "udid": device.udid,
                    "address": mux.address,
                    "files": len(regular),
                    "bytes": sum(f.size for f in regular),
                    "base_udid": base.udid,
                    "base_files": len(base_regular),
                    "base_bytes": sum(f.size for f in base_regular),
                    "blank_udid": devices[-1].udid if len(devices) > 2 else None,
                }
            ),
            flush=True,
        )
        day1 = dict(device.files)
        for line in sys.stdin:  # commands from the parent, until it closes our stdin
            print(json.dumps(_command(line.split(), device, devices[-1], day1, args)), flush=True)
    return 0


def _command(words: list[str], device, blank, day1: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The many-files scenario's steps on the device side: ``next_day`` (0.5 % of the generated
    files change), ``day1`` (back to the first day), ``verify`` (the blank device's rows and
    payloads against the device's: what a restore must have made), ``clear`` (empty the blank)."""
    from ibsync.testing.device.model import FLAG_FILE

    if words[0] == "next_day":
        return device.change_generated(args.change, seed=args.seed)
    if words[0] == "day1":
        device.files = dict(day1)
        return {}
    if words[0] == "clear":
        blank.files = {}
        return {}
    if words[0] == "verify":
        want = {fid: f for fid, f in device.files.items()}
        got = blank.files
        # rows compare with their payloads: generated ones (data None) only stay None on the blank
        # device when the bytes restored are exactly what the generator makes
        same = sum(1 for fid, f in want.items() if got.get(fid) == f)
        files = sum(1 for f in want.values() if f.flags == FLAG_FILE)
        return {"rows": len(want), "restored_rows": len(got), "identical_rows": same, "files": files}
    raise SystemExit(f"unknown command {words!r}")


# --------------------------------------------------------------------------------------------
# child: pymobiledevice3's own backup


def pmd3_backup(args: argparse.Namespace) -> int:
    import asyncio

    from pymobiledevice3.lockdown import create_using_usbmux
    from pymobiledevice3.services.mobilebackup2 import Mobilebackup2Service

    async def run() -> None:
        lockdown = await create_using_usbmux(serial=args.udid, autopair=False)
        async with lockdown, Mobilebackup2Service(lockdown) as service:
            await service.backup(full=True, backup_directory=Path(args.dest))

    asyncio.run(run())
    return 0


# --------------------------------------------------------------------------------------------
# the benchmark


class Sampler:
    """Peak size of some folders, sampled every ``interval`` seconds while a step runs."""

    def __init__(self, paths: list[Path], interval: float = 0.5):
        self.paths, self.interval, self.peak = paths, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def size(path: Path) -> int:
        total = 0
        for root, _, files in os.walk(path):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
                except OSError:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self.size(p) for p in self.paths))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, sum(self.size(p) for p in self.paths))


def step(argv: list[str], env: dict[str, str], run_dir: Path, name: str) -> dict[str, Any]:
    sync_disks()
    out, err = run_dir / f"{name}.out", run_dir / f"{name}.err"
    r = timed(argv, cwd=run_dir, env=env, out=out, err=err)
    if r["rc"] != 0:
        raise SystemExit(f"{name} failed (exit {r['rc']}): {err.read_text()[-3000:]}")
    r["stdout"] = out.read_text()[-4000:]
    return r


def one_rep(
    scenario: str, rep: int, dev: dict[str, Any], base_env: dict[str, str], ibsync: list[str], work: Path
) -> dict[str, dict[str, Any]]:
    run_dir = work / f"{scenario}-{rep}"
    rmtree(run_dir)
    run_dir.mkdir(parents=True)
    results: dict[str, dict[str, Any]] = {}
    udid = dev["udid"]
    try:
        # ibsync: one step, straight into the repository
        repo, tmp = run_dir / "ibsync-repo", run_dir / "ibsync-tmp"
        tmp.mkdir()
        env = {**base_env, "IBSYNC_REPO": str(repo), "IBSYNC_PASSWORD": PASSWORD, "TMPDIR": str(tmp)}
        subprocess.run(
            [*ibsync, "init", "--quiet"], env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        repo_before = du_bytes(repo)
        with Sampler([repo, tmp]) as s:
            r = step([*ibsync, "backup", "--device", udid, "--full", "--json", "--quiet"], env, run_dir, "ibsync")
        report = json.loads(r.pop("stdout"))["snapshots"][0]
        r.update(
            files_received=report["files_received"],
            bytes_received=report["bytes_received"],
            repo_bytes=du_bytes(repo),
            repo_init_bytes=repo_before,
            peak_sampled_bytes=s.peak,
            tmp_end_bytes=du_bytes(tmp),
        )
        r["local_disk_bytes"] = max(r["repo_bytes"] + r["tmp_end_bytes"], s.peak)
        results["ibsync"] = r
        rmtree(repo), rmtree(tmp)

        # ibsync's fixed cost: the same command for the base phone alone (fresh repository)
        tmp.mkdir()
        subprocess.run(
            [*ibsync, "init", "--quiet"], env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        r = step(
            [*ibsync, "backup", "--device", dev["base_udid"], "--full", "--json", "--quiet"],
            env,
            run_dir,
            "ibsync-base",
        )
        report = json.loads(r.pop("stdout"))["snapshots"][0]
        r.update(files_received=report["files_received"], bytes_received=report["bytes_received"])
        results["ibsync_base"] = r
        rmtree(repo), rmtree(tmp)

        # today's two steps: pymobiledevice3 backup to a folder, then restic backup of that folder
        folder = run_dir / "pmd3"
        folder.mkdir()
        r = step(
            [sys.executable, str(Path(__file__).resolve()), "_pmd3", "--udid", udid, "--dest", str(folder)],
            base_env,
            run_dir,
            "pmd3",
        )
        r.pop("stdout")
        dev_dir = folder / udid
        nfiles = sum(len(f) for _, _, f in os.walk(dev_dir))
        r.update(folder_bytes=du_bytes(folder), folder_files=nfiles)
        results["pmd3"] = r

        rrepo, rcache = run_dir / "restic-repo", run_dir / "restic-cache"
        renv = {**base_env, "RESTIC_PASSWORD": PASSWORD}
        subprocess.run(
            ["restic", "-r", str(rrepo), "--cache-dir", str(rcache), "init", "--repository-version", "2"],
            env=renv,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        r = step(
            ["restic", "-r", str(rrepo), "--cache-dir", str(rcache), "backup", "--compression", "auto", str(dev_dir)],
            renv,
            run_dir,
            "restic",
        )
        r["stdout"] = r["stdout"][-1500:]
        r.update(repo_bytes=du_bytes(rrepo), cache_bytes=du_bytes(rcache))
        results["restic"] = r
        results["two_step"] = {
            "wall_s": results["pmd3"]["wall_s"] + r["wall_s"],
            "cpu_s": results["pmd3"]["cpu_s"] + r["cpu_s"],
            "local_disk_bytes": results["pmd3"]["folder_bytes"] + r["repo_bytes"] + r["cache_bytes"],
        }
    finally:
        rmtree(run_dir)
    return results


def device_command(proc: subprocess.Popen, command: str) -> dict[str, Any]:
    """A step of the many-files scenario on the device's side (see ``_command``)."""
    proc.stdin.write(f"{command}\n".encode())
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the device process ended on {command!r}")
    return json.loads(line)


def one_rep_many(
    rep: int,
    dev: dict[str, Any],
    proc: subprocess.Popen,
    base_env: dict[str, str],
    ibsync: list[str],
    work: Path,
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """The many-files scenario, one repetition: ibsync's full capture; the next day (0.5 % of the
    files changed) captured incrementally; that snapshot restored onto a blank device and checked
    row by row, payloads included; ibsync's fixed cost (the base phone, fresh repository); and, in
    the first ``--pmd3-reps`` repetitions, pymobiledevice3's full backup of the first day."""
    run_dir = work / f"many-{rep}"
    rmtree(run_dir)
    run_dir.mkdir(parents=True)
    results: dict[str, dict[str, Any]] = {}
    repo, tmp = run_dir / "ibsync-repo", run_dir / "ibsync-tmp"
    env = {**base_env, "IBSYNC_REPO": str(repo), "IBSYNC_PASSWORD": PASSWORD, "TMPDIR": str(tmp)}

    def fresh_repo() -> None:
        rmtree(repo), rmtree(tmp)
        tmp.mkdir()
        subprocess.run(
            [*ibsync, "init", "--quiet"], env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )

    def backup(name: str, udid: str, *extra: str) -> dict[str, Any]:
        r = step([*ibsync, "backup", "--device", udid, *extra, "--json", "--quiet"], env, run_dir, name)
        report = json.loads(r.pop("stdout"))["snapshots"][0]
        r.update(
            files_received=report["files_received"], bytes_received=report["bytes_received"], repo_bytes=du_bytes(repo)
        )
        return r

    try:
        fresh_repo()
        results["full"] = backup("full", dev["udid"], "--full")
        change = device_command(proc, "next_day")
        results["incremental"] = backup("incremental", dev["udid"])
        results["incremental"]["change"] = change
        device_command(proc, "clear")
        r = step(
            [*ibsync, "restore", "latest", "--to-device", dev["blank_udid"], "--no-reboot"], env, run_dir, "restore"
        )
        r.pop("stdout")
        r["verify"] = device_command(proc, "verify")
        results["restore"] = r
        device_command(proc, "day1")
        fresh_repo()
        results["ibsync_base"] = backup("ibsync-base", dev["base_udid"], "--full")
        rmtree(repo), rmtree(tmp)
        if rep < args.pmd3_reps:
            folder = run_dir / "pmd3"
            folder.mkdir()
            r = step(
                [sys.executable, str(Path(__file__).resolve()), "_pmd3", "--udid", dev["udid"], "--dest", str(folder)],
                base_env,
                run_dir,
                "pmd3",
            )
            r.pop("stdout")
            r.update(folder_bytes=du_bytes(folder))
            results["pmd3"] = r
    finally:
        device_command(proc, "day1")
        rmtree(run_dir)
    return results


def report_many(sc: dict[str, Any]) -> list[tuple[str, str]]:
    """Print the many-files scenario; returns its verdicts."""
    recs, dev = sc["records"], sc["device"]
    files = dev["files"]
    print(
        f"\nmany: {files} files, {dev['bytes'] / 1e6:.1f} MB on the device (device process: "
        f"{sc['device_process']['cpu_s']:.1f} s CPU over the whole run, peak RSS "
        f"{sc['device_process']['maxrss_kib'] / 1024:.0f} MiB, built in {dev['build_s']:.1f} s)"
    )
    print(f"  {'step':<22} {'files':>9} {'wall s':>20} {'host CPU s':>20} {'CPU us/file':>18} {'peak RSS MiB':>18}")
    verdicts = []
    for step_name, label in (
        ("full", "ibsync backup --full"),
        ("incremental", "ibsync backup (day 2)"),
        ("restore", "restore --to-device"),
        ("ibsync_base", "ibsync base phone"),
        ("pmd3", "pmd3 backup()"),
    ):
        rows = [r[step_name] for r in recs if step_name in r]
        if not rows:
            continue
        n = {"incremental": rows[0].get("files_received", 0), "ibsync_base": dev["base_files"]}.get(step_name, files)
        print(
            f"  {label:<22} {n:>9} {spread([r['wall_s'] for r in rows]):>20} "
            f"{spread([r['cpu_s'] for r in rows]):>20} "
            f"{spread([r['cpu_s'] / files * 1e6 for r in rows], '{:.0f}'):>18} "
            f"{spread([r['maxrss_kib'] / 1024 for r in rows], '{:.0f}'):>18}"
        )
    full = [r["full"] for r in recs]
    base = [r["ibsync_base"] for r in recs]
    us = statistics.median(r["cpu_s"] / files * 1e6 for r in full)
    marginal = statistics.median(
        (f["cpu_s"] - b["cpu_s"]) / (files - dev["base_files"]) * 1e6 for f, b in zip(full, base)
    )
    rss = statistics.median(r["maxrss_kib"] * 1024 for r in full)
    print(
        f"  full capture: {us:.0f} us host CPU per file (whole process), {marginal:.0f} us marginal; "
        f"peak RSS {rss / 2**20:.0f} MiB = {rss / files:.0f} bytes per file"
    )
    inc = [r["incremental"] for r in recs]
    print(
        f"  day 2: {inc[0]['change']} on the device; ibsync received {inc[0]['files_received']} files "
        f"({inc[0]['bytes_received'] / 1e6:.1f} MB)"
    )
    for r in recs:
        v = r["restore"]["verify"]
        ok = v["identical_rows"] == v["rows"] == v["restored_rows"]
        verdicts.append(
            (
                "PASS" if ok else "FAIL",
                f"many: restore onto a blank device: {v['identical_rows']} of "
                f"{v['rows']} rows identical, payloads included ({v['restored_rows']} rows restored)",
            )
        )
    verdicts.append(
        (
            "PASS" if us <= MAX_CPU_US_PER_FILE else "FAIL",
            f"many files: full capture host CPU per file {us:.0f} us <= {MAX_CPU_US_PER_FILE:.0f} us "
            f"(whole process; marginal {marginal:.0f} us)",
        )
    )
    pm = [r["pmd3"] for r in recs if "pmd3" in r]
    if pm:
        print(f"  pmd3 backup(): {statistics.median(r['cpu_s'] / files * 1e6 for r in pm):.0f} us host CPU per file")
    return verdicts


def start_device(scenario: str, args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, dict[str, Any]]:
    folder = work / f"mux-{scenario}"
    rmtree(folder)
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_serve",
        "--scenario",
        scenario,
        "--folder",
        str(folder),
        "--seed",
        str(args.seed),
        "--small-files",
        str(args.small_files),
        "--large-count",
        str(args.large_count),
        "--large-mib",
        str(args.large_mib),
        "--files",
        str(args.files),
        "--many-min-kib",
        str(args.many_min_kib),
        "--many-max-kib",
        str(args.many_max_kib),
        "--change",
        str(args.change),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**clean_env(), "PYTHONPATH": str(ROOT)}
    )
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the device process for {scenario!r} did not start (exit {proc.wait()})")
    dev = json.loads(line)
    dev["build_s"] = time.perf_counter() - t0
    return proc, dev


def stop_device(proc: subprocess.Popen) -> dict[str, Any]:
    proc.stdin.close()
    _, status, ru = os.wait4(proc.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss}


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def report(data: dict[str, Any]) -> None:
    print()
    print(
        f"capture benchmark, {data['date']}, {data['machine']}, load at start {data['load_start']}, "
        f"medians of {data['reps']} [min-max]"
    )
    verdicts = []
    for scenario, sc in data["scenarios"].items():
        if scenario == "many":
            verdicts += report_many(sc)
            continue
        recs, dev = sc["records"], sc["device"]
        files, mb = dev["files"], dev["bytes"] / 1e6
        print(
            f"\n{scenario}: {files} files, {mb:.1f} MB on the device (device process: {sc['device_process']['cpu_s']:.1f} s CPU "
            f"over the whole run, built in {dev['build_s']:.1f} s)"
        )
        print(
            f"  {'step':<18} {'wall s':>22} {'host CPU s':>22} {'CPU us/file':>22} {'MB/s':>22} {'local disk MB':>22}"
        )

        def col(tool: str, f) -> list[float]:
            return [f(r[tool]) for r in recs]

        for tool, disk in (
            ("ibsync", "local_disk_bytes"),
            ("pmd3", "folder_bytes"),
            ("restic", None),
            ("two_step", "local_disk_bytes"),
        ):
            label = {
                "ibsync": "ibsync backup",
                "pmd3": "pmd3 backup()",
                "restic": "restic backup",
                "two_step": "pmd3 + restic",
            }[tool]
            if tool == "restic":
                dcol = spread(col(tool, lambda r: (r["repo_bytes"] + r["cache_bytes"]) / 1e6), "{:.1f}") + " (+)"
            else:
                dcol = spread(col(tool, lambda r: r[disk] / 1e6), "{:.1f}")
            print(
                f"  {label:<18} {spread(col(tool, lambda r: r['wall_s'])):>22} "
                f"{spread(col(tool, lambda r: r['cpu_s'])):>22} "
                f"{spread(col(tool, lambda r: r['cpu_s'] / files * 1e6), '{:.0f}'):>22} "
                f"{spread(col(tool, lambda r: mb / r['wall_s']), '{:.0f}'):>22} {dcol:>22}"
            )
        wall_i = statistics.median(col("ibsync", lambda r: r["wall_s"]))
        wall_2 = statistics.median(col("two_step", lambda r: r["wall_s"]))
        disk_i = statistics.median(col("ibsync", lambda r: r["local_disk_bytes"]))
        disk_2 = statistics.median(col("two_step", lambda r: r["local_disk_bytes"]))
        print(
            f"  ibsync / two-step: wall {wall_i / wall_2:.2f}, local disk {disk_i / disk_2:.2f} "
            f"({disk_i / 1e6:.1f} MB vs {disk_2 / 1e6:.1f} MB)"
        )
        dfiles, dmb = files - dev["base_files"], (dev["bytes"] - dev["base_bytes"]) / 1e6
        m_us = [(r["ibsync"]["cpu_s"] - r["ibsync_base"]["cpu_s"]) / dfiles * 1e6 for r in recs]
        m_rate = [dmb / (r["ibsync"]["wall_s"] - r["ibsync_base"]["wall_s"]) for r in recs]
        print(
            f"  ibsync baseline (the 256 KiB phone alone, {dev['base_files']} files): "
            f"wall {spread(col('ibsync_base', lambda r: r['wall_s']))} s, CPU {spread(col('ibsync_base', lambda r: r['cpu_s']))} s"
        )
        m_cpu_mb = [(r["ibsync"]["cpu_s"] - r["ibsync_base"]["cpu_s"]) / dmb * 1e3 for r in recs]
        print(
            f"  ibsync marginal, scenario minus baseline ({dfiles} files, {dmb:.1f} MB): "
            f"CPU {spread(m_us, '{:.0f}')} us/file = {spread(m_cpu_mb, '{:.2f}')} ms/MB, {spread(m_rate, '{:.0f}')} MB/s"
        )
        bad = [r["ibsync"]["files_received"] for r in recs if r["ibsync"]["files_received"] < files]
        if bad:
            verdicts.append(("FAIL", f"{scenario}: ibsync received fewer files than the device has ({bad} < {files})"))
        if scenario == "small":
            us = statistics.median(col("ibsync", lambda r: r["cpu_s"] / files * 1e6))
            pmd3_us = statistics.median(col("pmd3", lambda r: r["cpu_s"] / files * 1e6))
            verdicts.append(
                (
                    "PASS" if us <= MAX_CPU_US_PER_FILE else "FAIL",
                    f"small files: host CPU per file {us:.0f} us <= {MAX_CPU_US_PER_FILE:.0f} us "
                    f"(whole `ibsync backup` process incl. start-up; pmd3 backup(): {pmd3_us:.0f} us)",
                )
            )
            mu = statistics.median(m_us)
            verdicts.append(
                (
                    "PASS" if mu <= MAX_CPU_US_PER_FILE else "FAIL",
                    f"small files: marginal host CPU per file {mu:.0f} us <= {MAX_CPU_US_PER_FILE:.0f} us "
                    f"(minus the baseline run's CPU: start-up, session, commit)",
                )
            )
        if scenario == "large":
            rate = statistics.median(col("ibsync", lambda r: mb / r["wall_s"]))
            verdicts.append(
                (
                    "PASS" if rate >= MIN_LARGE_MB_S else "FAIL",
                    f"large files: capture into a local repository {rate:.0f} MB/s >= {MIN_LARGE_MB_S:.0f} MB/s "
                    f"(device bytes / wall of the whole `ibsync backup` process)",
                )
            )
            mr = statistics.median(m_rate)
            verdicts.append(
                (
                    "PASS" if mr >= MIN_LARGE_MB_S else "FAIL",
                    f"large files: marginal capture rate {mr:.0f} MB/s >= {MIN_LARGE_MB_S:.0f} MB/s "
                    f"(extra bytes / extra wall over the baseline run)",
                )
            )
        verdicts.append(
            (
                "PASS" if wall_i < wall_2 else "FAIL",
                f"{scenario}: ibsync one step faster than pmd3 backup + restic backup "
                f"({wall_i:.2f} s vs {wall_2:.2f} s)",
            )
        )
        # "far less": the two-step keeps a whole local copy of the backup (the pmd3 folder) beside its
        # repository; ibsync must save at least 90% of that copy (for incompressible data both repositories
        # hold about the backup's size, so the ratio cannot go much below 50%)
        folder = statistics.median(col("pmd3", lambda r: r["folder_bytes"]))
        verdicts.append(
            (
                "PASS" if disk_i <= disk_2 - 0.9 * folder else "FAIL",
                f"{scenario}: ibsync peak local disk {disk_i / 1e6:.1f} MB vs pmd3 folder + restic "
                f"{disk_2 / 1e6:.1f} MB ({disk_i / disk_2:.0%}; saves {(disk_2 - disk_i) / folder:.0%} "
                f"of the {folder / 1e6:.1f} MB local copy, needs >= 90%)",
            )
        )
    print("\n  (+) restic repository + cache; the two-step's disk is the pmd3 folder + restic repository + cache.")
    print("  MB/s: decimal megabytes of the device's file payloads per second of the step's wall time.\n")
    for v, text in verdicts:
        print(f"{v}: {text}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 small files, 2 x 32 MiB, 1 repetition")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--small-files", type=int, default=None, help="files of the small scenario (default 20000)")
    ap.add_argument("--large-count", type=int, default=None, help="files of the large scenario (default 4)")
    ap.add_argument("--large-mib", type=int, default=None, help="MiB per large file (default 256)")
    ap.add_argument(
        "--files", type=int, default=None, help="files of the many-files scenario (default 300000, --quick 20000)"
    )
    ap.add_argument("--many-min-kib", type=int, default=4, help="smallest generated file, KiB (default 4)")
    ap.add_argument("--many-max-kib", type=int, default=16, help="largest generated file, KiB (default 16)")
    ap.add_argument("--change", type=float, default=0.005, help="share of files the next day touches (0.005)")
    ap.add_argument("--pmd3-reps", type=int, default=1, help="many: repetitions that also run pmd3 (default 1)")
    ap.add_argument("--scenarios", default="small,large", help="small, large and/or many (default small,large)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "capture")
    ap.add_argument("--report", type=Path, help="only print the report of an earlier results file")
    args = ap.parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()))
        return 0
    quick = args.quick
    args.reps = args.reps or (1 if quick else 3)
    args.small_files = args.small_files or (2000 if quick else 20000)
    args.large_count = args.large_count or (2 if quick else 4)
    args.large_mib = args.large_mib or (32 if quick else 256)
    args.files = args.files or (20000 if quick else 300000)
    if shutil.which("restic") is None and set(args.scenarios.split(",")) - {"many"}:
        raise SystemExit("restic is not installed (apt-get install restic)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    (home / ".local" / "share").mkdir(parents=True, exist_ok=True)
    ibsync = resolve_ibsync(None)
    data: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "reps": args.reps,
        "quick": quick,
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "args": {k: str(v) for k, v in vars(args).items()},
        "ibsync_cmd": ibsync,
        "restic": cmd_output(["restic", "version"]),
        "scenarios": {},
    }
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    out = results_dir / f"capture-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if quick else ''}.json"
    for scenario in args.scenarios.split(","):
        log(f"{scenario}: building the device in its own process ...")
        proc, dev = start_device(scenario, args, work)
        log(f"{scenario}: {dev['files']} files, {dev['bytes'] / 1e6:.1f} MB, built in {dev['build_s']:.1f} s")
        base_env = {
            **clean_env(),
            "USBMUXD_SOCKET_ADDRESS": dev["address"],
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
        }
        records = []
        try:
            for rep in range(args.reps):
                log(f"{scenario}: rep {rep + 1}/{args.reps} (load {os.getloadavg()[0]:.2f}) ...")
                if scenario == "many":
                    r = one_rep_many(rep, dev, proc, base_env, ibsync, work, args)
                    r["load"] = os.getloadavg()
                    log(
                        "  "
                        + ", ".join(
                            f"{k} {v['wall_s']:.1f} s ({v['cpu_s']:.1f} s CPU, {v['maxrss_kib'] >> 10} MiB)"
                            for k, v in r.items()
                            if isinstance(v, dict) and "wall_s" in v
                        )
                    )
                    records.append(r)
                    continue
                r = one_rep(scenario, rep, dev, base_env, ibsync, work)
                log(
                    f"  ibsync {r['ibsync']['wall_s']:.2f} s ({r['ibsync']['cpu_s']:.2f} s CPU), "
                    f"pmd3 {r['pmd3']['wall_s']:.2f} s ({r['pmd3']['cpu_s']:.2f} s CPU), "
                    f"restic {r['restic']['wall_s']:.2f} s ({r['restic']['cpu_s']:.2f} s CPU)"
                )
                records.append(r)
        finally:
            dproc = stop_device(proc)
        data["scenarios"][scenario] = {"device": dev, "device_process": dproc, "records": records}
        out.write_text(json.dumps(data, indent=1, default=str))  # kept if a later scenario fails
    data["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out.write_text(json.dumps(data, indent=1, default=str))
    report(data)
    log(f"results: {out}")
    return 0


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--scenario")
    ap.add_argument("--folder")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--small-files", type=int)
    ap.add_argument("--large-count", type=int)
    ap.add_argument("--large-mib", type=int)
    ap.add_argument("--udid")
    ap.add_argument("--dest")
    ap.add_argument("--files", type=int, default=0)
    ap.add_argument("--many-min-kib", type=int, default=4)
    ap.add_argument("--many-max-kib", type=int, default=16)
    ap.add_argument("--change", type=float, default=0.005)
    a = ap.parse_args(argv)
    return serve(a) if a.mode == "_serve" else pmd3_backup(a)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_serve", "_pmd3"):
        sys.exit(child_main(sys.argv[1:]))
    sys.exit(main())
