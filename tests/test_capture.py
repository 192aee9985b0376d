"""Capture (ibsync's own mobilebackup2 host) against the simulated device, checked against what
pymobiledevice3's own backup() writes for the same device into a plain folder."""

from __future__ import annotations

import asyncio
import os
import plistlib
import tempfile
import threading
from pathlib import Path

import pytest
from pyiosbackup import Backup
from pymobiledevice3.services.mobilebackup2 import Mobilebackup2Service

import ibsync
from ibsync.capture.backup import CaptureFailed
from ibsync.capture.vtree import VirtualTree, VTreeError
from ibsync.errors import UserError
from ibsync.format.chunker import SQLITE_MAGIC, Chunker, default_policy
from ibsync.source.backup_folder import read_backup_folder
from ibsync.testing.device import LegacyMessage, Misbehaviour, PasscodePrompt, SimDevice, SimLockdown
from ibsync.testing.generator import FLAG_FILE, generate_content

from conftest import PASSWORD, open_repo, tree_state
from simdevice_fixtures import FAST_ROUNDS, connect, repo  # noqa: F401  (pytest fixtures)

SEED = 5
SIZE = 1 << 20  # about 300 files, 3.6 MB of payloads, 740 Manifest.db rows
DEVICE_PASSWORD = "device backup password"
# Differ between two backups of the same content, and why: the device dates each backup
# (Manifest.plist and Status.plist Date) and names it (Status.plist UUID); the host writes a
# random GUID into Info.plist.
PER_BACKUP = {"Manifest.plist": {"Date"}, "Status.plist": {"Date", "UUID"}, "Info.plist": {"GUID"}}


@pytest.fixture(scope="module")
def content():
    return generate_content(seed=SEED, size_bytes=SIZE)


@pytest.fixture
def device(content) -> SimDevice:
    return SimDevice.from_content(content)


def pmd3_backup(lockdown: SimLockdown, parent: Path, *, full: bool) -> Path:
    async def run() -> None:
        async with Mobilebackup2Service(lockdown) as service:
            await service.backup(full=full, backup_directory=parent)

    asyncio.run(run())
    return parent / lockdown.udid


def restore(cli, spec: str, out: Path, udid: str) -> Path:
    cli("restore", spec, out)
    return out / udid


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_same_backup(ours: Path, theirs: Path) -> None:
    """Every payload and Manifest.db byte-identical; the plists equal but for what each backup
    dates or names afresh (PER_BACKUP)."""
    a, b = files_of(ours), files_of(theirs)
    assert set(a) == set(b)
    for name in a:
        if name in PER_BACKUP:
            pa, pb = plistlib.loads(a[name]), plistlib.loads(b[name])
            assert {k: v for k, v in pa.items() if k not in PER_BACKUP[name]} == {
                k: v for k, v in pb.items() if k not in PER_BACKUP[name]
            }, name
        else:
            assert a[name] == b[name], name
    assert a["Manifest.db"] == b["Manifest.db"]


def assert_matches_device(folder: Path, device: SimDevice) -> None:
    info = read_backup_folder(folder)
    assert info.snapshot_state == "finished"
    payloads = {p.name: p.read_bytes() for d in folder.iterdir() if d.is_dir() for p in d.iterdir()}
    assert payloads == device.payloads()


def snapshot_ids(path: str) -> list[str]:
    return [s.id for s in open_repo(Path(path)).snapshots()]


def change_add_delete(device: SimDevice) -> tuple[str, str, str]:
    files = sorted((f for f in device.files.values() if f.flags == FLAG_FILE), key=lambda f: f.file_id)
    changed = device.write_file(files[0].domain, files[0].relative_path, b"changed on the device")
    added = device.write_file("HomeDomain", "Library/Notes/ibsync-new.txt", b"a new note")
    device.delete(files[1].domain, files[1].relative_path)
    return changed.file_id, added.file_id, files[1].file_id


# ---- full and incremental backups, against pymobiledevice3's ----------------------------------------


def test_full_backup_restores_as_pymobiledevice3_writes_it(device, connect, repo, cli, tmp_path):
    lockdown = connect(device)
    outcome = ibsync.backup_device(lockdown, repo)
    log = lockdown.log
    assert log.backups == ["full"] and log.operations[-1] == ("Backup", 0)
    assert sorted(log.uploaded_payloads()) == sorted(device.payloads())
    assert outcome.full and outcome.files_received == len(device.payloads()) + 3  # and the three metadata files
    ours = restore(cli, "latest", tmp_path / "ours", device.udid)
    theirs = pmd3_backup(lockdown, tmp_path / "pmd3", full=True)
    assert_same_backup(ours, theirs)
    # the snapshot says what an import of pymobiledevice3's folder would
    snap, info = outcome.snapshot, read_backup_folder(theirs)
    assert (snap.device, snap.ios_encrypted, snap.snapshot_state, snap.folder) == (
        info.device,
        info.ios_encrypted,
        info.snapshot_state,
        theirs.name,
    )
    assert snap.backup_date == read_backup_folder(ours).backup_date
    assert snap.source["kind"] == "device" and snap.summary.files == len(files_of(ours))


def test_incremental_sends_only_changes_and_both_snapshots_restore(device, connect, repo, cli, tmp_path):
    lockdown = connect(device)
    first = ibsync.backup_device(lockdown, repo).snapshot
    one = restore(cli, first.id[:8], tmp_path / "one", device.udid)
    before = tree_state(one)
    theirs = pmd3_backup(lockdown, tmp_path / "pmd3", full=True)

    old = dict(device.files)
    device.next_day(seed=SEED)
    change_add_delete(device)
    changed = {fid for fid, f in device.files.items() if f.flags == FLAG_FILE and old.get(fid) != f}
    lockdown.log.clear()
    outcome = ibsync.backup_device(lockdown, repo)
    log = lockdown.log
    assert log.backups == ["incremental"] and not outcome.full
    assert set(log.uploaded_payloads()) == changed and 5 < len(changed) < len(device.payloads()) // 4
    assert log.downloaded == [
        [f"{device.udid}/Status.plist"],
        [f"{device.udid}/Manifest.plist", f"{device.udid}/Manifest.db"],
    ]
    s = outcome.snapshot.summary
    assert outcome.snapshot.parent == first.id
    assert s.files_unmodified > 0.7 * s.files and s.bytes_read == outcome.bytes_received

    lockdown.log.clear()
    pmd3_backup(lockdown, tmp_path / "pmd3", full=False)
    assert lockdown.log.backups == ["incremental"]
    assert_same_backup(restore(cli, "latest", tmp_path / "two", device.udid), theirs)
    assert tree_state(restore(cli, first.id[:8], tmp_path / "again", device.udid)) == before
    cli("check", "--read-data")


def test_incremental_loads_only_the_folders_it_touches(device, connect, repo, monkeypatch):
    from ibsync.ingest.archiver import Archiver
    from ibsync.repo.repository import Repository

    lockdown = connect(device)
    first = ibsync.backup_device(lockdown, repo).snapshot
    change_add_delete(device)
    loaded: list[bytes] = []
    archiving = []
    load, archive = Repository.load_tree_entries, Archiver.archive

    def load_tree_entries(self, tree_id):
        if not archiving:
            loaded.append(tree_id)
        return load(self, tree_id)

    monkeypatch.setattr(Repository, "load_tree_entries", load_tree_entries)
    monkeypatch.setattr(Archiver, "archive", lambda self, *a, **k: archiving.append(1) or archive(self, *a, **k))
    ibsync.backup_device(lockdown, repo)
    # the device folder and the xx folders of the three files; the snapshot has ~170 folders
    assert first.summary.dirs > 100 and len(set(loaded)) <= 5


def test_encrypted_device_stored_as_is_and_decrypts(device, connect, repo, cli, tmp_path):
    device.encrypted, device.password, device.keybag_rounds = True, DEVICE_PASSWORD, FAST_ROUNDS
    lockdown = connect(device)
    first = ibsync.backup_device(lockdown, repo).snapshot
    assert first.ios_encrypted
    change_add_delete(device)
    lockdown.log.clear()
    ibsync.backup_device(lockdown, repo)
    assert lockdown.log.backups == ["incremental"] and len(lockdown.log.uploaded_payloads()) == 2
    ours = restore(cli, "latest", tmp_path / "ours", device.udid)
    fid = next(iter(device.payloads()))
    assert (ours / fid[:2] / fid).read_bytes() != device.files[fid].data  # ciphertext, as the device sent it
    read = {e.file_id: e.read_bytes() for e in Backup.from_path(ours, DEVICE_PASSWORD).iter_files()}
    assert read == device.payloads()
    # and byte for byte what pymobiledevice3 writes for the same encrypted device
    theirs = pmd3_backup(lockdown, tmp_path / "pmd3", full=True)
    assert_same_backup(ours, theirs)


# ---- misbehaving devices: nothing committed, a clear error, the next run completes ------------------


def test_failed_read_commits_nothing_unless_partial_allowed(device, connect, repo, cli, tmp_path):
    lockdown = connect(device)
    ibsync.backup_device(lockdown, repo)
    good = snapshot_ids(repo)
    target = sorted(device.payloads())[7]
    old_bytes = device.files[target].data
    row = device.files[target]
    device.write_file(row.domain, row.relative_path, b"new version the device cannot read")
    device.misbehave = Misbehaviour(fail_read=frozenset({target}))
    with pytest.raises(CaptureFailed, match=f"could not read {row.domain}-{row.relative_path}"):
        ibsync.backup_device(lockdown, repo)
    assert snapshot_ids(repo) == good

    partial = ibsync.backup_device(lockdown, repo, allow_partial=True)
    assert [f.device_name for f in partial.failed] == [f"{row.domain}-{row.relative_path}"]
    kept = restore(cli, "latest", tmp_path / "partial", device.udid) / target[:2] / target
    assert kept.read_bytes() == old_bytes  # the previous version, not a 0-byte file

    device.misbehave = Misbehaviour()
    lockdown.log.clear()
    ibsync.backup_device(lockdown, repo)
    assert lockdown.log.backups == ["full"]  # after a partial snapshot: the device sends everything again
    assert_matches_device(restore(cli, "latest", tmp_path / "healed", device.udid), device)


def test_failed_read_on_a_first_backup_leaves_no_file(device, connect, repo, cli, tmp_path):
    target = sorted(device.payloads())[3]
    device.misbehave = Misbehaviour(fail_read=frozenset({target}))
    outcome = ibsync.backup_device(connect(device), repo, allow_partial=True)
    assert len(outcome.failed) == 1
    out = restore(cli, "latest", tmp_path / "out", device.udid)
    assert not (out / target[:2] / target).exists()


def test_connection_dropped_mid_upload_keeps_data_for_the_next_run(device, connect, repo, cli, tmp_path):
    lockdown = connect(device)
    ibsync.backup_device(lockdown, repo)
    good = snapshot_ids(repo)
    one = tree_state(restore(cli, "latest", tmp_path / "one", device.udid))
    device.next_day(seed=SEED)
    device.misbehave = Misbehaviour(drop_during_upload=2)
    lockdown.log.clear()
    with pytest.raises(CaptureFailed, match="connection to the device was lost.*already stored are kept"):
        ibsync.backup_device(lockdown, repo)
    assert snapshot_ids(repo) == good
    # what arrived before the drop is indexed: the next run stores it at no cost
    first_sent = lockdown.log.uploaded_payloads()[0]
    r = open_repo(Path(repo))
    data = device.files[first_sent].data
    assert all(r.index.has(r.blob_id(c)) for c in r.chunker.split(data))

    device.misbehave = Misbehaviour()
    ibsync.backup_device(lockdown, repo)
    assert_matches_device(restore(cli, "latest", tmp_path / "two", device.udid), device)
    assert tree_state(restore(cli, good[0][:8], tmp_path / "again", device.udid)) == one


def test_error_code_from_the_device(device, connect, repo, cli, tmp_path):
    lockdown = connect(device)
    device.misbehave = Misbehaviour(final_error=(207, "simulated failure"))
    with pytest.raises(CaptureFailed, match="error 207: simulated failure"):
        ibsync.backup_device(lockdown, repo)
    assert snapshot_ids(repo) == []
    device.misbehave = Misbehaviour(required_free_space=1 << 62)
    with pytest.raises(CaptureFailed, match="not enough free space"):
        ibsync.backup_device(lockdown, repo)
    device.misbehave = Misbehaviour()
    ibsync.backup_device(lockdown, repo)
    assert len(snapshot_ids(repo)) == 1
    assert_matches_device(restore(cli, "latest", tmp_path / "out", device.udid), device)


def test_legacy_messages_are_handled(device, connect, repo, cli, tmp_path):
    lockdown = connect(device)
    legacy = frozenset({LegacyMessage.MOVE_FILES, LegacyMessage.REMOVE_FILES, LegacyMessage.PING})
    device.misbehave = Misbehaviour(legacy_messages=legacy)
    ibsync.backup_device(lockdown, repo)
    change_add_delete(device)
    ibsync.backup_device(lockdown, repo)
    assert {"DLMessageMoveFiles", "DLMessageRemoveFiles", "DLMessagePing"} <= set(lockdown.log.sent)
    assert_matches_device(restore(cli, "latest", tmp_path / "out", device.udid), device)


def test_disconnect_instead_of_a_result_commits_nothing(device, connect, repo, cli, tmp_path):
    lockdown = connect(device)
    device.misbehave = Misbehaviour(legacy_messages=frozenset({LegacyMessage.DISCONNECT}))
    with pytest.raises(CaptureFailed, match="without a result"):
        ibsync.backup_device(lockdown, repo)
    assert snapshot_ids(repo) == []
    device.misbehave = Misbehaviour()
    ibsync.backup_device(lockdown, repo)
    assert_matches_device(restore(cli, "latest", tmp_path / "out", device.udid), device)


def test_passcode_prompt_is_reported(device, connect, repo):
    device.misbehave = Misbehaviour(passcode_prompt=PasscodePrompt())
    lockdown = connect(device)
    said: list[str] = []

    async def scenario():
        task = asyncio.create_task(ibsync.backup_device_async(lockdown, repo, notify=said.append))
        assert await asyncio.to_thread(lockdown.runtime.passcode_prompt_shown.wait, 10)
        for _ in range(100):
            if said:
                break
            await asyncio.sleep(0.05)
        assert not task.done()
        lockdown.enter_passcode()
        return await asyncio.wait_for(task, 30)

    outcome = asyncio.run(scenario())
    assert said and "passcode" in said[0]
    assert outcome.snapshot.snapshot_state == "finished"


# ---- the API ----------------------------------------------------------------------------------------


def test_api_password_option_and_event_loop(device, connect, env, cli, monkeypatch):
    cli("init")
    monkeypatch.delenv("IBSYNC_PASSWORD")
    lockdown = connect(device)
    with pytest.raises(UserError, match="no password"):
        ibsync.backup_device(lockdown, str(env))

    async def inside_a_loop():
        with pytest.raises(UserError, match="backup_device_async"):
            ibsync.backup_device(lockdown, str(env), password=PASSWORD)

    asyncio.run(inside_a_loop())
    assert ibsync.backup_device(lockdown, str(env), password=PASSWORD).snapshot.id


# ---- bounded local disk -----------------------------------------------------------------------------


def test_no_local_copy_of_the_backup(device, connect, cli, env, tmp_path, monkeypatch):
    """A 64 MiB file into a remote (memory://) repository with 4 MiB packs: nothing but staged
    packs is written to the temporary folder, each bounded by a pack, and never more at once
    than the session's bound (connections + 3 packs)."""
    import uuid

    url = f"memory://ibsync-capture-{uuid.uuid4().hex}"
    cli("init", "-r", url, "--pack-size", "4")
    big = os.urandom(64 << 20)
    device.write_file("CameraRollDomain", "Media/DCIM/100APPLE/IMG_0001.MOV", big)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    largest: list[int] = [0]
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = 0
            for p in tmp.rglob("*"):
                try:
                    size = p.stat().st_size
                except OSError:
                    continue
                total += size
                largest[0] = max(largest[0], size)
            peak[0] = max(peak[0], total)
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outcome = ibsync.backup_device(connect(device), url)
    finally:
        done.set()
        sampler.join()
    pack = 4 << 20
    chunk_max = default_policy(0).default.max_size
    assert 0 < largest[0] <= pack + chunk_max + 4096
    assert peak[0] <= (4 + 3) * (pack + chunk_max) < len(big)
    assert list(tmp.iterdir()) == []
    assert outcome.bytes_received > len(big)
    cli("restore", "-r", url, "latest", tmp_path / "out")
    fid = device.file("CameraRollDomain", "Media/DCIM/100APPLE/IMG_0001.MOV").file_id
    assert (tmp_path / "out" / device.udid / fid[:2] / fid).read_bytes() == big


# ---- the parts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 5, 16, 1000, 300 << 10, 9 << 20, 21 << 20])
@pytest.mark.parametrize("sqlite", [False, True])
def test_chunk_stream_cuts_as_split(size, sqlite):
    chunker = Chunker(default_policy(7))
    data = os.urandom(size)
    if sqlite and size >= 16:
        data = SQLITE_MAGIC + data[16:]
    stream = chunker.stream()
    got = []
    for step in range(0, size, 32 << 10):
        got += [bytes(c) for c in stream.feed(data[step : step + (32 << 10)])]
    got += [bytes(c) for c in stream.finish()]
    assert got == [bytes(c) for c in chunker.split(data)]


def test_vtree_operations():
    tree = VirtualTree(None, "UDID", None)  # type: ignore[arg-type]  # no base: no repository needed
    tree.mkdir("UDID/Snapshot/ab")
    tree.put_file("UDID/Snapshot/ab/ab1", 3, ["00" * 32])
    tree.put_file("UDID/Snapshot/ab/ab2", 4, ["11" * 32])
    tree.mkdir("UDID/ab")
    tree.put_file("UDID/ab/ab1", 1, ["22" * 32])
    assert tree.move("UDID/Snapshot/ab/ab1", "UDID/ab/ab1")  # replaces
    assert tree.file("UDID/ab/ab1")["size"] == 3
    assert not tree.move("UDID/Snapshot/ab/missing", "UDID/ab/ab2")  # nothing to move: nothing changes
    tree.copy("UDID/Snapshot", "UDID/Copy")
    assert tree.file("UDID/Copy/ab/ab2")["name"] == "ab2"
    assert tree.remove("UDID/Snapshot") and not tree.remove("UDID/Snapshot")
    assert set(tree.listdir("UDID")) == {"ab", "Copy"}
    assert tree.file("UDID/Copy/ab/ab2")["content"] == ["11" * 32]  # the copy outlives its source
    for bad in ("UDID/../x", "/UDID", "UDID//x", "UDID/./x"):
        with pytest.raises(VTreeError):
            tree.mkdir(bad)
    with pytest.raises(VTreeError) as e:
        tree.file("UDID/ab")
    assert e.value.strerror == os.strerror(21)  # EISDIR
    with pytest.raises(VTreeError):
        tree.move("UDID/ab", "UDID/ab/inside")


def test_download_frames_and_missing_file_answer(tmp_path):
    """What the device gets for DLMessageDownloadFiles: a stored file in frames of at most 32 KiB,
    a missing one as pymobiledevice3 answers it (CODE_ERROR_LOCAL, then Multi status -13 with
    DLFileErrorCode -6 for ENOENT, both as uint64)."""
    import struct

    from ibsync.capture.devicelink import DeviceLinkHost
    from ibsync.capture.store import FileStore
    from ibsync.repo.repository import Repository
    from ibsync.storage import LocalStorage

    repo = Repository.init(LocalStorage(tmp_path / "repo"), None)
    data = os.urandom(100_000)

    class Conn:
        max_frame_size = 1 << 27
        reader = None
        sent = bytearray()

        async def sendall(self, b: bytes) -> None:
            self.sent += b

    async def run() -> bytes:
        conn = Conn()
        with repo.write_session() as session:
            tree = VirtualTree(repo, "U", None, before_read=session.flush)
            tree.put_file("U/Manifest.db", *FileStore(session, repo.chunker).store_bytes(data))
            host = DeviceLinkHost(conn, tree, FileStore(session, repo.chunker), free_space=lambda: 0)  # type: ignore[arg-type]
            await host._download_files(["DLMessageDownloadFiles", ["U/Manifest.db", "U/Status.plist"], {}, 0.0])
        return bytes(conn.sent)

    out = memoryview(asyncio.run(run()))
    pos = 0

    def u32() -> int:
        nonlocal pos
        (v,) = struct.unpack_from(">I", out, pos)
        pos += 4
        return v

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return bytes(out[pos - n : pos])

    assert take(u32()) == b"U/Manifest.db"
    got, sizes = b"", []
    while True:
        size, code = u32(), take(1)[0]
        if code != 0x0C:
            assert (size, code) == (1, 0)
            break
        sizes.append(size - 1)
        got += take(size - 1)
    assert got == data and max(sizes) == 32 * 1024
    assert take(u32()) == b"U/Status.plist"
    size, code = u32(), take(1)[0]
    assert code == 0x06 and take(size - 1) == os.strerror(2).encode()
    assert u32() == 0
    status = plistlib.loads(take(u32()))
    assert status[:3] == ["DLMessageStatusResponse", 2**64 - 13, "Multi status"]
    assert status[3] == {"U/Status.plist": {"DLFileErrorString": os.strerror(2), "DLFileErrorCode": 2**64 - 6}}
    assert pos == len(out)


def test_capture_over_usbmuxd_lockdown_and_tls(device, repo, cli, tmp_path, monkeypatch):
    """The real provider path: pymobiledevice3's usbmux discovery, pairing record, lockdown session and
    TLS services (the simulated usbmuxd), with the provider made inside the loop backup_device runs."""
    from pymobiledevice3.lockdown import create_using_usbmux

    from ibsync.testing.device.lockdownd import make_pair_record
    from ibsync.testing.device.usbmuxd import ENV_VAR, SimUsbmuxd

    with SimUsbmuxd(tmp_path / "mux", [device], tcp=True) as mux:
        monkeypatch.setenv(ENV_VAR, mux.address)
        mux.pair(device.udid, make_pair_record(device, system_buid="SIM-BUID"))
        outcome = ibsync.backup_device(
            lambda: create_using_usbmux(
                serial=device.udid, autopair=False, pairing_records_cache_folder=tmp_path / "pr"
            ),
            repo,
        )
        granted = mux.attachment(device.udid).lockdownd.granted
        errors = mux.all_errors()
    assert errors == [], "\n".join(errors)
    assert ("com.apple.mobilebackup2", True) in granted  # over TLS
    assert outcome.full
    assert_matches_device(restore(cli, "latest", tmp_path / "out", device.udid), device)
