"""Capture against a hostile or faulty device, and the commit it relies on (issue 11, defect 11
and the capture items "found by reading the code").

A device may send malformed DeviceLink messages (missing or mistyped arguments, a non-UTF-8 name,
a message that is not a DeviceLink array), absurd frame lengths, messages out of order, names
that try to leave the backup folder, or nothing at all. Each case: one line, exit status 1, no
traceback, the last snapshot as it was, `check` passes, and the next normal backup succeeds.
"""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ibsync.format.pack import BlobType
from ibsync.repo.repository import Repository
from ibsync.storage import LocalStorage
from ibsync.testing.device import HostileStep, Misbehaviour, SimDevice, Then, run_sim_usbmuxd
from ibsync.testing.generator import generate_content

from conftest import one_line_error, open_repo
from simdevice_fixtures import connect, repo  # noqa: F401  (pytest fixtures)

IDLE = 3  # seconds: the idle timeout the hanging cases run with (IBSYNC_DEVICE_IDLE_TIMEOUT)
# A run that outlives this has hung: before the fix, a silent device or a 4 GiB length did
WALL = 120

# (case, what the device sends, what the one line must say)
HOSTILE = {
    "missing argument": (
        HostileStep(message=("DLMessageCreateDirectory",)),
        ["malformed DLMessageCreateDirectory message", "path (argument 1) is missing"],
    ),
    "path of the wrong type": (
        HostileStep(message=("DLContentsOfDirectory", 42)),
        ["malformed DLContentsOfDirectory message", "an integer, not a string"],
    ),
    "paths of the wrong type": (
        HostileStep(message=("DLMessageRemoveItems", "Snapshot", {}, 0.0)),
        ["malformed DLMessageRemoveItems message", "a string, not an array"],
    ),
    "a move of non-strings": (
        HostileStep(message=("DLMessageMoveItems", {"a": 7}, {}, 0.0)),
        ["malformed DLMessageMoveItems message", "not strings to strings"],
    ),
    "a file name not UTF-8": (
        HostileStep(upload_names=(b"HomeDomain-Library/\xff\xfe.db", b"x/Snapshot/aa/bb")),
        ["malformed DLMessageUploadFiles message", "not UTF-8"],
    ),
    "not a plist": (
        HostileStep(raw_message=b"\x00\x01 not a plist"),
        ["malformed DeviceLink message", "not a valid plist"],
    ),
    "not an array": (
        HostileStep(raw_message=plistlib.dumps({"DLMessageCreateDirectory": "x"})),
        ["malformed DeviceLink message", "a dictionary instead of an array"],
    ),
    "a 4 GiB message length": (
        HostileStep(announce_length=0xFFFFFFF0, then=Then.HANG),
        ["malformed DeviceLink message", "4294967280 bytes long", "16 MiB"],
    ),
    "out of order": (
        HostileStep(message=("DLMessageDeviceReady",)),
        ["malformed DLMessageDeviceReady message", "start of a session"],
    ),
    "a host's message": (
        HostileStep(message=("DLMessageStatusResponse", 0, "x", {})),
        ["malformed DLMessageStatusResponse message"],
    ),
    "a result without an error code": (
        HostileStep(message=("DLMessageProcessMessage", "done")),
        ["malformed DLMessageProcessMessage message", "a string, not a dictionary"],
    ),
    "silence": (HostileStep(then=Then.HANG), [f"the device sent nothing for {IDLE} s"]),
}


# ---- the write session: flush against concurrent save_blob --------------------------------------


def test_flush_is_safe_against_concurrent_save_blob(tmp_path):
    """Threads store blobs while another flushes, round after round (a barrier starts each round,
    no sleeps): nothing raises, and every blob reported as new ends up in an uploaded, indexed
    pack and reads back. Packs are tiny, so the savers ship full packs while flush ships the same
    ones, and the interpreter switches threads as often as it can, so the hand-over is hit."""
    Repository.init(LocalStorage(tmp_path / "r"), None)
    repo = open_repo(tmp_path / "r")
    repo.pack_size = 2048  # two blobs per pack
    savers, rounds, per_round = 3, 150, 10
    start = threading.Barrier(savers + 1)
    stored: list[list[tuple[bytes, bytes]]] = [[] for _ in range(savers)]
    session = repo.write_session()

    def in_rounds(step) -> None:
        try:
            for r in range(rounds):
                start.wait()
                for i in range(per_round):
                    step(r, i)
        except BaseException:
            start.abort()  # the others stop at the barrier instead of waiting for ever
            raise

    def save(k: int) -> None:
        def one(r: int, i: int) -> None:
            data = f"saver {k} round {r} blob {i} ".encode() * 40
            blob_id, new = session.save_blob(BlobType.DATA, data, compress=False)
            assert new
            stored[k].append((blob_id, data))

        in_rounds(one)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(savers + 1) as pool:
            futures = [pool.submit(save, k) for k in range(savers)]
            futures.append(pool.submit(in_rounds, lambda r, i: session.flush()))
            errors = [repr(f.exception()) for f in futures if f.exception() is not None]
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    session.__exit__(None, None, None)

    again = open_repo(tmp_path / "r")
    blobs = [b for per in stored for b in per]
    assert len(blobs) == savers * rounds * per_round
    missing = [bid.hex()[:12] for bid, _ in blobs if not again.index.has(bid)]
    assert missing == [], f"{len(missing)} blobs reported stored are in no indexed pack"
    for bid, data in blobs:
        assert again.load_blob(bid) == data


# ---- a hostile device against `ibsync backup` ----------------------------------------------------


def _backup(env: dict, expect: int) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "ibsync", "backup", "--json"], env=env, capture_output=True, text=True, timeout=WALL
    )
    assert r.returncode == expect, r.stderr
    return r


def _snapshots(cli) -> list[str]:
    out, _ = cli("snapshots", "--json")
    return [s["id"] for s in json.loads(out)]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_device_gets_one_line_and_nothing_changes(case, env, cli, tmp_path):
    step, needles = HOSTILE[case]
    cli("init")
    phone = SimDevice.from_content(generate_content(seed=11, size_bytes=256 << 10))
    with run_sim_usbmuxd([phone], tmp_path / "mux") as mux:
        e = {**os.environ, **mux.env(home=tmp_path / "home"), "IBSYNC_DEVICE_IDLE_TIMEOUT": str(IDLE)}
        _backup(e, 0)
        good = _snapshots(cli)
        phone.misbehave = Misbehaviour(hostile=step)
        r = _backup(e, 7)  # a device problem (ibsync.errors.EXIT_DEVICE)
        one_line_error(r.stderr, *needles, "nothing was committed")
        assert _snapshots(cli) == good
        cli("check")
        phone.misbehave = Misbehaviour()
        _backup(e, 0)
    assert len(_snapshots(cli)) == 2
    cli("check", "--read-data")


# ---- bounded memory, paths out of the folder (the API, in-process) ------------------------------


@pytest.fixture
def phone() -> SimDevice:
    return SimDevice.from_content(generate_content(seed=12, size_bytes=256 << 10))


def test_a_huge_data_frame_is_read_in_pieces(phone, connect, repo):
    """A data frame that announces 4 GiB and carries 160 MiB before the link drops: the host
    streams it into the store in bounded pieces (it buffered the whole frame before)."""
    import tracemalloc

    import ibsync
    from ibsync.capture.backup import CaptureFailed

    lockdown = connect(phone)
    sent = 160 << 20
    phone.misbehave = Misbehaviour(hostile=HostileStep(upload_frame=(0xFFFFFFFF, sent)))
    tracemalloc.start()
    try:
        with pytest.raises(CaptureFailed, match="connection to the device was lost"):
            ibsync.backup_device(lockdown, repo)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, f"{peak >> 20} MiB held for a {sent >> 20} MiB frame"
    assert open_repo(Path(repo)).snapshots() == []
    phone.misbehave = Misbehaviour()
    assert ibsync.backup_device(lockdown, repo).snapshot.snapshot_state == "finished"


def _outside(tmp_path: Path) -> Path:
    return tmp_path / "outside" / "escaped"


@pytest.mark.parametrize("how", ["absolute", "dot-dot"])
def test_an_upload_out_of_the_backup_folder_is_refused(how, phone, connect, repo, cli, tmp_path):
    import ibsync
    from ibsync.capture.backup import CaptureFailed

    lockdown = connect(phone)
    first = ibsync.backup_device(lockdown, repo).snapshot
    target = str(_outside(tmp_path)) if how == "absolute" else f"{phone.udid}/{'../' * 12}{_outside(tmp_path)}"
    phone.misbehave = Misbehaviour(hostile=HostileStep(upload_names=(b"HomeDomain-evil", target.encode())))
    with pytest.raises(CaptureFailed, match="could not read HomeDomain-evil .cannot be placed"):
        ibsync.backup_device(lockdown, repo)
    assert not _outside(tmp_path).parent.exists()
    assert [s.id for s in open_repo(Path(repo)).snapshots()] == [first.id]
    cli("check")


def test_a_move_out_of_the_backup_folder_is_refused(phone, connect, repo, tmp_path):
    """The device asks to move its Status.plist out of the folder: the host answers an error and
    moves nothing; a device that goes on regardless gets its backup committed, intact."""
    import ibsync

    lockdown = connect(phone)
    ibsync.backup_device(lockdown, repo)
    escape = {
        f"{phone.udid}/Status.plist": str(_outside(tmp_path)),
        f"{phone.udid}/Manifest.plist": f"{phone.udid}/../../{_outside(tmp_path)}",
    }
    for src, dst in escape.items():
        phone.misbehave = Misbehaviour(hostile=HostileStep(message=("DLMessageMoveItems", {src: dst}, {}, 0.0)))
        lockdown.log.clear()
        outcome = ibsync.backup_device(lockdown, repo)
        [answer] = lockdown.log.hostile_answers
        assert answer[0] == "DLMessageStatusResponse" and answer[1] != 0, answer
        assert outcome.snapshot.snapshot_state == "finished"
    assert not _outside(tmp_path).parent.exists()


# ---- the commit: an explicit flush, not an incidental one ---------------------------------------


def test_the_commit_flushes_before_it_archives(phone, connect, repo, cli, tmp_path):
    """The snapshot may refer only to indexed blobs. Here no read at commit time flushes by
    chance: the device ends a full backup by putting back the previous backup's Manifest.plist
    and Status.plist (already indexed) and removing Info.plist, so only the explicit flush
    indexes the changed file stored in this run."""
    import ibsync
    from ibsync.testing.device.devicelink import Upload

    lockdown = connect(phone)
    ibsync.backup_device(lockdown, repo)
    folder = tmp_path / "first"
    cli("restore", "latest", folder)
    old = {name: (folder / phone.udid / name).read_bytes() for name in ("Manifest.plist", "Status.plist")}
    row = next(f for f in phone.files.values() if f.data)
    phone.write_file(row.domain, row.relative_path, b"changed after the first backup " * 50)

    def replay_old_metadata(link, root: str) -> None:
        assert link.upload_files([Upload(n, f"{root}/{n}", data) for n, data in old.items()], 100.0).ok
        assert link.remove_items([f"{root}/Info.plist"], 100.0).ok

    phone.misbehave = Misbehaviour(before_finish=replay_old_metadata)
    outcome = ibsync.backup_device(lockdown, repo, full=True)
    assert outcome.snapshot.snapshot_state == "finished"
    cli("check", "--read-data")
    out = tmp_path / "second"
    cli("restore", outcome.snapshot.id[:10], out)
    assert (out / phone.udid / row.file_id[:2] / row.file_id).read_bytes() == b"changed after the first backup " * 50
