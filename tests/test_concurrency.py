"""Four devices backing up into one repository at once, as four processes, while `forget --keep-last 1`
and `prune` are attempted meanwhile; on a local folder, SFTP (OpenSSH) and S3 (SeaweedFS). Nothing is
lost: every import completes (or is refused with exit 3 while prune holds the repository, and then
completes when run again), prune waits its turn (exit 3, "in use") or runs safely, every snapshot left
restores byte-identical to its source, and check --read-data passes at the end. The same with four
simulated devices captured at once through one simulated usbmuxd."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ibsync.storage import open_storage
from ibsync.testing.crash import child_env, digest_difference, run, start, tree_digest
from ibsync.testing.generator import generate, mutate_folder

from conftest import copy_folder
from servers_fixture import configure, server_fixture

seaweedfs_server = server_fixture("seaweedfs")
sshd_server = server_fixture("sshd")

DEVICES = 4
LOCKED = 3  # the exit status of "the repository is in use"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    """Four devices (distinct UDIDs); the first also has an older day, imported before the race."""
    root = tmp_path_factory.mktemp("devices")
    return [generate(root / f"d{i}", seed=40 + i, size_bytes=8 << 20) for i in range(DEVICES)]


@dataclass
class Race:
    """What happened while the imports ran."""

    imports: list[subprocess.CompletedProcess] = field(default_factory=list)
    retried: int = 0
    forget: list[int] = field(default_factory=list)
    prune: list[int] = field(default_factory=list)


def wait_for_a_lock(storage, procs: list[subprocess.Popen], timeout: float = 60.0) -> None:
    """Until some process holds its lock (or all have ended), read through the storage itself."""
    from ibsync.storage import Kind

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(storage.list(Kind.LOCKS)) or all(p.poll() is not None for p in procs):
            return
        time.sleep(0.01)
    raise AssertionError("no process took its lock")


def race(env: dict[str, str], storage, sources: list, argv_of) -> Race:
    """Start one command per source at once; as soon as one holds its lock, start `forget --keep-last 1`
    and a prune beside them, and a second prune a moment later. Imports refused as locked (a prune got
    the repository first) are run again afterwards, as a user would."""
    out = Race()
    procs = [start(argv_of(s), env) for s in sources]
    wait_for_a_lock(storage, procs)
    forget = start(["forget", "--keep-last", "1", "-q"], env)  # a shared lock: runs beside the imports
    prunes = [start(["prune", "--repack-threshold", "0", "-q"], env)]
    time.sleep(0.5)
    prunes.append(start(["prune", "--repack-threshold", "0", "-q"], env))
    _, err = forget.communicate(timeout=600)
    assert forget.returncode in (0, LOCKED), err  # locked only while a prune holds the repository
    out.forget.append(forget.returncode)
    for p in prunes:
        _, err = p.communicate(timeout=600)
        assert p.returncode in (0, LOCKED), err
        if p.returncode == LOCKED:
            assert "in use" in err and "Traceback" not in err, err
        out.prune.append(p.returncode)
    for source, p in zip(sources, procs):
        stdout, stderr = p.communicate(timeout=600)
        result = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        if p.returncode == LOCKED:  # refused because a prune held the repository: the user runs it again
            assert "in use" in stderr, stderr
            out.retried += 1
            result = run(argv_of(source), env)
        assert result.returncode == 0, (
            f"{' '.join(map(str, argv_of(source)))}: exit {result.returncode}: {result.stderr}"
        )
        out.imports.append(result)
    # the point of the test: prune and the imports met (one of them was refused), not ran one after the other
    assert LOCKED in out.prune or out.retried or LOCKED in out.forget, f"no overlap: {out}"
    return out


def assert_every_snapshot_restores(
    env: dict[str, str], expected: dict[str, Path], work: Path, older: dict[tuple[str, str], Path] | None = None
) -> None:
    """Each device's latest snapshot is there and restores byte-identical; so does any older one left."""
    snaps = json.loads(run(["snapshots", "--json"], env).stdout)
    latest = {}
    for s in snaps:
        latest[s["device"]["udid"]] = s  # oldest backup first
    assert set(latest) == set(expected), f"devices with snapshots: {sorted(latest)}, expected {sorted(expected)}"
    for s in snaps:
        udid = s["device"]["udid"]
        source = expected[udid] if s is latest[udid] else (older or {}).get((udid, s["backup_date"]))
        assert source is not None, f"unexpected snapshot {s['short_id']} of {udid}"
        out = work / f"restored-{s['short_id']}"
        r = run(["restore", s["id"], out], env)
        assert r.returncode == 0, r.stderr
        diff = digest_difference(tree_digest(source), tree_digest(out / source.name))
        assert diff is None, f"snapshot {s['short_id']} of {udid}: {diff}"


def new_repository(request, kind: str, env: Path, cli, tmp_path: Path, monkeypatch, name: str) -> tuple[str, dict]:
    """An initialised repository (4 MiB packs) on ``kind`` ("local" or a server fixture's name),
    named ``name`` in a config file for servers and set as IBSYNC_REPO; its URL and options."""
    if kind == "local":
        url, options, repo = str(env), {}, str(env)
    else:
        server = request.getfixturevalue(f"{kind}_server")
        url, options = server.new_url(name), server.options
        configure(tmp_path, monkeypatch, server, name, url)
        repo = name
    monkeypatch.setenv("IBSYNC_REPO", repo)
    cli("init", "--pack-size", "4")
    return url, options


def udid_of(folder: Path) -> str:
    return folder.name.upper()


@pytest.mark.parametrize("kind", ["local", "sshd", "seaweedfs"])
def test_four_imports_with_forget_and_prune_meanwhile(request, kind, folders, env, cli, tmp_path, monkeypatch):
    url, options = new_repository(request, kind, env, cli, tmp_path, monkeypatch, "shared")
    # device 0 has an older day already in the repository: forget --keep-last 1 has something to remove
    day2 = copy_folder(folders[0], tmp_path / "day2" / folders[0].name)
    mutate_folder(day2, seed=40)
    cli("import", folders[0], "-q")
    older = {(udid_of(folders[0]), json.loads(cli("snapshots", "--json")[0])[0]["backup_date"]): folders[0]}
    sources = [day2, *folders[1:]]

    e = child_env(dict(os.environ))
    outcome = race(e, open_storage(url, options), sources, lambda s: ["import", s, "-q"])

    # a last prune when nothing runs must proceed, then everything checks and restores
    r = run(["prune", "--repack-threshold", "0", "-q"], e)
    assert r.returncode == 0, r.stderr
    r = run(["check", "--read-data", "--json"], e)
    assert r.returncode == 0 and json.loads(r.stdout)["errors"] == [], r.stdout + r.stderr
    assert_every_snapshot_restores(e, {udid_of(s): s for s in sources}, tmp_path, older)
    print(f"{kind}: forget exits {outcome.forget}, prune exits {outcome.prune}, imports run again {outcome.retried}")


def test_four_captures_at_once_with_forget_and_prune_meanwhile(env, cli, tmp_path):
    """The simulated usbmuxd serves several devices: four `ibsync backup --device X` run at once."""
    from ibsync.testing.crash_scenarios import device_verifier
    from ibsync.testing.device import SimDevice, run_sim_usbmuxd
    from ibsync.testing.generator import generate_content

    cli("init", "--pack-size", "4")
    phones = [
        SimDevice.from_content(
            generate_content(seed=50 + i, size_bytes=3 << 20, udid=f"{i + 1:x}" * 40, device_name=f"Phone {i}")
        )
        for i in range(DEVICES)
    ]
    with run_sim_usbmuxd(phones, tmp_path / "mux") as mux:
        e = child_env(dict(os.environ), **mux.env(home=tmp_path / "home"))
        first = run(["backup", "--device", phones[0].udid, "-q"], e)  # an older snapshot for forget to remove
        assert first.returncode == 0, first.stderr
        phones[0].write_file("HomeDomain", "Library/Notes/second.txt", b"the second day")
        outcome = race(e, open_storage(str(env)), phones, lambda p: ["backup", "--device", p.udid, "-q"])
    r = run(["prune", "-q"], e)
    assert r.returncode == 0, r.stderr
    r = run(["check", "--read-data", "--json"], e)
    assert r.returncode == 0 and json.loads(r.stdout)["errors"] == [], r.stdout + r.stderr
    snaps = json.loads(run(["snapshots", "--json"], e).stdout)
    latest = {s["device"]["udid"].lower(): s for s in snaps}
    assert set(latest) == {p.udid.lower() for p in phones}
    for p in phones:
        out = tmp_path / f"restored-{p.udid[:4]}"
        r = run(["restore", latest[p.udid.lower()]["id"], out], e)
        assert r.returncode == 0, r.stderr
        problem = device_verifier(p)(next(out.iterdir()))
        assert problem is None, f"{p.udid}: {problem}"
    print(f"captures: forget exits {outcome.forget}, prune exits {outcome.prune}, run again {outcome.retried}")


@pytest.mark.parametrize("kind", ["local", "sshd", "seaweedfs"])
def test_prune_never_runs_while_an_import_holds_its_lock(request, kind, folders, env, cli, tmp_path, monkeypatch):
    """The strict form of the race above: once an import's lock is visible in the storage, a prune
    started then must refuse (exit 3), on every backend; the import is frozen (SIGSTOP) meanwhile so
    it cannot finish first and make the refusal a matter of luck."""
    import signal

    from ibsync.storage import Kind

    url, options = new_repository(request, kind, env, cli, tmp_path, monkeypatch, "strict")
    e = child_env(dict(os.environ))
    storage = open_storage(url, options)
    proc = start(["import", folders[1], "-q"], e)
    try:
        wait_for_a_lock(storage, [proc])
        assert proc.poll() is None, "the import ended before its lock could be seen"
        os.kill(proc.pid, signal.SIGSTOP)
        assert list(storage.list(Kind.LOCKS))
        r = run(["prune", "--repack-threshold", "0"], e)
        assert r.returncode == LOCKED and "in use" in r.stderr, (r.returncode, r.stderr)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    cli("check", "--read-data")
