"""Property-based tests of every decoder of repository bytes: pack headers, index objects,
unpacked objects, trees, snapshots, the config and key files. Random and mutated inputs may
only raise ibsync's own errors (IbsyncError: InvalidData, RepoError, ...), never IndexError,
KeyError, struct.error, ValueError or MemoryError, and never allocate what a length field
claims before checking it. The inputs of an unencrypted repository are exactly what anyone with
write access to the storage can store, so NullCipher is the attacker's view."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ibsync.errors import IbsyncError
from ibsync.format import index as index_format
from ibsync.format.compress import Compressor
from ibsync.format.crypto import MasterKey, NullCipher, make_key_file, open_key_file
from ibsync.format.objects import open_object, seal_object
from ibsync.format.pack import BlobType, PackWriter, parse_header, split_tail
from ibsync.model import Snapshot, decode_tree

from conftest import FAST_KDF

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NULL = NullCipher()
COMPRESSOR = Compressor(3)


def only_ibsync_errors(fn, *args):
    """Call; a result or an IbsyncError is fine, anything else is the defect under test."""
    try:
        return fn(*args)
    except IbsyncError:
        return None


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b) -> None:
        self.data += b


def a_pack(cipher, n: int) -> bytes:
    w = PackWriter(_Sink())
    for i in range(n):
        w.add(BlobType(i % 2), bytes([i]) * 32, [b"x" * (i + 1)], i + 1, False)
    w.finish(cipher)
    return bytes(w.sink.data)


def mutate(data: bytes, draw) -> bytes:
    """Flip, cut, insert or overwrite (lengths included) at drawn places."""
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "u32"]))
        pos = draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            raw = raw[:pos] + raw[pos + draw(st.integers(1, 16)) :]
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "u32" and len(raw) >= pos + 4:
            raw[pos : pos + 4] = struct.pack(
                "<I", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, len(raw), len(raw) + 1]))
            )
    return bytes(raw)


@st.composite
def mutated(draw, make):
    return mutate(make(draw), draw)


# ---- pack headers ------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=400))
def test_pack_header_of_random_bytes(data):
    only_ibsync_errors(parse_header, data, NULL)
    only_ibsync_errors(split_tail, data)


@FUZZ
@given(mutated(lambda draw: a_pack(NULL, draw(st.integers(0, 5)))))
def test_pack_header_mutated(data):
    only_ibsync_errors(parse_header, data, NULL)
    only_ibsync_errors(split_tail, data)


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_pack_header_plaintext_fields(junk, count, hlen):
    """A header that authenticates (no encryption) but lies: short, wrong count, bad types."""
    header = b"IBPH" + b"\x01" + struct.pack("<I", count) + junk
    only_ibsync_errors(parse_header, header + struct.pack("<I", len(header)), NULL)
    only_ibsync_errors(parse_header, header + struct.pack("<I", hlen), NULL)
    only_ibsync_errors(parse_header, junk[:3] + struct.pack("<I", min(len(junk), 3)), NULL)


# ---- index objects -------------------------------------------------------------------------------


def an_index(draw) -> bytes:
    packs = []
    for p in range(draw(st.integers(0, 3))):
        blobs = [
            index_format.PackedBlob(BlobType(i % 2), bytes([p, i]) * 16, i * 10, 10, 20, bool(i % 2))
            for i in range(draw(st.integers(0, 4)))
        ]
        packs.append(index_format.PackIndex(bytes([p]) * 32, blobs))
    return index_format.encode_index(packs)


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(an_index)))
def test_index_object(data):
    only_ibsync_errors(index_format.decode_index, data)
    only_ibsync_errors(lambda d: list(index_format.iter_index(d)), data)


# ---- unpacked objects (the envelope of snapshots and index objects) ------------------------------


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        mutated(lambda draw: seal_object(draw(st.binary(max_size=2000)), "index", NULL, COMPRESSOR)),
        mutated(lambda draw: seal_object(b"a" * draw(st.integers(100, 5000)), "snapshots", NULL, COMPRESSOR)),
    )
)
def test_unpacked_object(data):
    only_ibsync_errors(open_object, data, "index", NULL, COMPRESSOR)


BOMB_SCRIPT = """
import sys, zstandard
from ibsync.errors import IbsyncError
from ibsync.format.compress import Compressor
from ibsync.format.crypto import NullCipher
from ibsync.format.objects import open_object
# 1 GiB of zeros, compressed a MiB at a time (never held whole), with its size in the frame
c = zstandard.ZstdCompressor(level=3).compressobj(size=1 << 30)
zero = bytes(1 << 20)
bomb = b"".join([c.compress(zero) for _ in range(1024)] + [c.flush()])
try:
    open_object(b"\\x01" + bomb, "index", NullCipher(), Compressor(3))
    outcome = "decoded"
except IbsyncError:
    outcome = "refused"
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest) across exec
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(outcome, len(bomb), peak // 1024)
"""


def test_unpacked_object_that_claims_a_huge_size_is_refused_without_allocating_it():
    """A few KB of zstd that expand to 1 GiB (a frame may state its size, and zstd then
    allocates that much whatever max_output_size says): refused, memory stays flat. In a
    process of its own, so its peak memory is its own."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", BOMB_SCRIPT], capture_output=True, text=True, check=True).stdout
    outcome, size, peak_mib = out.split()
    assert int(size) < 100_000
    assert outcome == "refused"
    assert int(peak_mib) < 300, f"peak memory {peak_mib} MiB"


# ---- trees and snapshots (JSON) -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
GOOD_NODE = {"name": "a", "type": "file", "mode": 0o644, "mtime_ns": 1, "size": 1, "content": ["00" * 32]}


@st.composite
def tree_json(draw) -> bytes:
    node = dict(GOOD_NODE)
    for key in draw(st.lists(st.sampled_from([*GOOD_NODE, "subtree", "target"]), max_size=3)):
        node[key] = draw(json_values)
    nodes = draw(st.sampled_from([[node], [node, node], node, "x", None]))
    doc = draw(st.sampled_from([{"nodes": nodes}, [nodes], nodes]))
    return json.dumps(doc).encode()


@FUZZ
@given(st.one_of(st.binary(max_size=200), tree_json(), json_values.map(lambda v: json.dumps(v).encode())))
def test_tree(data):
    only_ibsync_errors(decode_tree, data)


GOOD_SNAPSHOT = {
    "time": "2024-01-01T00:00:00Z",
    "tree": "00" * 32,
    "device": {
        "udid": "U",
        "name": "n",
        "product_type": "p",
        "ios_version": "1",
        "build_version": "b",
        "serial_number": "s",
    },
    "backup_date": "2024-01-01T00:00:00Z",
    "summary": {"files": 1},
}


@st.composite
def snapshot_json(draw) -> bytes:
    doc = json.loads(json.dumps(GOOD_SNAPSHOT))
    for key in draw(st.lists(st.sampled_from([*GOOD_SNAPSHOT, "folder", "parent", "source"]), min_size=1, max_size=3)):
        if draw(st.booleans()):
            doc.pop(key, None)
        else:
            doc[key] = draw(json_values)
    return json.dumps(doc).encode()


@FUZZ
@given(st.one_of(st.binary(max_size=200), snapshot_json()))
def test_snapshot(data):
    only_ibsync_errors(Snapshot.from_json, data)


# ---- key files --------------------------------------------------------------------------------------

_KEY = make_key_file(MasterKey.generate(), "pw", meta={}, kdf=FAST_KDF)


@st.composite
def key_json(draw) -> bytes:
    doc = json.loads(_KEY)
    for key in draw(st.lists(st.sampled_from(["version", "kdf", "data"]), min_size=1, max_size=2)):
        doc[key] = draw(json_values)
    if draw(st.booleans()) and isinstance(doc.get("kdf"), dict):
        field = draw(st.sampled_from(["name", "memory_kib", "iterations", "lanes", "salt"]))
        doc["kdf"][field] = draw(json_values | st.sampled_from([0, -1, 2**40, 10**6]))
    return json.dumps(doc).encode()


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.binary(max_size=200), key_json(), mutated(lambda draw: _KEY)))
def test_key_file(data):
    # whatever it claims, a key file costs at most what the accepted KDF bounds allow
    only_ibsync_errors(open_key_file, data, "pw")


# ---- config ----------------------------------------------------------------------------------------

GOOD_CONFIG = {
    "format": "ibsync-repository",
    "version": 1,
    "id": "ab" * 16,
    "created": "2024-01-01T00:00:00Z",
    "encryption": "none",
    "id_hash": "blake3",
    "compression": {"algorithm": "zstd", "level": 3},
    "chunking": {"min": 1, "avg": 2, "max": 4},
    "pack_size": 4 << 20,
}


@st.composite
def config_json(draw) -> bytes:
    from ibsync.format.chunker import default_policy

    doc = {**GOOD_CONFIG, "chunking": default_policy(0).to_config()}
    for key in draw(st.lists(st.sampled_from(list(GOOD_CONFIG)), min_size=1, max_size=3)):
        if draw(st.booleans()):
            doc.pop(key, None)
        else:
            doc[key] = draw(json_values)
    return json.dumps(doc).encode()


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("config-fuzz")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=120), config_json(), json_values.map(lambda v: json.dumps(v).encode())))
def test_config(config_dir, data):
    from ibsync.repo.repository import Repository
    from ibsync.storage import LocalStorage

    (config_dir / "config").write_bytes(data)
    only_ibsync_errors(Repository.open, LocalStorage(config_dir), lambda: "pw")


def test_blob_zstd_bomb_is_refused_before_it_costs_memory():
    # A blob's frame stating more than the blob's recorded length: zstd would allocate what
    # the frame states whatever limit it is given, so the two are compared first.
    import tracemalloc

    import zstandard

    from ibsync.errors import InvalidData

    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(256 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidData, match="states 268435456 bytes, 4096 expected"):
            Compressor(3).decompress(bomb, 4096)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
