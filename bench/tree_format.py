"""Tree format 1 vs 2 (design §10, §26): bytes a day adds to a many-files folder and to a
Manifest.db content list, and µs per entry to encode and decode.

    python bench/tree_format.py                 # the figures of the notes / design §26
    python bench/tree_format.py --grid          # also try other cut parameters (leaf/inner bits)

Stored bytes are what a blob costs in a pack: zstd (level 3, kept only when it saves 1/32) +
AES-GCM nonce and tag (28 bytes) + its pack header entry (42) + its index entry (44).
Timings are medians of 5 runs (perf_counter; the machine is shared, so compare within one run).
``format2_rebuild_day_us``: the archiver's rebuild of a folder whose parent it read, 0.5 % changed;
``*_decode_split_us``: decoding plus the checks every reader makes (``split_entries``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ibsync.format.compress import Compressor  # noqa: E402
from ibsync.format.crypto import MasterKey, keyed_id_hasher  # noqa: E402
from ibsync.model import decode_tree_entries, encode_tree, split_entries  # noqa: E402
from ibsync.repo import trees  # noqa: E402

PER_BLOB = 28 + 42 + 44
T = 1_700_000_000_000_000_000


def hexid(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def folder(n: int, day: int = 0, changed: frozenset[int] = frozenset()) -> list[dict]:
    out = []
    for i in range(n):
        touched = i in changed
        out.append(
            {
                "name": hashlib.sha1(f"HomeDomain-Library/f{i}".encode()).hexdigest(),
                "type": "file",
                "mode": 0o100644,
                "mtime_ns": T + (day if touched else 0),
                "size": 1000 + i + (day if touched else 0),
                "content": [hexid(i, day if touched else 0)],
            }
        )
    return out


class Store:
    """Node blobs in memory, with the cost each would have in a pack."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.zstd = Compressor(3)

    def load_blob(self, blob_id: bytes) -> bytes:
        return self.blobs[blob_id]

    def stored(self, data: bytes) -> int:
        packed = self.zstd.compress(data)
        return len(packed if packed is not None else data) + PER_BLOB

    def add(self, blobs: dict[bytes, bytes]) -> tuple[int, int, int]:
        """(new blobs, raw bytes, stored bytes) of the blobs not stored yet."""
        new = {k: v for k, v in blobs.items() if k not in self.blobs}
        self.blobs.update(new)
        return len(new), sum(map(len, new.values())), sum(self.stored(v) for v in new.values())


def built_v1(hasher, entries) -> trees.BuiltTree:
    data = encode_tree(entries)
    return trees.BuiltTree(hasher(data), {hasher(data): data})


def median_us(fn, per: int, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / per * 1e6


def folder_day(hasher, n: int, k: int, seed: int) -> dict:
    """A folder of n fileID entries, then the same with k entries changed."""
    changed = frozenset(random.Random(seed).sample(range(n), k))
    old, new = folder(n), folder(n, 1, changed)
    own = sum(len(trees.pack_entry(new[i], lambda ids: b"")) for i in changed)
    out = {"entries": n, "changed": k, "changed_entries_bytes": own}
    for fmt, build in (("format1", built_v1), ("format2", lambda h, e: trees.build_tree(h, e))):
        store = Store()
        first = store.add(build(hasher, old).blobs)
        blobs, raw, stored = store.add(build(hasher, new).blobs)
        out[fmt] = {
            "whole_blobs": first[0],
            "whole_raw": first[1],
            "whole_stored": first[2],
            "day_blobs": blobs,
            "day_raw": raw,
            "day_stored": stored,
            "day_stored_per_changed_entry_byte": round(stored / own, 1),
        }
    return out


def speed(hasher, n: int) -> dict:
    entries = folder(n)
    store = Store()
    built = trees.build_tree(hasher, entries)
    store.blobs.update(built.blobs)
    data1 = encode_tree(entries)
    read = trees.read_folder_split(store, built.id, store.blobs[built.id])  # type: ignore[arg-type]
    # the archiver's next day: the parent's entries back, 0.5 % of them changed
    day = [dict(d, size=d["size"] + 1) if i % 200 == 0 else d for i, d in enumerate(read.good)]
    return {
        "format1_encode_us": round(median_us(lambda: encode_tree(entries), n), 2),
        "format1_decode_us": round(median_us(lambda: decode_tree_entries(data1), n), 2),
        "format1_decode_split_us": round(median_us(lambda: split_entries(decode_tree_entries(data1)), n), 2),
        "format2_encode_us": round(median_us(lambda: trees.build_tree(hasher, entries), n), 2),
        "format2_rebuild_day_us": round(median_us(lambda: trees.build_tree(hasher, day, read.reuse), n), 2),
        "format2_decode_us": round(median_us(lambda: trees.read_folder(store, built.id, store.blobs[built.id]), n), 2),
        "format2_decode_split_us": round(
            median_us(lambda: trees.read_folder_split(store, built.id, store.blobs[built.id]), n), 2
        ),  # type: ignore[arg-type]
    }


def id_list_day(hasher, n: int, share: float, seed: int, clustered: bool) -> dict:
    ids = [hexid("m", i) for i in range(n)]
    k = int(n * share)
    rnd = random.Random(seed)
    if clustered:  # runs of 8 neighbouring blocks (a b-tree page split writes neighbours)
        starts = rnd.sample(range(0, n - 8, 8), k // 8)
        changed = {s + j for s in starts for j in range(8)}
    else:
        changed = set(rnd.sample(range(n), k))
    ids2 = [hexid("m2", i) if i in changed else x for i, x in enumerate(ids)]
    root = [{"name": "Info.plist", "type": "file", "mode": 0o100644, "mtime_ns": T, "size": 1, "content": [hexid(1)]}]
    out = {"ids": n, "changed_ids": len(changed), "clustered": clustered, "changed_ids_bytes": 32 * len(changed)}
    for fmt, build in (("format1", built_v1), ("format2", lambda h, e: trees.build_tree(h, e))):
        store = Store()
        first = store.add(
            build(
                hasher,
                root
                + [
                    {
                        "name": "Manifest.db",
                        "type": "file",
                        "mode": 0o100644,
                        "mtime_ns": T,
                        "size": n * 32768,
                        "content": ids,
                    }
                ],
            ).blobs
        )
        blobs, raw, stored = store.add(
            build(
                hasher,
                root
                + [
                    {
                        "name": "Manifest.db",
                        "type": "file",
                        "mode": 0o100644,
                        "mtime_ns": T + 1,
                        "size": n * 32768,
                        "content": ids2,
                    }
                ],
            ).blobs
        )
        out[fmt] = {"whole_stored": first[2], "day_blobs": blobs, "day_raw": raw, "day_stored": stored}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", action="store_true")
    args = ap.parse_args()
    hasher = keyed_id_hasher(MasterKey.generate().id_key)
    print(
        json.dumps(
            {
                "folder_4000_20": folder_day(hasher, 4000, 20, 1),
                "speed_4000": speed(hasher, 4000),
                "manifest_random_1pct": id_list_day(hasher, 37_500, 0.01, 1, False),
                "manifest_clustered_1pct": id_list_day(hasher, 37_500, 0.01, 1, True),
            },
            indent=1,
        )
    )
    if args.grid:
        saved = trees.LEAF_CUT, trees.INNER_CUT, trees.LIST_CUT
        for leaf_bits in (2, 3, 4):
            for min_bytes in (0, 256, 512):
                for inner_bits in (3, 4):
                    trees.LEAF_CUT = dataclasses.replace(saved[0], bits=leaf_bits, min_bytes=min_bytes)
                    trees.INNER_CUT = dataclasses.replace(saved[1], bits=inner_bits)
                    f = folder_day(hasher, 4000, 20, 1)["format2"]
                    print(
                        f"leaf bits {leaf_bits} min {min_bytes} inner bits {inner_bits}: day {f['day_blobs']} blobs "
                        f"{f['day_stored']} B stored ({f['day_stored_per_changed_entry_byte']}x); "
                        f"whole {f['whole_blobs']} blobs {f['whole_stored']} B"
                    )
        trees.LEAF_CUT, trees.INNER_CUT = saved[0], saved[1]
        for list_bits in (3, 4, 5, 6, 7):
            trees.LIST_CUT = dataclasses.replace(saved[2], bits=list_bits)
            r = id_list_day(hasher, 37_500, 0.01, 1, False)["format2"]
            c = id_list_day(hasher, 37_500, 0.01, 1, True)["format2"]
            print(
                f"list bits {list_bits}: random {r['day_blobs']} blobs {r['day_stored']} B; "
                f"clustered {c['day_blobs']} blobs {c['day_stored']} B; whole {r['whole_stored']} B"
            )
        trees.LIST_CUT = saved[2]


if __name__ == "__main__":
    main()
