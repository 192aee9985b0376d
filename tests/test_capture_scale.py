"""Capture at scale: a simulated phone of tens of thousands of generated files (its payloads made
on demand, not held) captured in full, captured again the next day, and restored onto a blank
device byte for byte; the fast DeviceLink paths (a whole small file parsed from the input buffer,
binary plists read without plistlib) checked against the slow ones they stand in for."""

from __future__ import annotations

import json
import math
import os
import plistlib
import random
import subprocess
import sys
import tracemalloc

import pytest

import ibsync
from ibsync.capture import bplist
from ibsync.capture.vtree import VirtualTree
from ibsync.testing.device import SimDevice, run_sim_usbmuxd
from ibsync.testing.device.model import GeneratedPayloads
from ibsync.testing.generator import FLAG_FILE

from conftest import ibsync_peak_rss
from simdevice_fixtures import connect, repo  # noqa: F401  (pytest fixtures)

FILES = 25_000  # about 15 s on the 2-core VM
SEED = 7


def generated_device(udid: str, files: int, *, max_size: int = 2048) -> SimDevice:
    device = SimDevice(udid=udid, name="Scale iPhone", generated=GeneratedPayloads(SEED))
    device.add_generated_files(files, seed=SEED, min_size=64, max_size=max_size)
    return device


def payload_ids(device: SimDevice) -> set[str]:
    return {fid for fid, f in device.files.items() if f.flags == FLAG_FILE}


def test_generated_phone_full_incremental_and_restored_byte_for_byte(connect, repo):
    device = generated_device("00008120-5CA1E0000000000A", FILES)
    lockdown = connect(device)

    first = ibsync.backup_device(lockdown, repo)
    assert first.full and first.files_received == FILES + 3  # the payloads, Manifest.plist/.db, Status.plist
    assert not first.failed

    change = device.change_generated(0.005, seed=SEED)
    assert change["changed"] + change["deleted"] >= 0.005 * FILES - 1 and change["added"] > 0
    before = set(lockdown.log.uploaded_payloads())
    assert len(before) == FILES
    lockdown.log.clear()
    second = ibsync.backup_device(lockdown, repo)
    assert not second.full and second.snapshot.parent == first.snapshot.id
    # only what changed came over the link: the rewritten and the new files (and the metadata)
    sent = lockdown.log.uploaded_payloads()
    assert len(sent) == change["changed"] + change["added"] == second.files_received - 3
    assert set(sent) <= payload_ids(device)
    assert len(set(sent) - before) == change["added"]
    assert second.snapshot.summary.files == len(payload_ids(device)) + 4  # + Info.plist, Manifest.*, Status.plist

    # onto a blank device that can make the same payloads: a row keeps no bytes only when the bytes
    # restored are exactly the generated ones, so equal rows mean equal payloads
    blank = SimDevice(udid="00008120-5CA1E0000000000B", generated=device.generated)
    outcome = ibsync.restore_to_device(connect(blank), repo, "latest")
    assert outcome.files_sent == len(payload_ids(device)) + 3
    assert blank.files == device.files
    assert all(f.data is None for f in blank.files.values() if f.flags == FLAG_FILE)


def test_restore_keeps_bytes_that_differ_from_the_generated_ones():
    """The check above can fail: a payload that is not the generated one stays as bytes."""
    device = generated_device("00008120-5CA1E0000000000C", 3)
    row = next(f for f in device.files.values() if f.flags == FLAG_FILE)
    good = device.payload(row)
    assert device.kept(row, good) == row and device.kept(row, good).data is None
    bad = bytes([good[0] ^ 1]) + good[1:]
    assert device.kept(row, bad).data == bad and device.kept(row, bad) != row


# ---- the binary plist reader ---------------------------------------------------------------------------


def _value(rnd: random.Random, depth: int = 0):
    kinds = ["str", "ustr", "int", "float", "bool", "bytes", "none"] + (["list", "dict"] if depth < 4 else [])
    kind = rnd.choice(kinds)
    if kind == "str":
        return "".join(rnd.choice("abc/XYZ-_.0123456789") for _ in range(rnd.choice([0, 3, 14, 15, 16, 90, 300])))
    if kind == "ustr":
        return "".join(rnd.choice("aé/日本\u00ff\U0001f600") for _ in range(rnd.randint(0, 40)))
    if kind == "int":
        return rnd.choice([0, 1, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**63), 2**64 - 13])
    if kind == "float":
        return rnd.choice([0.0, -1.5, 12.5, 1e300, math.inf])
    if kind == "bool":
        return rnd.random() < 0.5
    if kind == "bytes":
        return rnd.randbytes(rnd.choice([0, 5, 15, 16, 300]))
    if kind == "none":
        return ""  # plistlib does not write None; an empty string stands in
    if kind == "list":
        return [_value(rnd, depth + 1) for _ in range(rnd.randint(0, 20))]
    return {_value_key(rnd): _value(rnd, depth + 1) for _ in range(rnd.randint(0, 20))}


def _value_key(rnd: random.Random) -> str:
    return "".join(rnd.choice("abcdef/0123456789") for _ in range(rnd.randint(1, 70)))


def _outcome(fn, data: bytes):
    try:
        return "ok", repr(fn(data))
    except Exception as e:  # noqa: BLE001 - the kind of failure is what is compared
        return "error", type(e).__name__


def test_bplist_reads_what_plistlib_reads():
    rnd = random.Random(3)
    messages = [
        plistlib.dumps(
            ["DLMessageMoveItems", {f"U/Snapshot/{i:02x}/{'a' * 40}": f"U/{i:02x}/{'a' * 40}"}, {}, 12.5],
            fmt=plistlib.FMT_BINARY,
        )
        for i in range(3)
    ]
    messages += [
        plistlib.dumps([_value(rnd) for _ in range(rnd.randint(1, 6))], fmt=plistlib.FMT_BINARY) for _ in range(400)
    ]
    for data in messages:
        assert bplist.loads(data) == plistlib.loads(data)
        assert repr(bplist.loads(data)) == repr(plistlib.loads(data))


def test_bplist_damaged_input_gives_what_plistlib_gives():
    """Totality: on any bytes the fast reader either agrees with plistlib or hands over to it, so
    a damaged message is accepted or refused exactly as before."""
    rnd = random.Random(4)
    seeds = [
        plistlib.dumps([_value(rnd) for _ in range(rnd.randint(1, 4))], fmt=plistlib.FMT_BINARY) for _ in range(150)
    ]
    checked = 0
    for data in seeds:
        for _ in range(20):
            damaged = bytearray(data)
            for _ in range(rnd.randint(1, 4)):
                damaged[rnd.randrange(len(damaged))] = rnd.randrange(256)
            if rnd.random() < 0.2:
                damaged = damaged[: rnd.randrange(8, len(damaged) + 1)]
            damaged = bytes(damaged)
            assert _outcome(bplist.loads, damaged) == _outcome(plistlib.loads, damaged), damaged.hex()
            checked += 1
    assert checked == 3000


# ---- the virtual folder's memory per received file ---------------------------------------------------------

OVERLAY_FILES = 20_000
# Measured 195 bytes a file (record, fileID key as 20 bytes, dict slot); an entry dict with hex ids
# cost about 700. The bound sits between, with room for the dict's growth steps.
OVERLAY_BYTES_PER_FILE = 350


def _file_id(i: int) -> str:
    return f"{i:040x}"[::-1]  # 40 lowercase hex digits, spread over the xx folders as fileIDs are


def test_received_files_are_held_compactly():
    """A full backup's traffic (each file put into Snapshot/xx, then moved into xx): the overlay
    grows by a bounded number of bytes a file, measured with tracemalloc on the real VirtualTree."""
    tree = VirtualTree(None, "U", None, clock=lambda: 1_700_000_000_000_000_000)  # type: ignore[arg-type]
    ids = [_file_id(i) for i in range(OVERLAY_FILES)]
    contents = [[bytes([i & 0xFF, i >> 8 & 0xFF]).hex() * 16] for i in range(OVERLAY_FILES)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, fid in enumerate(ids):
            tree.put_file(f"U/Snapshot/{fid[:2]}/{fid}", 1000 + i, contents[i])
            assert tree.move(f"U/Snapshot/{fid[:2]}/{fid}", f"U/{fid[:2]}/{fid}")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown / OVERLAY_FILES < OVERLAY_BYTES_PER_FILE, f"{grown / OVERLAY_FILES:.0f} bytes a file"
    entry = tree.file(f"U/{ids[7][:2]}/{ids[7]}")
    assert entry == {
        "name": ids[7],
        "type": "file",
        "mode": 0o100644,
        "mtime_ns": 1_700_000_000_000_000_000,
        "size": 1007,
        "content": contents[7],
    }


def test_compact_names_and_records_read_back_as_entries():
    """Names kept as raw bytes (fileIDs) and as they are (anything else, including upper-case and
    spaced hex that would not survive the round trip) list, read, move and scan as given."""
    tree = VirtualTree(None, "U", None)  # type: ignore[arg-type]
    names = ["ab" * 20, "AB" * 20, " " + "ab" * 19 + "a", "ab" * 19 + "a ", "Manifest.db", "ab" * 21, "ab" * 19]
    for i, name in enumerate(names):
        tree.put_file(f"U/f/{name}", i, [f"{i:064x}"])
    assert sorted(tree.listdir("U/f")) == sorted(names)
    for i, name in enumerate(names):
        assert tree.file(f"U/f/{name}")["content"] == [f"{i:064x}"]
        assert tree.file(f"U/f/{name}")["name"] == name
    scanned = {e.name: e for e in tree.source({}).scan("f")}
    assert sorted(scanned) == sorted(names)
    assert all(scanned[n].size == i and scanned[n].content == [f"{i:064x}"] for i, n in enumerate(names))
    assert tree.move(f"U/f/{names[0]}", f"U/g/{names[1]}")  # a fileID key renamed to a plain name
    assert tree.file(f"U/g/{names[1]}")["name"] == names[1] and tree.file(f"U/g/{names[1]}")["size"] == 0
    assert not tree.remove(f"U/f/{names[0]}") and tree.remove(f"U/f/{names[1]}")
    assert sorted(tree.listdir("U/f")) == sorted(names[2:])
    tree.put_file("U/raw", 5, bytes(range(32)) * 2)  # FileStore's form: raw ids joined
    assert tree.file("U/raw")["content"] == [bytes(range(32)).hex()] * 2
    with pytest.raises(ValueError):
        tree.put_file("U/bad", 5, b"\0" * 33)


# ---- memory at a larger size -------------------------------------------------------------------------------

LARGE_FILES = 100_000
# The host process: about 100 MiB of interpreter, imports and pack buffers, plus per file the
# virtual folder's record, the index entry of its blob and the open pack's list of blobs (small
# files: tens of thousands a pack). Measured at this size (files of 64 B - 1 KiB): 174 MiB, and
# 228 MiB when each file was held as an entry dict with hex ids; 1 KiB a file is the loose bound.
RSS_LIMIT = (100 << 20) + LARGE_FILES * 1024


@pytest.mark.slow
def test_capture_of_a_large_phone_stays_within_memory(tmp_path, env):
    """``ibsync backup`` of 100,000 files in its own process (the device served over the simulated
    usbmuxd by this one), peak RSS under a generous limit, every file received."""
    device = generated_device("00008120-5CA1E0000000000D", LARGE_FILES, max_size=1024)
    child_env = {k: v for k, v in os.environ.items()}
    with run_sim_usbmuxd([device], tmp_path / "mux") as mux:
        child_env.update(mux.env(home=tmp_path / "home"))
        init = subprocess.run([sys.executable, "-m", "ibsync", "init"], env=child_env, capture_output=True)
        assert init.returncode == 0, init.stderr
        r, peak = ibsync_peak_rss(
            ["backup", "--device", device.udid, "--json", "--quiet"],
            child_env,
            tmp_path,
            capture_output=True,
            text=True,
        )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)["snapshots"][0]
    assert report["files_received"] == LARGE_FILES + 3
    assert peak < RSS_LIMIT, f"peak RSS {peak >> 20} MiB"
