"""Reading one stored file back: its blobs in order, verified, a pack range at a time.

``read_file`` is the reader that everything rehydrating a single file uses (a snapshot's
Manifest.db for browsing, each file ``extract`` writes). Consecutive blobs of a file that sit
in one pack are fetched in ranged reads through ``Repository.read_pack_blobs`` (one request
per run of nearby blobs, as restore plans them), and every blob is decrypted, decompressed and
checked against its id by ``Repository.decode_blob`` before a byte of it is yielded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..errors import InvalidData
from ..format.pack import PackedBlob
from ..model import Node
from ..repo.repository import Repository

NEARBY_GAP = 64 << 10  # bytes between two blobs worth reading rather than a second request


def read_file(repo: Repository, node: Node) -> Iterator[bytes]:
    """Yield a file node's content, blob by blob, in order.

    Raises InvalidData when a blob is missing from the index, unreadable or does not match its
    id, and when the blobs do not add up to the node's size (after yielding what came before:
    callers write to a temporary file and keep it only if the generator ran to its end)."""
    if node.type != "file":
        raise InvalidData(f"{node.name} is a {node.type}, not a file")
    content = node.content
    total = 0
    i = 0
    while i < len(content):
        # a run of consecutive blobs stored in the same pack: read together, yielded in order
        first = repo.locate(content[i])
        pack_id = first.pack_id
        run: list[bytes] = [content[i]]
        located: dict[bytes, PackedBlob] = {content[i]: first.as_packed(content[i])}
        j = i + 1
        while j < len(content):
            blob_id = content[j]
            loc = located.get(blob_id)
            if loc is None:
                where = repo.locate(blob_id)
                if where.pack_id != pack_id:
                    break
                located[blob_id] = where.as_packed(blob_id)
            run.append(blob_id)
            j += 1
        i = j
        for data in _read_run(repo, pack_id, run, located):
            total += len(data)
            yield data
    if total != node.size:
        raise InvalidData(f"{node.name}: its blobs hold {total} bytes, the snapshot says {node.size}")


def _read_run(repo: Repository, pack_id: bytes, run: list[bytes], located: dict[bytes, PackedBlob]) -> Iterator[bytes]:
    """The blobs of ``run`` (all in one pack, repeats allowed) in the run's order. Blobs come
    back in pack order; those that arrive early wait (in the usual case, a file written in
    order, none do)."""
    remaining: dict[bytes, int] = {}
    for blob_id in run:
        remaining[blob_id] = remaining.get(blob_id, 0) + 1
    ready: dict[bytes, bytes] = {}
    k = 0
    for blob, data, err in repo.read_pack_blobs(pack_id, list(located.values())):
        if err is not None or data is None:
            raise InvalidData(f"blob {blob.id.hex()[:12]} in pack {pack_id.hex()[:12]}: {err}")
        ready[blob.id] = data
        while k < len(run) and run[k] in ready:
            blob_id = run[k]
            chunk = ready[blob_id]
            remaining[blob_id] -= 1
            if not remaining[blob_id]:
                del ready[blob_id]
            k += 1
            yield chunk
    if k != len(run):  # read_pack_blobs yields every blob it was given; anything else is a bug
        raise InvalidData(f"pack {pack_id.hex()[:12]} did not return every blob asked for")


def read_file_bytes(repo: Repository, node: Node) -> bytes:
    """A small file's whole content (plists): ``read_file`` joined."""
    return b"".join(read_file(repo, node))


def read_blobs(repo: Repository, blob_ids: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """``(id, data)`` of each distinct blob of ``blob_ids``, verified, in pack order: one ranged
    read per run of nearby blobs of a pack (rehydrating only the blocks of a database that
    changed). Raises InvalidData for a blob that is missing or does not match its id."""
    by_pack: dict[bytes, list[PackedBlob]] = {}
    for blob_id in dict.fromkeys(blob_ids):
        loc = repo.locate(blob_id)
        by_pack.setdefault(loc.pack_id, []).append(loc.as_packed(blob_id))
    for pack_id in sorted(by_pack):
        for run in _nearby(by_pack[pack_id]):
            for blob, data, err in repo.read_pack_blobs(pack_id, run):
                if err is not None or data is None:
                    raise InvalidData(f"blob {blob.id.hex()[:12]} in pack {pack_id.hex()[:12]}: {err}")
                yield blob.id, data


def _nearby(blobs: list[PackedBlob]) -> Iterator[list[PackedBlob]]:
    """Runs of blobs close enough in the pack to read in one request: a few scattered changed
    blocks must not cost the megabytes of unchanged blobs between them."""
    blobs = sorted(blobs, key=lambda b: b.offset)
    run: list[PackedBlob] = []
    for b in blobs:
        if run and b.offset - (run[-1].offset + run[-1].length) > NEARBY_GAP:
            yield run
            run = []
        run.append(b)
    if run:
        yield run
