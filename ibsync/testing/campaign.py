"""The fault and corruption campaign, shared by the default test suite (a few seeds) and
bench/campaign_faults.py (many): scenarios, the invariants checked after each, and tallies.

Fault scenarios: a command runs (as a process of its own) on a repository whose storage fails
one chosen call, the n-th call of one method, picked by the seed among the calls a clean run
makes, so every call site is reached in proportion to its use. Then, with a clean storage:
`check --read-data` passes (unreferenced leftovers are warnings, not errors), every snapshot
restores byte-identical to the folder it came from, and the command run again completes.

Corruption scenarios: one object of one kind is damaged (flip, truncate, delete, swap) or an
older object is put back (replay). Then `check --read-data` is run, every snapshot is
restored and each restored file compared with its original (identical, or absent and named on
stderr), and `repair index` + `repair snapshots` are run, after which check must pass and the
surviving snapshots restore exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..storage.base import Kind, object_path
from .faulty import FAULTS_ENV, Action, Fault, chance, plan_json

DEFAULT_SIZE = 2 << 20

# ---- running commands -------------------------------------------------------------------------


@dataclass
class Outcome:
    args: list[str]
    code: int
    out: str
    err: str
    injected: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def well_behaved(self) -> bool:
        """A documented exit code (errors.EXIT_CODES: failed, refused, locked, wrong password, not
        found, storage unreachable, ...), never an internal error."""
        from ..errors import EXIT_CODES, EXIT_INTERNAL

        clean = self.code in EXIT_CODES and self.code != EXIT_INTERNAL
        return clean and "Traceback" not in self.err and "internal error" not in self.err

    def describe(self) -> str:
        return f"ibsync {' '.join(self.args)} -> {self.code}\n{self.err.strip()[-2000:]}"


def run_inprocess(args: list[str]) -> Outcome:
    from ..cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Outcome([str(a) for a in args], code, out.getvalue(), err.getvalue())


def run_faulted(args: list[str], seed: int, faults: list[Fault], report: Path, timeout: float = 300) -> Outcome:
    """``ibsync args`` in a child process whose storage follows ``faults``."""
    args = [str(a) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env[FAULTS_ENV] = plan_json(seed, faults, str(report))
    proc = subprocess.run(
        [sys.executable, "-m", "ibsync.testing.faulty", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    outcome = Outcome(args, proc.returncode, proc.stdout, proc.stderr)
    if report.exists():
        data = json.loads(report.read_text())
        outcome.injected, outcome.calls = data["injected"], data["calls"]
        report.unlink()
    return outcome


# ---- comparing what was restored with what was backed up ------------------------------------


def folder_state(root: Path) -> dict[str, tuple]:
    """Every entry below ``root``: ('file', sha256) / ('link', target) / ('dir',)."""
    state: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            state[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            state[rel] = ("dir",)
        else:
            state[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return state


@dataclass
class RestoreVerdict:
    identical: int = 0
    lost_named: list[str] = field(default_factory=list)  # absent, and named on stderr
    lost_unnamed: list[str] = field(default_factory=list)  # absent, not named: a defect
    wrong: list[str] = field(default_factory=list)  # present with other bytes: a defect
    extra: list[str] = field(default_factory=list)  # present, not in the original: a defect

    @property
    def exact(self) -> bool:
        return not (self.lost_named or self.lost_unnamed or self.wrong or self.extra)

    @property
    def safe(self) -> bool:
        """Never a wrong byte, and everything missing is named."""
        return not (self.lost_unnamed or self.wrong or self.extra)

    def describe(self) -> str:
        return (
            f"{self.identical} identical, {len(self.lost_named)} lost and named, "
            f"lost unnamed {self.lost_unnamed[:5]}, wrong {self.wrong[:5]}, extra {self.extra[:5]}"
        )


def _named(rel: str, err: str) -> bool:
    """Whether stderr names the file, or a folder it is in (a folder whose listing is lost)."""
    parts = rel.split("/")
    return any("/".join(parts[:i]) in err for i in range(len(parts), 0, -1))


def verify_restore(restored: Path, original: dict[str, tuple], err: str, code: int = 1) -> RestoreVerdict:
    """Compare a restore with the original. A restore that failed before writing any file
    (exit non-zero and a one-line error: the repository did not open, the snapshot or its root
    folder was unreadable) has named its loss: the whole snapshot."""
    got = folder_state(restored) if restored.is_dir() else {}
    verdict = RestoreVerdict()
    if code != 0 and not any(v[0] != "dir" for v in got.values()):
        verdict.lost_named = sorted(original)
        return verdict
    for rel, want in original.items():
        have = got.get(rel)
        if have == want:
            verdict.identical += 1
        elif have is None or (want[0] == "dir" and have[0] != "dir"):
            (verdict.lost_named if _named(rel, err) else verdict.lost_unnamed).append(rel)
        elif want[0] == "dir":
            verdict.identical += 1
        else:
            verdict.wrong.append(rel)
    verdict.extra = sorted(set(got) - set(original))
    return verdict


# ---- the repositories the scenarios start from -----------------------------------------------


@dataclass
class Base:
    root: Path
    repo: Path
    dest: Path  # an empty repository with another password (copy's target)
    folders: dict[str, Path]  # A, B: imported; C: the next day, for import scenarios
    sources: dict[str, Path]  # snapshot id -> the folder it was made from
    states: dict[str, dict[str, tuple]] = field(default_factory=dict)  # folder name -> folder_state

    def clone(self, into: Path) -> Base:
        shutil.rmtree(into, ignore_errors=True)  # a previous failed run's leftovers
        into.mkdir(parents=True)
        shutil.copytree(self.repo, into / "repo", symlinks=True)
        shutil.copytree(self.dest, into / "dest", symlinks=True)
        return Base(into, into / "repo", into / "dest", self.folders, self.sources, self.states)

    def state_of(self, folder: Path) -> dict[str, tuple]:
        if str(folder) not in self.states:
            self.states[str(folder)] = folder_state(folder)
        return self.states[str(folder)]


DEST_PASSWORD = "the copy's own password"


def snapshot_list(repo: Path) -> list[dict]:
    o = run_inprocess(["snapshots", "--json", "--repo", repo])
    if o.code != 0:
        raise RuntimeError(o.describe())
    return json.loads(o.out)


def _must(o: Outcome) -> Outcome:
    if o.code != 0:
        raise RuntimeError(o.describe())
    return o


def build_base(root: Path, *, seed: int = 1, size: int = DEFAULT_SIZE) -> Base:
    """Folders A, B (the next day) and C (the day after); a repository holding snapshots of A
    and B (4 MiB packs, so several packs); an empty second repository. The caller has set
    IBSYNC_PASSWORD and a fast KDF."""
    from .generator import generate, mutate_folder

    root.mkdir(parents=True, exist_ok=True)
    folders = {}
    for i, name in enumerate("ABC"):
        if i == 0:
            folders[name] = generate(root / name, seed=seed, size_bytes=size)
        else:
            folders[name] = root / name / folders["A"].name
            shutil.copytree(folders[chr(ord(name) - 1)], folders[name], symlinks=True)
            mutate_folder(folders[name], seed=seed * 10 + i)
    repo, dest = root / "repo", root / "dest"
    _must(run_inprocess(["init", "--repo", repo, "--pack-size", "4"]))
    sources = {}
    for name in "AB":
        _must(run_inprocess(["import", folders[name], "--repo", repo]))
        newest = max(snapshot_list(repo), key=lambda s: s["time"])
        sources[newest["id"]] = folders[name]
    with _env(IBSYNC_PASSWORD=DEST_PASSWORD):
        _must(run_inprocess(["init", "--repo", dest, "--pack-size", "4"]))
    return Base(root, repo, dest, folders, sources)


def scratch_folder(prefix: str) -> Path:
    """A new scratch folder on tmpfs where there is one: the scenarios create and remove
    thousands of folders, which costs milliseconds each on a disk."""
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


@contextlib.contextmanager
def campaign_settings(root: Path, password: str):
    """What every scenario runs under, restored afterwards: the repository password, a cache
    below ``root``, no IBSYNC_REPO, and the fast test KDF for new key files."""
    from ..format import crypto
    from . import FAST_KDF

    saved_kdf, crypto.DEFAULT_KDF = crypto.DEFAULT_KDF, FAST_KDF
    repo = os.environ.pop("IBSYNC_REPO", None)
    try:
        with _env(IBSYNC_PASSWORD=password, IBSYNC_CACHE_DIR=str(root / "cache")):
            yield
    finally:
        crypto.DEFAULT_KDF = saved_kdf
        if repo is not None:
            os.environ["IBSYNC_REPO"] = repo


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def restore_all(
    base: Base, repo: Path, out: Path, *, password: str | None = None, sources: dict[str, Path] | None = None
) -> dict[str, tuple[Outcome, RestoreVerdict]]:
    """Restore every snapshot of ``repo`` and compare each with its source folder."""
    sources = sources if sources is not None else base.sources
    results = {}
    with _env(IBSYNC_PASSWORD=password or os.environ["IBSYNC_PASSWORD"]):
        o = run_inprocess(["snapshots", "--json", "--repo", repo])
        snaps = json.loads(o.out) if o.code == 0 else []
        for s in snaps:
            target = out / s["short_id"]
            r = run_inprocess(["restore", s["id"], target, "--repo", repo])
            folder = sources.get(s["id"])
            if folder is None:
                raise AssertionError(f"snapshot {s['short_id']} has no known source")
            results[s["id"]] = (r, verify_restore(target / folder.name, base.state_of(folder), r.err, r.code))
    return results


# ---- fault scenarios --------------------------------------------------------------------------

FAULT_COMMANDS = ("import", "restore", "copy", "forget", "prune", "check", "repair-index", "repair-snapshots")


def command_args(command: str, b: Base) -> list[str]:
    return {
        "import": ["import", b.folders["C"], "--repo", b.repo],
        "restore": ["restore", "latest", b.root / "faulted-restore", "--repo", b.repo],
        "copy": ["copy", "--from-repo", b.repo, "--repo", b.dest],
        "forget": ["forget", "--keep-last", "1", "--repo", b.repo],
        "prune": ["prune", "--repack-threshold", "0", "--repo", b.repo],
        "check": ["check", "--read-data", "--repo", b.repo],
        "repair-index": ["repair", "index", "--repo", b.repo],
        "repair-snapshots": ["repair", "snapshots", "--repo", b.repo],
    }[command]


def prepare(command: str, b: Base) -> None:
    if command == "prune":  # something to prune: the older snapshot forgotten
        _must(run_inprocess(["forget", "--keep-last", "1", "--repo", b.repo]))


def command_env(command: str) -> dict[str, str]:
    if command == "copy":
        return {"IBSYNC_FROM_PASSWORD": os.environ["IBSYNC_PASSWORD"], "IBSYNC_PASSWORD": DEST_PASSWORD}
    return {}


# Actions a well-behaved storage can show: a failed call, or a call whose answer was lost.
HONEST = (Action.FAIL, Action.FAIL_AFTER)


def pick_fault(seed: int, calls: dict[str, int], actions=HONEST) -> Fault:
    """One rule failing the n-th call of one method, chosen so each call a clean run makes is
    equally likely."""
    from .faulty import _ALLOWED

    total = sum(calls.values())
    k = int(chance("call", seed) * total)
    for method, count in sorted(calls.items()):
        if k < count:
            usable = [a for a in actions if a in _ALLOWED[method]] or [Action.FAIL]
            action = usable[int(chance("action", seed) * len(usable))]
            return Fault(method, action, skip=k, times=1, transient=chance("transient", seed) < 0.5)
        k -= count
    raise AssertionError("no calls to choose from")


@dataclass
class FaultResult:
    command: str
    seed: int
    fault: str
    injected: list[str]
    code: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def clean_calls(base: Base, command: str, work: Path) -> dict[str, int]:
    """The storage calls a clean run of ``command`` makes (on a clone of the base)."""
    b = base.clone(work)
    prepare(command, b)
    with _env(**command_env(command)):
        o = run_faulted(command_args(command, b), 0, [], work / "report.json")
    if o.code != 0:
        raise RuntimeError(o.describe())
    shutil.rmtree(work)
    return o.calls


def run_fault_scenario(
    base: Base, command: str, seed: int, calls: dict[str, int], work: Path, fault: Fault | None = None
) -> FaultResult:
    b = base.clone(work)
    prepare(command, b)
    fault = fault or pick_fault(seed, calls)
    args = command_args(command, b)
    before = {s["id"] for s in snapshot_list(b.repo)}
    with _env(**command_env(command)):
        o = run_faulted(args, seed, [fault], work / "report.json")
    problems: list[str] = []
    if not o.well_behaved:
        problems.append(f"not a clean failure: {o.describe()}")
    if command == "restore":
        latest = max(snapshot_list(b.repo), key=lambda s: s["time"])
        v = verify_restore(Path(args[2]) / b.folders["B"].name, b.state_of(b.sources[latest["id"]]), o.err, o.code)
        if not v.safe or (o.code == 0 and not v.exact):
            problems.append(f"faulted restore output: {v.describe()} (exit {o.code})")
    problems += _invariants(b, command, before, f"after the faulted run (exit {o.code})")
    with _env(**command_env(command)):
        again = run_inprocess(args if command != "restore" else ["restore", "latest", work / "again", "--repo", b.repo])
    if again.code != 0 and not (command == "check" and again.code == 0):
        problems.append(f"re-run without faults failed: {again.describe()}")
    problems += _invariants(b, command, before, "after the re-run")
    if not problems:
        shutil.rmtree(work, ignore_errors=True)
    return FaultResult(
        command,
        seed,
        f"{fault.action.value} {fault.method} #{fault.skip + 1} ({'transient' if fault.transient else 'permanent'})",
        o.injected,
        o.code,
        problems,
    )


def _invariants(b: Base, command: str, before: set[str], when: str) -> list[str]:
    problems = []
    for repo, password in ((b.repo, None), (b.dest, DEST_PASSWORD)):
        with _env(IBSYNC_PASSWORD=password or os.environ["IBSYNC_PASSWORD"]):
            c = run_inprocess(["check", "--read-data", "--json", "--repo", repo])
        if c.code != 0:
            problems.append(f"{when}: check of {repo.name} failed: {c.out[-1500:]} {c.err[-500:]}")
    after = {s["id"] for s in snapshot_list(b.repo)}
    if command in ("forget", "prune"):
        newest = max(before, key=lambda i: b.sources[i].parent.name)  # B is the newer folder
        if newest not in after:
            problems.append(f"{when}: the kept snapshot {newest[:8]} is gone")
    elif not before <= after:
        problems.append(f"{when}: snapshots lost: {sorted(i[:8] for i in before - after)}")
    sources = dict(b.sources)
    for new in after - set(b.sources):
        sources[new] = b.folders["C"]  # only import adds snapshots
    out = b.root / f"verify-{len(list(b.root.glob('verify-*')))}"
    for sid, (r, v) in restore_all(b, b.repo, out, sources=sources).items():
        if r.code != 0 or not v.exact:
            problems.append(f"{when}: snapshot {sid[:8]} does not restore exactly: {v.describe()}; {r.err[-300:]}")
    if command == "copy":
        dest_sources = _copied_sources(b)
        for sid, (r, v) in restore_all(b, b.dest, out / "dest", password=DEST_PASSWORD, sources=dest_sources).items():
            if r.code != 0 or not v.exact:
                problems.append(f"{when}: copied snapshot {sid[:8]} does not restore exactly: {v.describe()}")
    shutil.rmtree(out, ignore_errors=True)
    return problems


def _copied_sources(b: Base) -> dict[str, Path]:
    """Snapshots of the copy's target, mapped to their folders by the source snapshot's backup date."""
    by_date = {s["backup_date"]: b.sources[s["id"]] for s in snapshot_list(b.repo) if s["id"] in b.sources}
    with _env(IBSYNC_PASSWORD=DEST_PASSWORD):
        dest = snapshot_list(b.dest)
    return {s["id"]: by_date[s["backup_date"]] for s in dest}


# ---- corruption scenarios -----------------------------------------------------------------------

CORRUPT_KINDS = (Kind.PACKS, Kind.INDEX, Kind.SNAPSHOTS, Kind.KEYS, Kind.CONFIG, Kind.LOCKS)
OPERATIONS = ("flip", "truncate", "delete", "swap", "replay")
# The config is one object, never rewritten: nothing to swap it with, no older version to replay.
# The sample repository has one key (a second one would make a damaged key go unnoticed, as
# it should: any key that opens is enough), so no key to swap it with.
NOT_APPLICABLE = frozenset({(Kind.CONFIG, "swap"), (Kind.CONFIG, "replay"), (Kind.KEYS, "swap")})
# Kinds whose every change of bytes (or absence) `check --read-data` must report: it fails,
# or (keys, config) every command refuses the repository with a one-line error. Not locks (they
# hold no data), and not the deletion of a snapshot: snapshots are the roots, nothing refers to
# them, so a deleted one is indistinguishable from a forgotten one.
MUST_DETECT = frozenset({Kind.PACKS, Kind.INDEX, Kind.SNAPSHOTS, Kind.KEYS, Kind.CONFIG})


def must_detect(kind: Kind, operation: str) -> bool:
    return kind in MUST_DETECT and operation != "replay" and not (kind is Kind.SNAPSHOTS and operation == "delete")


def object_file(repo: Path, kind: Kind, name: str) -> Path:
    return repo / object_path(kind, name)


def objects_of(repo: Path, kind: Kind) -> list[str]:
    if kind is Kind.CONFIG:
        return ["config"] if (repo / "config").is_file() else []
    folder = repo / kind.value
    files = folder.rglob("*") if kind is Kind.PACKS else folder.glob("*")
    return sorted(p.name for p in files if p.is_file() and not p.name.startswith("."))


@dataclass
class CorruptionBase:
    """A repository with two snapshots and two stale locks (``full``), and the same repository
    after `key add` + `key remove`, `unlock`, `forget --keep-last 1` and `prune` (``later``),
    whose deleted objects can be replayed from ``history``."""

    base: Base
    full: Path
    later: Path
    history: Path  # every object either of them ever held


def plant_stale_lock(repo: Path) -> None:
    """A lock left by a process that died (a child that takes a lock and exits without releasing)."""
    code = (
        "import os, sys\n"
        "from ibsync.repo.repository import Repository\n"
        "from ibsync.repo.lock import RepoLock\n"
        "from ibsync.storage import LocalStorage\n"
        "r = Repository.open(LocalStorage(sys.argv[1]), lambda: os.environ['IBSYNC_PASSWORD'])\n"
        "RepoLock(r, exclusive=False, command='import').acquire()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(repo)], check=True, env=dict(os.environ))


def build_corruption_base(base: Base) -> CorruptionBase:
    full = base.root / "corrupt-full"
    later = base.root / "corrupt-later"
    shutil.copytree(base.repo, full, symlinks=True)
    plant_stale_lock(full)
    plant_stale_lock(full)  # two, so locks can be swapped
    shutil.copytree(full, later, symlinks=True)
    # a key added, then revoked: what a replay of a key puts back
    with _env(IBSYNC_NEW_PASSWORD="a revoked password"):
        _must(run_inprocess(["key", "add", "--repo", later]))
    keys_before = set(objects_of(full, Kind.KEYS))
    added = [k for k in objects_of(later, Kind.KEYS) if k not in keys_before]
    history = base.root / "corrupt-history"  # full, and the key that is about to be revoked
    shutil.copytree(full, history, symlinks=True)
    shutil.copy2(object_file(later, Kind.KEYS, added[0]), object_file(history, Kind.KEYS, added[0]))
    _must(run_inprocess(["key", "remove", added[0][:12], "--repo", later]))
    _must(run_inprocess(["unlock", "--repo", later]))
    _must(run_inprocess(["forget", "--keep-last", "1", "--repo", later]))
    _must(run_inprocess(["prune", "--repack-threshold", "0", "--repo", later]))
    return CorruptionBase(base, full, later, history)


@dataclass
class CorruptionResult:
    kind: str
    operation: str
    seed: int
    target: str  # what was damaged
    damaged: bool  # bytes under a name differ from what ibsync wrote, or an object is gone
    detected: bool  # check --read-data exited non-zero
    check_errors: list[str]
    restore: dict[str, str]  # snapshot -> verdict
    restore_safe: bool  # no wrong byte, every loss named
    exit_named: bool  # restores that lost something exited non-zero
    repaired: bool | None  # after repair: check passes and survivors restore exactly
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def damage(repo: Path, kind: Kind, operation: str, seed: int, history: Path | None = None) -> tuple[str, bool] | None:
    """Apply one damage; returns (what, whether bytes differ now), or None if it does not apply."""
    rnd = random.Random(f"corrupt:{kind.value}:{operation}:{seed}")
    names = objects_of(repo, kind)
    if operation == "replay":
        assert history is not None
        gone = sorted(set(objects_of(history, kind)) - set(names))
        if not gone:
            return None
        name = rnd.choice(gone)
        dst = object_file(repo, kind, name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(object_file(history, kind, name), dst)
        return f"replayed {kind.value}/{name[:12]}", False
    if not names:
        return None
    name = rnd.choice(names)
    path = object_file(repo, kind, name)
    os.chmod(path, 0o644)
    data = path.read_bytes()
    if operation == "flip":
        raw = bytearray(data)
        if not raw:
            return None
        spots = sorted({rnd.randrange(len(raw)) for _ in range(rnd.randint(1, 3))})
        for i in spots:
            raw[i] ^= 1 << rnd.randrange(8)
        path.write_bytes(bytes(raw))
        return f"flipped {len(spots)} bit(s) in {kind.value}/{name[:12]} at {spots}", True
    if operation == "truncate":
        cut = rnd.randrange(len(data)) if data else 0
        path.write_bytes(data[:cut])
        return f"truncated {kind.value}/{name[:12]} to {cut} of {len(data)} bytes", True
    if operation == "delete":
        path.unlink()
        return f"deleted {kind.value}/{name[:12]}", True
    if operation == "swap":
        others = [n for n in names if n != name and object_file(repo, kind, n).read_bytes() != data]
        if not others:
            return None
        other = rnd.choice(others)
        opath = object_file(repo, kind, other)
        os.chmod(opath, 0o644)
        odata = opath.read_bytes()
        path.write_bytes(odata)
        opath.write_bytes(data)
        return f"swapped {kind.value}/{name[:12]} and {other[:12]}", True
    raise ValueError(operation)


def run_corruption_scenario(
    cb: CorruptionBase, kind: Kind, operation: str, seed: int, work: Path, *, repair: bool = True
) -> CorruptionResult | None:
    source = cb.later if operation == "replay" else cb.full
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = work / "repo"
    shutil.copytree(source, repo, symlinks=True)
    b = cb.base
    with _env(IBSYNC_PASSWORD=os.environ["IBSYNC_PASSWORD"]):
        ids_before = {s["id"] for s in snapshot_list(repo)}
    applied = damage(repo, kind, operation, seed, history=cb.history)
    if applied is None:
        shutil.rmtree(work)
        return None
    what, damaged = applied
    problems: list[str] = []
    c = run_inprocess(["check", "--read-data", "--json", "--repo", repo])
    if not c.well_behaved:
        problems.append(f"check: {c.describe()}")
    try:
        errors = json.loads(c.out)["errors"] if c.out.strip() else [c.err.strip()]
    except ValueError:
        errors = [c.err.strip()]
    detected = c.code != 0
    if must_detect(kind, operation) and not detected:
        problems.append(f"check --read-data did not detect: {what}")

    sources = {i: b.sources[i] for i in ids_before if i in b.sources}
    restore: dict[str, str] = {}
    safe = named = True
    for sid in sorted(ids_before):
        target = work / "restore" / sid[:8]
        r = run_inprocess(["restore", sid, target, "--repo", repo])
        v = verify_restore(target / b.folders["A"].name, b.state_of(sources[sid]), r.err, r.code)
        restore[sid[:8]] = f"exit {r.code}: {v.describe()}"
        if not r.well_behaved:
            problems.append(f"restore {sid[:8]}: {r.describe()}")
        if not v.safe:
            safe = False
            problems.append(f"restore {sid[:8]} after {what}: {v.describe()}")
        if not v.exact and r.code == 0:
            named = False
            problems.append(f"restore {sid[:8]} lost files but exited 0 after {what}")
    repaired = None
    if repair and kind in (Kind.PACKS, Kind.INDEX, Kind.SNAPSHOTS) and detected:
        repaired, why = _repair_and_verify(b, repo, sources, work)
        if not repaired:
            problems.append(f"repair after {what}: {why}")
    if not problems:
        shutil.rmtree(work, ignore_errors=True)
    return CorruptionResult(
        kind.value, operation, seed, what, damaged, detected, errors[:5], restore, safe, named, repaired, problems
    )


def _repair_and_verify(b: Base, repo: Path, sources: dict[str, Path], work: Path) -> tuple[bool, str]:
    """`repair index`, `repair packs --read-data`, `repair snapshots` (the order the README
    gives); then check passes, and every snapshot restores exactly: one that survived as it
    was, one rewritten in place of a damaged original as the original but for the paths the
    repair named as lost (and nothing else: no other snapshot may appear)."""
    steps = [
        run_inprocess([*args, "--repo", repo])
        for args in (["repair", "index"], ["repair", "packs", "--read-data"], ["repair", "snapshots", "--json"])
    ]
    for s in steps:
        if not s.well_behaved or s.code != 0:
            return False, s.describe()
    c = run_inprocess(["check", "--read-data", "--json", "--repo", repo])
    if c.code != 0:
        return False, f"check still fails after repair: {c.out[-800:]}"
    expected: dict[str, tuple[Path, list[str]]] = {sid: (folder, []) for sid, folder in sources.items()}
    for d in json.loads(steps[-1].out):
        if d.get("rewritten_as") and d["id"] in sources:
            expected[d["rewritten_as"]] = (sources[d["id"]], d["lost_files"] + d["lost_folders"])
    for s in snapshot_list(repo):
        if s["id"] not in expected:
            return False, f"snapshot {s['short_id']} after repair is neither a survivor nor a rewrite of one"
        folder, lost = expected[s["id"]]
        target = work / "repaired" / s["short_id"]
        r = run_inprocess(["restore", s["id"], target, "--repo", repo])
        want = {rel: v for rel, v in b.state_of(folder).items() if not _under_any(rel, lost)}
        v = verify_restore(target / folder.name, want, r.err, r.code)
        if r.code != 0 or not v.exact:
            return (
                False,
                f"{'rewritten' if lost else 'survivor'} {s['short_id']} does not restore exactly: {v.describe()}",
            )
    return True, ""


def _under_any(rel: str, paths: list[str]) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in paths)


# ---- tallies ---------------------------------------------------------------------------------


def tally_corruption(results: list[CorruptionResult]) -> list[dict]:
    rows: dict[tuple[str, str], dict] = {}
    for r in results:
        row = rows.setdefault(
            (r.kind, r.operation),
            {
                "kind": r.kind,
                "operation": r.operation,
                "cases": 0,
                "damaged": 0,
                "detected": 0,
                "restore_safe": 0,
                "repair_tried": 0,
                "repaired": 0,
                "problems": 0,
            },
        )
        row["cases"] += 1
        row["damaged"] += r.damaged
        row["detected"] += r.detected
        row["restore_safe"] += r.restore_safe
        row["repair_tried"] += r.repaired is not None
        row["repaired"] += bool(r.repaired)
        row["problems"] += not r.ok
    return [rows[k] for k in sorted(rows)]


def tally_faults(results: list[FaultResult]) -> list[dict]:
    rows: dict[str, dict] = {}
    for r in results:
        row = rows.setdefault(
            r.command, {"command": r.command, "runs": 0, "fault_fired": 0, "failed_run": 0, "invariants_held": 0}
        )
        row["runs"] += 1
        row["fault_fired"] += bool(r.injected)
        row["failed_run"] += r.code != 0
        row["invariants_held"] += r.ok
    return [rows[c] for c in FAULT_COMMANDS if c in rows]


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


Progress = Callable[[str], None]
