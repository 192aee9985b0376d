"""The crash campaign: SIGKILL every repository-changing command (and restore) at many seeded instants,
fill the disk, stop storage servers mid-command, freeze an import past its lock's staleness, and race
four devices with forget and prune; write the figures to bench/results/ and print them.

    python bench/campaign.py --kills 50                          # every scenario, local folders
    python bench/campaign.py --kills 50 --backends local,sftp,s3 # also on OpenSSH and SeaweedFS
    python bench/campaign.py --kills 5 --only import,prune        # a quick look at two commands
    python bench/campaign.py --kills 50 --seed 7                  # other instants; a failure names its seed
    python bench/campaign.py --only backup --seed 1 --trials 14 --duration 6.9  # replay one reported trial

Scenarios (``--only``): the commands import, backup, copy, forget, prune, repair-index, key-add,
key-passwd, key-remove, restore (``--kills`` kills each, per backend; ``backup`` on local only, as the
simulated device is local), and disk-full (local; needs root for tmpfs), server-restart and server-down
(sftp, s3; ``--outages`` rounds each), frozen (local; ``--outages`` rounds), concurrency
(tests/test_concurrency.py run ``--outages`` times). See docs/campaign.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ibsync.testing.crash import Backend, measure, run_trial  # noqa: E402
from ibsync.testing.crash_extras import (  # noqa: E402
    ExtraOutcome,
    MountFailed,
    disk_full,
    frozen_import,
    restore_into_full_disk,
    server_outage,
)
from ibsync.testing.crash_scenarios import COMMANDS, Lab, Sizes, describe_failure  # noqa: E402

EXTRAS = ["disk-full", "server-restart", "server-down", "frozen", "concurrency"]
SERVER_KINDS = {"sftp": "sshd", "s3": "seaweedfs"}


@dataclass
class Results:
    started: str
    args: dict
    kills: list[dict] = field(default_factory=list)
    extras: list[dict] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)  # "command/backend" -> measured seconds
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=50, help="kills per command and backend (default 50)")
    p.add_argument("--only", default="", help=f"comma-separated scenarios (default all): {','.join(COMMANDS + EXTRAS)}")
    p.add_argument("--backends", default="local", help="comma-separated: local, sftp, s3 (default local)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--outages", type=int, default=5, help="rounds of each non-kill scenario (default 5)")
    p.add_argument("--sizes", default="16,32,4,12", help="MiB of folders A, B and devices P, Q (default 16,32,4,12)")
    p.add_argument("--trials", default="", help="replay only these trial numbers (comma-separated), e.g. a failure's")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="the typical run in seconds instead of measuring it (a failure's report gives it): "
        "with --seed and --trials, time kills land at the same instants",
    )
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/results/crash-campaign-<time>.json)"
    )
    args = p.parse_args(argv)
    unknown = set(filter(None, args.only.split(","))) - set(COMMANDS + EXTRAS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    bad = set(args.backends.split(",")) - {"local", *SERVER_KINDS}
    if bad:
        p.error(f"unknown backend(s): {', '.join(sorted(bad))}")
    return args


def selected(args: argparse.Namespace) -> list[str]:
    return [s for s in COMMANDS + EXTRAS if not args.only or s in args.only.split(",")]


@contextlib.contextmanager
def backend_for(name: str, work: Path):
    """A Backend for ``name``, with its server started (and stopped at the end) for sftp and s3."""
    if name == "local":
        yield Backend("local", work / "local")
        return
    from ibsync.testing.servers import STARTERS

    server = STARTERS[SERVER_KINDS[name]](work / f"server-{name}")
    with server:
        yield Backend(name, work / name, server)


def log(msg: str) -> None:
    print(msg, flush=True)


def run_kills(results: Results, args: argparse.Namespace, work: Path, backend_name: str, commands: list[str]) -> None:
    sizes = Sizes(*(int(x) for x in args.sizes.split(",")))
    with (
        backend_for(backend_name, work) as backend,
        Lab(
            work / f"lab-{backend_name}", backend, sizes, local=Backend("local", work / f"lab-{backend_name}-src")
        ) as lab,
    ):
        for command in commands:
            if command == "backup" and backend_name != "local":
                continue  # the capture writes through the same storage code as import; the device is local
            scenario = lab.scenario(command)
            cwork = lab.work / command
            duration = args.duration if args.duration is not None else measure(scenario, cwork)
            results.durations[f"{command}/{backend_name}"] = round(duration, 3)
            log(f"== {command} on {backend_name}: typical run {duration:.2f} s; {args.kills} kills")
            replay = [int(t) for t in args.trials.split(",") if t]
            killed = attempts = 0
            while (killed < args.kills and attempts < 3 * args.kills) if not replay else attempts < len(replay):
                number = replay[attempts] if replay else attempts
                outcome = run_trial(
                    scenario,
                    backend_name,
                    args.seed,
                    number,
                    cwork,
                    duration,
                    event_kills=backend.server is None or backend_name == "sftp",
                )
                attempts += 1
                killed += outcome.killed
                results.kills.append(outcome.as_dict())
                status = "ok" if outcome.ok else "FAIL " + describe_failure(outcome)
                log(
                    f"  {command} #{outcome.trial} {outcome.kill:>16} {'killed' if outcome.killed else 'ended '} "
                    f"at {outcome.at:.3f}s  {status}"
                )
                save(results, args)  # after every trial: an interrupted campaign keeps its figures


def run_extras(results: Results, args: argparse.Namespace, work: Path, extras: list[str]) -> None:
    from ibsync.testing.generator import generate

    sizes = Sizes(*(int(x) for x in args.sizes.split(",")))
    src = work / "extra-sources"
    small = generate(src / "small", seed=61, size_bytes=4 << 20)
    big = generate(src / "big", seed=62, size_bytes=max(sizes.b, 32) << 20)
    rnd = random.Random(f"extras:{args.seed}")

    def record(o: ExtraOutcome) -> None:
        results.extras.append(o.as_dict())
        log(
            f"  {o.scenario} on {o.backend} #{o.trial}: {'ok' if o.ok else 'FAIL ' + '; '.join(o.problems)}"
            f"  {json.dumps({k: v for k, v in o.details.items() if 'stderr' not in k})}"
        )
        save(results, args)

    if "disk-full" in extras:
        log("== disk-full (tmpfs of 20 MiB)")
        for n in range(args.outages):
            try:
                record(disk_full(work / f"disk-full-{n}", small, big, seed=args.seed, trial=n))
                record(restore_into_full_disk(work / f"restore-full-{n}", small, seed=args.seed, trial=n))
            except MountFailed as e:
                results.notes.append(f"disk-full not run: {e}")
                log(f"  not run: {e}")
                break
    if "frozen" in extras:
        log("== frozen import (SIGSTOP past lock staleness, shifted clock)")
        for n in range(args.outages):
            record(frozen_import(work / f"frozen-{n}", small, big, seed=args.seed, trial=n))
    remote = [b for b in args.backends.split(",") if b in SERVER_KINDS]
    for kind in ("server-restart", "server-down"):
        if kind not in extras:
            continue
        if not remote:
            results.notes.append(f"{kind} needs --backends sftp and/or s3")
        for b in remote:
            log(f"== {kind} on {b}")
            with backend_for(b, work / f"{kind}-{b}") as backend:
                for n in range(args.outages):
                    down = rnd.uniform(1, 8) if kind == "server-restart" else None
                    retry = 60.0 if kind == "server-restart" else 3.0
                    record(
                        server_outage(
                            backend.server,
                            backend,
                            work / f"{kind}-{b}",
                            small,
                            big,
                            down_seconds=down,
                            retry_seconds=retry,
                            seed=args.seed,
                            trial=n,
                        )
                    )
    if "concurrency" in extras:
        log("== concurrency: tests/test_concurrency.py")
        for n in range(args.outages):
            t = time.monotonic()
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    str(ROOT / "tests" / "test_concurrency.py"),
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-s",
                ],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            lines = [
                line
                for line in r.stdout.splitlines()
                if "exits" in line or "passed" in line or "failed" in line or "skipped" in line
            ]
            record(
                ExtraOutcome(
                    "concurrency",
                    "local+sftp+s3",
                    args.seed,
                    n,
                    [] if r.returncode == 0 else [r.stdout[-2000:]],
                    {"summary": lines},
                    round(time.monotonic() - t, 1),
                )
            )


# ---- report -----------------------------------------------------------------------------------------------


def save(results: Results, args: argparse.Namespace) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results.__dict__, indent=1, default=str))
    args.out.with_suffix(".md").write_text(report(results))


def report(results: Results) -> str:
    lines = [
        f"# Crash campaign {results.started}",
        "",
        f"`python bench/campaign.py {' '.join(results.args.get('argv', []))}` (seed {results.args.get('seed')})",
        "",
    ]
    if results.kills:
        lines += [
            "| command | backend | typical run (s) | trials | killed | ended first | check ok | "
            "leftover packs warned | other warnings | snapshots restored | re-run ok | failures |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for k in results.kills:
            groups[(k["command"], k["backend"])].append(k)
        for (command, backend), ks in groups.items():
            lines.append(
                f"| {command} | {backend} | {results.durations.get(f'{command}/{backend}', 0):.2f} | {len(ks)} | "
                f"{sum(k['killed'] for k in ks)} | {sum(not k['killed'] for k in ks)} | "
                f"{sum(k['check'].startswith('ok') for k in ks)} | {sum(bool(k['warnings']) for k in ks)} | "
                f"{sum(bool(k['other_warnings']) for k in ks)} | "
                f"{sum(k['snapshots_verified'] for k in ks)} | {sum(k['rerun'].startswith('exit 0') for k in ks)} | "
                f"{sum(bool(k['problems']) for k in ks)} |"
            )
        lines.append("")
    if results.extras:
        lines += ["| scenario | backend | rounds | ok | failures |", "|---|---|---:|---:|---:|"]
        eg: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for e in results.extras:
            eg[(e["scenario"], e["backend"])].append(e)
        for (scenario, backend), es in eg.items():
            ok = sum(not e["problems"] for e in es)
            lines.append(f"| {scenario} | {backend} | {len(es)} | {ok} | {len(es) - ok} |")
        lines.append("")
    others = sorted({w for k in results.kills for w in k["other_warnings"]})
    if others:
        lines += ["Other check warnings seen after kills (not failures):", ""] + [f"- {w}" for w in others] + [""]
    failures = [k for k in results.kills if k["problems"]] + [e for e in results.extras if e["problems"]]
    if failures:
        lines += ["## Failures", ""]
        for f in failures:
            if "command" in f:
                typical = results.durations.get(f"{f['command']}/{f['backend']}", 0)
                lines.append(
                    f"- {f['command']} on {f['backend']}, seed {f['seed']}, trial {f['trial']} (typical run "
                    f"{typical:.3f} s), kill {f['kill']} at {f['at']:.3f} s "
                    f"({'killed' if f['killed'] else 'ended first'}): " + "; ".join(f["problems"])
                )
            else:
                lines.append(
                    f"- {f['scenario']} on {f['backend']}, seed {f['seed']}, round {f['trial']}: "
                    + "; ".join(p.replace("\n", " ") for p in f["problems"])
                )
        lines.append("")
    lines += [f"- {n}" for n in results.notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    args.out = args.out or ROOT / "bench" / "results" / f"crash-campaign-{stamp}.json"
    results = Results(
        stamp, {**{k: str(v) for k, v in vars(args).items()}, "argv": sys.argv[1:] if argv is None else argv}
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="ibsync-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    chosen = selected(args)
    commands = [c for c in chosen if c in COMMANDS]
    extras = [c for c in chosen if c in EXTRAS]
    began = time.monotonic()
    try:
        if commands:
            for b in args.backends.split(","):
                run_kills(results, args, work, b, commands)
        if extras:
            run_extras(results, args, work, extras)
    finally:
        results.notes.append(f"wall time {time.monotonic() - began:.0f} s")
        save(results, args)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = report(results)
    print(text)
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    failed = any(k["problems"] for k in results.kills) or any(e["problems"] for e in results.extras)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
