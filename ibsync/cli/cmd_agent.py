from __future__ import annotations

from typing import cast

import click


class _AgentGroup(click.Group):
    """``ibsync agent`` runs the agent; ``ibsync agent install|uninstall`` manage its service."""

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in ("install", "uninstall"):
            from . import cmd_agent_service

            return getattr(cmd_agent_service, f"{name}_cmd")
        return None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return ["install", "uninstall"]


@click.group("agent", cls=_AgentGroup, invoke_without_command=True)
@click.option(
    "--config",
    "config_path",
    envvar="IBSYNC_CONFIG",
    metavar="FILE",
    help="Config file with the [agent] and [devices] tables (default: the platform's user config folder, ibsync/config.toml).",
)
@click.option(
    "--repo",
    "-r",
    "repo_url",
    envvar="IBSYNC_REPO",
    metavar="URL|NAME",
    help="Repository for devices the config file does not give one ([agent] repository wins over it). Default: $IBSYNC_REPO.",
)
@click.option(
    "--once", is_flag=True, help="Look once: back up the devices that are due now, run maintenance, and exit."
)
@click.option("--quiet", "-q", is_flag=True, help="Log only warnings and errors.")
@click.pass_context
def agent_group(ctx: click.Context, config_path: str | None, repo_url: str | None, once: bool, quiet: bool) -> None:
    """Back up each phone when it is due, by itself: watch for devices over USB and Wi-Fi, start
    a backup when a device's last good snapshot is older than its interval (inside its time
    window, while charging if asked), tell the person when the phone needs its passcode, and
    keep the repositories healthy (retention, prune, a rotating check) when no backup runs.

    \b
    Configured by the [agent] and [devices."<UDID or name>"] tables of the config file (README:
    "Automatic backups"). Every attempt is logged as one line on stderr and kept in a small
    history ($XDG_STATE_HOME/ibsync/agent.db) that `ibsync status` reads. SIGTERM or Ctrl-C stop
    it cleanly: a running backup is interrupted as Ctrl-C interrupts `ibsync backup` (nothing
    committed, uploaded data kept), and the exit status is 0.

    \b
    It also serves the web app ([agent] ui, ui-address, ui-port; README: "Web app"): the first
    line on standard output is its login link, also kept in the state folder (ui-login.url).

    \b
      ibsync agent                  # run in the foreground
      ibsync agent --once           # one pass, for cron or a timer
      ibsync agent install          # a user service started at login (systemd, launchd, Task Scheduler)
      ibsync status                 # what it did and what is due
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    if ctx.invoked_subcommand is not None:
        return
    import asyncio
    import dataclasses
    import logging

    from ..agent.history import History
    from ..agent.runner import Agent, lock_state_folder
    from ..agent.settings import parse_agent_settings
    from ..config import load_document
    from ..errors import UserError

    doc, path = load_document(config_path)
    settings = parse_agent_settings(doc, f"config file {path}")
    if repo_url and not settings.defaults.repository:
        settings = dataclasses.replace(settings, defaults=dataclasses.replace(settings.defaults, repository=repo_url))
    if not settings.defaults.repository and not any("repository" in t for t in settings.devices.values()):
        raise UserError(f"no repository to back up into: set [agent] repository in {path}, or pass --repo")
    notifier = health = None
    if settings.notify or settings.defaults.healthcheck or any("healthcheck" in t for t in settings.devices.values()):
        from ..agent.notify import HealthPing, Notifier, check_health_url

        notifier = Notifier(list(settings.notify)) if settings.notify else None
        health = HealthPing
        if settings.defaults.healthcheck:  # a wrong URL is refused now, not in the middle of a backup
            check_health_url(settings.defaults.healthcheck, "[agent] healthcheck")
        for key, table in settings.devices.items():
            if "healthcheck" in table:
                check_health_url(table["healthcheck"], f'[devices."{key}"] healthcheck')
    history = History()
    held = lock_state_folder(history.path.parent)
    logger = logging.getLogger("ibsync")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    for handler in logger.handlers:  # the CLI's stderr handler: a time on every line of a long-running log
        if getattr(handler, "ibsync_cli", False):  # made with its formatter (cli/app.py), whose class is kept
            formatter_class = type(cast(logging.Formatter, handler.formatter))
            handler.setFormatter(formatter_class("%(asctime)s ibsync: %(message)s", "%Y-%m-%d %H:%M:%S"))
    agent = Agent(
        settings, history, config_path=str(path) if path.exists() else None, notifier=notifier, health=health, once=once
    )
    web = None
    try:
        if settings.ui.enabled and not once:
            from ..web.agent_ui import AgentUi
            from ..web.server import CannotListen

            try:
                web = AgentUi.start(agent, settings, path, history.path)  # prints the login link: the first line
            except CannotListen as e:  # backups matter more than the app: run without it
                logging.getLogger("ibsync.agent").error("%s; running without the web app", e)
        asyncio.run(web.run_with(agent.run()) if web is not None else agent.run())
    finally:
        if web is not None:
            web.close()
        history.close()
        held.close()
