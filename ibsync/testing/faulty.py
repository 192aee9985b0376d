"""A storage that misbehaves on purpose, the same way every time (kopia's
repo/blob/storagetest/faulty_storage.go is the model).

``FaultyStorage(inner, faults, seed=...)`` implements the whole Storage protocol around any
storage (LocalStorage, the servers' backends) and consults its list of :class:`Fault` rules
at every call site: ``put``, ``stage`` and the staged object's ``write``/``commit``/``abort``,
``get`` (ranged), ``stat``, ``list``, ``delete``, ``exists`` and ``is_empty``. A rule names a
method (and optionally object kinds) and what to do to a matching call:

- ``FAIL``: raise before the operation happens (nothing changed);
- ``FAIL_AFTER``: carry the operation out, then raise (the answer was lost: a put that landed,
  a delete that happened, as a dropped connection does after the server acted);
- ``TRUNCATE``: store, or return, only a prefix, and report success;
- ``CORRUPT``: store, or return, the bytes with one of them flipped, and report success;
- ``DUPLICATE``: a put delivered twice; the caller sees the second answer (an exclusive put
  then reports AlreadyExists for an object it wrote itself);
- ``DROP``: report success and do nothing (a storage that loses acknowledged writes or
  deletions: the contract is broken, and what matters is that `check` notices);
- ``DELAY``: run the rule's callback, then the operation. A "slow" call is modelled as
  "something else happens before it": the callback does that something (another command, a
  kill, a clock step) deterministically, with no wall-clock sleep.

Whether a rule fires is deterministic: ``skip`` and ``times`` count matching calls ("fail the
3rd put of an index object": ``skip=2, times=1``), and ``probability`` is decided by a hash of
(seed, rule number, method, kind, name, offset, length, how many times this same call was
made before), never by a shared random stream, so threads calling in another order still get
the same decision for the same object. (Which object a pack-writing thread stages depends on
scheduling, so a multi-threaded import is repeatable only as far as its own call sequence is.)

Errors are StorageError, as a backend raises them once its retries are spent; ``transient``
rules chain a ConnectionResetError (what ``retry.is_transient`` recognises), permanent ones a
PermissionError. ``injected`` records every fault that fired, so a test can show it tested
something.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum

from ..errors import StorageError
from ..storage.base import Kind, ObjectInfo, Properties, Staged, Storage, join_pieces

METHODS = ("put", "stage", "write", "commit", "abort", "get", "stat", "list", "delete", "exists", "is_empty")


class Action(str, Enum):
    FAIL = "fail"
    FAIL_AFTER = "fail_after"
    TRUNCATE = "truncate"
    CORRUPT = "corrupt"
    DUPLICATE = "duplicate"
    DROP = "drop"
    DELAY = "delay"


# Which actions mean something for which method; anything else is refused when the rule is made.
_ALLOWED: dict[str, frozenset[Action]] = {
    "put": frozenset(Action),
    "stage": frozenset({Action.FAIL, Action.DELAY}),
    "write": frozenset({Action.FAIL, Action.TRUNCATE, Action.CORRUPT, Action.DROP, Action.DELAY}),
    "commit": frozenset({Action.FAIL, Action.FAIL_AFTER, Action.DROP, Action.DELAY}),
    "abort": frozenset({Action.FAIL, Action.FAIL_AFTER, Action.DROP, Action.DELAY}),
    "get": frozenset({Action.FAIL, Action.TRUNCATE, Action.CORRUPT, Action.DELAY}),
    "stat": frozenset({Action.FAIL, Action.DELAY}),
    "list": frozenset({Action.FAIL, Action.TRUNCATE, Action.DELAY}),
    "delete": frozenset({Action.FAIL, Action.FAIL_AFTER, Action.DROP, Action.DELAY}),
    "exists": frozenset({Action.FAIL, Action.DELAY}),
    "is_empty": frozenset({Action.FAIL, Action.DELAY}),
}


@dataclass(frozen=True)
class Call:
    """One storage call as a rule sees it."""

    method: str
    kind: Kind | None = None
    name: str | None = None  # None for stage/write/abort (the name is known at commit) and list
    offset: int = 0
    length: int | None = None
    occurrence: int = 0  # how many identical calls came before this one

    def describe(self) -> str:
        where = f" {self.kind.value}/{self.name[:12] if self.name else '*'}" if self.kind else ""
        return f"{self.method}{where}"


@dataclass
class Fault:
    """A rule: do ``action`` to calls of ``method`` (on objects of ``kinds``, if given)."""

    method: str
    action: Action = Action.FAIL
    kinds: frozenset[Kind] | None = None
    probability: float = 1.0
    skip: int = 0  # matching calls let through before the rule may fire
    times: int | None = 1  # how often it fires; None: every matching call after ``skip``
    transient: bool = True  # FAIL/FAIL_AFTER: a connection that dropped, or a refusal
    callback: Callable[[Call], None] | None = None  # DELAY: what happens "meanwhile"; others: called when fired
    matched: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.method not in _ALLOWED:
            raise ValueError(f"unknown storage method {self.method!r}; one of {', '.join(METHODS)}")
        if self.action not in _ALLOWED[self.method]:
            raise ValueError(f"{self.action.value} means nothing for {self.method}")
        if self.kinds is not None:
            self.kinds = frozenset(self.kinds)

    def applies(self, call: Call) -> bool:
        return call.method == self.method and (self.kinds is None or call.kind in self.kinds)


@dataclass(frozen=True)
class Injection:
    """A fault that fired."""

    call: Call
    action: Action

    def describe(self) -> str:
        return f"{self.action.value} {self.call.describe()}"


class InjectedFault(StorageError):
    """What a FAIL or FAIL_AFTER rule raises."""


def chance(*parts: object) -> float:
    """A number in [0, 1) that depends only on ``parts``."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _flip(data: bytes, where: float) -> bytes:
    if not data:
        return data
    i = min(len(data) - 1, int(where * len(data)))
    return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]


def _prefix(data: bytes, where: float) -> bytes:
    return data[: int(where * len(data))]  # always shorter than data, possibly empty


class FaultyStorage:
    """``inner`` with ``faults`` applied; see the module's docstring."""

    def __init__(self, inner: Storage, faults: Sequence[Fault] = (), *, seed: int = 0) -> None:
        self.inner = inner
        self.faults = list(faults)
        self.seed = seed
        self.url = inner.url
        self.properties: Properties = inner.properties
        self.injected: list[Injection] = []
        self.calls: Counter[str] = Counter()
        self.enabled = True  # False lets everything through (a test's clean-up, a re-run)
        self._occurrences: Counter[Call] = Counter()
        self._stage_serial = 0
        self._lock = threading.Lock()

    # ---- deciding ------------------------------------------------------------------------------

    def decide(self, call: Call) -> tuple[Call, Fault | None, float]:
        """The call with its occurrence number, the rule that fires on it (if any), and a
        number in [0, 1) the action uses (where to cut or flip)."""
        with self._lock:
            occurrence = self._occurrences[call]
            self._occurrences[call] += 1
            call = Call(call.method, call.kind, call.name, call.offset, call.length, occurrence)
            self.calls[call.method] += 1
            if not self.enabled:
                return call, None, 0.0
            for number, fault in enumerate(self.faults):
                if not fault.applies(call):
                    continue
                fault.matched += 1
                if fault.matched <= fault.skip or (fault.times is not None and fault.fired >= fault.times):
                    continue
                key = (self.seed, number, call.method, call.kind, call.name, call.offset, call.length, occurrence)
                if fault.probability < 1.0 and chance("fire", *key) >= fault.probability:
                    continue
                fault.fired += 1
                self.injected.append(Injection(call, fault.action))
                return call, fault, chance("where", *key)
        return call, None, 0.0

    def _error(self, call: Call, fault: Fault) -> InjectedFault:
        if fault.transient:
            cause: OSError = ConnectionResetError(104, "connection reset by peer (injected)")
        else:
            cause = PermissionError(13, "permission denied (injected)")
        error = InjectedFault(f"{self.url}: {call.describe()}: {cause.strerror}")
        error.__cause__ = cause
        return error

    def _before(self, call: Call) -> tuple[Call, Fault | None, float]:
        """Decide; run the callback; raise for FAIL. The caller handles the other actions."""
        call, fault, where = self.decide(call)
        if fault is not None:
            if fault.callback is not None:
                fault.callback(call)
            if fault.action is Action.FAIL:
                raise self._error(call, fault)
        return call, fault, where

    def _after(self, call: Call, fault: Fault | None) -> None:
        if fault is not None and fault.action is Action.FAIL_AFTER:
            raise self._error(call, fault)

    # ---- the Storage protocol ------------------------------------------------------------------

    def put(self, kind: Kind, name: str, data: bytes | Sequence[bytes], *, exclusive: bool = False) -> None:
        call, fault, where = self._before(Call("put", kind, name))
        action = fault.action if fault else None
        if action is Action.DROP:
            return
        if action in (Action.TRUNCATE, Action.CORRUPT):
            raw = join_pieces(data)
            data = _prefix(raw, where) if action is Action.TRUNCATE else _flip(raw, where)
        if action is Action.DUPLICATE:
            data = join_pieces(data)  # an iterable of pieces can be consumed only once
            self.inner.put(kind, name, data, exclusive=exclusive)
        self.inner.put(kind, name, data, exclusive=exclusive)
        self._after(call, fault)

    def stage(self, kind: Kind) -> Staged:
        with self._lock:
            self._stage_serial += 1
            serial = self._stage_serial
        self._before(Call("stage", kind, None, serial))
        return FaultyStaged(self, self.inner.stage(kind), kind, serial)

    def get(self, kind: Kind, name: str, offset: int = 0, length: int | None = None) -> bytes:
        call, fault, where = self._before(Call("get", kind, name, offset, length))
        data = self.inner.get(kind, name, offset, length)
        if fault is not None and fault.action is Action.TRUNCATE:
            return _prefix(data, where)
        if fault is not None and fault.action is Action.CORRUPT:
            return _flip(data, where)
        return data

    def stat(self, kind: Kind, name: str) -> ObjectInfo:
        self._before(Call("stat", kind, name))
        return self.inner.stat(kind, name)

    def list(self, kind: Kind) -> Iterator[ObjectInfo]:
        # decided when called (not when iterated): a listing that fails, fails at once
        call, fault, where = self._before(Call("list", kind))
        infos = list(self.inner.list(kind))
        if fault is not None and fault.action is Action.TRUNCATE:
            infos = infos[: int(where * len(infos))]  # a listing that lags behind the writes
        return iter(infos)

    def delete(self, kind: Kind, name: str) -> None:
        call, fault, _ = self._before(Call("delete", kind, name))
        if fault is not None and fault.action is Action.DROP:
            return
        self.inner.delete(kind, name)
        self._after(call, fault)

    def exists(self) -> bool:
        self._before(Call("exists"))
        return self.inner.exists()

    def is_empty(self) -> bool:
        self._before(Call("is_empty"))
        return self.inner.is_empty()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):
        # backend extras some callers look for (``requests`` counters, ``root``)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class FaultyStaged:
    """A staged object whose write, commit and abort go through the rules too."""

    def __init__(self, storage: FaultyStorage, inner: Staged, kind: Kind, serial: int) -> None:
        self.storage = storage
        self.inner = inner
        self.kind = kind
        self.serial = serial
        self.writes = 0
        self.dropped = False

    def write(self, data: bytes | memoryview) -> None:
        self.writes += 1
        # offset stands for "which object, which write": the name is not known before commit
        _, fault, where = self.storage._before(Call("write", self.kind, None, self.serial, self.writes))
        action = fault.action if fault else None
        if action is Action.DROP:
            return
        if action is Action.TRUNCATE:
            data = _prefix(bytes(data), where)
        elif action is Action.CORRUPT:
            data = _flip(bytes(data), where)
        self.inner.write(data)

    def commit(self, name: str) -> None:
        call, fault, _ = self.storage._before(Call("commit", self.kind, name))
        if fault is not None and fault.action is Action.DROP:
            self.inner.abort()
            return
        self.inner.commit(name)
        self.storage._after(call, fault)

    def abort(self) -> None:
        call, fault, _ = self.storage._before(Call("abort", self.kind, None, self.serial))
        if fault is not None and fault.action is Action.DROP:
            return
        self.inner.abort()
        self.storage._after(call, fault)


def random_faults(
    seed: int,
    *,
    rate: float = 0.05,
    methods: Sequence[str] = METHODS,
    actions: Sequence[Action] = (Action.FAIL, Action.FAIL_AFTER),
    times: int | None = 2,
) -> list[Fault]:
    """A seeded mix of rules for a fault campaign: each method gets one rule with an action
    chosen from ``actions`` (among those that mean something for it), firing with ``rate`` at
    most ``times`` times."""
    faults = []
    for method in methods:
        usable = [a for a in actions if a in _ALLOWED[method]]
        if not usable:
            continue
        action = usable[int(chance("action", seed, method) * len(usable))]
        transient = chance("transient", seed, method) < 0.5
        faults.append(Fault(method, action, probability=rate, times=times, transient=transient))
    return faults


# ---- running the real command line with faults (a process of its own, so a lock it leaves
# behind belongs to a dead process, as after a real failure) -----------------------------------

FAULTS_ENV = "IBSYNC_TEST_FAULTS"  # a JSON plan: {"seed": n, "faults": [...], "report": path}


def fault_to_dict(f: Fault) -> dict:
    d = {k: v for k, v in asdict(f).items() if k not in ("callback", "matched", "fired")}
    d["action"] = f.action.value
    d["kinds"] = sorted(k.value for k in f.kinds) if f.kinds is not None else None
    return d


def fault_from_dict(d: dict) -> Fault:
    kinds = d.get("kinds")
    return Fault(
        d["method"],
        Action(d.get("action", "fail")),
        kinds=frozenset(Kind(k) for k in kinds) if kinds is not None else None,
        probability=float(d.get("probability", 1.0)),
        skip=int(d.get("skip", 0)),
        times=d.get("times", 1),
        transient=bool(d.get("transient", True)),
    )


def plan_json(seed: int, faults: Sequence[Fault], report: str) -> str:
    return json.dumps({"seed": seed, "faults": [fault_to_dict(f) for f in faults], "report": report})


def run_cli_with_faults(argv: list[str]) -> int:
    """``ibsync argv`` with every storage it opens wrapped in a FaultyStorage following the plan
    in $IBSYNC_TEST_FAULTS (the rules, and their counters, are shared by all storages the command
    opens: copy opens two). Writes the calls made and the faults that fired to the plan's report."""
    import ibsync.storage as storage_module
    from ibsync.cli import main

    plan = json.loads(os.environ[FAULTS_ENV])
    faults = [fault_from_dict(d) for d in plan["faults"]]
    opened: list[FaultyStorage] = []
    real_open = storage_module.open_storage

    def faulty_open(url, options=None):
        s = FaultyStorage(real_open(url, options), faults, seed=int(plan["seed"]))
        opened.append(s)
        return s

    storage_module.open_storage = faulty_open
    code = 4
    try:
        code = main(argv)
    finally:
        calls: Counter[str] = Counter()
        for s in opened:
            calls.update(s.calls)
        report = {"code": code, "calls": dict(calls), "injected": [i.describe() for s in opened for i in s.injected]}
        with open(plan["report"], "w") as f:
            json.dump(report, f)
    return code


if __name__ == "__main__":
    sys.exit(run_cli_with_faults(sys.argv[1:]))
