from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..errors import UserError
from ..maint.forget import UNLIMITED, Duration, RetentionPolicy, snapshot_timestamp
from ..model import DeviceInfo, Snapshot
from ..ui.text import printable, size, table, when
from .app import App, common_options
from .cmd_prune import PRUNE_AGAIN, fail_if_undeleted, report_undeleted, run_prune

if TYPE_CHECKING:
    from ..maint.api import ForgetResult

PRUNE_NOTE = "their data stays in the repository until 'ibsync prune' reclaims it"
FORGET_AGAIN = "run the same 'ibsync forget' again once the storage allows it"


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
        f"--keep-{name}",
        name,
        type=COUNT,
        default=0,
        metavar="N",
        help=f"Keep the {what} ('unlimited': all of them).",
    )


def _rows(snaps: list[Snapshot], reasons: dict[str, list[str]] | None) -> str:
    headers = ["ID", "Backup date", "iOS", "Files", "Size"] + (["Reasons"] if reasons is not None else [])
    rows = []
    for s in sorted(snaps, key=lambda s: (snapshot_timestamp(s), s.id)):  # oldest first, as 'snapshots' lists them
        row = [
            s.short_id,
            when(snapshot_timestamp(s)),
            s.device.ios_version or "-",
            str(s.summary.files),
            size(s.summary.total_bytes),
        ]
        if reasons is not None:
            row.append(", ".join(reasons[s.id]))
        rows.append(row)
    return table(headers, rows, right={3, 4})


def _device_title(snaps: list[Snapshot]) -> str:
    return _device_title_of(snaps[0].device)


def _device_title_of(d: DeviceInfo) -> str:
    return printable(f"snapshots of {d.name} ({d.udid}):" if d.name else f"snapshots of {d.udid}:")


@click.command("forget")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@_keep_option("last", "N newest snapshots")
@_keep_option("hourly", "newest snapshot of each of the last N hours that have one")
@_keep_option("daily", "newest snapshot of each of the last N days that have one")
@_keep_option("weekly", "newest snapshot of each of the last N weeks (ISO, Monday to Sunday) that have one")
@_keep_option("monthly", "newest snapshot of each of the last N months that have one")
@_keep_option("yearly", "newest snapshot of each of the last N years that have one")
@click.option(
    "--keep-within",
    "within",
    type=DurationType(),
    metavar="DURATION",
    help="Keep every snapshot made within DURATION (like 1y5m7d2h) before the device's newest one.",
)
@click.option("--device", metavar="UDID|NAME", help="Only consider snapshots of this device.")
@click.option("--dry-run", "-n", is_flag=True, help="Only show what would be removed; delete nothing.")
@click.option(
    "--prune", is_flag=True, help="Then prune: reclaim the data no remaining snapshot uses (takes the exclusive lock)."
)
@click.option(
    "--repack-threshold",
    type=click.IntRange(0, 100),
    default=50,
    show_default=True,
    metavar="PCT",
    help="With --prune: repack packs once this percentage of them is unused.",
)
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

    from ..maint import api

    # forget alone deletes only snapshot objects (a shared lock suffices); with --prune it
    # deletes data too, so nothing else may run
    repo = app.open_repo(lock="exclusive" if prune else "shared")
    if ids:
        result = api.forget_snapshots(repo, ids, device=device, dry_run=dry_run)
    else:
        result = api.apply_retention(repo, policy, device=device, dry_run=dry_run)
        app.say(f"applying policy: {policy.describe()}, per device")
    _print_groups(app, result)

    if not app.json:
        if dry_run:
            app.say(f"would remove {len(result.remove)} snapshot(s) (dry run: nothing was deleted)")
        elif result.removed:
            app.say(f"removed {len(result.removed)} snapshot(s)" + ("" if prune else f"; {PRUNE_NOTE}"))
        else:
            app.say("removed 0 snapshot(s)")
    report_undeleted(result.failed)
    pruned = None
    if prune:
        # a dry run has deleted nothing: plan as if the chosen snapshots were gone (a real run
        # has deleted them, or failed to, and then they must still count as used)
        ignore = {s.id for s in result.remove} if dry_run else set()
        pruned = run_prune(app, repo, repack_threshold / 100, dry_run, ignore=ignore)
    if app.json:
        doc = result.to_dict()
        if pruned is not None:
            doc["prune"] = pruned.to_dict()
        app.emit_json(doc)
    if result.failed:
        fail_if_undeleted({**result.failed, **(pruned.failed if pruned else {})}, FORGET_AGAIN)
    if pruned is not None:
        fail_if_undeleted(pruned.failed, PRUNE_AGAIN)


def _print_groups(app: App, result: ForgetResult) -> None:
    """Per device: the snapshots kept (with why) and those removed, oldest first."""
    for group in result.groups:
        if group.keep is None:  # chosen by id
            app.say(_device_title(group.remove))
            app.say(f"remove {len(group.remove)} snapshot(s):")
            app.say(_rows(group.remove, None))
            app.say("")
            continue
        app.say(_device_title_of(group.device))
        if group.keep:
            app.say(f"keep {len(group.keep)} snapshot(s):")
            app.say(_rows([d.snapshot for d in group.keep], {d.snapshot.id: d.reasons for d in group.keep}))
            app.say("")
        if group.remove:
            app.say(f"remove {len(group.remove)} snapshot(s):")
            app.say(_rows(group.remove, None))
            app.say("")
