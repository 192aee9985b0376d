from __future__ import annotations

import click

from ..errors import IbsyncError
from ..ui.text import printable, size
from .app import App, common_options


class CheckFailed(IbsyncError):
    pass


@click.command("check")
@click.option(
    "--read-data", is_flag=True, help="Also read every pack and verify every blob (reads the whole repository)."
)
@click.option(
    "--read-data-subset",
    "subset_text",
    metavar="N%|n/t",
    help="Read and verify only part of the packs: a random N%, or group n of t (run 1/7 ... 7/7 on seven days to read everything once a week).",
)
@common_options
def check_cmd(app: App, read_data: bool, subset_text: str | None) -> None:
    """Verify the repository: structure, and with --read-data (or a subset) the data."""
    from ..maint import api
    from ..maint.check import Subset

    subset = Subset.parse(subset_text) if subset_text else None  # bad input refused before opening
    repo = app.open_repo(load_index=False)
    result = api.check(repo, read_data=read_data, read_data_subset=subset, progress=app.progress("check"))
    if app.json:
        app.emit_json(result.to_dict())
    else:
        for w in result.warnings:
            click.echo(f"warning: {printable(w)}", err=True)
        for e in result.errors:
            click.echo(f"error: {printable(e)}", err=True)  # errors name entries a snapshot chose
        app.say(
            f"checked {result.snapshots} snapshot(s), {result.packs} pack(s), {result.blobs} blob(s)"
            + (f"; read {result.packs_read} pack(s), {size(result.bytes_read)} of data" if result.packs_read else "")
        )
        if result.ok:
            app.say("no errors were found")
        elif result.damaged_packs:
            ids = " ".join(name[:12] for name in result.damaged_packs)
            app.say(
                f"to keep what the damaged pack(s) still hold: 'ibsync repair packs {ids}', "
                "then 'ibsync repair snapshots'"
            )
    if not result.ok:
        raise CheckFailed(f"the repository has {len(result.errors)} error(s)")
