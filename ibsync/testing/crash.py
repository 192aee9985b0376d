"""Kill real ``python -m ibsync`` processes at chosen instants and verify what a kill may leave behind.

Shared by the fast crash sample of the default test suite (tests/test_crash_sample.py) and the long
campaign (bench/campaign.py). One *trial*: copy a prepared repository (the baseline, holding snapshots
committed before the kill), start the command as a subprocess, SIGKILL it at an instant, then

1. ``check --json`` must report no errors (warnings name harmless leftovers, e.g. unreferenced packs);
2. every snapshot committed before the kill that the command may not remove is still listed, and every
   listed snapshot restores byte-identical to its source (a hash of every entry: bytes, type, mode, mtime);
3. the scenario's own promise holds (keys: a password that worked still works unless it was the one
   being removed or changed, and at least one works);
4. running the command again completes (exit 0), and check passes after it.

The instant is either a time, uniform in [0, 1.2 x the command's measured duration), or an *event*
seen by watching the repository's folder: the n-th new pack, index, snapshot or key object appearing
or going (``packs+3``, ``index+1``, ``snapshots-1``, ``keys+1``...), then a random few milliseconds more.
Event kills need the repository's objects on a local path (local folders, the SFTP server's root);
on S3 only time kills are used.

Everything is seeded: a trial's (command, backend, seed, trial number) names its instant again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ibsync
from ibsync.testing import FAST_KDF

# The checkout holding this ibsync: children import the same code whatever their working folder.
SOURCE_ROOT = Path(ibsync.__file__).resolve().parent.parent
# Fast key derivation for generated repositories only; key files store their own parameters.
COMMAND_TIMEOUT = 300.0
POLL_SECONDS = 0.001
# check's wording for packs no index refers to: what a kill between a pack and its index leaves
LEFTOVER_WARNING = "not in any index"


# ---- processes --------------------------------------------------------------------------------------------


def child_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of an ibsync child: ``base`` (already holding IBSYNC_*), no pytest variables,
    this checkout first on the path."""
    env = {k: v for k, v in base.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def ibsync_argv(args: Iterable[Any]) -> list[str]:
    return [sys.executable, "-m", "ibsync", *map(str, args)]


def run(args: Iterable[Any], env: dict[str, str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ibsync to completion; a hang past ``timeout`` becomes returncode -999 with a note on stderr."""
    try:
        return subprocess.run(ibsync_argv(args), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(
            e.cmd, -999, _text(e.stdout), _text(e.stderr) + f"\n(timed out after {timeout} s)"
        )


def start(args: Iterable[Any], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        ibsync_argv(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode(errors="replace")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---- folder digests ---------------------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry below ``root``: type, sha256 of the bytes (files) or target (links), mode and mtime (ns)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = (
                    "file",
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                    stat.S_IMODE(st.st_mode),
                    st.st_mtime_ns,
                )
    return out


def digest_difference(expected: dict[str, tuple], got: dict[str, tuple]) -> str | None:
    """None when equal, else a short description of the first differences."""
    if expected == got:
        return None
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    changed = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    parts = []
    for label, names in (("missing", missing), ("unexpected", extra), ("different", changed)):
        if names:
            parts.append(f"{len(names)} {label} (e.g. {names[0]})")
    return ", ".join(parts)


# ---- repositories -----------------------------------------------------------------------------------------


@dataclass
class Target:
    """A repository as the commands see it (``IBSYNC_REPO`` and the config file naming it) and, when its
    objects sit in a folder of this machine, that folder (for event kills and fast copies)."""

    repo: str
    folder: Path | None
    env: dict[str, str]  # IBSYNC_* entries: repository, password, cache, config

    def with_password(self, password: str) -> dict[str, str]:
        return {**self.env, "IBSYNC_PASSWORD": password}


@dataclass
class Backend:
    """Where trial repositories are made: a local folder, or a server's URL root with its options."""

    name: str
    workdir: Path
    server: Any = None  # ibsync.testing.servers.Server
    _count: int = 0

    def new_target(self, label: str, password: str, cache: Path) -> Target:
        """A fresh, empty repository location."""
        self._count += 1
        name = f"{label}-{self._count}"
        env = {"IBSYNC_PASSWORD": password, "IBSYNC_CACHE_DIR": str(cache)}
        if self.server is None:
            folder = self.workdir / "repos" / name
            folder.parent.mkdir(parents=True, exist_ok=True)
            return Target(str(folder), folder, {**env, "IBSYNC_REPO": str(folder)})
        url = self.server.new_url(name)
        config = self.workdir / "configs" / f"{name}.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(self.server.config_toml("trial", url))
        folder = None
        if url.startswith("sftp://"):
            folder = Path("/" + url.split("/", 3)[3])  # sshd serves this machine's folders by their path
        return Target(
            "trial", folder, {**env, "IBSYNC_REPO": "trial", "IBSYNC_CONFIG": str(config), "IBSYNC_RETRY_SECONDS": "20"}
        )

    def storage(self, target: Target):
        from ibsync.storage import open_storage

        if self.server is None:
            return open_storage(str(target.folder))
        url = self._url_of(target)
        return open_storage(url, self.server.options)

    def _url_of(self, target: Target) -> str:
        text = Path(target.env["IBSYNC_CONFIG"]).read_text()
        return next(line.split("=", 1)[1].strip().strip('"') for line in text.splitlines() if line.startswith("url"))

    def clone(self, source: Target, label: str, cache: Path) -> Target:
        """A copy of ``source``'s repository at a fresh location (same password)."""
        dest = self.new_target(label, source.env["IBSYNC_PASSWORD"], cache)
        if self.server is None or (source.folder is not None and dest.folder is not None):
            shutil.copytree(source.folder, dest.folder, symlinks=True)
            return dest
        copy_objects(self.storage(source), self.storage(dest))
        return dest


def copy_objects(src, dst) -> None:
    """Every object of one storage into another, through the storage interface (any backend)."""
    from ibsync.storage import Kind

    dst.put(Kind.CONFIG, "config", src.get(Kind.CONFIG, "config"))
    for kind in Kind:
        if kind is Kind.CONFIG:
            continue
        for info in src.list(kind):
            dst.put(kind, info.name, src.get(kind, info.name))


def init_repo(target: Target, backend: Backend, *, pack_mib: int = 4) -> None:
    """``init`` through the library, so the key uses the fast KDF (children cannot be told to)."""
    from ibsync.repo.repository import Repository

    Repository.init(backend.storage(target), target.env["IBSYNC_PASSWORD"], kdf=FAST_KDF, pack_size=pack_mib << 20)


def add_key(target: Target, backend: Backend, new_password: str) -> str:
    """A second key (fast KDF) for ``new_password``; returns its id."""
    from ibsync.repo.keys import add_key as add
    from ibsync.repo.repository import Repository

    repo = Repository.open(backend.storage(target), lambda: target.env["IBSYNC_PASSWORD"])
    return add(repo, new_password, kdf=FAST_KDF)


# ---- watching ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """The n-th object of a kind appearing (``+``) or going (``-``) in a watched folder: ``packs+3``."""

    folder: str  # packs, index, snapshots, keys, locks, or "out" (a restore's target, any entry)
    sign: str
    n: int

    @classmethod
    def parse(cls, text: str) -> Event:
        for sign in "+-":
            if sign in text:
                folder, n = text.split(sign)
                return cls(folder, sign, int(n or 1))
        raise ValueError(f"not an event: {text!r}")

    def __str__(self) -> str:
        return f"{self.folder}{self.sign}{self.n}"


def _names(root: Path, folder: str) -> set[str]:
    path = root / folder if folder != "out" else root
    try:
        if folder == "packs":
            return {e.name for d in os.scandir(path) if d.is_dir() for e in os.scandir(d.path)}
        if folder == "out":
            return {str(Path(d) / n) for d, ds, fs in os.walk(path) for n in fs}
        return {e.name for e in os.scandir(path) if not e.name.startswith(".")}
    except FileNotFoundError:
        return set()


class Watcher:
    def __init__(self, root: Path, event: Event) -> None:
        self.root, self.event = root, event
        self.before = _names(root, event.folder)

    def happened(self) -> bool:
        now = _names(self.root, self.event.folder)
        changed = now - self.before if self.event.sign == "+" else self.before - now
        return len(changed) >= self.event.n


# ---- one kill ---------------------------------------------------------------------------------------------


@dataclass
class Kill:
    """How a trial picks its instant: at ``seconds`` after start, or ``delay`` after ``event``."""

    seconds: float | None = None
    event: Event | None = None
    delay: float = 0.0

    def describe(self) -> str:
        if self.event is None:
            return f"t={self.seconds:.3f}s"
        return f"{self.event}+{self.delay * 1000:.0f}ms"


@dataclass
class Killed:
    killed: bool  # False: the command ended on its own first
    at: float  # seconds after start when killed (or ended)
    returncode: int | None
    stderr: str


def kill_at(
    proc: subprocess.Popen, kill: Kill, watch_root: Path | None, started: float, timeout: float = COMMAND_TIMEOUT
) -> Killed:
    """SIGKILL ``proc`` at the chosen instant, unless it ends first."""
    watcher = Watcher(watch_root, kill.event) if kill.event is not None and watch_root is not None else None
    deadline = started + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        now = time.monotonic()
        if watcher is None and now - started >= (kill.seconds or 0.0):
            break
        if watcher is not None and watcher.happened():
            time.sleep(kill.delay)
            break
        time.sleep(POLL_SECONDS)
    at = time.monotonic() - started
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        return Killed(True, at, proc.returncode, err)
    _, err = proc.communicate(timeout=60)
    return Killed(False, at, proc.returncode, err)


# ---- scenarios --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """What a snapshot must restore to: a folder digest (imports) or a check of the restored folder."""

    digest: dict[str, tuple] | None = None
    verify: Callable[[Path], str | None] | None = None

    def compare(self, restored: Path) -> str | None:
        if self.verify is not None:
            return self.verify(restored)
        return digest_difference(self.digest or {}, tree_digest(restored))


@dataclass
class Trial:
    """One prepared repository about to be hit: what to run, where, and what must hold afterwards."""

    target: Target
    argv: list[str]
    env: dict[str, str]  # the killed command's environment
    workdir: Path
    watch_root: Path | None
    must_keep: set[str]  # snapshot ids committed before the kill that must still be listed
    state: dict[str, Any] = field(default_factory=dict)  # scenario-specific (passwords, key ids)


@dataclass
class Scenario:
    """A command under test.

    ``prepare(work)`` runs once and returns a baseline maker; ``make_trial(work, n)`` gives a fresh trial;
    ``after_kill(trial)`` returns problems beyond the generic checks; ``rerun(trial)`` re-runs the command
    and returns (returncode, stderr, note)."""

    name: str
    events: list[str]
    make_trial: Callable[[Path, int], Trial]
    references: Callable[[dict], Reference | None]  # snapshot JSON -> what it must restore to
    after_kill: Callable[[Trial], list[str]] = lambda trial: []
    rerun: Callable[[Trial], tuple[int, str, str]] | None = None
    verify_env: Callable[[Trial], dict[str, str]] = lambda trial: trial.env
    after_rerun: Callable[[Trial], list[str]] = lambda trial: []


@dataclass
class Outcome:
    command: str
    backend: str
    seed: int
    trial: int
    kill: str
    killed: bool
    at: float
    exit: int | None
    check: str  # "ok", "ok with warnings", or the errors
    warnings: list[str]  # check's warnings naming harmless leftovers (packs in no index)
    other_warnings: list[str]  # any other warning: reported, not counted as a failure
    snapshots_verified: int
    rerun: str
    problems: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return asdict(self)


def check_repo(env: dict[str, str]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of ``check --json``."""
    r = run(["check", "--json"], env)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return [f"check exited {r.returncode} without a JSON report: {last_line(r.stderr)}"], []
    problems = [f"check: {e}" for e in doc.get("errors", [])]
    if r.returncode != 0 and not problems:
        problems.append(f"check exited {r.returncode}: {last_line(r.stderr)}")
    return problems, list(doc.get("warnings", []))


def list_snapshots(env: dict[str, str]) -> tuple[list[dict] | None, str]:
    r = run(["snapshots", "--json"], env)
    if r.returncode != 0:
        return None, f"snapshots exited {r.returncode}: {last_line(r.stderr)}"
    return json.loads(r.stdout), ""


def restore_matches(env: dict[str, str], snap: dict, ref: Reference, out: Path) -> str | None:
    """Restore one snapshot into a fresh ``out`` and compare it with its reference."""
    r = run(["restore", snap["id"], out], env)
    if r.returncode != 0:
        return f"restore {snap['short_id']} exited {r.returncode}: {last_line(r.stderr)}"
    folders = [p for p in out.iterdir()] if out.exists() else []
    if len(folders) != 1:
        return f"restore {snap['short_id']} made {len(folders)} folders"
    diff = ref.compare(folders[0])
    shutil.rmtree(out, ignore_errors=True)
    return f"snapshot {snap['short_id']} restored with {diff}" if diff else None


def verify_snapshots(
    scenario: Scenario, trial: Trial, env: dict[str, str], label: str, skip: set[str] = frozenset()
) -> tuple[list[str], int, set[str]]:
    """Every listed snapshot but those in ``skip`` restores as its reference; must_keep ones are listed.
    Returns (problems, how many were restored, the ids listed)."""
    snaps, error = list_snapshots(env)
    if snaps is None:
        return [error], 0, set()
    listed = {s["id"] for s in snaps}
    problems = [f"snapshot {s[:8]} committed before the kill is gone" for s in trial.must_keep - listed]
    verified = 0
    for snap in snaps:
        if snap["id"] in skip:
            continue
        ref = scenario.references(snap)
        if ref is None:
            problems.append(
                f"snapshot {snap['short_id']} ({snap['device']['udid']}, {snap['backup_date']}) is not one the test made"
            )
            continue
        problem = restore_matches(env, snap, ref, trial.workdir / f"{label}-{snap['short_id']}")
        verified += 1
        if problem:
            problems.append(problem)
    return problems, verified, listed


def default_rerun(trial: Trial) -> tuple[int, str, str]:
    r = run(trial.argv, trial.env)
    return r.returncode, r.stderr, ""


def run_trial(
    scenario: Scenario, backend: str, seed: int, n: int, work: Path, duration: float, *, event_kills: bool
) -> Outcome:
    """Prepare, start, kill, verify, re-run, verify again."""
    began = time.monotonic()
    rnd = random.Random(f"{scenario.name}:{backend}:{seed}:{n}")
    trial = scenario.make_trial(work, n)
    use_event = bool(event_kills and trial.watch_root is not None and scenario.events and n % 2 == 1)
    if use_event:
        kill = Kill(event=Event.parse(rnd.choice(scenario.events)), delay=rnd.uniform(0, 0.02))
    else:
        kill = Kill(seconds=rnd.uniform(0, 1.2 * duration))
    started = time.monotonic()
    root = trial.state.get("out") if kill.event is not None and kill.event.folder == "out" else trial.watch_root
    proc = start(trial.argv, trial.env)
    result = kill_at(proc, kill, root, started)
    problems: list[str] = []
    if "Traceback" in result.stderr:
        problems.append(f"traceback before the kill: {last_line(result.stderr)}")
    if not result.killed and result.returncode != 0:
        problems.append(f"ended on its own with exit {result.returncode} before the kill: {last_line(result.stderr)}")
    venv = scenario.verify_env(trial)
    check_problems, warnings = check_repo(venv)
    problems += check_problems
    snap_problems, verified, seen = verify_snapshots(scenario, trial, venv, "after-kill")
    problems += snap_problems
    problems += scenario.after_kill(trial)
    code, err, note = (scenario.rerun or default_rerun)(trial)
    rerun = f"exit {code}" + (f" ({note})" if note else "")
    if code != 0:
        problems.append(f"re-run exited {code}: {last_line(err)}")
    else:
        venv = scenario.verify_env(trial)
        more, _ = check_repo(venv)
        new_problems, new_verified, _ = verify_snapshots(scenario, trial, venv, "after-rerun", skip=seen)
        problems += [f"after the re-run: {p}" for p in more + new_problems]
        verified += new_verified
        problems += scenario.after_rerun(trial)
    check = "ok" if not check_problems else "; ".join(check_problems)
    if not check_problems and warnings:
        check = "ok with warnings"
    leftovers = [w for w in warnings if LEFTOVER_WARNING in w]
    outcome = Outcome(
        scenario.name,
        backend,
        seed,
        n,
        kill.describe(),
        result.killed,
        round(result.at, 3),
        result.returncode if not result.killed else None,
        check,
        leftovers,
        [w for w in warnings if w not in leftovers],
        verified,
        rerun,
        problems,
        round(time.monotonic() - began, 2),
    )
    shutil.rmtree(trial.workdir, ignore_errors=True)
    return outcome


def measure(scenario: Scenario, work: Path, runs: int = 2) -> float:
    """The command's typical duration (median of ``runs`` complete runs on fresh trials)."""
    times = []
    for i in range(runs):
        trial = scenario.make_trial(work, 10_000 + i)
        t = time.monotonic()
        r = run(trial.argv, trial.env)
        times.append(time.monotonic() - t)
        if r.returncode != 0:
            raise RuntimeError(f"{scenario.name}: the uninterrupted command failed: exit {r.returncode}: {r.stderr}")
        shutil.rmtree(trial.workdir, ignore_errors=True)
    return sorted(times)[len(times) // 2]


# ---- a shifted clock for children (frozen-process tests) --------------------------------------------------

CLOCK_ENV = "IBSYNC_TEST_CLOCK_OFFSET_FILE"

_SITECUSTOMIZE = """
# Test-only: shift this process's wall clock by the number of seconds in the file $%(env)s, read at
# every call, so a test can move a running (or SIGSTOPped) process's clock forward without waiting.
import datetime as _dt
import os as _os
import time as _time

_path = _os.environ.get("%(env)s")
if _path:
    _real_time, _real_time_ns = _time.time, _time.time_ns

    def _offset():
        try:
            with open(_path) as f:
                return float(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0.0

    _time.time = lambda: _real_time() + _offset()
    _time.time_ns = lambda: _real_time_ns() + int(_offset() * 1e9)

    class _ShiftedDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return _dt.datetime.fromtimestamp(_time.time(), tz)

        @classmethod
        def utcnow(cls):
            return _dt.datetime.utcfromtimestamp(_time.time())

    _dt.datetime = _ShiftedDatetime
"""


@dataclass
class ShiftedClock:
    """A sitecustomize that shifts children's wall clock (``time.time`` and ``datetime.now``) by the number
    of seconds held in a file; writing the file moves every child's clock at once, even a stopped one's."""

    folder: Path

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "sitecustomize.py").write_text(_SITECUSTOMIZE % {"env": CLOCK_ENV})
        self.offset_file = self.folder / "offset"
        self.set(0)

    def set(self, seconds: float) -> None:
        tmp = self.offset_file.with_suffix(".tmp")
        tmp.write_text(str(seconds))
        os.replace(tmp, self.offset_file)  # a reader sees the old or the new value, never an empty file

    def env(self, base: dict[str, str]) -> dict[str, str]:
        path = os.pathsep.join([str(self.folder), base.get("PYTHONPATH", "")])
        return {**base, "PYTHONPATH": path, CLOCK_ENV: str(self.offset_file)}
