"""``diff``: the files added, removed and changed from one snapshot to another, per domain.

The comparison itself is ``history.diff_snapshots`` (rows compared only where the two
Manifest.db differ); this adds the per-domain and total counts and sizes a report shows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..model import Snapshot
from ..repo.repository import Repository
from .history import Change, diff_snapshots
from .ios_crypto import BackupKeyring
from .manifest import BadRow
from .manifest_cache import ManifestCache

KINDS = ("added", "removed", "changed")


@dataclass
class DomainDiff:
    """Files and their recorded sizes: of B for added and changed files, of A for removed ones."""

    added: int = 0
    added_bytes: int = 0
    removed: int = 0
    removed_bytes: int = 0
    changed: int = 0
    changed_bytes: int = 0

    def add(self, kind: str, size: int) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + size)

    def merge(self, other: DomainDiff) -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class SnapshotDiff:
    a: Snapshot
    b: Snapshot
    changes: list[Change]  # by domain and relative path
    domains: dict[str, DomainDiff]  # by domain name; only domains with a change
    total: DomainDiff
    bad: list[tuple[Snapshot, BadRow]] = field(default_factory=list)  # rows that could not be read

    @property
    def different_devices(self) -> bool:
        return self.a.device.udid != self.b.device.udid


def summarize(changes: Iterable[Change]) -> tuple[dict[str, DomainDiff], DomainDiff]:
    """Per-domain counts and sizes (domains sorted by name) and their total."""
    per_domain: dict[str, DomainDiff] = {}
    for c in changes:
        per_domain.setdefault(c.domain, DomainDiff()).add(c.kind, c.size)
    per_domain = dict(sorted(per_domain.items()))
    total = DomainDiff()
    for d in per_domain.values():
        total.merge(d)
    return per_domain, total


def compare_snapshots(
    repo: Repository, a: Snapshot, b: Snapshot, keyring: BackupKeyring | None = None, cache: ManifestCache | None = None
) -> SnapshotDiff:
    """What differs from ``a`` to ``b``: each changed file, and the counts per domain."""
    changes, bad = diff_snapshots(repo, a, b, keyring, cache)
    per_domain, total = summarize(changes)
    return SnapshotDiff(a, b, changes, per_domain, total, bad)
