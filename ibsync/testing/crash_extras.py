"""The crash campaign's other faults: a full disk, a storage server stopped mid-command, and a process
frozen (SIGSTOP) past its lock's staleness while a prune runs. Each function runs one round against
real processes and returns an :class:`ExtraOutcome`; tests assert on it, bench/campaign.py counts them.

Time for the frozen process: the lock's constants (30 min stale, 25 min lost) have no test-only knob,
so children get :class:`~ibsync.testing.crash.ShiftedClock`: a sitecustomize that adds the seconds in a
file to ``time.time()`` and ``datetime.now()``. Writing +31 min into the file moves the stopped import's
clock and the prune's at once; monotonic clocks (timeouts, the refresher's sleep) are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .crash import (
    Backend,
    Event,
    ShiftedClock,
    Target,
    Watcher,
    check_repo,
    child_env,
    digest_difference,
    init_repo,
    last_line,
    run,
    start,
    tree_digest,
)

STALE_SHIFT = 31 * 60  # seconds: past the lock's 30 minutes of staleness


@dataclass
class ExtraOutcome:
    scenario: str
    backend: str
    seed: int
    trial: int
    problems: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return asdict(self)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ibsync: error:")]


def one_clear_line(stderr: str) -> str | None:
    """A problem when stderr is not one ``ibsync: error:`` line without a traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if "Traceback" in stderr:
        return f"traceback: {last_line(stderr)}"
    if len(lines) != 1 or not lines[0].startswith("ibsync: error:"):
        return f"not one error line: {tail(stderr)}"
    return None


def full_disk_problem(stderr: str) -> str | None:
    """A full disk must end in one ``ibsync: error:`` line that names the cause, not a line per file."""
    if problem := one_clear_line(stderr):
        return problem
    if "No space left" not in stderr and "full" not in stderr:
        return f"the error does not say the disk is full: {last_line(stderr)}"
    return None


def tail(stderr: str, n: int = 3) -> str:
    lines = stderr.strip().splitlines()
    return (f"({len(lines)} lines) " if len(lines) > n else "") + " | ".join(lines[-n:])


def restores_as(env: dict[str, str], snapshot: str, digest: dict, out: Path) -> str | None:
    r = run(["restore", snapshot, out], env)
    if r.returncode != 0:
        return f"restore {snapshot[:8]} exited {r.returncode}: {last_line(r.stderr)}"
    diff = digest_difference(digest, tree_digest(next(out.iterdir())))
    shutil.rmtree(out, ignore_errors=True)
    return f"restore {snapshot[:8]} differs: {diff}" if diff else None


def snapshot_ids(env: dict[str, str]) -> list[str]:
    r = run(["snapshots", "--json"], env)
    return [s["id"] for s in json.loads(r.stdout)] if r.returncode == 0 else []


def import_json(env: dict[str, str], folder: Path) -> tuple[subprocess.CompletedProcess, str | None]:
    r = run(["import", folder, "--json"], env)
    snap = json.loads(r.stdout)["snapshots"][0]["id"] if r.returncode == 0 else None
    return r, snap


# ---- disk full ----------------------------------------------------------------------------------------------


class MountFailed(Exception):
    pass


@contextlib.contextmanager
def tmpfs(folder: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of ``mib`` MiB mounted on ``folder`` (root only), unmounted on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise MountFailed(f"mount -t tmpfs failed (exit {r.returncode}): {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(folder: Path, mib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={mib}m", str(folder)], check=True, capture_output=True)


def _holding(
    backend: Backend, name: str, work: Path, folder: Path, base_env: dict[str, str] | None
) -> tuple[dict[str, str], subprocess.CompletedProcess, str | None]:
    """A new repository ``name`` on ``backend`` with ``folder`` imported: the children's
    environment, the import's result and the snapshot id (None if the import failed)."""
    target = backend.new_target(name, f"{name}-password", work / "cache")
    init_repo(target, backend)
    env = child_env({**(base_env or os.environ), **target.env})
    r, snapshot = import_json(env, folder)
    return env, r, snapshot


def disk_full(
    work: Path,
    small: Path,
    big: Path,
    *,
    seed: int = 1,
    trial: int = 0,
    space_mib: int = 20,
    base_env: dict[str, str] | None = None,
) -> ExtraOutcome:
    """A repository on a ``space_mib`` tmpfs holding ``small``; importing ``big`` (larger than the space
    left) fails with one line, the repository stays valid and ``small`` restores; after the space grows
    the import completes."""
    began = time.monotonic()
    out = ExtraOutcome("disk-full", "local", seed, trial)
    with tmpfs(work / "fs", space_mib) as fs:
        env, r, first = _holding(Backend("local", fs), "full", work, small, base_env)
        if first is None:
            out.problems.append(f"the first import did not fit: {last_line(r.stderr)}")
            return out
        r = run(["import", big, "-q"], env)
        out.details["import_exit"] = r.returncode
        out.details["import_stderr"] = tail(r.stderr)
        if r.returncode == 0:
            out.problems.append("importing more than the free space succeeded")
        elif problem := full_disk_problem(r.stderr):
            out.problems.append(f"import on a full disk: {problem}")
        check_problems, warnings = check_repo(env)
        out.problems += [f"after the full disk: {p}" for p in check_problems]
        out.details["check_warnings"] = len(warnings)
        if snapshot_ids(env) != [first]:
            out.problems.append(f"snapshots after the failed import: {snapshot_ids(env)}")
        if problem := restores_as(env, first, tree_digest(small), work / "restored-small"):
            out.problems.append(problem)
        resize(fs, space_mib * 4)
        r, second = import_json(env, big)
        out.details["rerun_exit"] = r.returncode
        if second is None:
            out.problems.append(f"the re-run after freeing space failed: {last_line(r.stderr)}")
        else:
            out.problems += [f"after the re-run: {p}" for p in check_repo(env)[0]]
            if problem := restores_as(env, second, tree_digest(big), work / "restored-big"):
                out.problems.append(problem)
    out.seconds = round(time.monotonic() - began, 2)
    return out


def restore_into_full_disk(
    work: Path,
    small: Path,
    *,
    seed: int = 1,
    trial: int = 0,
    space_mib: int = 2,
    base_env: dict[str, str] | None = None,
) -> ExtraOutcome:
    """Restoring ``small``'s snapshot into a ``space_mib`` tmpfs fails with one line naming the full disk."""
    began = time.monotonic()
    out = ExtraOutcome("restore-full", "local", seed, trial)
    env, r, first = _holding(Backend("local", work), "restore-full", work, small, base_env)
    if first is None:
        out.problems.append(f"the import failed: {last_line(r.stderr)}")
        return out
    with tmpfs(work / "small-target", space_mib) as target_fs:
        r = run(["restore", first, target_fs / "out", "-q"], env)
    out.details["restore_exit"] = r.returncode
    out.details["restore_stderr"] = tail(r.stderr)
    if r.returncode == 0:
        out.problems.append("restore into a full filesystem succeeded")
    elif problem := full_disk_problem(r.stderr):
        out.problems.append(f"restore into a full filesystem: {problem}")
    out.seconds = round(time.monotonic() - began, 2)
    return out


# ---- a frozen process -----------------------------------------------------------------------------------------


def frozen_import(
    work: Path, small: Path, big: Path, *, seed: int = 1, trial: int = 0, base_env: dict[str, str] | None = None
) -> ExtraOutcome:
    """An import of ``big`` is stopped (SIGSTOP) right after it stored a pack (its shared lock held), the
    clocks move 31 minutes on, a prune runs (the import's lock is stale now) and deletes the import's
    unindexed packs; then SIGCONT: the import must stop with LockLost and commit nothing, the
    repository must check clean, ``small`` must restore, and a new import must complete."""
    began = time.monotonic()
    rnd = random.Random(f"frozen:{seed}:{trial}")
    out = ExtraOutcome("frozen", "local", seed, trial)
    backend = Backend("local", work)
    target = backend.new_target("frozen", "frozen-password", work / "cache")
    init_repo(target, backend)
    clock = ShiftedClock(work / "clock")
    env = clock.env(child_env({**(base_env or os.environ), **target.env}))
    r, first = import_json(env, small)
    if first is None:
        out.problems.append(f"the first import failed: {last_line(r.stderr)}")
        return out
    event = Event("packs", "+", rnd.randint(1, 2))
    watcher = Watcher(target.folder, event)
    proc = start(["import", big, "-q"], env)
    try:
        deadline = time.monotonic() + 120
        while not watcher.happened():
            if proc.poll() is not None or time.monotonic() > deadline:
                out.problems.append(f"the import ended before {event} could be seen (exit {proc.poll()})")
                return out
            time.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)
        out.details["stopped_after"] = str(event)
        clock.set(STALE_SHIFT)
        prune = run(["prune", "--repack-threshold", "0", "--json"], env)
        out.details["prune_exit"] = prune.returncode
        if prune.returncode != 0:
            out.problems.append(f"prune beside a stale lock exited {prune.returncode}: {last_line(prune.stderr)}")
        else:
            plan = json.loads(prune.stdout)
            out.details["prune_deleted_packs"] = plan.get("packs_to_delete")
            if not plan.get("packs_to_delete"):
                out.problems.append("prune deleted none of the frozen import's packs: the scenario did not happen")
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    out.details["import_exit"] = proc.returncode
    out.details["import_stderr"] = tail(err)
    if proc.returncode == 0:
        out.problems.append("the frozen import committed after its lock went stale")
    elif "Traceback" in err or "lock" not in last_line(err):
        out.problems.append(f"the frozen import did not end with LockLost: {last_line(err)}")
    clock.set(0)
    check_problems, _ = check_repo(env)
    out.problems += check_problems
    if snapshot_ids(env) != [first]:
        out.problems.append(f"snapshots after the lost lock: {snapshot_ids(env)}")
    if problem := restores_as(env, first, tree_digest(small), work / "restored-small"):
        out.problems.append(problem)
    r, second = import_json(env, big)
    if second is None:
        out.problems.append(f"the import run again failed: {last_line(r.stderr)}")
    elif problem := restores_as(env, second, tree_digest(big), work / "restored-big"):
        out.problems.append(problem)
    out.seconds = round(time.monotonic() - began, 2)
    return out


# ---- servers stopped mid-command ------------------------------------------------------------------------------


def wait_for_lock(storage, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    from ibsync.storage import Kind

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(storage.list(Kind.LOCKS)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def server_outage(
    server,
    backend: Backend,
    work: Path,
    small: Path,
    big: Path,
    *,
    down_seconds: float | None,
    retry_seconds: float,
    seed: int = 1,
    trial: int = 0,
    base_env: dict[str, str] | None = None,
) -> ExtraOutcome:
    """Stop ``server`` while an import of ``big`` runs (after it took its lock). With ``down_seconds``
    (shorter than ``retry_seconds``, the retry budget) it comes back after that long and the import must
    complete; with None it stays down until the import gives up, which must be one line and a non-zero
    exit, leaving the repository valid; the import run again must complete."""
    began = time.monotonic()
    within = down_seconds is not None
    out = ExtraOutcome(
        "server-restart" if within else "server-down",
        backend.name,
        seed,
        trial,
        details={"down_s": round(down_seconds, 2) if within else "until the import ends", "retry_s": retry_seconds},
    )
    target: Target = backend.new_target(f"outage-{trial}", "outage-password", work / f"cache-{trial}")
    init_repo(target, backend)
    env = child_env({**(base_env or os.environ), **target.env}, IBSYNC_RETRY_SECONDS=str(retry_seconds))
    r, first = import_json(env, small)
    if first is None:
        out.problems.append(f"the first import failed: {last_line(r.stderr)}")
        return out
    proc = start(["import", big, "--json"], env)
    if not wait_for_lock(backend.storage(target), proc):
        out.problems.append("the import never took its lock")
        proc.kill()
        proc.communicate()
        return out
    server.stop()
    stopped = time.monotonic()
    try:
        if within:
            time.sleep(down_seconds)
        else:
            try:
                proc.wait(timeout=retry_seconds + 120)
            except subprocess.TimeoutExpired:
                out.problems.append(f"the import still ran {time.monotonic() - stopped:.0f} s into the outage")
    finally:
        server.start()
    stdout, stderr = proc.communicate(timeout=600)
    out.details.update(import_exit=proc.returncode, outage_s=round(time.monotonic() - stopped, 1))
    if within:
        if proc.returncode != 0:
            out.problems.append(
                f"the import did not ride out a {down_seconds:.1f} s outage: exit {proc.returncode}: "
                f"{last_line(stderr)}"
            )
        else:
            second = json.loads(stdout)["snapshots"][0]["id"]
            if problem := restores_as(env, second, tree_digest(big), work / f"restored-{trial}"):
                out.problems.append(problem)
    else:
        out.details["stderr"] = tail(stderr)
        if proc.returncode == 0:
            out.problems.append("the import succeeded though the server stayed down past the retry budget")
        else:
            errors = error_lines(stderr)
            if "Traceback" in stderr or len(errors) != 1 or errors[0] != last_line(stderr):
                out.problems.append(f"not one clear error line: {' | '.join(stderr.strip().splitlines()[-3:])}")
        if snapshot_ids(env) != [first]:
            out.problems.append(f"snapshots after the outage: {snapshot_ids(env)}")
        r, second = import_json(env, big)
        if second is None:
            out.problems.append(f"the import run again failed: {last_line(r.stderr)}")
        elif problem := restores_as(env, second, tree_digest(big), work / f"restored-{trial}"):
            out.problems.append(problem)
    out.problems += check_repo(env)[0]
    if problem := restores_as(env, first, tree_digest(small), work / f"restored-first-{trial}"):
        out.problems.append(problem)
    out.seconds = round(time.monotonic() - began, 2)
    return out
