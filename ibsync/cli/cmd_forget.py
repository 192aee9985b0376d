from __future__ import annotations

from dataclasses import asdict

import click

from ..errors import NotFound, UserError
from ..maint.forget import UNLIMITED, Decision, Duration, RetentionPolicy, apply_policy_by_device, group_by_device, snapshot_timestamp
from ..model import Snapshot, utc_iso
from ..ui.text import printable, size, table, when
from .app import App, common_options

PRUNE_NOTE = "their data stays in the repository until 'ibsync prune' reclaims it"


class CountType(click.ParamType):
    """A --keep-* count: 0 or more, or 'unlimited' (restic's -1)."""

    name = "n"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "unlimited":
            return UNLIMITED
        try:
            n = int(text)
        except ValueError:
            self.fail(f"{value!r} is not a count (a whole number, or 'unlimited')", param, ctx)
        if n < 0:
            self.fail("negative values are not allowed; use 'unlimited' to keep all", param, ctx)
        return n


class DurationType(click.ParamType):
    """restic's duration: years, months, days and hours, like 1y5m7d2h."""

    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, Duration):
            return value
        try:
            return Duration.parse(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


COUNT = CountType()


def _keep_option(name: str, what: str):
    return click.option(
        f"--keep-{name}", name, type=COUNT, default=0, metavar="N",
        help=f"Keep the {what} ('unlimited': all of them).",
    )


def _snapshot_dict(s: Snapshot) -> dict:
    return {
        "id": s.id,
        "short_id": s.short_id,
        "time": utc_iso(s.time),
        "backup_date": utc_iso(s.backup_date) if s.backup_date else None,
    }


def _rows(snaps: list[Snapshot], reasons: dict[str, list[str]] | None) -> str:
    headers = ["ID", "Backup date", "iOS", "Files", "Size"] + (["Reasons"] if reasons is not None else [])
    rows = []
    for s in sorted(snaps, key=lambda s: (snapshot_timestamp(s), s.id)):  # oldest first, as 'snapshots' lists them
        row = [s.short_id, when(snapshot_timestamp(s)), s.device.ios_version or "-", str(s.summary.files), size(s.summary.total_bytes)]
        if reasons is not None:
            row.append(", ".join(reasons[s.id]))
        rows.append(row)
    return table(headers, rows, right={3, 4})


def _device_title(snaps: list[Snapshot]) -> str:
    d = snaps[0].device
    return printable(f"snapshots of {d.name} ({d.udid}):" if d.name else f"snapshots of {d.udid}:")


@click.command("forget")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@_keep_option("last", "N newest snapshots")
@_keep_option("hourly", "newest snapshot of each of the last N hours that have one")
@_keep_option("daily", "newest snapshot of each of the last N days that have one")
@_keep_option("weekly", "newest snapshot of each of the last N weeks (ISO, Monday to Sunday) that have one")
@_keep_option("monthly", "newest snapshot of each of the last N months that have one")
@_keep_option("yearly", "newest snapshot of each of the last N years that have one")
@click.option("--keep-within", "within", type=DurationType(), metavar="DURATION",
              help="Keep every snapshot made within DURATION (like 1y5m7d2h) before the device's newest one.")
@click.option("--device", metavar="UDID|NAME", help="Only consider snapshots of this device.")
@click.option("--dry-run", "-n", is_flag=True, help="Only show what would be removed; delete nothing.")
@click.option("--prune", is_flag=True, help="Then prune: reclaim the data no remaining snapshot uses (takes the exclusive lock).")
@click.option("--repack-threshold", type=click.IntRange(0, 100), default=50, show_default=True, metavar="PCT",
              help="With --prune: repack packs once this percentage of them is unused.")
@common_options
def forget_cmd(
    app: App,
    ids: tuple[str, ...],
    last: int,
    hourly: int,
    daily: int,
    weekly: int,
    monthly: int,
    yearly: int,
    within: Duration | None,
    device: str | None,
    dry_run: bool,
    prune: bool,
    repack_threshold: int,
) -> None:
    """Remove snapshots: the given IDs, or those a --keep-* policy does not keep.

    \b
    ibsync forget --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --keep-yearly 3 --dry-run
    ibsync forget --keep-last 10
    ibsync forget 3f2a1b9c          (snapshot ids, or unique prefixes of them)

    The policy is applied to each device on its own, with restic's rules: walking from the
    newest backup, a snapshot is kept if it is the newest of its hour, day, ISO week, month or
    year (local time) while fewer than N such periods have been kept; --keep-last N keeps the N
    newest; --keep-within keeps all snapshots within DURATION of the device's newest. A
    snapshot's time is when the device made the backup (Status.plist Date). A policy always
    keeps the newest snapshot of each device.

    Only the snapshot objects are deleted: the data they used stays in the repository until
    'ibsync prune' (or --prune here) reclaims what no remaining snapshot needs.
    """
    policy = RetentionPolicy(last, hourly, daily, weekly, monthly, yearly, within)
    if ids and not policy.is_empty():
        raise UserError("give snapshot IDs or a --keep-* policy, not both")
    if not ids and policy.is_empty():
        raise UserError(
            "no policy given: pass snapshot IDs or at least one --keep-* option above 0 "
            "(an empty policy would forget nothing)"
        )

    from ..storage import Kind

    # forget alone deletes only snapshot objects (a shared lock suffices); with --prune it
    # deletes data too, so nothing else may run
    repo = app.open_repo(lock="exclusive" if prune else "shared")
    snaps = repo.snapshots()
    if device:
        snaps = [s for s in snaps if s.of_device(device)]
        if not snaps:
            raise UserError(f"no snapshot of a device '{device}'")

    groups: list[dict] = []
    to_remove: list[Snapshot] = []
    if ids:
        chosen: dict[str, Snapshot] = {}
        for spec in ids:
            s = repo.find_snapshot(spec, device, snapshots=snaps)
            chosen.setdefault(s.id, s)
        to_remove = list(chosen.values())
        for group in group_by_device(to_remove).values():
            groups.append({"device": asdict(group[0].device), "remove": group})
            app.say(_device_title(group))
            app.say(f"remove {len(group)} snapshot(s):")
            app.say(_rows(group, None))
            app.say("")
    else:
        app.say(f"applying policy: {policy.describe()}, per device")
        for decisions in apply_policy_by_device(snaps, policy).values():
            keep = [d for d in decisions if d.keep]
            remove = [d.snapshot for d in decisions if not d.keep]
            groups.append({"device": asdict(decisions[0].snapshot.device), "keep": keep, "remove": remove})
            to_remove.extend(remove)
            app.say(_device_title([d.snapshot for d in decisions]))
            if keep:
                app.say(f"keep {len(keep)} snapshot(s):")
                app.say(_rows([d.snapshot for d in keep], {d.snapshot.id: d.reasons for d in keep}))
                app.say("")
            if remove:
                app.say(f"remove {len(remove)} snapshot(s):")
                app.say(_rows(remove, None))
                app.say("")

    removed: list[str] = []
    if not dry_run:
        # Only the snapshot objects go; every blob stays until prune finds it unused.
        for s in to_remove:
            try:
                repo.storage.delete(Kind.SNAPSHOTS, s.id)
            except NotFound:
                pass  # forgotten by another process meanwhile: the outcome is the same
            removed.append(s.id)

    if not app.json:
        if dry_run:
            app.say(f"would remove {len(to_remove)} snapshot(s) (dry run: nothing was deleted)")
        elif removed:
            app.say(f"removed {len(removed)} snapshot(s)" + ("" if prune else f"; {PRUNE_NOTE}"))
        else:
            app.say("removed 0 snapshot(s)")
    pruned = None
    if prune:
        from .cmd_prune import run_prune

        # a dry run has deleted nothing: plan as if the chosen snapshots were gone
        pruned = run_prune(app, repo, repack_threshold / 100, dry_run, ignore={s.id for s in to_remove})
    if app.json:
        doc = {
            "dry_run": dry_run,
            "policy": None if ids else policy.to_dict(),
            "groups": [_group_json(g) for g in groups],
            "remove": [s.id for s in to_remove],
            "removed": removed,
        }
        if pruned is not None:
            doc["prune"] = pruned
        app.emit_json(doc)
    if pruned is not None:
        from .cmd_prune import PRUNE_AGAIN, fail_if_undeleted

        fail_if_undeleted(pruned.get("failed", {}), PRUNE_AGAIN)


def _group_json(group: dict) -> dict:
    out: dict = {"device": group["device"]}
    if "keep" in group:
        keep: list[Decision] = group["keep"]
        out["keep"] = [{**_snapshot_dict(d.snapshot), "reasons": d.reasons} for d in keep]
    out["remove"] = [_snapshot_dict(s) for s in group["remove"]]
    return out
