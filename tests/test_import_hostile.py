"""A hostile or odd backup folder: nothing blocks, nothing is followed, nothing is skipped
without a word (issue 11, defect 13)."""

import json
import os
import threading

import pytest

from ibsync.source import backup_folder

from conftest import MIT_BACKUP, copy_folder, one_line_error, run_subprocess
from test_bad_input import _finished


@pytest.fixture
def repo_env(cli, env):
    cli("init")
    return dict(os.environ)


def _sample(tmp_path):
    return _finished(copy_folder(MIT_BACKUP, tmp_path / "in" / "sample_backup"))


def test_fifo_socket_in_folder_are_named_not_read(repo_env, tmp_path):
    src = _sample(tmp_path)
    os.mkfifo(src / "12" / "fifo-in-place-of-a-file")
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "12" / "a-socket"))
    try:
        # A FIFO nobody writes would block a reader for ever: the import must not even open it.
        r = run_subprocess(["import", "--json", src], repo_env, timeout=120)
    finally:
        sock.close()
    assert r.returncode == 0, r.stderr
    assert "fifo-in-place-of-a-file: skipped, a FIFO" in r.stderr
    assert "a-socket: skipped, a socket" in r.stderr
    assert "Traceback" not in r.stderr
    report = json.loads(r.stdout)
    (done,) = report["snapshots"]
    assert sorted(done["skipped"]) == ["12/a-socket", "12/fifo-in-place-of-a-file"]


def test_file_replaced_by_fifo_after_listing_does_not_block(tmp_path):
    # The race: listed as a regular file, swapped for a FIFO before it is read.
    path = tmp_path / "f"
    os.mkfifo(path)
    result: list[BaseException] = []

    def read() -> None:
        try:
            backup_folder.open_regular(path)
        except BaseException as e:  # noqa: BLE001 - the test looks at what was raised
            result.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert result and "not a regular file (a FIFO)" in str(result[0])


@pytest.mark.parametrize("name", ["Manifest.db", "Info.plist"])
def test_symlinked_metadata_is_refused(repo_env, tmp_path, name):
    src = _sample(tmp_path)
    real = tmp_path / "elsewhere"
    os.replace(src / name, real)
    os.symlink(real, src / name)
    r = run_subprocess(["import", src], repo_env)
    assert r.returncode == 1
    one_line_error(r.stderr, name, "symbolic link")
    assert not list((tmp_path / "repo").glob("snapshots/*"))


def test_huge_plist_is_refused_without_reading_it_whole(repo_env, tmp_path, monkeypatch):
    src = _sample(tmp_path)
    # a sparse file: the size of a plist no device writes, costing no disk
    with open(src / "Manifest.plist", "r+b") as f:
        f.truncate(backup_folder.MAX_PLIST_BYTES + 4096)
    r = run_subprocess(["import", src], repo_env)
    assert r.returncode == 1
    one_line_error(r.stderr, "Manifest.plist", "larger than 128 MiB")
