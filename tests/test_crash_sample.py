"""The crash campaign's fast sample: every command that writes to a repository (and restore), run as a
real process and SIGKILLed twice, once at a random time within its measured duration and once right
after a watched event (a pack, index, snapshot, key or lock object appearing or going). After each kill:
check finds no error, every snapshot committed before restores byte-identical, the command's own promise
holds (passwords), and running it again completes. The long campaign is ``python bench/campaign.py``
(docs/campaign.md); its shared logic is ibsync/testing/crash.py.

A failure names the command, the kill instant and the seed: ``IBSYNC_CRASH_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import os

import pytest

from ibsync.testing.crash import Backend, measure, run_trial
from ibsync.testing.crash_extras import MountFailed, disk_full, frozen_import, restore_into_full_disk
from ibsync.testing.crash_scenarios import COMMANDS, Lab, Sizes, describe_failure

SEED = int(os.environ.get("IBSYNC_CRASH_SEED", "1"))
KILLS = 2  # trial 0: a random time; trial 1: a watched event


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("crash")
    with Lab(work, Backend("local", work), Sizes(a=4, b=8, device_p=2, device_q=6)) as lab:
        yield lab


@pytest.mark.parametrize("command", COMMANDS)
def test_kill_leaves_a_valid_repository_and_the_rerun_completes(lab, command):
    scenario = lab.scenario(command)
    work = lab.work / command
    duration = measure(scenario, work, runs=1)
    outcomes = [run_trial(scenario, "local", SEED, n, work, duration, event_kills=True) for n in range(KILLS)]
    failures = [describe_failure(o) for o in outcomes if o.problems]
    assert not failures, "\n".join(failures)
    assert any(o.killed for o in outcomes), f"{command} ended before every kill: {[o.kill for o in outcomes]}"
    assert all(o.snapshots_verified >= 1 for o in outcomes), "no snapshot was restored and compared"


@pytest.fixture(scope="module")
def small_and_big(tmp_path_factory):
    from ibsync.testing.generator import generate

    root = tmp_path_factory.mktemp("extra-sources")
    return generate(root / "small", seed=61, size_bytes=4 << 20), generate(root / "big", seed=62, size_bytes=16 << 20)


def mounted(run_round):
    """Run a round that mounts tmpfs: skipped where mount is refused (not root), failed on CI (root there)."""
    try:
        return run_round()
    except MountFailed as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (CI runs as root: the tmpfs must mount)", pytrace=False)
        pytest.skip(str(e))


def test_import_on_a_full_disk_fails_in_one_line_keeps_the_repository_and_completes_after(small_and_big, tmp_path):
    """A 12 MiB tmpfs holds the repository: importing 16 MiB more fails with one line naming the full disk,
    the earlier snapshot restores, and after the filesystem grows the import completes."""
    small, big = small_and_big
    outcome = mounted(lambda: disk_full(tmp_path, small, big, seed=SEED, space_mib=12))
    assert outcome.ok, "\n".join(outcome.problems) + f"\n{outcome.details}"
    assert outcome.details["import_exit"] == 1 and outcome.details["rerun_exit"] == 0


def test_restore_into_a_full_disk_fails_in_one_line(small_and_big, tmp_path):
    """A restore into a 2 MiB tmpfs stops with one `ibsync: error:` line saying the disk is full, not a line
    per file and not a traceback."""
    small, _ = small_and_big
    outcome = mounted(lambda: restore_into_full_disk(tmp_path, small, seed=SEED))
    assert outcome.ok, "\n".join(outcome.problems) + f"\n{outcome.details}"


def test_import_frozen_past_lock_staleness_commits_nothing_after_prune(small_and_big, tmp_path):
    """SIGSTOP an import after it stored a pack, move the clocks 31 minutes on (ShiftedClock), let a prune
    delete the import's unindexed packs, SIGCONT: the import stops with LockLost, nothing refers to
    pruned data, and a new import completes."""
    small, big = small_and_big
    outcome = frozen_import(tmp_path, small, big, seed=SEED)
    assert outcome.ok, "\n".join(outcome.problems) + f"\n{outcome.details}"
    assert outcome.details["prune_deleted_packs"] > 0 and outcome.details["import_exit"] == 1
