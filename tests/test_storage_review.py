"""Storage review (r1-storage): promises of the local and remote backends that the code did not
keep. Real folders, links and files throughout.

- On POSIX, local folders are reached from descriptors (folders.py): a root swapped for a link
  after the storage opened it redirects nothing.
- A stale staging file whose name carries a PID no process can have is removed, not a crash.
- Range reads return exactly the bytes asked for, and a read past the end is a short read.
"""

from __future__ import annotations

import os
import secrets
import time

import pytest

from ibsync.errors import StorageError
from ibsync.storage import Kind, LocalStorage
from ibsync.storage.remote import STAGE_PREFIX, remove_stale_staging


def _name() -> str:
    return secrets.token_hex(32)


@pytest.mark.skipif(os.name == "nt", reason="descriptor-relative folders are POSIX; Windows uses the lstat fallback")
def test_root_replaced_by_a_link_after_opening_redirects_nothing(tmp_path):
    root, moved, elsewhere = tmp_path / "repo", tmp_path / "moved", tmp_path / "elsewhere"
    elsewhere.mkdir()
    s = LocalStorage(root)
    first = _name()
    s.put(Kind.INDEX, first, b"one")
    # someone with write access to the drive moves the repository away and leaves a link
    root.rename(moved)
    root.symlink_to(elsewhere)
    second = _name()
    s.put(Kind.INDEX, second, b"two")
    assert s.get(Kind.INDEX, first) == b"one"
    assert [p.name for p in elsewhere.rglob("*")] == []
    assert (moved / "index" / second).read_bytes() == b"two"
    s.close()


def test_stale_staging_file_with_an_impossible_pid_is_removed(tmp_path):
    folder = tmp_path / "tmp"
    folder.mkdir()
    planted = folder / f"{STAGE_PREFIX}{2**80}-x"  # any local user can name a file so in /tmp
    planted.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(planted, (old, old))
    assert remove_stale_staging(60, str(folder)) == 1
    assert not planted.exists()


@pytest.mark.parametrize("dir_fd", [None, False])
def test_range_reads(tmp_path, dir_fd):
    s = LocalStorage(tmp_path / "repo", dir_fd=dir_fd)
    name = _name()
    data = os.urandom(300_000)
    s.put(Kind.PACKS, name, data)
    assert s.get(Kind.PACKS, name) == data
    assert s.get(Kind.PACKS, name, 0, 10) == data[:10]
    assert s.get(Kind.PACKS, name, 123_456, 100_000) == data[123_456:223_456]
    assert s.get(Kind.PACKS, name, 299_990) == data[299_990:]
    assert s.get(Kind.PACKS, name, 300_000, 0) == b""
    with pytest.raises(StorageError, match="short read"):
        s.get(Kind.PACKS, name, 299_990, 20)
    s.close()


def test_header_larger_than_the_first_tail_read(env, cli):
    """A pack of many small blobs has a header past TAIL_GUESS: read_pack_header (check, prune
    and repair index read unindexed packs so) still reads it whole, and exactly."""
    from ibsync.format.pack import BlobType
    from ibsync.maint.repair import TAIL_GUESS, read_pack_header

    from conftest import open_repo

    cli("init")
    repo = open_repo(env)
    with repo.write_session() as session:
        for i in range(3000):  # 3,000 headers of 42 bytes: ~126 KB, twice the first read
            session.save_blob(BlobType.DATA, f"blob {i}".encode(), compress=False)
    repo.load_index()
    (pack,) = list(repo.storage.list(Kind.PACKS))
    blobs = read_pack_header(repo, pack.name, pack.size)
    assert len(blobs) == 3000 and pack.size - (blobs[-1].offset + blobs[-1].length) > TAIL_GUESS
    assert {(b.id, b.offset, b.length) for b in blobs} == {
        (blob_id, loc.offset, loc.length) for blob_id, loc in repo.index.entries()
    }
    repo.storage.close()
