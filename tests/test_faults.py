"""Fault injection: a storage that fails, truncates, duplicates or drops calls, deterministically
from a seed (ibsync/testing/faulty.py), driving import, restore, copy, forget, prune, check and
repair through every storage call site. After each faulted run, with a clean storage: check
passes (leftovers are warnings), every snapshot restores byte-identical, and the command run
again completes. bench/campaign_faults.py runs the same scenarios with many more seeds."""

from __future__ import annotations

import shutil

import pytest

from ibsync.errors import AlreadyExists, NotFound, StorageError
from ibsync.storage import Kind, LocalStorage
from ibsync.storage.retry import is_transient
from ibsync.testing import campaign
from ibsync.testing.faulty import METHODS, Action, Fault, FaultyStorage, InjectedFault

from conftest import PASSWORD

NAME = "ab" * 32


@pytest.fixture(scope="module")
def fast_root():
    """A scratch folder on tmpfs where there is one: the scenarios create and remove thousands
    of folders, which costs milliseconds each on this machine's disk."""
    root = campaign.scratch_folder("ibsync-faults-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def base(fast_root):
    with campaign.campaign_settings(fast_root, PASSWORD):
        yield campaign.build_base(fast_root / "base", seed=5)


@pytest.fixture
def scenario_env(base, monkeypatch):
    monkeypatch.setenv("IBSYNC_PASSWORD", PASSWORD)
    monkeypatch.setenv("IBSYNC_CACHE_DIR", str(base.root / "cache"))
    monkeypatch.delenv("IBSYNC_REPO", raising=False)
    return base


_calls: dict[str, dict[str, int]] = {}


def calls_of(base, command: str) -> dict[str, int]:
    if command not in _calls:
        _calls[command] = campaign.clean_calls(base, command, base.root / f"calls-{command}")
    return _calls[command]


# ---- the wrapper itself ---------------------------------------------------------------------


def storage(tmp_path, *faults: Fault, seed: int = 0) -> FaultyStorage:
    return FaultyStorage(LocalStorage(tmp_path / "s"), list(faults), seed=seed)


def call_method(s: FaultyStorage, method: str) -> None:
    """One call of ``method`` on ``s`` (an object named NAME exists beforehand)."""
    if method in ("stage", "write", "commit", "abort"):
        staged = s.stage(Kind.PACKS)
        staged.write(b"data")
        if method == "abort":
            staged.abort()
        else:
            staged.commit("cd" * 32)
        return
    calls = {
        "put": lambda: s.put(Kind.INDEX, "ef" * 32, b"x"),
        "get": lambda: s.get(Kind.INDEX, NAME, 1, 2),
        "stat": lambda: s.stat(Kind.INDEX, NAME),
        "list": lambda: s.list(Kind.INDEX),
        "delete": lambda: s.delete(Kind.INDEX, NAME),
        "exists": s.exists,
        "is_empty": s.is_empty,
    }
    calls[method]()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("transient", [True, False])
def test_every_call_site_can_fail(tmp_path, method, transient):
    s = storage(tmp_path, Fault(method, Action.FAIL, transient=transient))
    s.inner.put(Kind.INDEX, NAME, b"index")
    with pytest.raises(InjectedFault) as e:
        call_method(s, method)
    assert isinstance(e.value, StorageError)
    assert is_transient(e.value) is transient  # what the retry layer of a remote backend looks at
    assert [i.call.method for i in s.injected] == [method]
    call_method(s, method)  # times=1: the next call goes through


def test_nth_call_and_probability_are_deterministic(tmp_path):
    s = storage(tmp_path, Fault("put", Action.FAIL, skip=2, times=1))
    outcomes = []
    for i in range(5):
        try:
            s.put(Kind.SNAPSHOTS, f"{i:02x}" * 32, b"x")
            outcomes.append("ok")
        except InjectedFault:
            outcomes.append("fail")
    assert outcomes == ["ok", "ok", "fail", "ok", "ok"]

    def fired(seed: int) -> list[str]:
        st = storage(tmp_path / str(seed), Fault("get", Action.FAIL, probability=0.3, times=None), seed=seed)
        names = [f"{i:02x}" * 32 for i in range(16)]
        for n in names:
            st.inner.put(Kind.INDEX, n, b"y")
        hit = []
        for n in reversed(names):  # the order of calls does not change the decisions
            try:
                st.get(Kind.INDEX, n)
            except InjectedFault:
                hit.append(n)
        return sorted(hit)

    assert fired(1) == fired(1) and 0 < len(fired(1)) < 16
    assert fired(1) != fired(2)


def test_fail_after_does_the_work_and_loses_the_answer(tmp_path):
    s = storage(tmp_path, Fault("put", Action.FAIL_AFTER), Fault("delete", Action.FAIL_AFTER))
    with pytest.raises(InjectedFault):
        s.put(Kind.SNAPSHOTS, NAME, b"landed")
    assert s.get(Kind.SNAPSHOTS, NAME) == b"landed"
    with pytest.raises(InjectedFault):
        s.delete(Kind.SNAPSHOTS, NAME)
    with pytest.raises(NotFound):
        s.get(Kind.SNAPSHOTS, NAME)


def test_duplicate_exclusive_put_reports_already_exists(tmp_path):
    s = storage(tmp_path, Fault("put", Action.DUPLICATE))
    with pytest.raises(AlreadyExists):
        s.put(Kind.CONFIG, "config", [b"{", b"}"], exclusive=True)
    assert s.get(Kind.CONFIG, "config") == b"{}"


def test_truncate_corrupt_drop(tmp_path):
    s = storage(
        tmp_path,
        Fault("put", Action.TRUNCATE),
        Fault("get", Action.CORRUPT),
        Fault("commit", Action.DROP),
        Fault("write", Action.TRUNCATE, skip=1),
    )
    data = bytes(range(200))
    s.put(Kind.INDEX, NAME, data)
    stored = s.inner.get(Kind.INDEX, NAME)
    assert len(stored) < len(data) and data.startswith(stored)
    got = s.get(Kind.INDEX, NAME)
    assert len(got) == len(stored) and got != stored
    staged = s.stage(Kind.PACKS)
    staged.write(b"abc")
    staged.commit("cd" * 32)
    assert list(s.inner.list(Kind.PACKS)) == []  # acknowledged, never stored
    staged = s.stage(Kind.PACKS)
    staged.write(b"first")
    staged.write(b"second")  # the second write of this run is cut short
    staged.commit("ef" * 32)
    assert s.inner.get(Kind.PACKS, "ef" * 32) != b"firstsecond"


def test_delay_runs_something_else_first(tmp_path):
    """A 'slow' call is modelled as another client acting before it, with no sleep."""
    s = storage(tmp_path)
    s.faults.append(Fault("get", Action.DELAY, callback=lambda call: s.inner.delete(Kind.INDEX, NAME)))
    s.inner.put(Kind.INDEX, NAME, b"z")
    with pytest.raises(NotFound):
        s.get(Kind.INDEX, NAME)


def test_rules_refuse_meaningless_actions():
    with pytest.raises(ValueError):
        Fault("stat", Action.TRUNCATE)
    with pytest.raises(ValueError):
        Fault("unknown")


# ---- commands under faults ---------------------------------------------------------------------

SEEDS = {c: (1, 2) for c in campaign.FAULT_COMMANDS}  # more: bench/campaign_faults.py


@pytest.mark.parametrize("command,seed", [(c, s) for c in campaign.FAULT_COMMANDS for s in SEEDS[c]])
def test_command_under_one_fault(scenario_env, command, seed):
    base = scenario_env
    result = campaign.run_fault_scenario(
        base, command, seed, calls_of(base, command), base.root / f"run-{command}-{seed}"
    )
    assert result.injected, f"the fault {result.fault} never fired: the scenario tested nothing"
    assert result.ok, f"{command} with {result.fault} (seed {seed}):\n" + "\n".join(result.problems)


@pytest.mark.parametrize("command", ["repair-index", "repair-snapshots"])
def test_repair_treats_a_read_error_as_a_read_error(scenario_env, command):
    """A pack that could not be read this time (the connection dropped) is not a damaged pack:
    repair must not drop it from the index, nor remove the snapshots that use it."""
    base = scenario_env
    result = campaign.run_fault_scenario(
        base,
        command,
        0,
        {},
        base.root / f"read-error-{command}",
        fault=Fault("get", Action.FAIL, kinds=frozenset({Kind.PACKS}), transient=True),
    )
    assert result.injected
    assert result.ok, "\n".join(result.problems)
