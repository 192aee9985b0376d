"""Review of the repository and format layers (r3): invariants that moved to a shared place
keep holding there, and what the review asked about is measured, not assumed."""

from __future__ import annotations

import os

import pytest
import zstandard

from ibsync.errors import InvalidData
from ibsync.format import index as index_format
from ibsync.format.compress import Compressor
from ibsync.format.crypto import NullCipher
from ibsync.format.objects import MAX_OBJECT_SIZE, open_object
from ibsync.format.pack import BlobType, PackedBlob
from ibsync.repo.known import KNOWN_FILE

from conftest import MIT_BACKUP


def _pack(n: int) -> index_format.PackIndex:
    return index_format.PackIndex(
        os.urandom(32), [PackedBlob(BlobType.DATA, os.urandom(32), i * 10, 10, 20, True) for i in range(n)]
    )


def test_index_object_with_a_bad_last_pack_yields_nothing():
    # A reader adds each pack as it comes (repository.add_index_object streams them, so a
    # 100,000-entry object is never held as tuples whole): the decoder must have checked
    # the whole object before it hands out the first pack, or a bad object adds half of itself.
    data = bytearray(index_format.encode_index([_pack(3), _pack(3)]))
    data[-46] = 9  # the type byte of the last entry of the last pack: no such blob type
    got = []
    with pytest.raises(InvalidData, match="unknown blob type 9"):
        for pack in index_format.iter_index(bytes(data)):
            got.append(pack)
    assert got == []


def test_index_object_with_trailing_bytes_yields_nothing():
    data = index_format.encode_index([_pack(2), _pack(2)]) + b"\0"
    got = []
    with pytest.raises(InvalidData, match="trailing bytes"):
        for pack in index_format.iter_index(data):
            got.append(pack)
    assert got == []


def test_index_object_bad_flags_refused():
    data = bytearray(index_format.encode_index([_pack(2)]))
    data[-45] = 0x80  # the flags byte of the last entry
    with pytest.raises(InvalidData, match="unknown blob flags 0x80"):
        list(index_format.iter_index(bytes(data)))


def test_object_and_blob_decompression_share_one_bomb_check():
    # One check (Compressor.decompress) for both: an object's frame may state less than the
    # bound, a blob's must state exactly its recorded length; neither may state more.
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 1000)
    z = Compressor(3)
    assert open_object(b"\x01" + frame, "index", NullCipher(), z) == b"x" * 1000
    assert z.decompress(frame, 1000) == b"x" * 1000
    with pytest.raises(InvalidData, match="states 1000 bytes, 999 allowed"):
        z.decompress(frame, 999, at_most=True)
    with pytest.raises(InvalidData, match="states 1000 bytes, 1001 expected"):
        z.decompress(frame, 1001)
    unstated = zstandard.ZstdCompressor(write_content_size=False).compress(b"y" * 50)
    assert z.decompress(unstated, MAX_OBJECT_SIZE, at_most=True) == b"y" * 50
    with pytest.raises(InvalidData, match="gave 50 bytes, 60 expected"):
        z.decompress(unstated, 60)


def test_known_file_is_not_rewritten_by_a_command_that_learns_nothing(env, cli, tmp_path):
    # Every command opens through Repository.open, which remembers the repository: once it is
    # remembered, further commands leave the file as it is (no write per command).
    cli("init")
    cli("snapshots")  # the first open remembers the repository and its key
    known = tmp_path / "cache" / KNOWN_FILE
    before = known.stat()
    cli("import", str(MIT_BACKUP), "--allow-unfinished", "-q")
    cli("snapshots")
    after = known.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
