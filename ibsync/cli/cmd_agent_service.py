"""``ibsync agent install`` and ``ibsync agent uninstall``: the agent as a per-user service."""

from __future__ import annotations

from pathlib import Path

import click

_PLATFORM = click.Choice(["linux", "macos", "windows"])
_JSON = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")


def _emit_json(value: dict) -> None:
    import json

    click.echo(json.dumps(value, indent=2, default=str))  # as App.emit_json


def _config_from(ctx: click.Context, config: str | None) -> Path | None:
    """--config of this command, else the one given to ``ibsync agent`` (or $IBSYNC_CONFIG)."""
    if config is None:
        for c in (ctx.parent, ctx.find_root()):
            obj = getattr(c, "obj", None)
            if isinstance(obj, dict) and obj.get("config_path"):
                config = obj["config_path"]
                break
    return None if config is None else Path(config).expanduser().absolute()


@click.command("install")
@click.option(
    "--config",
    "config",
    metavar="FILE",
    help="Config file the agent reads (default: the one given to `ibsync agent`, $IBSYNC_CONFIG, or "
    "the platform's default, found by the agent itself).",
)
@click.option(
    "--platform", type=_PLATFORM, default=None, help="Service manager to write for (default: this machine's)."
)
@click.option("--no-start", is_flag=True, help="Write the service file only; print what to run to start it.")
@click.option("--print", "print_only", is_flag=True, help="Print the service file to stdout and change nothing.")
@click.option("--force", is_flag=True, help="Replace an existing service file that differs from this one.")
@_JSON
@click.pass_context
def install_cmd(
    ctx: click.Context,
    config: str | None,
    platform: str | None,
    no_start: bool,
    print_only: bool,
    force: bool,
    as_json: bool = False,
) -> None:
    """Run `ibsync agent` as a service of the current user: started at login, restarted after a
    failure (not after a clean stop).

    \b
      Linux    ~/.config/systemd/user/ibsync-agent.service, then
               systemctl --user daemon-reload && systemctl --user enable --now ibsync-agent.service
               (logs: journalctl --user -u ibsync-agent). On a headless box (a NAS, a server
               nobody logs in to) also run `sudo loginctl enable-linger $USER` so it starts at
               boot and keeps running without a login.
      macOS    ~/Library/LaunchAgents/org.ibsync.agent.plist, loaded with
               launchctl bootstrap gui/$UID (logs: ~/Library/Logs/ibsync/agent.log)
      Windows  a Task Scheduler task "ibsync-agent" at logon, from
               %LOCALAPPDATA%\\ibsync\\ibsync-agent.xml via schtasks /Create /XML

    \b
    The service runs this Python interpreter with `-m ibsync agent`, and `--config FILE` when
    one is given. It carries PATH and IBSYNC_CONFIG, never a password: give the repositories a
    password file, command or environment variable in the config file as usual.
    """
    import os

    from ..agent import service
    from ..config import load_document

    platform = platform or service.current_platform()
    config_path = _config_from(ctx, config)
    if config_path is not None:
        load_document(config_path)  # a missing or unreadable file is refused now, not at every login
        _check_agent_table(config_path)
    spec = service.default_spec(platform, config_path)
    if print_only:
        if as_json:
            _emit_json(
                {
                    "platform": platform,
                    "path": str(service.service_file(platform, Path.home(), os.environ)),
                    "service_file": service.render(platform, spec),
                }
            )
        else:
            click.echo(service.render(platform, spec), nl=False)
        return
    result = service.install(platform, spec, start=not no_start, force=force)
    if as_json:
        _emit_json(
            {
                "platform": platform,
                "path": str(result.path),
                "changed": result.changed,
                "started": not no_start,
                "ran": result.ran,
                "next_steps": result.next_steps or None,
            }
        )
        return
    where = f"{'wrote' if result.changed else 'unchanged:'} {result.path}"
    if no_start:
        click.echo(f"ibsync: {where}; to start it run: {result.next_steps}")
    else:
        click.echo(f"ibsync: {where}; the agent is installed and started ({'; '.join(result.ran)})")
    if platform == "linux" and not no_start:
        click.echo(
            "ibsync: logs: journalctl --user -u ibsync-agent; on a headless box run "
            "`sudo loginctl enable-linger $USER` so it runs without a login"
        )


def _check_agent_table(path: Path) -> None:
    """Refuse a config whose [agent] table the agent would refuse, so the mistake shows now."""
    from ..agent.settings import parse_agent_settings
    from ..config import load_document

    doc, _ = load_document(path)
    parse_agent_settings(doc, f"config file {path}")


@click.command("uninstall")
@click.option(
    "--platform",
    type=_PLATFORM,
    default=None,
    help="Service manager to remove the agent from (default: this machine's).",
)
@click.option(
    "--no-stop",
    "--no-start",
    "no_stop",
    is_flag=True,
    help="Remove the service file only, without asking the service manager to stop it.",
)
@click.option("--print", "print_only", is_flag=True, help="Print what would be removed and run; change nothing.")
@_JSON
def uninstall_cmd(platform: str | None, no_stop: bool, print_only: bool, as_json: bool = False) -> None:
    """Stop the agent's service and remove it (what `ibsync agent install` did). The history and
    the config file are kept."""
    import os
    from pathlib import Path as _Path

    from ..agent import service

    platform = platform or service.current_platform()
    if print_only:
        path = service.service_file(platform, _Path.home(), os.environ)
        stop = [] if no_stop else service.stop_commands(platform, service.user_id())
        if as_json:
            _emit_json(
                {
                    "platform": platform,
                    "path": str(path),
                    "exists": path.exists(),
                    "would_run": [service.shell_line(stop)] if stop else [],
                }
            )
            return
        click.echo(f"would remove {path}" + ("" if path.exists() else " (not there)"))
        if stop:
            click.echo(f"would run: {service.shell_line(stop)}")
        return
    result = service.uninstall(platform, stop=not no_stop)
    if as_json:
        _emit_json({"platform": platform, "path": str(result.path), "removed": result.changed, "ran": result.ran})
        return
    if result.changed:
        click.echo(f"ibsync: removed {result.path}" + (f" ({'; '.join(result.ran)})" if result.ran else ""))
    else:
        click.echo(f"ibsync: no agent service was installed ({result.path} is not there)")
