"""The real storage servers: each starts, serves its URL and options through plain fsspec, stops and restarts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec
import pytest

from ibsync.testing import servers
from ibsync.testing.servers import STARTERS, Server, ServerUnavailable, port_open

from servers_fixture import server_fixture, start_or_skip, unavailable

sshd_server = server_fixture("sshd")


def client(server: Server, url: str) -> tuple[Any, str]:
    """A new fsspec filesystem and path for ``url``, built from the server's options as ibsync's config gives them."""
    if url.startswith("webdav+"):
        from webdav4.fsspec import WebdavFileSystem

        parts = urlsplit(url.removeprefix("webdav+"))
        # webdav4 wants the host in base_url and auth as a tuple (httpx rejects the list JSON gives).
        options = {**server.options, "auth": tuple(server.options["auth"])}
        fs = WebdavFileSystem(base_url=f"{parts.scheme}://{parts.netloc}", skip_instance_cache=True, **options)
        return fs, parts.path.lstrip("/")
    return fsspec.core.url_to_fs(url, skip_instance_cache=True, **server.options)


def names(fs: Any, path: str) -> set[str]:
    fs.invalidate_cache()
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}


@pytest.mark.parametrize("kind", list(STARTERS))
def test_round_trip_stop_and_restart(kind: str, tmp_path: Path) -> None:
    with start_or_skip(kind, tmp_path) as server:
        url = server.new_url("round-trip")
        assert url.startswith(server.root + "/")
        fs, path = client(server, url)
        fs.makedirs(path, exist_ok=True)  # SMB and paramiko SFTP need the folder; object stores ignore it
        fs.pipe_file(f"{path}/kept", b"kept bytes")
        fs.pipe_file(f"{path}/gone", b"gone bytes")
        assert fs.cat_file(f"{path}/kept") == b"kept bytes"
        assert names(fs, path) == {"kept", "gone"}
        fs.rm_file(f"{path}/gone")
        assert names(fs, path) == {"kept"}

        server.stop()
        assert [p for p in server.ports if port_open(p)] == []
        server.stop()  # idempotent

        server.start()
        fs, path = client(server, url)
        if kind == "moto":  # in memory: the restart lost the object, the bucket is recreated empty
            assert fs.ls(servers.BUCKET, detail=False) == []
        else:
            assert fs.cat_file(f"{path}/kept") == b"kept bytes"
    assert [p for p in server.ports if port_open(p)] == []
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{server.port}.sock"))


@pytest.mark.parametrize("kind", ["sshd", "samba"])
def test_stop_cuts_open_connections(kind: str, tmp_path: Path) -> None:
    # sshd's session processes leave the process group (setsid); stop() must end them too, or an open SFTP
    # connection would outlive the "crash" a fault test simulates.
    import asyncssh

    with start_or_skip(kind, tmp_path) as server:
        fs, path = client(server, server.new_url("open"))
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path}/f", b"f")
        server.stop()
        # Unrelated types: asyncssh's SFTPNoConnection; smbprotocol's ValueError when it fails to reconnect.
        with pytest.raises((asyncssh.Error, OSError, ValueError)):
            fs.cat_file(f"{path}/f")


def test_new_url_is_fresh_each_call(sshd_server: Server) -> None:
    first, second = sshd_server.new_url("t"), sshd_server.new_url("t")
    assert first != second and sshd_server.url not in (first, second)
    with pytest.raises(ValueError):
        sshd_server.new_url("../escape")


def test_session_fixture_server_serves_fresh_folders(sshd_server: Server) -> None:
    fs, path = client(sshd_server, sshd_server.new_url("fixture"))
    assert not fs.exists(path)
    fs.pipe_file(f"{path}/x", b"x")  # sshfs creates the folder as it writes
    assert fs.cat_file(f"{path}/x") == b"x"


def test_missing_binary_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers.shutil, "which", lambda *a, **k: None)
    with pytest.raises(ServerUnavailable, match=r"sshd not installed: apt-get install openssh-server"):
        servers.start_sshd(tmp_path)


def fake_server(tmp_path: Path, code: str) -> Server:
    def never_ready() -> None:
        raise ConnectionRefusedError("nothing listens")

    return Server(
        kind="fake",
        options={},
        workdir=tmp_path,
        root="fake://x",
        ports=[1],
        argv=[sys.executable, "-c", code],
        probe=never_ready,
    )


def test_server_that_exits_reports_its_log(tmp_path: Path) -> None:
    server = fake_server(tmp_path, "print('bind failed: address in use', flush=True); raise SystemExit(3)")
    with pytest.raises(ServerUnavailable, match=r"(?s)exited with code 3.*bind failed: address in use"):
        server.start()
    assert not server.running


def test_server_never_ready_times_out_and_is_killed(tmp_path: Path) -> None:
    code = (
        "import os, subprocess, sys, time; print('still booting', flush=True);"
        "child = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(60)']);"
        "open('pids', 'w').write(f'{os.getpid()} {child.pid}'); time.sleep(60)"
    )
    server = fake_server(tmp_path, code)
    with pytest.raises(ServerUnavailable, match=r"(?s)not ready after 1 s.*ConnectionRefusedError.*still booting"):
        server.start(timeout=1)
    # The leader and its child in a session of its own (as sshd's connection processes are) are both gone.
    for pid in map(int, (tmp_path / "pids").read_text().split()):
        assert gone(pid), pid


def gone(pid: int) -> bool:
    try:
        return ") Z " in Path(f"/proc/{pid}/stat").read_text()  # a zombie waiting for a reaper is done
    except FileNotFoundError:
        return True


def test_unavailable_server_skips_locally_and_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    err = ServerUnavailable("smbd not installed: apt-get install samba")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="samba server unavailable: smbd not installed"):
        unavailable("samba", err)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="(?s)smbd not installed.*CI is set"):
        unavailable("samba", err)
