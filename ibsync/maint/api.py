"""Maintenance of an open repository, one call per job: retention (forget), prune, check.

The command line (``ibsync forget``, ``prune``, ``check``), the agent and any other caller run
maintenance through these functions and print or record what they return; nothing here prints.
Each returns a dataclass with ``to_dict()`` (what the command's ``--json`` prints).

The caller opens the repository and holds its lock for the whole call (``RepoLock(repo,
exclusive=...).acquire()``, or ``App.open_repo`` in the CLI), as design.md §16 requires:

==================  ===========================================================================
apply_retention,    shared (or exclusive): only snapshot objects are deleted, which no import,
forget_snapshots    restore or check running meanwhile depends on
prune               exclusive (a dry run: any), with the index loaded after the lock was taken
check               shared (or exclusive); the index need not be loaded (check loads it itself,
                    reporting damaged objects rather than failing)
==================  ===========================================================================

A call without the lock it needs raises :class:`LockRequired` before touching anything: a
prune beside an import could delete data the import is about to reference.

Failed deletions are not exceptions: they are collected in the result's ``failed`` (object
path -> why), the rest goes ahead, and the repository stays valid; the caller reports them and
runs the job again later. Bad input (an empty policy, an unknown device, an ambiguous id, a
malformed subset) is a one-line :class:`ibsync.errors.UserError`; a repository prune cannot
judge safely (a damaged snapshot or index object) is a :class:`ibsync.errors.RepoError`, raised
before anything is deleted; a lost lock is :class:`ibsync.repo.lock.LockLost`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, tzinfo

from ..errors import NameNotFound, UserError
from ..model import DeviceInfo, Snapshot, utc_iso
from ..progress import NULL_PROGRESS, Progress
from ..repo.repository import Repository
from ..storage import Kind, object_path
from .check import CheckResult, Subset
from .check import check as _check
from .forget import (
    UNLIMITED,
    Decision,
    Duration,
    RetentionPolicy,
    apply_policy_by_device,
    group_by_device,
)
from .prune import PrunePlan, PruneResult, execute_prune, plan_prune
from .repair import delete_objects

__all__ = [
    "UNLIMITED",
    "CheckResult",
    "Decision",
    "DeviceRetention",
    "Duration",
    "ForgetResult",
    "KeepPolicy",
    "LockRequired",
    "PrunePlan",
    "PruneResult",
    "RetentionPolicy",
    "Subset",
    "apply_retention",
    "check",
    "forget_snapshots",
    "prune",
]

# The retention policy the agent reads from ``keep = {...}`` (KeepPolicy.from_mapping); the same
# class as the command line's --keep-* options build.
KeepPolicy = RetentionPolicy


class LockRequired(RuntimeError):
    """A maintenance call without the repository lock it needs: a bug in the caller."""


def _require_lock(repo: Repository, what: str, *, exclusive: bool) -> None:
    lock = getattr(repo, "lock", None)
    if lock is None or (exclusive and not lock.exclusive):
        kind = "exclusive" if exclusive else "shared or exclusive"
        raise LockRequired(
            f"{what} needs the repository's {kind} lock held for the whole call "
            f"(RepoLock(repo, exclusive={exclusive}).acquire())"
        )


# ---- retention (forget) ---------------------------------------------------------------------


def _snapshot_dict(s: Snapshot) -> dict:
    return {
        "id": s.id,
        "short_id": s.short_id,
        "time": utc_iso(s.time),
        "backup_date": utc_iso(s.backup_date) if s.backup_date else None,
    }


@dataclass
class DeviceRetention:
    """What retention decided for one device."""

    device: DeviceInfo  # as its newest snapshot (policy) or first chosen one (ids) records it
    remove: list[Snapshot]
    keep: list[Decision] | None = None  # kept snapshots, newest first, with their reasons; None: chosen by id

    def to_dict(self) -> dict:
        out: dict = {"device": asdict(self.device)}
        if self.keep is not None:
            out["keep"] = [{**_snapshot_dict(d.snapshot), "reasons": d.reasons} for d in self.keep]
        out["remove"] = [_snapshot_dict(s) for s in self.remove]
        return out


@dataclass
class ForgetResult:
    dry_run: bool
    policy: RetentionPolicy | None  # None: snapshots given by id
    groups: list[DeviceRetention] = field(default_factory=list)  # by device UDID
    remove: list[Snapshot] = field(default_factory=list)  # chosen for removal, in the groups' order
    removed: list[str] = field(default_factory=list)  # ids now gone (incl. already gone); none in a dry run
    failed: dict[str, str] = field(default_factory=dict)  # object path -> why it could not be deleted

    @property
    def kept(self) -> list[Snapshot]:
        return [d.snapshot for g in self.groups for d in (g.keep or [])]

    @property
    def problems(self) -> list[str]:
        """One line per snapshot that could not be deleted (it stays, intact)."""
        return [f"could not delete {path}: {why}" for path, why in sorted(self.failed.items())]

    def to_dict(self) -> dict:
        """What ``forget --json`` prints (``failed`` only when a deletion failed)."""
        out: dict = {
            "dry_run": self.dry_run,
            "policy": self.policy.to_dict() if self.policy is not None else None,
            "groups": [g.to_dict() for g in self.groups],
            "remove": [s.id for s in self.remove],
            "removed": list(self.removed),
        }
        if self.failed:
            out["failed"] = dict(self.failed)
        return out


def _snapshots_of(repo: Repository, device: str | None) -> list[Snapshot]:
    snaps = repo.snapshots()
    if device:
        snaps = [s for s in snaps if s.of_device(device)]
        if not snaps:
            raise NameNotFound(f"no snapshot of a device '{device}'")
    return snaps


def _delete(repo: Repository, result: ForgetResult) -> None:
    """Delete the chosen snapshot objects and nothing else: every blob stays until prune finds
    it unused. Each deletion stands alone (design.md §19); one already gone counts as removed."""
    if result.dry_run:
        return
    delete_objects(repo, Kind.SNAPSHOTS, [s.id for s in result.remove], result.failed)
    result.removed = [s.id for s in result.remove if object_path(Kind.SNAPSHOTS, s.id) not in result.failed]


def apply_retention(
    repo: Repository,
    policy: RetentionPolicy,
    *,
    device: str | None = None,
    dry_run: bool = False,
    tz: tzinfo | None = None,
    now: datetime | None = None,
) -> ForgetResult:
    """Forget the snapshots ``policy`` does not keep, applied to each device on its own
    (``device``: a UDID or name, only that device's snapshots). Needs the shared (or exclusive)
    lock. ``tz``/``now``: the zone periods are counted in and the present (default: local, now)."""
    _require_lock(repo, "forget", exclusive=False)
    if policy.is_empty():
        raise UserError("an empty retention policy would forget nothing: set at least one rule above 0")
    result = ForgetResult(dry_run=dry_run, policy=policy)
    for decisions in apply_policy_by_device(_snapshots_of(repo, device), policy, tz=tz, now=now).values():
        remove = [d.snapshot for d in decisions if not d.keep]
        result.groups.append(DeviceRetention(decisions[0].snapshot.device, remove, [d for d in decisions if d.keep]))
        result.remove.extend(remove)
    _delete(repo, result)
    return result


def forget_snapshots(
    repo: Repository, ids: Iterable[str], *, device: str | None = None, dry_run: bool = False
) -> ForgetResult:
    """Forget the snapshots named by ``ids`` (ids, unique prefixes, or 'latest' with
    ``device``). Needs the shared (or exclusive) lock."""
    _require_lock(repo, "forget", exclusive=False)
    snaps = _snapshots_of(repo, device)
    chosen: dict[str, Snapshot] = {}
    for spec in ids:
        s = repo.find_snapshot(spec, device, snapshots=snaps)
        chosen.setdefault(s.id, s)
    result = ForgetResult(dry_run=dry_run, policy=None, remove=list(chosen.values()))
    result.groups = [DeviceRetention(group[0].device, group) for group in group_by_device(result.remove).values()]
    _delete(repo, result)
    return result


# ---- prune ------------------------------------------------------------------------------------


def prune(
    repo: Repository,
    *,
    repack_threshold: float = 0.5,
    dry_run: bool = False,
    ignore_snapshots: Iterable[str] = (),
    progress: Progress = NULL_PROGRESS,
) -> PruneResult:
    """Delete the packs no snapshot uses and repack those whose unused share reaches
    ``repack_threshold`` (0.0: any unused byte; 1.0: never repack). Needs the exclusive lock
    (a dry run: any lock), taken before the index was loaded. ``ignore_snapshots``: ids to plan
    as if they were gone (a dry run of forget, then prune). The plan is ``result.plan``; a dry
    run changes nothing and leaves the result's counts at 0."""
    _require_lock(repo, "prune", exclusive=not dry_run)
    if not repo.loaded_index and not repo.index_damage:
        repo.load_index()  # a caller that never loaded it; a no-op listing for an empty repository
    plan = plan_prune(repo, repack_threshold=repack_threshold, ignore=set(ignore_snapshots))
    if dry_run:
        return PruneResult(plan, dry_run=True)
    return execute_prune(repo, plan, progress=progress)


# ---- check ------------------------------------------------------------------------------------


def check(
    repo: Repository,
    *,
    read_data: bool = False,
    read_data_subset: str | Subset | None = None,
    progress: Progress = NULL_PROGRESS,
    workers: int = 2,
) -> CheckResult:
    """Verify the structure; with ``read_data`` every pack's data too, with
    ``read_data_subset`` a part of the packs: "n/t" (the runs 1/t ... t/t together read every
    pack once; ``Subset.parse(s).following()`` is the next one) or "N%" (random). Problems are
    in the result (``errors``: they affect a snapshot or the index, ``ok`` is False;
    ``warnings``: they cannot), never raised. Needs the shared (or exclusive) lock."""
    _require_lock(repo, "check", exclusive=False)
    subset = Subset.parse(read_data_subset) if isinstance(read_data_subset, str) else read_data_subset
    return _check(repo, read_data=read_data, subset=subset, progress=progress, workers=workers)
