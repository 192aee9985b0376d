from __future__ import annotations

import click


@click.command("ui")
@click.option(
    "--config",
    "config_path",
    envvar="IBSYNC_CONFIG",
    metavar="FILE",
    help="Config file with the repositories and the [agent] table (default: the platform's user config folder, ibsync/config.toml).",
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
    "--address",
    metavar="ADDRESS",
    help="Address to listen on (default: [agent] ui-address, else 127.0.0.1). Another than loopback needs [agent] ui-password and turns TLS on.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Port to listen on (default: [agent] ui-port, else 8765; 0: any free port).",
)
@click.option("--no-browser", is_flag=True, help="Do not open the browser; just print the login link.")
def ui_cmd(
    config_path: str | None, repo_url: str | None, address: str | None, port: int | None, no_browser: bool
) -> None:
    """Serve the web app until Ctrl-C: every device's backups, "Back up now" with live progress,
    repositories, snapshots to browse and download, restore into a folder or onto a device.

    \b
    The first line printed is the login link (http://127.0.0.1:8765/login?token=...): it works
    once and gives the browser that opens it a session. The browser is opened on it unless
    --no-browser (or there is no screen). `ibsync agent` serves the same app ([agent] ui).

    \b
      ibsync ui
      ibsync ui --no-browser --port 0
    """
    import asyncio
    import dataclasses
    import signal
    import sys

    from ..web.app import create_app
    from ..web.context import WebContext
    from ..web.server import listen, make_server, open_browser

    ctx = WebContext.load(config_path)
    if repo_url and not ctx.settings.defaults.repository:
        ctx.settings = dataclasses.replace(
            ctx.settings, defaults=dataclasses.replace(ctx.settings.defaults, repository=repo_url)
        )
    listener = listen(ctx.settings.ui, address=address, port=port, where="[agent]")
    ctx.auth = listener.auth
    server = make_server(create_app(ctx), listener)
    click.echo(listener.login_url)
    sys.stdout.flush()
    click.echo(
        f"ibsync: serving the web app on {listener.auth.base_url()}; open the link above (it works once). "
        "Ctrl-C stops it.",
        err=True,
    )
    if not no_browser:
        open_browser(listener.login_url)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
            except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C raises KeyboardInterrupt
                pass
        await server.serve(sockets=[listener.sock])

    try:
        asyncio.run(serve())
    finally:
        listener.sock.close()
        if ctx.history is not None:
            ctx.history.close()
