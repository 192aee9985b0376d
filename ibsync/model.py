"""The vocabulary shared by every layer: snapshots, trees and the devices they came from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import InvalidData, RepoError

# A name longer than this does not fit one component of the filesystems a restore writes to
# (ext4, APFS, NTFS: 255 bytes or UTF-16 units); refusing it up front names the entry instead of
# failing mid-restore with ENAMETOOLONG.
MAX_NAME_BYTES = 255
NODE_TYPES = frozenset({"file", "dir", "symlink"})
_INT64 = 1 << 63


def utc_iso(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class DeviceInfo:
    """What a backup says about the device it came from (Info.plist, Manifest.plist)."""

    udid: str
    name: str = ""
    product_type: str = ""
    ios_version: str = ""
    build_version: str = ""
    serial_number: str = ""


# ---- tree entries ------------------------------------------------------------------------------
# A tree entry is a dict (the form every reader and writer of trees passes around: a million of
# them in a phone's backup, so no objects). Its fields, per type, in the one order every
# encoding writes them (design §10): a format-1 tree's JSON, a format-2 entry's positional array
# and the JSON text of an entry the positional form cannot hold. The order is the one ibsync
# always wrote, so trees built before the constructors existed are the same bytes.
ENTRY_FIELDS: dict[str, tuple[str, ...]] = {
    "file": ("name", "type", "mode", "mtime_ns", "size", "content"),
    "dir": ("name", "type", "mode", "mtime_ns", "subtree"),
    "symlink": ("name", "type", "mode", "mtime_ns", "target"),
}
_ENTRY_KEYS = {kind: frozenset(fields) for kind, fields in ENTRY_FIELDS.items()}


class UnknownEntryField(RepoError):
    """A writer handed a tree entry a field the format does not have (a bug in the writer, or
    an entry read from a tree no ibsync wrote): refused rather than stored where no reader
    looks."""


# The only builders of entries: one dict literal each (a call costs ~0.03 µs a file; the
# literal itself ~0.15 µs). ``content`` and ``subtree`` may be None while the archiver stores a
# file or a sub-folder; they are filled in before the folder's tree is written.
def file_entry(name: str, mode: int, mtime_ns: int, size: int, content: list[str] | None) -> dict[str, Any]:
    """A file: ``content`` its data blob ids as lowercase hex, in order."""
    return {"name": name, "type": "file", "mode": mode, "mtime_ns": mtime_ns, "size": size, "content": content}


def dir_entry(name: str, mode: int, mtime_ns: int, subtree: str | None) -> dict[str, Any]:
    """A folder: ``subtree`` its tree id as hex (None: a folder whose listing was not stored)."""
    return {"name": name, "type": "dir", "mode": mode, "mtime_ns": mtime_ns, "subtree": subtree}


def symlink_entry(name: str, mode: int, mtime_ns: int, target: str | None) -> dict[str, Any]:
    """A symbolic link to ``target`` (None or empty: an entry every reader refuses)."""
    return {"name": name, "type": "symlink", "mode": mode, "mtime_ns": mtime_ns, "target": target}


def canonical_entry(d: Any) -> Any:
    """``d`` with its fields in the canonical order of its type, for encoding.

    An entry of a known type may hold only that type's fields (a missing one is left missing:
    readers take a default or refuse it); any other field raises :class:`UnknownEntryField`.
    Anything else (not a dict, an unknown type) is what readers refuse whatever its fields
    are; only repair hands such an entry back, to keep it visible, and it comes back as it is."""
    if type(d) is not dict:
        return d
    kind = d.get("type")
    fields = ENTRY_FIELDS.get(kind) if type(kind) is str else None
    if fields is None or tuple(d) == fields:  # the common case, ~0.2 µs: every writer builds this
        return d
    assert isinstance(kind, str)
    if not _ENTRY_KEYS[kind].issuperset(d):
        extra = sorted(str(k) for k in d.keys() - _ENTRY_KEYS[kind])
        raise UnknownEntryField(
            f"tree entry {str(d.get('name'))[:80]!r}: a {kind} has no field "
            + ", ".join(repr(k[:40]) for k in extra[:3])
        )
    return {k: d[k] for k in fields if k in d}


@dataclass
class Node:
    """One entry of a directory in a snapshot. ``content`` lists a file's data blob ids in order."""

    name: str
    type: str  # "file" | "dir" | "symlink"
    mode: int
    mtime_ns: int
    size: int = 0
    content: list[bytes] = field(default_factory=list)
    subtree: bytes | None = None
    target: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.type == "file":
            return file_entry(self.name, self.mode, self.mtime_ns, self.size, [c.hex() for c in self.content])
        if self.type == "dir":
            return dir_entry(self.name, self.mode, self.mtime_ns, self.subtree.hex() if self.subtree else None)
        if self.type == "symlink":
            return symlink_entry(self.name, self.mode, self.mtime_ns, self.target)
        # not a type of the format (from_dict never makes one): refused by every reader
        return {"name": self.name, "type": self.type, "mode": self.mode, "mtime_ns": self.mtime_ns}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Node:
        return cls(
            name=d["name"],
            type=d["type"],
            mode=d["mode"],
            mtime_ns=d["mtime_ns"],
            # only the fields of its type: entry_problem checked those, not the others
            size=d.get("size", 0) if d["type"] == "file" else 0,
            content=[bytes.fromhex(c) for c in d.get("content", ())] if d["type"] == "file" else [],
            subtree=bytes.fromhex(d["subtree"]) if d["type"] == "dir" and d.get("subtree") else None,
            target=d.get("target") if d["type"] == "symlink" else None,
        )


class MalformedTree(RepoError):
    """A tree blob that authenticates but is not a tree (only a writer of the repository, with
    the password or of an unencrypted one, can store such a thing)."""


def name_problem(name: object, *, separators: str = "/\\", subject: str = "its name") -> str | None:
    """Why ``name`` cannot be one entry of a folder on disk, or None when it can (the reason
    starts with ``subject``).

    A tree names its entries; every reader joins those names to a folder of its own (restore's
    target, extract's output). Anyone who can write a snapshot chooses them, so a name must be
    exactly one path component: ``..``, ``a/../..`` or an absolute name would land outside (and
    pathlib drops the left side of a join for an absolute name). By default both separators are
    refused so a snapshot restores the same way on Windows; extract, whose names are the
    device's own, passes only the system's."""
    if not isinstance(name, str):
        return f"{subject} is not text"
    if name in ("", ".", ".."):
        return f"{subject} is empty" if not name else f"{subject} is '{name}'"
    for sep in separators:  # a loop, not any(): this runs for every entry of every tree read
        if sep in name:
            return f"{subject} holds a path separator"
    if "\0" in name:
        return f"{subject} holds a NUL character"
    try:
        # surrogateescape: a name imported from a non-UTF-8 folder on Linux is legitimate
        length = len(name.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return f"{subject} is not valid Unicode"
    if length > MAX_NAME_BYTES:
        return f"{subject} is {length} bytes long (a folder entry holds at most {MAX_NAME_BYTES})"
    return None


def _is_int(v: object, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < high


def _is_hex(v: object) -> bool:
    if not isinstance(v, str):
        return False
    try:
        bytes.fromhex(v)
    except ValueError:
        return False
    return True


def entry_problem(d: object) -> str | None:
    """Why the tree entry ``d`` (``Node.to_dict`` form) cannot be restored as it says, or None.
    The name first (see :func:`name_problem`), then the fields a restore hands to the system."""
    if not isinstance(d, dict):
        return "it is not a tree entry"
    problem = name_problem(d.get("name"))
    if problem:
        return problem
    kind = d.get("type")
    if not isinstance(kind, str) or kind not in NODE_TYPES:
        return f"its type {str(kind)[:20]!r} is unknown"
    if not _ENTRY_KEYS[kind].issuperset(d):  # ~0.07 µs (``d.keys() <= ...`` takes twice that)
        # a field no ibsync writes: whatever it means, a restore would drop it, and a writer
        # handed the entry back (import's files cache, copy) must refuse it (canonical_entry)
        return "it has a field its type does not have"
    if not _is_int(d.get("mode"), 0, 1 << 32) or not _is_int(d.get("mtime_ns"), -_INT64, _INT64):
        return "its mode or time is malformed"
    if kind == "file":
        content = d.get("content", [])
        if not _is_int(d.get("size", 0), 0, _INT64) or not isinstance(content, list) or not all(map(_is_hex, content)):
            return "its size or content is malformed"
    elif kind == "dir":
        if d.get("subtree") is not None and not _is_hex(d["subtree"]):
            return "its tree id is malformed"
    else:
        target = d.get("target")
        if not isinstance(target, str) or not target or "\0" in target:
            return "its link target is empty or malformed"
    return None


@dataclass(frozen=True)
class Rejected:
    """A tree entry no reader uses: ``name`` as printable text (the entry's own when it has
    one), why, and the entry as stored (for ``collect_blobs``, which must keep its data)."""

    name: str
    reason: str
    entry: Any = field(compare=False, repr=False)


def split_entries(entries: list[Any]) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """The entries a folder on disk can hold, and the others with why. A name stored more than
    once is refused in every copy: no reader may pick one silently (a symlink and a folder of
    one name would otherwise let a restore write under the link)."""
    seen: dict[object, int] = {}
    for d in entries:
        if isinstance(d, dict) and isinstance(d.get("name"), str):
            seen[d["name"]] = seen.get(d["name"], 0) + 1
    good: list[dict[str, Any]] = []
    rejected: list[Rejected] = []
    for i, d in enumerate(entries):
        problem = entry_problem(d)
        if problem is None and seen[d["name"]] > 1:
            problem = f"its name appears {seen[d['name']]} times in its folder"
        if problem is None:
            good.append(d)
        elif not isinstance(d, dict):
            rejected.append(Rejected(f"<entry {i + 1} of the folder>", problem, d))
        else:
            name = d.get("name")
            rejected.append(Rejected(name if isinstance(name, str) else repr(name)[:60], problem, d))
    return good, rejected


def reports(rejected: list[Rejected]) -> list[tuple[str, str]]:
    """(name, reason) of refused entries, each once (the copies of a twice-stored name are one report)."""
    return list(dict.fromkeys((r.name, r.reason) for r in rejected))


class Tree(list):  # list[Node]
    """A decoded tree: the entries every reader may use, in name order, as a list; the ones it
    must not (``rejected``) kept aside so restore and check can name them."""

    def __init__(self, nodes: list[Node], rejected: list[Rejected], parts: list[bytes] | None = None) -> None:
        super().__init__(nodes)
        self.rejected = rejected
        self.parts = parts or []  # the ids of the blobs it was read from (format 2: its nodes)


def encode_tree(entries: list[dict[str, Any]]) -> bytes:
    """Serialise a folder's entries (``Node.to_dict`` form), sorted by name, as a format-1
    tree (JSON; repositories of format version 1 keep getting these, design §10). Each entry's
    fields are written in their canonical order, whatever order its dict holds them in; a
    field the format does not have raises :class:`UnknownEntryField`."""
    entries = sorted(map(canonical_entry, entries), key=_name_key)
    return json.dumps({"nodes": entries}, separators=(",", ":")).encode()


def _name_key(d: Any) -> str:
    # total: an entry with no name as text (only a refused one, which repair keeps) sorts first
    name = d.get("name") if isinstance(d, dict) else None
    return name if isinstance(name, str) else ""


def decode_tree_entries(data: bytes) -> list[Any]:
    """A tree's stored entries as they are (each checked by :func:`split_entries` before use)."""
    try:
        nodes = json.loads(data)["nodes"]
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise MalformedTree(f"a tree blob is not a tree ({e.__class__.__name__})") from None
    if not isinstance(nodes, list):
        raise MalformedTree("a tree blob is not a tree (its entries are not a list)")
    return nodes


def decode_tree(data: bytes) -> Tree:
    good, rejected = split_entries(decode_tree_entries(data))
    return Tree([Node.from_dict(d) for d in good], rejected)


@dataclass
class Summary:
    files: int = 0
    dirs: int = 0
    total_bytes: int = 0  # logical bytes of all files in the snapshot
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    bytes_read: int = 0  # bytes ibsync had to read and chunk
    blobs_added: int = 0
    raw_bytes_added: int = 0  # plaintext bytes of new blobs
    added_bytes: int = 0  # bytes the repository grew by (packs, after compression and encryption)
    duration_s: float = 0.0


def _text(d: dict, key: str, default: str = "") -> str:
    value = d.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"'{key}' is not text")
    return value


def _int(d: dict, key: str) -> int:
    value = d.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not -_INT64 <= value < _INT64:
        raise ValueError(f"'{key}' is not an integer")
    return value


@dataclass
class Snapshot:
    time: datetime  # when ibsync stored it
    tree: bytes
    device: DeviceInfo
    backup_date: datetime | None  # when the device made the backup (Status.plist Date)
    ios_encrypted: bool
    source: dict[str, Any]  # {"kind": "folder", "path": ...} or {"kind": "device", ...}
    folder: str = ""  # name of the device folder (restore recreates it); the UDID when empty
    folder_mode: int = 0  # st_mode and mtime of the device folder itself (0: unknown)
    folder_mtime_ns: int = 0
    hostname: str = ""
    username: str = ""
    parent: str | None = None
    snapshot_state: str = "finished"
    summary: Summary = field(default_factory=Summary)
    program: str = ""
    id: str = ""  # storage name, filled in when loaded or saved; not part of the stored JSON

    def to_json(self) -> bytes:
        d = {
            "version": 1,
            "time": utc_iso(self.time),
            "tree": self.tree.hex(),
            "device": asdict(self.device),
            "backup_date": utc_iso(self.backup_date) if self.backup_date else None,
            "ios_encrypted": self.ios_encrypted,
            "source": self.source,
            "folder": self.folder,
            "folder_mode": self.folder_mode,
            "folder_mtime_ns": self.folder_mtime_ns,
            "hostname": self.hostname,
            "username": self.username,
            "parent": self.parent,
            "snapshot_state": self.snapshot_state,
            "summary": asdict(self.summary),
            "program": self.program,
        }
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, id: str = "") -> Snapshot:
        """Parse a snapshot; ValueError (or TypeError) for anything not of the shape §11 gives.
        Whoever can write a snapshot chooses every field, and readers use them as text, numbers
        and paths without looking again, so each field's type is checked here, once."""
        try:
            return cls._from_json(data, id)
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
            raise InvalidData(f"not a snapshot ({e})") from None

    @classmethod
    def _from_json(cls, data: bytes, id: str) -> Snapshot:
        d = json.loads(data)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        device = d.get("device")
        if not isinstance(device, dict):
            raise ValueError("'device' is not an object")
        known = {f for f in DeviceInfo.__dataclass_fields__}
        dev = {k: _text(device, k) for k in known if k in device}  # newer fields are ignored
        if not dev.get("udid"):
            raise ValueError("the device has no UDID")
        tree = bytes.fromhex(_text(d, "tree"))
        if len(tree) != 32:
            raise ValueError("'tree' is not a blob id")
        summary = d.get("summary", {})
        if not isinstance(summary, dict):
            raise ValueError("'summary' is not an object")
        known_summary = Summary.__dataclass_fields__
        counts: dict[str, Any] = {
            k: v for k, v in summary.items() if k in known_summary and isinstance(v, (int, float))
        }
        source = d.get("source", {})
        parent = d.get("parent")
        return cls(
            time=parse_iso(_text(d, "time")),
            tree=tree,
            device=DeviceInfo(**dev),
            backup_date=parse_iso(_text(d, "backup_date")) if d.get("backup_date") else None,
            ios_encrypted=bool(d.get("ios_encrypted")),
            source=source if isinstance(source, dict) else {},
            folder=_text(d, "folder"),
            folder_mode=_int(d, "folder_mode"),
            folder_mtime_ns=_int(d, "folder_mtime_ns"),
            hostname=_text(d, "hostname"),
            username=_text(d, "username"),
            parent=parent if isinstance(parent, str) else None,
            snapshot_state=_text(d, "snapshot_state", "finished"),
            summary=Summary(**counts),
            program=_text(d, "program"),
            id=id,
        )

    def of_device(self, device: str | None) -> bool:
        """Whether this is a snapshot of ``device`` (its UDID in either case, as Info.plist and
        folder names differ, or its name); None matches all."""
        return device is None or device.upper() == self.device.udid.upper() or device == self.device.name

    @property
    def folder_name(self) -> str:
        return self.folder or self.device.udid

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def sort_key(self) -> tuple:
        return (self.backup_date or self.time, self.time)
