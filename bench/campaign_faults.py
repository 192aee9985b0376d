#!/usr/bin/env python3
"""The long fault-injection and corruption campaign (issue 11, "The campaign").

    python bench/campaign_faults.py                 # 25 seeds per command, 6 per damage
    python bench/campaign_faults.py --seeds 100     # the long version
    python bench/campaign_faults.py --only faults   # or: corruption

Fault injection: each of import, restore, copy, forget, prune, check, repair index and repair
snapshots runs as a process of its own over a FaultyStorage (ibsync/testing/faulty.py) that
fails one call: the n-th call of one method, picked by the seed among the calls a clean run of
the command makes (every call site equally likely), failing before the call or after it (the
answer lost), as a transient or a permanent error. After each run, with a clean storage:
`check --read-data` passes, every snapshot restores byte-identical to its source folder, and the
command run again completes.

Corruption: one object of one kind (pack, index, snapshot, key, config, lock) is flipped,
truncated, deleted, swapped with another of its kind, or replayed (an object a later
`forget`/`prune`/`key passwd`/`unlock` deleted, put back). Then `check --read-data` (does it
detect?), a restore of every snapshot compared file by file with the originals (never a wrong
byte; every loss named; non-zero exit), and for packs, index and snapshots `repair index` +
`repair snapshots` (check passes after, survivors restore exactly).

Writes bench/results/campaign-<time>.json and .md (figures and every failure with its seed) and
prints the tables. Work happens in a scratch folder on /dev/shm where there is one (--work).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from ibsync.testing import campaign  # noqa: E402

PASSWORD = "campaign password"


def run_faults(base: campaign.Base, seeds: int, log) -> list[campaign.FaultResult]:
    results = []
    for command in campaign.FAULT_COMMANDS:
        calls = campaign.clean_calls(base, command, base.root / f"calls-{command}")
        log(f"{command}: a clean run makes {sum(calls.values())} storage calls {dict(sorted(calls.items()))}")
        for seed in range(1, seeds + 1):
            r = campaign.run_fault_scenario(base, command, seed, calls, base.root / f"fault-{command}-{seed}")
            results.append(r)
            if not r.ok:
                log(f"  FAIL {command} seed {seed}: {r.fault}: {r.problems[0][:300]}")
    return results


def run_corruption(base: campaign.Base, seeds: int, log) -> list[campaign.CorruptionResult]:
    cb = campaign.build_corruption_base(base)
    results = []
    for kind in campaign.CORRUPT_KINDS:
        for op in campaign.OPERATIONS:
            if (kind, op) in campaign.NOT_APPLICABLE:
                continue
            for seed in range(1, seeds + 1):
                r = campaign.run_corruption_scenario(
                    cb, kind, op, seed, base.root / f"corrupt-{kind.value}-{op}-{seed}"
                )
                if r is None:
                    continue  # nothing to swap with, nothing deleted to replay
                results.append(r)
                if not r.ok:
                    log(f"  FAIL {kind.value} {op} seed {seed}: {r.target}: {r.problems[0][:300]}")
    return results


def detection_rows(results: list[campaign.CorruptionResult]) -> list[dict]:
    rows = []
    for kind in campaign.CORRUPT_KINDS:
        mine = [r for r in results if r.kind == kind.value and campaign.must_detect(kind, r.operation)]
        if mine:
            detected = sum(r.detected for r in mine)
            rows.append(
                {
                    "kind": kind.value,
                    "damaged": len(mine),
                    "detected": detected,
                    "rate": f"{100 * detected / len(mine):.0f} %",
                }
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--seeds", type=int, default=25, help="seeds per command (faults); a quarter of it per damage (corruption)"
    )
    ap.add_argument("--corruption-seeds", type=int, help="seeds per kind and damage (default: seeds/4, at least 2)")
    ap.add_argument("--only", choices=("faults", "corruption"))
    ap.add_argument("--size-mib", type=float, default=2.0, help="size of the generated backup folder")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new one on /dev/shm or in /tmp)")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    args = ap.parse_args()

    work = args.work or campaign.scratch_folder("ibsync-campaign-")
    with campaign.campaign_settings(work, PASSWORD):  # the test KDF: the KDF is not what is measured
        return run(args, work)


def run(args: argparse.Namespace, work: Path) -> int:
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {text}", flush=True)

    base = campaign.build_base(work / "base", seed=1, size=int(args.size_mib * (1 << 20)))
    log(f"base repository ready in {work}")
    report: dict = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "seeds": args.seeds,
        "size_mib": args.size_mib,
    }
    md = [f"# Fault and corruption campaign, {report['started']}", ""]
    if args.only != "corruption":
        faults = run_faults(base, args.seeds, log)
        rows = campaign.tally_faults(faults)
        report["faults"] = {"table": rows, "failures": [asdict(r) for r in faults if not r.ok]}
        md += ["## Fault injection (one failed storage call per run)", "", campaign.markdown_table(rows), ""]
        md += [f"- {r.command} seed {r.seed} ({r.fault}): {r.problems[0][:400]}" for r in faults if not r.ok] + [""]
    if args.only != "faults":
        cseeds = args.corruption_seeds or max(2, args.seeds // 4)
        corrupt = run_corruption(base, cseeds, log)
        rows = campaign.tally_corruption(corrupt)
        det = detection_rows(corrupt)
        report["corruption"] = {
            "seeds": cseeds,
            "table": rows,
            "detection": det,
            "failures": [asdict(r) for r in corrupt if not r.ok],
        }
        md += [
            "## Corruption",
            "",
            campaign.markdown_table(rows),
            "",
            "### Detection of damage by `check --read-data`",
            "",
            campaign.markdown_table(det),
            "",
        ]
        md += [
            f"- {r.kind} {r.operation} seed {r.seed} ({r.target}): {r.problems[0][:400]}" for r in corrupt if not r.ok
        ]
    report["seconds"] = round(time.monotonic() - started, 1)
    md += ["", f"{report['seconds']} s in all."]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"campaign-{datetime.now():%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwritten: {stem}.json, {stem}.md")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = len(report.get("faults", {}).get("failures", [])) + len(report.get("corruption", {}).get("failures", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
