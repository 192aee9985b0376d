import io
import os

import pytest

from ibsync.errors import InvalidData, WrongPassword
from ibsync.format.chunker import SQLITE_MAGIC, Chunker, default_policy
from ibsync.format.compress import Compressor
from ibsync.format.crypto import AesGcmCipher, MasterKey, NullCipher, make_key_file, open_key_file
from ibsync.format.index import PackIndex, decode_index, encode_index
from ibsync.format.objects import open_object, seal_object
from ibsync.format.pack import BlobType, PackWriter, parse_header
from ibsync.repo.index import MasterIndex

from conftest import FAST_KDF


def test_key_file_roundtrip_and_wrong_password():
    master = MasterKey.generate()
    pw = "a long secret passphrase"
    key = make_key_file(master, pw, meta={}, kdf=FAST_KDF)
    assert open_key_file(key, pw) == master
    with pytest.raises(WrongPassword):
        open_key_file(key, "not it")
    assert pw.encode() not in key and master.encrypt not in key and master.id_key not in key


def test_aead_detects_tampering_and_wrong_context():
    c = AesGcmCipher(os.urandom(32))
    sealed = c.seal(b"hello", b"ctx")
    assert c.open(sealed, b"ctx") == b"hello"
    with pytest.raises(InvalidData):
        c.open(sealed, b"other")
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(InvalidData):
        c.open(bytes(flipped), b"ctx")


@pytest.mark.parametrize("cipher", [AesGcmCipher(os.urandom(32)), NullCipher()])
def test_pack_header_roundtrip(cipher):
    buf = io.BytesIO()
    w = PackWriter(buf)
    blobs = [(BlobType.DATA, os.urandom(32), cipher.seal(os.urandom(n)), n, n % 2 == 0) for n in (10, 2000, 1)]
    for t, bid, sealed, raw, comp in blobs:
        w.add(t, bid, [sealed[:5], sealed[5:]], raw, comp)
    w.add(BlobType.TREE, b"t" * 32, [b"tree"], 4, False)
    name = w.finish(cipher)
    data = buf.getvalue()
    parsed = parse_header(data, cipher)
    assert [(b.type, b.id, b.length, b.raw_length, b.compressed) for b in parsed] == [
        (t, bid, len(s), raw, comp) for t, bid, s, raw, comp in blobs
    ] + [(BlobType.TREE, b"t" * 32, 4, 4, False)]
    assert data[parsed[1].offset : parsed[1].offset + parsed[1].length] == blobs[1][2]
    from ibsync.format.pack import pack_name, split_tail

    assert pack_name(split_tail(data)) == name


def test_index_codec_and_truncation():
    w = PackWriter(io.BytesIO())
    w.add(BlobType.DATA, os.urandom(32), [b"abc"], 3, False)
    packs = [PackIndex(os.urandom(32), w.blobs), PackIndex(os.urandom(32), [])]
    data = encode_index(packs)
    assert decode_index(data) == packs
    with pytest.raises(InvalidData):
        decode_index(data[:-5])


def test_object_envelope_compresses_and_authenticates():
    c, z = AesGcmCipher(os.urandom(32)), Compressor()
    body = b"snapshot " * 1000
    stored = seal_object(body, "snapshots", c, z)
    assert len(stored) < len(body) / 10
    assert open_object(stored, "snapshots", c, z) == body
    with pytest.raises(InvalidData):
        open_object(stored, "index", c, z)  # an object cannot be passed off as another kind


def test_chunker_is_deterministic_and_seeded():
    ch = Chunker(default_policy(seed=12345))
    data = os.urandom(6 << 20)
    big = [bytes(c) for c in ch.split(data)]
    assert b"".join(big) == data and 3 <= len(big) <= 30  # ~1 MiB chunks
    assert [bytes(c) for c in Chunker(default_policy(seed=12345)).split(data)] == big
    assert [len(c) for c in Chunker(default_policy(seed=999)).split(data)] != [len(c) for c in big]
    streamed = [bytes(c) for c in ch.split_file(io.BytesIO(data * 2), len(data) * 2)]
    assert b"".join(streamed) == data * 2
    assert list(ch.split(b"")) == []
    assert [bytes(c) for c in ch.split(b"tiny")] == [b"tiny"]


@pytest.mark.parametrize("size", [100_000, 20 << 20])  # read whole, and streamed
def test_sqlite_files_are_cut_in_page_aligned_blocks(size):
    ch = Chunker(default_policy(seed=7))
    db = SQLITE_MAGIC + os.urandom(size - 16)
    chunks = [bytes(c) for c in ch.split_file(io.BytesIO(db), len(db))]
    assert b"".join(chunks) == db
    assert {len(c) for c in chunks[:-1]} == {32 << 10}


def test_a_page_write_changes_one_block():
    """A 4 KiB page rewritten inside a large sqlite file re-stores one 32 KiB block."""
    ch = Chunker(default_policy(seed=7))
    db = bytearray(SQLITE_MAGIC + os.urandom((32 << 20) - 16))
    before = {bytes(c) for c in ch.split(bytes(db))}
    db[20 << 20 : (20 << 20) + 4096] = os.urandom(4096)
    after = [bytes(c) for c in ch.split(bytes(db))]
    assert sum(len(c) for c in after if c not in before) == 32 << 10


def test_master_index_lookup():
    idx = MasterIndex()
    w = PackWriter(io.BytesIO())
    ids = [os.urandom(32) for _ in range(5000)]
    for i, bid in enumerate(ids):
        w.add(BlobType.DATA if i % 3 else BlobType.TREE, bid, [b"x" * (i % 50 + 1)], i, bool(i % 2))
    pack = os.urandom(32)
    idx.add_pack(pack, w.blobs)
    assert len(idx) == 5000
    for b in w.blobs[::97]:
        loc = idx.get(b.id)
        assert (loc.pack_id, loc.offset, loc.length, loc.raw_length, loc.type, loc.compressed) == (
            pack,
            b.offset,
            b.length,
            b.raw_length,
            b.type,
            b.compressed,
        )
    assert idx.get(os.urandom(32)) is None
    assert sorted(bid for bid, _ in idx.entries()) == sorted(ids)
    other = os.urandom(32)
    idx.add_pack(other, w.blobs[:10])  # a blob in two packs: lookups give the first location
    assert idx.get(ids[0]).pack_id == pack
    assert sum(1 for bid, loc in idx.entries() if bid == ids[0]) == 2
