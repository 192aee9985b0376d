"""Opening a repository that someone without the password could write: no downgrade to plain
text, no lock-out by one junk object, no hang on planted key parameters (issue 11: 3, 6, 7, 12)."""

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ibsync.errors import StorageError
from ibsync.format.crypto import MasterKey, make_key_file, storage_name
from ibsync.repo.repository import Repository
from ibsync.storage import Kind, LocalStorage

from conftest import FAST_KDF, MIT_BACKUP, PASSWORD, copy_folder, one_line_error, run_subprocess, tree_state

MAX_KEYS_TRIED = 20  # as restic; named in the error
DOWNGRADE = "claims to be unencrypted although a password is set"


@pytest.fixture
def backup(tmp_path):
    return copy_folder(MIT_BACKUP, tmp_path / "sample_backup")


def _packs(repo) -> set[str]:
    return {p.name for p in (repo / "packs").rglob("*") if p.is_file()}


def _downgrade(repo, *, new_id: bool = False) -> None:
    """What a storage attacker without the password does: delete the keys (and what cannot be
    read without them, so that the next import starts afresh), rewrite the config."""
    for kind in ("keys", "index", "snapshots"):
        for obj in (repo / kind).glob("*"):
            obj.unlink()
    config = json.loads((repo / "config").read_text())
    config.pop("mac", None)
    config.update(encryption="none", id_hash="blake3")
    if new_id:
        config["id"] = os.urandom(16).hex()
    (repo / "config").chmod(0o644)
    (repo / "config").write_text(json.dumps(config))


# ---- defect 3: encryption downgrade -------------------------------------------------------------


def test_downgraded_repository_is_refused_when_a_password_is_set(env, cli, backup):
    cli("init")
    cli("import", backup, "--allow-unfinished")
    _downgrade(env)
    shutil.rmtree(env.parent / "cache", ignore_errors=True)  # nothing remembered: the password alone must do
    packs, snaps = _packs(env), os.listdir(env / "snapshots")
    _, err = cli("import", backup, "--allow-unfinished", expect=1)
    one_line_error(err, DOWNGRADE, "tampered")
    assert _packs(env) == packs and os.listdir(env / "snapshots") == snaps


def test_downgrade_refused_without_password_when_remembered(env, cli, backup, monkeypatch):
    cli("init")
    cli("import", backup, "--allow-unfinished")
    _downgrade(env)
    monkeypatch.delenv("IBSYNC_PASSWORD")
    packs = _packs(env)
    _, err = cli("import", backup, "--allow-unfinished", expect=1)
    one_line_error(err, "was encrypted when last opened here", "tampered")
    assert _packs(env) == packs
    # the same with a new id in the rewritten config: the location is remembered too
    _downgrade(env, new_id=True)
    _, err = cli("snapshots", expect=1)
    one_line_error(err, "held encrypted repository", "tampered")
    _, err = cli("import", backup, "--allow-unfinished", expect=1)
    assert _packs(env) == packs


def test_remembered_with_no_object_cache(env, cli, monkeypatch):
    """The memory is kept whether or not the object cache is used."""
    monkeypatch.setenv("IBSYNC_NO_CACHE", "1")
    cli("init")
    cli("snapshots")
    _downgrade(env)
    monkeypatch.delenv("IBSYNC_PASSWORD")
    _, err = cli("snapshots", expect=1)
    one_line_error(err, "was encrypted when last opened here")


def test_copy_refuses_a_downgraded_source_or_target(env, cli, backup, tmp_path, monkeypatch):
    other = tmp_path / "other"
    cli("init")
    cli("import", backup, "--allow-unfinished")
    cli("init", "--repo", other)
    monkeypatch.setenv("IBSYNC_FROM_PASSWORD", PASSWORD)
    _downgrade(other)
    packs = _packs(other)
    _, err = cli("copy", "--from-repo", env, "--repo", other, expect=1)
    one_line_error(err, DOWNGRADE)
    assert _packs(other) == packs
    _, err = cli("copy", "--from-repo", other, "--repo", env, expect=1)
    one_line_error(err, DOWNGRADE)


def test_key_commands_refuse_a_downgrade(env, cli):
    cli("init")
    _downgrade(env)
    _, err = cli("key", "list", expect=1)
    one_line_error(err, DOWNGRADE)


def test_unencrypted_repository_recreated_by_init_is_accepted(env, cli, backup, monkeypatch):
    """The owner replacing an encrypted repository by an unencrypted one here is not an attack."""
    cli("init")
    cli("snapshots")
    shutil.rmtree(env)
    monkeypatch.delenv("IBSYNC_PASSWORD")
    cli("init", "--no-encryption")
    cli("import", backup, "--allow-unfinished")
    out, _ = cli("snapshots")
    assert "1 snapshot(s)" in out


# ---- defect 6: one junk object ------------------------------------------------------------------


def test_junk_snapshot_object_does_not_hide_the_others(env, cli, backup, tmp_path):
    cli("init")
    cli("import", backup, "--allow-unfinished")
    named = os.urandom(300)  # named by its hash, as a real object: only authentication fails
    junk = {storage_name(named): named, "00" * 32: os.urandom(300)}
    for name, data in junk.items():
        (env / "snapshots" / name).write_bytes(data)
    # as a user sees it: the good snapshot listed, exit 0, one warning line per junk object
    r = run_subprocess(["snapshots"], dict(os.environ), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "1 snapshot(s)" in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("ibsync: snapshot object ") for line in lines), r.stderr
    for name in junk:
        assert any(name[:12] in line and line.endswith("'ibsync repair snapshots' removes it") for line in lines), (
            r.stderr
        )
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / backup.name) == tree_state(backup)
    repo = Repository.open(LocalStorage(env), lambda: PASSWORD)
    good, damaged = repo.snapshots_with_damage()
    assert len(good) == 1 and set(damaged) == set(junk)
    assert "authentication failed" in damaged[storage_name(named)]
    assert "does not match its name" in damaged["00" * 32]


def test_malformed_key_files_are_skipped(env, cli, caplog):
    cli("init")
    planted = {
        "00" * 32: b"\xff not json",
        "01" * 32: b"[1, 2]",
        "02" * 32: json.dumps({"version": 1, "kdf": {"name": "argon2id"}}).encode(),
        "03" * 32: json.dumps(
            {
                "version": 1,
                "data": 5,
                "kdf": {"name": "argon2id", "memory_kib": "x", "iterations": 1, "lanes": 1, "salt": "AAAAAAAAAAA="},
            }
        ).encode(),
    }
    for name, data in planted.items():
        (env / "keys" / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        out, _ = cli("snapshots")
    assert "0 snapshot(s)" in out
    for name in planted:
        assert f"key file keys/{name[:8]} skipped: malformed" in caplog.text


def _limited(max_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))

    return apply


def _planted_key(kdf: dict, salt_bytes: int = 16) -> bytes:
    import base64

    return json.dumps(
        {
            "version": 1,
            "kdf": {"name": "argon2id", **kdf, "salt": base64.b64encode(os.urandom(salt_bytes)).decode()},
            "data": base64.b64encode(os.urandom(100)).decode(),
        }
    ).encode()


def test_absurd_kdf_parameters_are_refused_without_deriving(env, cli):
    """In a real process with 2 GiB of address space: before the fix these ran for hours or
    ran out of memory before the real key was tried."""
    cli("init")
    absurd = [
        {"iterations": 1_000_000, "memory_kib": 8192, "lanes": 1},
        {"iterations": 1, "memory_kib": 64 << 20, "lanes": 1},
        {"iterations": 1, "memory_kib": 1 << 16, "lanes": 1 << 20},
    ]
    for i, kdf in enumerate(absurd):
        (env / "keys" / (f"{i:02x}" * 32)).write_bytes(_planted_key(kdf))
    (env / "keys" / ("0a" * 32)).write_bytes(_planted_key({"iterations": 1, "memory_kib": 8192, "lanes": 1}, 1 << 20))
    started = time.monotonic()
    try:
        r = run_subprocess(
            ["snapshots"], dict(os.environ), stdin=subprocess.DEVNULL, timeout=60, preexec_fn=_limited(2 << 30)
        )
    except subprocess.TimeoutExpired:
        pytest.fail("opening derived a planted key with absurd parameters")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 20
    assert "0 snapshot(s)" in r.stdout
    assert r.stderr.count("skipped: malformed") == 4


def test_key_files_tried_are_capped(env, cli, monkeypatch):
    cli("init")
    stranger = MasterKey.generate()
    # well formed, as cheap as the real key, and named before it: keys are tried in name order,
    # and the real key's name is random ("00", "01", ... would let it come 20th in ~8 % of runs)
    for i in range(MAX_KEYS_TRIED + 5):
        (env / "keys" / (f"000000{i:02x}" + "0" * 56)).write_bytes(
            make_key_file(stranger, f"other {i}", meta={}, kdf=FAST_KDF)
        )
    cli("snapshots")  # the key that opened it last time is tried first
    (env.parent / "cache" / "known-repositories.json").unlink(missing_ok=True)
    _, err = cli("snapshots", expect=4)  # a wrong password (ibsync.errors.EXIT_PASSWORD)
    one_line_error(err, f"tries at most {MAX_KEYS_TRIED}")


def test_slow_key_derivation_is_interruptible(env, cli):
    """SIGTERM during the derivation of an expensive key ends the command within a second or
    two, not when the derivation ends (Argon2 holds the GIL: it runs in a child process)."""
    cli("init")
    # within the accepted bounds (256 MiB x 16 passes), about 5-10 s here
    (env / "keys" / ("00" * 32)).write_bytes(_planted_key({"iterations": 16, "memory_kib": 256 << 10, "lanes": 1}))
    e = dict(os.environ, IBSYNC_PASSWORD="not the password")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ibsync", "snapshots"],
        env=e,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # past start-up and the real key, inside the planted key's derivation
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert took < 2.0, f"SIGTERM took {took:.1f} s to end the command"


def test_damaged_index_object_is_skipped_with_advice(env, cli, backup, tmp_path, caplog):
    from ibsync.testing.generator import generate

    cli("init", "--pack-size", "4")
    cli("import", backup, "--allow-unfinished")
    first = set(os.listdir(env / "index"))
    (older,) = os.listdir(env / "snapshots")
    cli("import", generate(tmp_path / "gen", seed=3, size_bytes=1 << 20))
    (victim,) = set(os.listdir(env / "index")) - first
    path = env / "index" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ibsync"):
        cli("restore", older, tmp_path / "out")
    assert f"index object {victim[:12]} skipped" in caplog.text and "ibsync repair index" in caplog.text
    assert tree_state(tmp_path / "out" / backup.name) == tree_state(backup)


# ---- defect 12: a config that is not what it should be ------------------------------------------


@pytest.mark.parametrize("change", ["list", "pack_size", "chunking", "level", "id"])
def test_mistyped_config_is_one_line(env, cli, monkeypatch, change):
    monkeypatch.delenv("IBSYNC_PASSWORD")  # unencrypted: no MAC stands before these fields
    cli("init", "--no-encryption")
    config = json.loads((env / "config").read_text())
    if change == "list":
        config = [config]
    elif change == "pack_size":
        config["pack_size"] = "x"
    elif change == "chunking":
        config["chunking"] = 5
    elif change == "level":
        config["compression"] = {"algorithm": "zstd", "level": [3]}
    else:
        config["id"] = 7
    (env / "config").chmod(0o644)
    (env / "config").write_text(json.dumps(config))
    _, err = cli("snapshots", expect=1)
    one_line_error(err, "unreadable repository config")


# ---- init that fails after writing its key file -------------------------------------------------


class _ConfigWriteFails:
    """Fault injection: the storage fails the config write, as a full disk or a dropped
    connection would; everything else is the real local storage."""

    def __init__(self, storage: LocalStorage) -> None:
        self._storage = storage

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def put(self, kind, name, data, *, exclusive=False):
        if kind is Kind.CONFIG:
            raise StorageError("no space left on device")
        return self._storage.put(kind, name, data, exclusive=exclusive)


def test_failed_init_removes_its_key_file(env, cli):
    storage = LocalStorage(env)
    with pytest.raises(StorageError, match="no space"):
        Repository.init(_ConfigWriteFails(storage), PASSWORD, kdf=FAST_KDF)
    assert list(storage.list(Kind.KEYS)) == []
    assert not storage.exists()
    (env / "packs" / "ab").mkdir(parents=True)  # empty folders of our own are no obstacle
    cli("init")  # the folder is usable again
    # anything else still is: a user's file beside the empty folders
    other = env.parent / "other"
    (other / "keys").mkdir(parents=True)
    (other / "keys" / "notes.txt").write_text("mine")
    _, err = cli("init", "--repo", other, expect=2)
    assert "not empty" in err


@pytest.mark.parametrize(
    "field,value",
    [
        ("device", {"udid": 5}),
        ("device", {"name": "no udid"}),
        ("folder", ["a"]),
        ("folder_mode", "x"),
        ("tree", "00"),
        ("summary", [1]),
    ],
)
def test_snapshot_of_the_wrong_shape_is_skipped_not_a_crash(env, cli, backup, monkeypatch, field, value):
    # Anyone who can write an unencrypted repository writes snapshots: every field is checked once.
    monkeypatch.delenv("IBSYNC_PASSWORD")
    cli("init", "--no-encryption")
    cli("import", "--allow-unfinished", backup)
    (good,) = list((env / "snapshots").iterdir())
    repo = Repository.open(LocalStorage(env), lambda: "")
    doc = json.loads(repo.load_object(Kind.SNAPSHOTS, good.name))
    doc[field] = value
    repo.save_object(Kind.SNAPSHOTS, json.dumps(doc).encode())
    out, err = cli("snapshots", "--json")
    assert [s["id"] for s in json.loads(out)] == [good.name]
    cli("restore", good.name[:8], env.parent / "out")


def test_library_api_refuses_a_downgrade(env, cli):
    from ibsync.capture.api import open_repository
    from ibsync.errors import RepoError

    cli("init")
    _downgrade(env)
    with pytest.raises(RepoError, match="claims to be unencrypted although a password is set"):
        open_repository(env, password=PASSWORD)
