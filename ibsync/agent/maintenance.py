"""The agent's upkeep of one repository, run when no backup is: the retention policy applied to
the devices it just backed up, a prune when the last one is older than ``prune``, and after
each prune a ``check --read-data-subset n/N`` whose n advances each time, so that N prunes
read all the data once. All of it under the repository's exclusive lock, as the commands take
it; a repository busy with another process is left for the next time."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from ..errors import IbsyncError
from ..opening import RepoSource
from ..repo.lock import Locked
from .history import FAILED, OK, History
from .settings import AgentSettings

logger = logging.getLogger("ibsync.agent")


def maintain_repository(
    source: RepoSource, name: str, udids: set[str], settings: AgentSettings, history: History
) -> None:
    policies = {udid: settings.policy(udid, _name(history, udid)).keep for udid in udids}
    policies = {udid: keep for udid, keep in policies.items() if keep}
    last_prune = history.last_maintenance(name, "prune")
    prune_due = settings.prune_every is not None and (
        last_prune is None or datetime.now(UTC) - last_prune >= settings.prune_every
    )
    if not policies and not prune_due:
        return
    from ..maint.api import KeepPolicy, apply_retention, check, prune

    try:
        opened = source.open(lock="exclusive", command="agent maintenance")
    except Locked as e:
        logger.info("repository %s is busy (%s); its maintenance waits for the next time", name, e)
        return
    except IbsyncError as e:
        logger.warning("repository %s: maintenance skipped: %s", name, e)
        return
    with opened as repo:
        for udid, keep in policies.items():
            _run(
                history,
                name,
                "forget",
                lambda keep=keep, udid=udid: apply_retention(repo, KeepPolicy.from_mapping(keep), device=udid),
                lambda r, udid=udid: f"{_label(history, udid)}: kept {len(r.kept)}, removed {len(r.removed)}",
            )
        if not prune_due:
            return
        pruned = _run(history, name, "prune", lambda: prune(repo), _summary)
        if pruned is None or settings.check_subset is None:
            return
        _, total = settings.check_subset
        n = int(history.get(f"check-next:{name}") or settings.check_subset[0])
        checked = _run(
            history,
            name,
            "check",
            lambda: check(repo, read_data_subset=f"{n}/{total}"),
            lambda r: f"subset {n}/{total}: " + _summary(r),
        )
        if checked is not None:
            history.put(f"check-next:{name}", str(n % total + 1))


def _run(history: History, repository: str, kind: str, work, describe):
    run = history.begin_maintenance(repository, kind)
    try:
        result = work()
    except IbsyncError as e:
        history.end_maintenance(run, FAILED, str(e))
        logger.error("repository %s: %s failed: %s", repository, kind, e)
        return None
    problems = getattr(result, "problems", None)
    detail = describe(result)
    history.end_maintenance(run, FAILED if problems else OK, detail)
    (logger.error if problems else logger.info)("repository %s: %s: %s", repository, kind, detail)
    return result


def _summary(result) -> str:
    to_dict = getattr(result, "to_dict", None)
    if to_dict is None:
        return str(result)
    d = to_dict()
    return ", ".join(f"{k} {v}" for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool))


def _name(history: History, udid: str) -> str | None:
    rec = history.device(udid)
    return rec.name if rec else None


def _label(history: History, udid: str) -> str:
    return f"{_name(history, udid) or '?'} ({udid})"
