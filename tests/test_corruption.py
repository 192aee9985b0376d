"""Corruption campaign, fast sample (bench/campaign_faults.py runs more seeds): one object of
each kind flipped, truncated, deleted, swapped with another of its kind, or replayed (an object
a later forget/prune/key passwd/unlock deleted, put back).

"Damage" is a change of the bytes stored under a name, or the absence of a named object: for
packs, index objects, snapshots, keys and config, `check --read-data` must detect all of it
(keys and config: every command refuses the repository with one line). Not detected, by design:
a deleted snapshot (snapshots are the roots; nothing refers to them, so it looks forgotten) and
lock damage (locks hold no data). A replay changes no bytes under any name: it is not damage, and
whether it shows depends on what the object refers to (a replayed index naming pruned packs is
reported; a replayed snapshot whose data was pruned is reported; a replayed key or lock is not).

Whatever the damage: restore never writes a wrong byte, names every file it could not restore
and exits non-zero; after `repair index` + `repair snapshots`, check passes and the surviving
snapshots restore exactly."""

from __future__ import annotations

import shutil

import pytest

from ibsync.storage import Kind
from ibsync.testing import campaign

from conftest import PASSWORD


@pytest.fixture(scope="module")
def corruption_base():
    root = campaign.scratch_folder("ibsync-corruption-")
    try:
        with campaign.campaign_settings(root, PASSWORD):
            yield campaign.build_corruption_base(campaign.build_base(root / "base", seed=7))
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cb(corruption_base, monkeypatch):
    monkeypatch.setenv("IBSYNC_PASSWORD", PASSWORD)
    monkeypatch.delenv("IBSYNC_REPO", raising=False)
    return corruption_base


CASES = [
    (k, op) for k in campaign.CORRUPT_KINDS for op in campaign.OPERATIONS if (k, op) not in campaign.NOT_APPLICABLE
]
_results: dict[tuple[str, str], campaign.CorruptionResult] = {}


@pytest.mark.parametrize("kind,operation", CASES, ids=[f"{k.value}-{op}" for k, op in CASES])
def test_damage(cb, kind, operation):
    work = cb.base.root / f"corrupt-{kind.value}-{operation}"
    result = campaign.run_corruption_scenario(cb, kind, operation, 1, work)
    assert result is not None, f"the sample repository has no {kind.value} object to {operation}"
    _results[(kind.value, operation)] = result
    assert result.ok, f"{result.target}:\n" + "\n".join(result.problems)


def test_detection_is_total(cb):
    """Every damage of a kind that must be detected, over several seeds, is detected."""
    missed, total = [], 0
    for kind in (Kind.PACKS, Kind.INDEX, Kind.SNAPSHOTS, Kind.KEYS, Kind.CONFIG):
        for op in ("flip", "truncate", "swap"):
            for seed in (2,):
                work = cb.base.root / f"detect-{kind.value}-{op}-{seed}"
                r = campaign.run_corruption_scenario(cb, kind, op, seed, work, repair=False)
                if r is None:
                    continue
                total += 1
                if not r.detected:
                    missed.append(r.target)
                shutil.rmtree(work, ignore_errors=True)
    assert total >= 12
    assert not missed, f"{len(missed)} of {total} damages not detected: {missed}"
