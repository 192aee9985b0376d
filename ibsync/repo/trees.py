"""Tree format 2 (design §10): a folder's entries as msgpack node blobs.

A folder is a tree of nodes, like a B-tree whose node boundaries are content-defined (a
"prolly tree"): its entries, sorted by name, are cut into leaves after entries whose boundary
hash (the first id the entry holds, else a keyed hash of its name) has its low bits zero; the leaves' (separator key, id) pairs are cut the same way into
nodes one level up, and so on until one node is left: the folder's tree id is that node's id.
A changed entry rewrites its leaf and the nodes above it, not the folder. A file's content list
longer than ``INLINE_IDS`` is stored apart in id-list nodes, cut the same way by the ids
themselves, so a database that changed in a few 32 KiB blocks adds a few small list nodes.

Node blobs (type TREE), msgpack; a format-1 tree blob is JSON and starts with ``{``:

    folder leaf   [1, 0, [entry, ...]]
    folder inner  [1, level, [key, ...], child ids (32 bytes each)]     level >= 1
    id list       [2, level, ids (32 bytes each)]    level 0: content ids; above: list node ids
    entry         [name, 0, mode, mtime_ns, size, ids | [list id, count]]    a file
                  (a name of lowercase hex digits, even in number, is stored as the bytes they spell)
                  [name, 1, mode, mtime_ns, subtree id | nil]                  a folder
                  [name, 2, mode, mtime_ns, target]                            a symlink
                  "<JSON text of the entry>"   any entry the positional form cannot hold as it is
                                               (kept so a rewrite never alters what readers refuse;
                                               fields in model.ENTRY_FIELDS order)

Nothing read here is trusted: every node is checked for its shape, levels go down by exactly
one (so a walk ends), a folder may not use one node twice, and counts are bounded. A malformed
node makes its folder unreadable (MalformedTree); a malformed entry becomes a value that
``model.split_entries`` refuses by name, as in format 1.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from ..model import (
    ENTRY_FIELDS,
    MalformedTree,
    Rejected,
    canonical_entry,
    dir_entry,
    entry_problem,
    file_entry,
    split_entries,
    symlink_entry,
)

if TYPE_CHECKING:
    from .repository import Repository

FOLDER_NODE = 1
LIST_NODE = 2
ID = 32
TYPE_CODES = {"file": 0, "dir": 1, "symlink": 2}
_TYPE_NAMES = {v: k for k, v in TYPE_CODES.items()}
# a positional entry holds exactly its type's fields, in their canonical order (model.ENTRY_FIELDS)
_FILE_KEYS = frozenset(ENTRY_FIELDS["file"])
_DIR_KEYS = frozenset(ENTRY_FIELDS["dir"])
_LINK_KEYS = frozenset(ENTRY_FIELDS["symlink"])
# what the first byte of a node blob is: a msgpack array of 3 or 4 elements
_NODE_STARTS = (0x93, 0x94)


@dataclass(frozen=True)
class Cut:
    """Where a level's nodes end: after an item whose hash has ``bits`` low bits zero, once the
    node holds ``min_bytes`` and ``min_items``; at ``max_bytes`` whatever the hashes say."""

    bits: int
    min_bytes: int
    max_bytes: int
    min_items: int = 2  # at least halves each level above the leaves: the build always ends


# Measured with bench/tree_format.py (design §26): leaves of about 11 fileID entries (~800
# bytes) and inner nodes of about 13 children. Smaller leaves save little (each node costs
# ~114 bytes in pack header, index and AEAD, and one more blob in the index); larger ones make a
# day's rewrite grow with the leaf size. Id lists: ~18 ids (~600 bytes) per node.
LEAF_CUT = Cut(bits=2, min_bytes=512, max_bytes=64 << 10, min_items=1)
INNER_CUT = Cut(bits=4, min_bytes=0, max_bytes=64 << 10)
LIST_CUT = Cut(bits=4, min_bytes=0, max_bytes=32 << 10)
# A file with more content ids than this stores them in id-list nodes.
INLINE_IDS = 32

# Bounds on what a reader accepts (a real phone needs far less; see design §10).
MAX_LEVEL = 32
MAX_FOLDER_ENTRIES = 1 << 22
MAX_LIST_IDS = 1 << 23

_BOUNDARY = b"ibsync tree boundary\0"
_LIST_KEY = b"ibsync content list\0"


def is_node(data: bytes | memoryview) -> bool:
    """Whether a tree blob is a format-2 node (else it is format-1 JSON)."""
    return len(data) > 0 and data[0] in _NODE_STARTS


# ---- entries ---------------------------------------------------------------------------------

_packer = msgpack.Packer(unicode_errors="surrogateescape")


def _key(d: Any) -> bytes:
    """An entry's sort key: its name as UTF-8 (byte order is code point order); b"" for an
    entry with no name as text (only a refused one)."""
    name = d.get("name") if isinstance(d, dict) else None
    return name.encode("utf-8", "surrogatepass") if isinstance(name, str) else b""


def _ids(hex_ids: object) -> bytes | None:
    """A content list of lowercase 64-digit hex ids as one bytes, or None if it is not one."""
    if not isinstance(hex_ids, list) or not all(type(c) is str and len(c) == 2 * ID for c in hex_ids):
        return None
    joined = "".join(hex_ids)
    try:
        raw = bytes.fromhex(joined)
    except ValueError:
        return None
    return raw if raw.hex() == joined else None


def _hex_name(name: str) -> str | bytes:
    """A name of lowercase hex digits (even in number) as the bytes they spell, else itself."""
    if not name or len(name) % 2:
        return name
    try:
        raw = bytes.fromhex(name)
    except ValueError:
        return name
    return raw if raw.hex() == name else name  # fromhex also takes capitals and spaces


def _positional(d: Any, store_list: Callable[[bytes], bytes]) -> list | None:
    """The positional form of a well-formed entry, or None when it cannot hold it exactly. The
    fields are taken by name and written by position: the dict's order does not matter."""
    if type(d) is not dict or type(d.get("name")) is not str:
        return None
    kind, keys = d.get("type"), d.keys()
    name = d["name"]
    # fileID names (40 hex digits, most entries of a phone's backup) take half the room as bytes
    head = [_hex_name(name), TYPE_CODES.get(kind) if isinstance(kind, str) else None, d.get("mode"), d.get("mtime_ns")]
    if type(head[2]) is not int or type(head[3]) is not int:
        return None
    if kind == "file" and keys == _FILE_KEYS and type(d["size"]) is int:
        ids = _ids(d["content"])
        if ids is None:
            return None
        n = len(ids) // ID
        return head + [d["size"], ids if n <= INLINE_IDS else [store_list(ids), n]]
    if kind == "dir" and keys == _DIR_KEYS:
        sub = d["subtree"]
        if sub is None:
            return head + [None]
        ids = _ids([sub])
        return head + [ids] if ids is not None else None
    if kind == "symlink" and keys == _LINK_KEYS and type(d["target"]) is str:
        return head + [d["target"]]
    return None


def pack_entry(d: Any, store_list: Callable[[bytes], bytes]) -> bytes:
    """One entry as stored in a leaf (msgpack), positional when it can be; a field the format
    does not have raises ``model.UnknownEntryField``."""
    item = _positional(d, store_list)
    if item is not None:
        try:
            return _packer.pack(item)
        except (UnicodeEncodeError, OverflowError):
            pass  # a name not UTF-8 even with escapes, or an integer beyond 64 bits
    return _json_entry(d)


def _json_entry(d: Any) -> bytes:
    """The stored form of an entry the positional form cannot hold: its JSON text, fields in
    their canonical order (so equal entries are equal bytes however their dicts were built)."""
    return _packer.pack(json.dumps(canonical_entry(d), separators=(",", ":")))


def unpack_entry(item: Any, expand: Callable[[Any], Any]) -> Any:
    """A leaf item in ``Node.to_dict`` form: ``expand`` turns a content list reference into the
    list of hex ids. Anything malformed comes out as a value ``entry_problem`` refuses."""
    if isinstance(item, str):
        try:
            return json.loads(item)
        except (ValueError, RecursionError):
            return item
    if not isinstance(item, list) or not 5 <= len(item) <= 6:
        return item
    name, code, mode, mtime_ns = item[:4]
    if isinstance(name, bytes):
        name = name.hex()
    kind = _TYPE_NAMES.get(code) if type(code) is int else None
    if kind == "file" and len(item) == 6:
        return file_entry(name, mode, mtime_ns, item[4], _content(item[5], expand))
    if kind == "dir" and len(item) == 5:
        value = item[4]
        return dir_entry(
            name,
            mode,
            mtime_ns,
            None if value is None else value.hex() if isinstance(value, bytes) and len(value) == ID else "not an id",
        )
    if kind == "symlink" and len(item) == 5:
        return symlink_entry(name, mode, mtime_ns, item[4])
    # an unknown code must not read as a type name: "file" stored as the code is not a file;
    # a known type with the wrong number of fields gets no mode: both are refused
    return {"name": name, "type": kind or f"code {code!r}"[:20], "mode": None if kind else mode, "mtime_ns": mtime_ns}


def _content(value: Any, expand: Callable[[Any], Any]) -> Any:
    if isinstance(value, bytes):
        if len(value) % ID:
            return None
        return [value[i : i + ID].hex() for i in range(0, len(value), ID)]
    if _is_list_ref(value):
        return expand(value)
    return None


def _is_list_ref(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], bytes)
        and len(value[0]) == ID
        and type(value[1]) is int
    )


def _first_id(item: list) -> bytes | None:
    """The first 32-byte id a positional entry holds (a file's first content id or its list id,
    a folder's subtree id), or None."""
    value = item[-1]
    if item[1] == 0 and type(value) is list:
        value = value[0]
    return value[:ID] if type(value) is bytes and len(value) >= ID else None


# name -> (the entry as read_folder_split returned it, its stored positional form)
Reuse = dict[str, tuple[dict[str, Any], list]]


def _item_name(item: Any) -> Any:
    if isinstance(item, list) and item:
        return item[0].hex() if isinstance(item[0], bytes) else item[0]
    if isinstance(item, str):
        try:
            d = json.loads(item)
        except (ValueError, RecursionError):
            return None
        return d.get("name") if isinstance(d, dict) else None
    return None


# ---- building --------------------------------------------------------------------------------


@dataclass
class BuiltTree:
    """A folder's tree as node blobs: ``id`` is the top node's; ``blobs`` every node (id -> bytes),
    children before their parents."""

    id: bytes
    blobs: dict[bytes, bytes] = field(default_factory=dict)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _hit(h: bytes, bits: int) -> bool:
    return int.from_bytes(h[:4], "little") & ((1 << bits) - 1) == 0


def _cut(
    sizes: list[int], hits: list[bool], cut: Cut, may_end: Callable[[int], bool] | None = None
) -> list[tuple[int, int]]:
    """Split items (their encoded sizes and hash hits) into runs [start, end)."""
    runs: list[tuple[int, int]] = []
    start = size = 0
    for i, s in enumerate(sizes):
        size += s
        count = i + 1 - start
        full = size >= cut.max_bytes and count >= cut.min_items
        ends = hits[i] and size >= cut.min_bytes and count >= cut.min_items and (may_end is None or may_end(i))
        if full or ends:
            runs.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(sizes) or not runs:
        runs.append((start, len(sizes)))
    return runs


def _separator(last: bytes, first: bytes) -> bytes:
    """The shortest prefix of ``first`` that sorts after ``last``: the key naming where a node
    starts, short as parents hold one per child."""
    n = min(len(last), len(first))
    i = 0
    while i < n and last[i] == first[i]:
        i += 1
    return first[: i + 1]


class TreeBuilder:
    """Encodes folders into node blobs with one repository's keyed hash (``hasher``)."""

    def __init__(self, hasher: Callable[[bytes], bytes]) -> None:
        self.hash = hasher
        self.blobs: dict[bytes, bytes] = {}

    def _store(self, data: bytes) -> bytes:
        node_id = self.hash(data)
        self.blobs.setdefault(node_id, data)
        return node_id

    def folder(self, entries: list[Any], reuse: Reuse | None = None) -> BuiltTree:
        self.blobs = {}
        packed = sorted(self._pack(d, reuse) for d in entries)
        keys = [k for k, _, _ in packed]
        items = [p for _, p, _ in packed]
        hits = self._leaf_hits(keys, [i for _, _, i in packed])
        # copies of one name stay in one leaf (a tree only a crafted writer makes has them)
        runs = _cut([len(p) for p in items], hits, LEAF_CUT, lambda i: i + 1 == len(keys) or keys[i] < keys[i + 1])
        children = [
            (
                b"" if start == 0 else _separator(keys[start - 1], keys[start]),
                self._store(b"\x93\x01\x00" + _array_header(end - start) + b"".join(items[start:end])),
            )
            for start, end in runs
        ]
        level = 1
        while len(children) > 1:
            children = self._folder_level(children, level)
            level += 1
        return BuiltTree(children[0][1], self.blobs)

    def _pack(self, d: Any, reuse: Reuse | None) -> tuple[bytes, bytes, bytes | None]:
        """(sort key, packed entry, its first id or None): an entry the caller got from
        ``read_folder_split`` and passes back unchanged is packed from its stored form, without
        the conversions of ``_positional`` (the reader checked that form is canonical)."""
        if reuse is not None and type(d) is dict and type(name := d.get("name")) is str:
            known = reuse.get(name)
            if known is not None and known[0] is d:
                stored = known[1]
                return name.encode(), _packer.pack(stored), _first_id(stored)  # reused names are hex: ASCII
        item = _positional(d, self.id_list)
        if item is not None:
            try:
                return _key(d), _packer.pack(item), _first_id(item)
            except (UnicodeEncodeError, OverflowError):
                pass  # a name not UTF-8 even with escapes, or an integer beyond 64 bits
        return _key(d), _json_entry(d), None

    def _leaf_hits(self, keys: list[bytes], first_ids: list[bytes | None]) -> list[bool]:
        """Where a leaf may end (design §10): after an entry whose first id (a keyed hash the
        entry holds anyway: content, list or subtree id) has its low bits zero; an entry with no
        id, or whose first id an earlier entry of the folder already used (copies of one file),
        takes a keyed hash of its name instead, so equal contents cannot suppress every
        boundary. One keyed hash call per entry was most of the cost of building a folder."""
        mask = (1 << LEAF_CUT.bits) - 1
        seen: set[bytes] = set()
        hits = []
        for k, first in zip(keys, first_ids):
            if first is None or first in seen:
                hits.append(self.hash(_BOUNDARY + k)[0] & mask == 0)
            else:
                seen.add(first)
                hits.append(first[0] & mask == 0)
        return hits

    def _folder_level(self, children: list[tuple[bytes, bytes]], level: int) -> list[tuple[bytes, bytes]]:
        runs = _cut([len(k) + ID + 3 for k, _ in children], [_hit(c, INNER_CUT.bits) for _, c in children], INNER_CUT)
        return [
            (
                children[start][0],
                self._store(
                    _packer.pack(
                        [
                            FOLDER_NODE,
                            level,
                            [k for k, _ in children[start:end]],
                            b"".join(c for _, c in children[start:end]),
                        ]
                    )
                ),
            )
            for start, end in runs
        ]

    def id_list(self, ids: bytes) -> bytes:
        """Store a content list as id-list nodes; returns the top node's id."""
        items = [ids[i : i + ID] for i in range(0, len(ids), ID)]
        level = 0
        while True:
            runs = _cut([ID] * len(items), [_hit(c, LIST_CUT.bits) for c in items], LIST_CUT)
            items = [self._store(_packer.pack([LIST_NODE, level, b"".join(items[s:e])])) for s, e in runs]
            if len(items) == 1:
                return items[0]
            level += 1


def build_tree(hasher: Callable[[bytes], bytes], entries: list[Any], reuse: Reuse | None = None) -> BuiltTree:
    """A folder's node blobs, computed without storing anything (``WriteSession.save_tree``
    stores them; ``repair`` plans with them before it writes). ``reuse``: what
    ``read_folder_split`` returned for an earlier version of the folder; entries taken from it
    unchanged (the same dict objects) are packed without converting them again. The result is
    the same with or without it."""
    return TreeBuilder(hasher).folder(entries, reuse)


def list_key(hasher: Callable[[bytes], bytes], ids: bytes) -> bytes:
    return hasher(_LIST_KEY + ids)


# ---- reading ---------------------------------------------------------------------------------


def parse_node(data: bytes | memoryview, kind: int, level: int | None = None) -> list:
    """One node blob, checked for its shape (MalformedTree otherwise)."""
    if not is_node(data):
        raise MalformedTree("a tree node is not a msgpack node")
    try:
        node = msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape", strict_map_key=False)
    except Exception as e:  # the unpacker raises several types for malformed input, all "not a node"
        raise MalformedTree(f"a tree node does not decode ({e.__class__.__name__})") from None
    if not isinstance(node, list) or type(node[0]) is not int or type(node[1]) is not int:
        raise MalformedTree("a tree node is not a node")
    if node[0] != kind:
        raise MalformedTree(f"a tree node of kind {node[0]} where kind {kind} belongs")
    if not 0 <= node[1] <= MAX_LEVEL or (level is not None and node[1] != level):
        raise MalformedTree(f"a tree node of level {node[1]} where level {level} belongs")
    if kind == FOLDER_NODE and node[1] == 0:
        ok = len(node) == 3 and isinstance(node[2], list)
    elif kind == FOLDER_NODE:
        ok = (
            len(node) == 4
            and isinstance(node[2], list)
            and len(node[2]) > 0
            and all(isinstance(k, bytes) for k in node[2])
            and isinstance(node[3], bytes)
            and len(node[3]) == ID * len(node[2])
        )
    else:
        ok = len(node) == 3 and isinstance(node[2], bytes) and len(node[2]) > 0 and len(node[2]) % ID == 0
    if not ok:
        raise MalformedTree(f"a tree node of kind {kind}, level {node[1]}, is malformed")
    return node


def _split_ids(ids: bytes) -> list[bytes]:
    return [ids[i : i + ID] for i in range(0, len(ids), ID)]


class _Reader:
    """Reads node blobs of one repository, remembering every node it read (a folder's parts)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.parts: list[bytes] = []
        self._seen: set[bytes] = set()

    def node(self, node_id: bytes, kind: int, level: int | None, data: bytes | None = None) -> list:
        node = parse_node(self.repo.load_blob(node_id) if data is None else data, kind, level)
        if node_id not in self._seen:
            self._seen.add(node_id)
            self.parts.append(node_id)
        return node

    def folder_items(self, tree_id: bytes, data: bytes) -> list[Any]:
        """Every leaf item of a folder, in order."""
        items: list[Any] = []
        visited: set[bytes] = set()

        def visit(node_id: bytes, node: list) -> None:
            if node[1] == 0:
                items.extend(node[2])
                if len(items) > MAX_FOLDER_ENTRIES:
                    raise MalformedTree(f"a folder of more than {MAX_FOLDER_ENTRIES} entries")
                return
            for child in _split_ids(node[3]):
                if child in visited:
                    raise MalformedTree("a folder uses one tree node twice")
                visited.add(child)
                visit(child, self.node(child, FOLDER_NODE, node[1] - 1))

        visited.add(tree_id)
        visit(tree_id, self.node(tree_id, FOLDER_NODE, None, data))
        return items

    def id_list(self, ref: list) -> bytes:
        """A content list's ids, from its id-list nodes (MalformedTree if they do not add up)."""
        top, count = ref
        if not 0 < count <= MAX_LIST_IDS:
            raise MalformedTree(f"a content list of {count} ids")
        out = bytearray()
        want = count * ID
        cache: dict[bytes, list] = {}  # one list may use a node many times (runs of equal blocks)

        def get(node_id: bytes, level: int | None) -> list:
            node = cache.get(node_id)
            if node is None:
                node = cache[node_id] = self.node(node_id, LIST_NODE, level)
            elif level is not None and node[1] != level:
                raise MalformedTree(f"a tree node of level {node[1]} where level {level} belongs")
            return node

        def visit(node: list) -> None:
            if node[1] == 0:
                out.extend(node[2])
            else:
                for child in _split_ids(node[2]):
                    visit(get(child, node[1] - 1))
                    if len(out) > want:
                        break
            if len(out) > want:
                raise MalformedTree(f"a content list holds more than the {count} ids it says")

        visit(get(top, None))
        if len(out) != want:
            raise MalformedTree(f"a content list holds {len(out) // ID} ids, not the {count} it says")
        return bytes(out)

    def expand(self, ref: list) -> Any:
        """A content list reference as hex ids, or None (refused) if its nodes are malformed.
        A list node that cannot be read at all (missing, damaged) raises: the folder's tree is
        then not readable, as when its own node is lost."""
        try:
            ids = self.id_list(ref)
        except MalformedTree:
            return None
        hexed = ids.hex()
        return [hexed[i : i + 2 * ID] for i in range(0, len(hexed), 2 * ID)]


def read_folder(repo: Repository, tree_id: bytes, data: bytes) -> tuple[list[Any], list[bytes]]:
    """A format-2 folder's stored entries (``Node.to_dict`` form, or what split_entries refuses)
    and the ids of all its node blobs, top first."""
    reader = _Reader(repo)
    items = reader.folder_items(tree_id, data)
    return [unpack_entry(item, reader.expand) for item in items], reader.parts


@dataclass
class Folder:
    """A folder as its readers use it: the usable entries (``Node.to_dict`` form, stored order),
    the refused ones aside, the ids of its tree blobs, and ``reuse`` for ``build_tree``."""

    good: list[dict[str, Any]]
    rejected: list[Rejected]
    parts: list[bytes]
    reuse: Reuse = field(default_factory=dict)


_I64 = 1 << 63
_U32 = 1 << 32
_HEX_ID = 2 * ID


def split_items(items: list[Any], expand: Callable[[Any], Any]) -> tuple[list[dict], list[Rejected], Reuse]:
    """Leaf items as ``model.split_entries`` would split their dicts, and the reusable ones.

    A file or folder with a hex name stored in the positional form a writer makes of it (the
    form of nearly every entry of a phone's backup) is usable by its shape alone: a hex name is
    a valid name, bytes ids are ids, and the integers are checked here. Only the other items go
    through ``unpack_entry`` and ``entry_problem`` (about 2 µs an entry). The fast items are
    also exactly what ``_positional`` makes of their dicts, so ``build_tree`` may pack them as
    they are (``reuse``); a content list in list nodes is not reused (its nodes would have to
    be checked to be canonical)."""
    decoded: list[Any] = []
    good: list[dict] = []
    reuse: Reuse = {}
    problems: list[tuple[int, str]] = []
    seen: set[str] = set()
    duplicate = False
    append, add = decoded.append, seen.add
    for item in items:
        d = None
        if type(item) is list and 5 <= len(item) <= 6:
            name, code, mode, mtime, last = item[0], item[1], item[2], item[3], item[-1]
            if (
                type(name) is bytes
                and 0 < len(name) <= 127
                and type(code) is int
                and type(mode) is int
                and 0 <= mode < _U32
                and type(mtime) is int
                and -_I64 <= mtime < _I64
            ):
                if code == 0 and len(item) == 6:
                    size = item[4]
                    if (
                        type(size) is int
                        and 0 <= size < _I64
                        and type(last) is bytes
                        and len(last) % ID == 0
                        and len(last) <= INLINE_IDS * ID
                    ):
                        h = last.hex()
                        d = file_entry(
                            name.hex(), mode, mtime, size, [h[i : i + _HEX_ID] for i in range(0, len(h), _HEX_ID)]
                        )
                elif code == 1 and len(item) == 5 and (last is None or type(last) is bytes and len(last) == ID):
                    d = dir_entry(name.hex(), mode, mtime, None if last is None else last.hex())
        if d is not None:
            n = d["name"]
            if n in seen:
                duplicate = True
            add(n)
            reuse[n] = (d, item)
            good.append(d)
            append(d)
            continue
        d = unpack_entry(item, expand)
        n = d.get("name") if isinstance(d, dict) else None
        if isinstance(n, str):  # a refused entry's name counts too, as in split_entries
            if n in seen:
                duplicate = True
            add(n)
        problem = entry_problem(d)
        if problem is None:
            good.append(d)
        else:
            problems.append((len(decoded), problem))
        append(d)
    if duplicate:  # only a crafted tree: every copy is refused, as split_entries words it
        good, rejected = split_entries(decoded)
        names = {d["name"] for d in good}
        return good, rejected, {n: r for n, r in reuse.items() if n in names}
    return good, [_rejected(i, decoded[i], p) for i, p in problems], reuse


def _rejected(i: int, d: Any, problem: str) -> Rejected:
    if not isinstance(d, dict):
        return Rejected(f"<entry {i + 1} of the folder>", problem, d)
    name = d.get("name")
    return Rejected(name if isinstance(name, str) else repr(name)[:60], problem, d)


def read_folder_split(repo: Repository, tree_id: bytes, data: bytes) -> Folder:
    """A format-2 folder split into usable and refused entries (as ``split_entries`` splits
    ``read_folder``'s entries, at about half the cost), with its parts and reusable items."""
    reader = _Reader(repo)
    items = reader.folder_items(tree_id, data)
    good, rejected, reuse = split_items(items, reader.expand)
    return Folder(good, rejected, reader.parts, reuse)


# ---- reading by parts ------------------------------------------------------------------------


def _path_items(repo: Repository, tree_id: bytes, name: str, reader: _Reader) -> list[Any] | None:
    """The items of the leaf where ``name`` belongs, reading only the nodes on its path; None
    for a format-1 tree."""
    data = repo.load_blob(tree_id)
    if not is_node(data):
        return None
    node = reader.node(tree_id, FOLDER_NODE, None, data)
    key = name.encode("utf-8", "surrogatepass")
    while node[1] > 0:
        i = max(0, bisect_right(node[2], key) - 1)
        node = reader.node(node[3][i * ID : (i + 1) * ID], FOLDER_NODE, node[1] - 1)
    return [item for item in node[2] if _item_name(item) == name]


def lookup(repo: Repository, tree_id: bytes, name: str) -> dict[str, Any] | None:
    """One usable entry of a folder by name (``Node.to_dict`` form), or None: reads only the
    nodes on the name's path (and the file's list nodes). A copy of the name that a crafted tree
    stores out of order elsewhere is not seen here; readers of whole folders refuse both."""
    reader = _Reader(repo)
    found = _path_items(repo, tree_id, name, reader)
    if found is None:
        found = [d for d in repo.load_tree_entries(tree_id) if isinstance(d, dict) and d.get("name") == name]
    if len(found) != 1:
        return None
    return _usable(found[0], reader)


def content_id(repo: Repository, tree_id: bytes, name: str) -> bytes | None:
    """A 32-byte key of the content list of the usable file ``name`` in a folder (None if there
    is none), read without the file's list nodes: two files with equal keys in one repository
    have equal content. For a long list it is the id of its top list node; for a short one,
    and in a format-1 tree, a keyed hash of the ids (so a long list stored in format 1 and the
    same list in format 2 have different keys)."""
    reader = _Reader(repo)
    found = _path_items(repo, tree_id, name, reader)
    if found is not None:
        if len(found) != 1 or not isinstance(found[0], list) or len(found[0]) != 6:
            return None
        head = unpack_entry(found[0][:5] + [b""], reader.expand)  # the fields, without the list
        ref = found[0][5]
        if entry_problem(head) is not None or head["type"] != "file":
            return None
        if _is_list_ref(ref):
            return bytes(ref[0])
        return list_key(repo.blob_id, ref) if isinstance(ref, bytes) and len(ref) % ID == 0 else None
    d = lookup(repo, tree_id, name)
    ids = _ids(d["content"]) if d is not None and d["type"] == "file" else None
    return list_key(repo.blob_id, ids) if ids is not None else None


def diff_folder(
    repo: Repository, old: bytes | None, new: bytes | None
) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """The usable entries of one folder that differ between two versions of it, by name, as
    (old entry or None, new entry or None), in name order, ``Node.to_dict`` form. Node blobs
    whose ids are equal on both sides are not read: the cost follows what changed.
    Subfolders are not descended."""
    if old == new:
        return
    nodes: dict[bytes, list] = {}  # parsed nodes of this diff: the tops are read once
    a, b = _frontier(repo, old, nodes), _frontier(repo, new, nodes)
    if a is None or b is None:  # a format-1 tree: whole folders, as they are stored
        yield from _diff_items(repo, _whole(repo, old), _whole(repo, new))
        return
    while True:
        a, b = _cancel(a, b)
        top = max((level for _, level in a + b), default=0)
        if top == 0:
            break
        a, b = _expand(repo, a, top, nodes), _expand(repo, b, top, nodes)
    yield from _diff_items(repo, _leaf_items(repo, a, nodes), _leaf_items(repo, b, nodes))


# A frontier: nodes (id, level) whose leaves, in order, hold the folder's entries.
_Frontier = list[tuple[bytes, int]]


def _parsed(repo: Repository, nodes: dict[bytes, list], node_id: bytes, level: int | None) -> list:
    node = nodes.get(node_id)
    if node is None or (level is not None and node[1] != level):
        node = nodes[node_id] = parse_node(repo.load_blob(node_id), FOLDER_NODE, level)
    return node


def _frontier(repo: Repository, tree_id: bytes | None, nodes: dict[bytes, list]) -> _Frontier | None:
    if tree_id is None:
        return []
    data = repo.load_blob(tree_id)
    if not is_node(data):
        return None
    nodes[tree_id] = parse_node(data, FOLDER_NODE)
    return [(tree_id, nodes[tree_id][1])]


def _cancel(a: _Frontier, b: _Frontier) -> tuple[_Frontier, _Frontier]:
    """Both frontiers without the nodes they share (equal ids hold equal entries)."""
    common = Counter(a) & Counter(b)
    if not common:
        return a, b
    return _without(a, Counter(common)), _without(b, Counter(common))


def _without(frontier: _Frontier, drop: Counter) -> _Frontier:
    out: _Frontier = []
    for n in frontier:
        if drop[n] > 0:
            drop[n] -= 1
        else:
            out.append(n)
    return out


def _expand(repo: Repository, frontier: _Frontier, level: int, nodes: dict[bytes, list]) -> _Frontier:
    out: _Frontier = []
    for node_id, node_level in frontier:
        if node_level != level:
            out.append((node_id, node_level))
            continue
        node = _parsed(repo, nodes, node_id, level)
        out.extend((child, level - 1) for child in _split_ids(node[3]))
    if len(out) > MAX_FOLDER_ENTRIES:
        raise MalformedTree(f"a folder of more than {MAX_FOLDER_ENTRIES} nodes")
    return out


def _leaf_items(repo: Repository, frontier: _Frontier, nodes: dict[bytes, list]) -> list[Any]:
    items: list[Any] = []
    for node_id, _ in frontier:
        items.extend(_parsed(repo, nodes, node_id, 0)[2])
    return items


def _whole(repo: Repository, tree_id: bytes | None) -> list[Any]:
    return [] if tree_id is None else repo.load_tree_entries(tree_id)


def _diff_items(repo: Repository, old: list[Any], new: list[Any]) -> Iterator[tuple[dict | None, dict | None]]:
    """Compare stored items (format-2 leaf items or format-1 entries) by name; an entry a reader
    refuses counts as absent."""
    a, b = _by_name(old), _by_name(new)
    reader = _Reader(repo)
    for name in sorted(a.keys() | b.keys()):
        ia, ib = a.get(name), b.get(name)
        if ia == ib:
            continue  # equal as stored (a long content list: equal list ids)
        da, db = _usable(ia, reader), _usable(ib, reader)
        if da != db:
            yield da, db


def _by_name(items: list[Any]) -> dict[str, Any]:
    """name -> stored item, for names stored once (a name stored twice is refused)."""
    names = [item.get("name") if isinstance(item, dict) else _item_name(item) for item in items]
    counts = Counter(n for n in names if isinstance(n, str))
    return {n: item for n, item in zip(names, items) if isinstance(n, str) and counts[n] == 1}


def _usable(item: Any, reader: _Reader) -> dict[str, Any] | None:
    if item is None:
        return None
    d = item if isinstance(item, dict) else unpack_entry(item, reader.expand)
    return d if entry_problem(d) is None else None
