"""The vocabulary shared by every layer: snapshots, trees and the devices they came from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any


def utc_iso(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


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
        d: dict[str, Any] = {"name": self.name, "type": self.type, "mode": self.mode, "mtime_ns": self.mtime_ns}
        if self.type == "file":
            d.update(size=self.size, content=[c.hex() for c in self.content])
        elif self.type == "dir":
            d["subtree"] = self.subtree.hex() if self.subtree else None
        elif self.type == "symlink":
            d["target"] = self.target
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Node":
        return cls(
            name=d["name"],
            type=d["type"],
            mode=d["mode"],
            mtime_ns=d["mtime_ns"],
            size=d.get("size", 0),
            content=[bytes.fromhex(c) for c in d.get("content", ())],
            subtree=bytes.fromhex(d["subtree"]) if d.get("subtree") else None,
            target=d.get("target"),
        )


def encode_tree(entries: list[dict[str, Any]]) -> bytes:
    """Serialise a folder's entries (``Node.to_dict`` form), sorted by name."""
    entries = sorted(entries, key=lambda d: d["name"])
    return json.dumps({"nodes": entries}, separators=(",", ":")).encode()


def decode_tree_entries(data: bytes) -> list[dict[str, Any]]:
    return json.loads(data)["nodes"]


def decode_tree(data: bytes) -> list[Node]:
    return [Node.from_dict(d) for d in decode_tree_entries(data)]


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
    def from_json(cls, data: bytes, id: str = "") -> "Snapshot":
        d = json.loads(data)
        return cls(
            time=parse_iso(d["time"]),
            tree=bytes.fromhex(d["tree"]),
            device=DeviceInfo(**d["device"]),
            backup_date=parse_iso(d["backup_date"]) if d.get("backup_date") else None,
            ios_encrypted=bool(d.get("ios_encrypted")),
            source=d.get("source", {}),
            folder=d.get("folder", ""),
            folder_mode=d.get("folder_mode", 0),
            folder_mtime_ns=d.get("folder_mtime_ns", 0),
            hostname=d.get("hostname", ""),
            username=d.get("username", ""),
            parent=d.get("parent"),
            snapshot_state=d.get("snapshot_state", "finished"),
            summary=Summary(**d.get("summary", {})),
            program=d.get("program", ""),
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
