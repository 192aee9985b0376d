from __future__ import annotations

import json

import click


@click.command("status")
@click.option(
    "--config",
    "config_path",
    envvar="IBSYNC_CONFIG",
    metavar="FILE",
    help="Config file with the [agent] and [devices] tables (default: the platform's user config folder).",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")
@click.option(
    "--history",
    "history_rows",
    type=click.IntRange(0, 10_000),
    default=0,
    metavar="N",
    help="Also show the last N attempts, newest first.",
)
def status_cmd(config_path: str | None, as_json: bool, history_rows: int) -> None:
    """Whether backups are current: per device, the last good backup and its age, the last
    attempt and why it was skipped or failed, when it is next due, and whether it is overdue
    (no good backup for longer than its interval plus its grace period).

    Read from the agent's history and the config file; no repository is opened. The exit
    status is 0 when no device is overdue and 1 when one is, so monitoring can run
    `ibsync status --json` as it is.
    """
    from ..agent.history import History
    from ..agent.settings import parse_agent_settings
    from ..agent.status import describe, read_status
    from ..config import load_document

    doc, path = load_document(config_path)
    settings = parse_agent_settings(doc, f"config file {path}")
    history = History()
    try:
        status = read_status(settings, history)
        attempts = history.attempts(limit=history_rows) if history_rows else []
    finally:
        history.close()
    if as_json:
        out = status.to_dict()
        if history_rows:
            out["attempts"] = [a.to_dict() for a in attempts]
        click.echo(json.dumps(out, indent=2))
    else:
        from ..ui.text import printable

        for line in describe(status):
            click.echo(printable(line))
        if attempts:
            click.echo("")
            click.echo("recent attempts:")
            for a in attempts:
                click.echo(
                    printable(
                        f"  {a.started.astimezone():%Y-%m-%d %H:%M}  {a.name or a.udid}: {a.result}"
                        + (f", {a.reason}" if a.reason else "")
                    )
                )
    if status.overdue:
        raise click.exceptions.Exit(1)
