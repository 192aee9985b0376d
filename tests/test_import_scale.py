"""Correctness of the import's per-file fast paths: one read per small file, blobs stored per
batch, buffered pack writes, folders finished in any order, the files cache on a next day.
(Speed and memory are measured by bench/import_profile.py, never here.)"""

from __future__ import annotations

import hashlib
import json
import os
import random
from concurrent.futures import Future
from pathlib import Path

import pytest

from ibsync.errors import SourceError
from ibsync.format.chunker import SQLITE_MAGIC
from ibsync.ingest.archiver import BATCH_FILE_MAX, Archiver, _Dir
from ibsync.repo.repository import Repository
from ibsync.source.folder import FolderSource
from ibsync.storage.local import LocalStorage
from ibsync.testing.generator import generate

from conftest import FAST_KDF, PASSWORD, copy_folder, tree_state

APP_FILES = 400


def _content(rnd: random.Random, i: int) -> bytes:
    kind = i % 5
    if kind == 0:
        return rnd.randbytes(rnd.randint(1, 20_000))  # incompressible
    if kind == 1:
        return (b"<key>k%d</key><string>v</string>\n" % i) * rnd.randint(1, 400)  # compressible
    if kind == 2:  # a 2-4 block sqlite file (32 KiB blocks)
        size = rnd.randint((32 << 10) + 1, 128 << 10)
        return (SQLITE_MAGIC + rnd.randbytes(size))[:size]
    if kind == 3:
        return b""
    return rnd.randbytes(300) * rnd.randint(1, 50)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("base"), seed=4, size_bytes=1 << 20)


@pytest.fixture
def phone(base: Path, tmp_path: Path) -> Path:
    """A small generated phone plus APP_FILES app files spread over the fileID folders, two of
    them larger than a batch (stored on their own, streamed)."""
    folder = copy_folder(base, tmp_path / "phone" / base.name)
    rnd = random.Random(9)
    for i in range(APP_FILES):
        file_id = hashlib.sha1(b"app-%d" % i).hexdigest()
        path = folder / file_id[:2] / file_id
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_content(rnd, i))
    for n in range(2):
        (folder / "00").mkdir(exist_ok=True)
        (folder / "00" / f"00big{n}").write_bytes(rnd.randbytes(BATCH_FILE_MAX + 12345))
    return folder


def _app_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and len(p.name) in (40, 6))


def _import(cli, folder: Path, *extra: str) -> dict:
    out, _ = cli("import", folder, "--json", *extra)
    return json.loads(out)["snapshots"][0]


def _next_day(folder: Path, count: int) -> list[Path]:
    """Rewrite ``count`` app files as a device does: new content, renamed into place, a later mtime."""
    rnd = random.Random(5)
    changed = rnd.sample(_app_files(folder), count)
    for i, path in enumerate(changed):
        st = path.stat()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(_content(rnd, i) + b"day two")
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 86_400 * 10**9))
        os.replace(tmp, path)
    return changed


def test_round_trip_of_small_sqlite_empty_and_large_files(env, cli, phone, tmp_path):
    cli("init")
    s = _import(cli, phone)
    assert s["summary"]["files"] == sum(1 for p in phone.rglob("*") if p.is_file())
    assert s["summary"]["bytes_read"] == s["summary"]["total_bytes"]
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / phone.name) == tree_state(phone)


def test_round_trip_unencrypted(env, cli, phone, tmp_path, monkeypatch):
    # unencrypted blobs that do not compress reach the pack writer as views of the chunk:
    # small ones are copied into its write buffer, large ones written at once
    monkeypatch.delenv("IBSYNC_PASSWORD")
    cli("init", "--no-encryption")
    _import(cli, phone)
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / phone.name) == tree_state(phone)


def test_next_day_reads_only_changed_files_and_equals_a_forced_import(env, cli, phone, tmp_path):
    cli("init")
    first = _import(cli, phone)
    changed = _next_day(phone, 7)
    day2 = _import(cli, phone)
    s = day2["summary"]
    assert day2["status"] == "created" and day2["parent"] == first["id"]
    assert s["files_changed"] == 7 and s["files_new"] == 0
    assert s["files_unmodified"] == s["files"] - 7
    assert s["bytes_read"] == sum(p.stat().st_size for p in changed)
    # reading everything again gives exactly the same snapshot tree: nothing new is written
    forced = _import(cli, phone, "--force")
    assert forced["status"] == "unchanged" and forced["id"] == day2["id"]
    assert forced["summary"]["bytes_read"] == forced["summary"]["total_bytes"]
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / phone.name) == tree_state(phone)


def test_unchanged_reimport_reads_nothing(env, cli, phone):
    cli("init")
    first = _import(cli, phone)
    again = _import(cli, phone)
    assert again["status"] == "unchanged" and again["id"] == first["id"]
    assert again["summary"]["bytes_read"] == 0
    assert again["summary"]["files_unmodified"] == again["summary"]["files"]


def _repo(tmp_path: Path) -> Repository:
    return Repository.init(LocalStorage(tmp_path / "repo"), PASSWORD, kdf=FAST_KDF)


def test_a_file_that_grew_since_it_was_listed_is_refused(tmp_path, phone):
    source = FolderSource.open(phone)
    path = _app_files(phone)[0]
    rel = str(path.relative_to(phone))
    size = path.stat().st_size
    assert source.read_file(rel, size) == path.read_bytes()
    path.write_bytes(path.read_bytes() + b"more")
    assert len(source.read_file(rel, size)) == size + 1  # one byte past the listing tells
    archiver = Archiver(_repo(tmp_path))
    archiver.source = source
    with archiver.repo.write_session() as session:
        archiver.session = session
        with pytest.raises(SourceError, match="changed while being read"):
            archiver._store_files([(rel, size)])


def test_a_file_replaced_by_a_fifo_is_refused_without_blocking(tmp_path, phone):
    source = FolderSource.open(phone)
    path = _app_files(phone)[0]
    size = path.stat().st_size
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(SourceError, match="not a regular file"):
        source.read_file(str(path.relative_to(phone)), size)


def test_batch_of_duplicates_stores_each_blob_once(tmp_path, phone):
    repo = _repo(tmp_path)
    data = [b"same bytes" * 100, b"other" * 50, b"same bytes" * 100]
    with repo.write_session() as session:
        ids = session.save_blobs(0, data)
        again = session.save_blobs(0, data[:1])
    assert ids[0] == ids[2] == again[0] and ids[0] != ids[1]
    assert session.stats.blobs_added == 2
    assert [repo.load_blob(i) for i in ids] == data


def test_a_folder_finishes_while_an_earlier_one_still_stores_a_file(tmp_path):
    """A slow file in one folder does not keep every later folder (and its entries) waiting."""
    archiver = Archiver(_repo(tmp_path))
    slow: Future = Future()
    done: Future = Future()
    done.set_result([[b"\x01" * 32]])
    early = _Dir(
        "00",
        None,
        [],
        pending=[(slow, [{"name": "a", "type": "file", "mode": 0o100644, "mtime_ns": 1, "size": 1, "content": None}])],
    )
    late = _Dir(
        "01",
        None,
        [],
        pending=[(done, [{"name": "b", "type": "file", "mode": 0o100644, "mtime_ns": 1, "size": 1, "content": None}])],
    )
    archiver._queue = [early, late]
    with archiver.repo.write_session() as session:
        archiver.session = session
        archiver._drain(block=False)
        assert late.tree_id is not None and late.entries == [] and early.tree_id is None
        assert archiver._queue == [early]
        slow.set_result([[b"\x02" * 32]])
        archiver._drain(block=False)
        assert early.tree_id is not None and archiver._queue == []
