"""The ibsync command line. Only this package imports click; only ``main`` formats errors."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from .._version import __version__

# Command name -> "module:object". A command's module is imported only when that command runs
# (or --help lists them): every command pays start-up time, an unchanged re-import is about
# half start-up.
COMMANDS = {
    "devices": "cmd_devices:devices_cmd",
    "backup": "cmd_backup:backup_cmd",
    "init": "cmd_init:init_cmd",
    "import": "cmd_import:import_cmd",
    "snapshots": "cmd_snapshots:snapshots_cmd",
    "restore": "cmd_restore:restore_cmd",
    "ls": "cmd_browse:ls_cmd",
    "find": "cmd_browse:find_cmd",
    "extract": "cmd_browse:extract_cmd",
    "export": "cmd_export:export_cmd",
    "diff": "cmd_browse:diff_cmd",
    "mount": "cmd_mount:mount_cmd",
    "forget": "cmd_forget:forget_cmd",
    "copy": "cmd_copy:copy_cmd",
    "prune": "cmd_prune:prune_cmd",
    "check": "cmd_check:check_cmd",
    "repair": "cmd_repair:repair_group",
    "stats": "cmd_stats:stats_cmd",
    "key": "cmd_key:key_group",
    "unlock": "cmd_unlock:unlock_cmd",
    "upgrade": "cmd_upgrade:upgrade_cmd",
    "agent": "cmd_agent:agent_group",
    "status": "cmd_status:status_cmd",
    "ui": "cmd_ui:ui_cmd",
}


class LazyGroup(click.Group):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The exit statuses as a table (click would rewrap an epilog into one paragraph)."""
        from ..errors import EXIT_CODES

        with formatter.section("Exit codes"):
            formatter.write_dl([(str(code), meaning) for code, meaning in EXIT_CODES.items()])
        formatter.write_paragraph()
        formatter.write_text(
            'Shell completion: eval "$(_IBSYNC_COMPLETE=bash_source ibsync)" in ~/.bashrc '
            "(zsh_source for zsh, fish_source for fish; README: Shell completion)."
        )

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        import importlib

        module, attr = target.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ibsync")
def cli() -> None:
    """Back up iPhones and iPads to storage you own: deduplicated, compressed, encrypted,
    with history.

    \b
    Quick start:
      export IBSYNC_REPO=/Volumes/External/ibsync   # a path or any fsspec URL
      export IBSYNC_PASSWORD_FILE=~/.ibsync-pass
      ibsync init
      ibsync import ~/Library/Application\\ Support/MobileSync/Backup
      ibsync snapshots
      ibsync restore latest /tmp/out
    """


INTERRUPTED = "ibsync: interrupted; data stored so far is kept and the next run reuses it"


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so uploaded packs get indexed
    raise KeyboardInterrupt


class _PrintableFormatter(logging.Formatter):
    """Warnings often name a path or device from a backup: escape what a terminal would obey."""

    def format(self, record: logging.LogRecord) -> str:
        from ..ui.text import printable

        return printable(super().format(record))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each warning, not the one at set-up:
    main() may run many times in one process (tests, embedding) with stderr redirected."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """Warnings from the library (a storage retrying after a dropped connection) as one line
    each on stderr; set once per process, whatever number of times main() runs."""
    logger = logging.getLogger("ibsync")
    if not any(getattr(h, "ibsync_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_PrintableFormatter("ibsync: %(message)s"))
        handler.ibsync_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    # the exit statuses are ibsync.errors' table (README "Exit codes"): a script must be able
    # to tell "retry later" from "wrong password" from a crash, so no two share a number
    from ..errors import EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, IbsyncError
    from ..ui.text import printable

    debug = bool(os.environ.get("IBSYNC_DEBUG"))
    signal.signal(signal.SIGTERM, _terminate)
    _log_to_stderr()
    try:
        # without standalone mode click returns the code of a click.exceptions.Exit (status's 1)
        # NO_COLOR (no-color.org): click strips any styling even on a terminal; off a
        # terminal it always does
        color = False if os.environ.get("NO_COLOR") else None
        code = cli.main(args=argv, prog_name="ibsync", standalone_mode=False, color=color)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort as e:
        # click turns Ctrl-C (and our SIGTERM) into Abort
        if isinstance(e.__cause__, KeyboardInterrupt):
            click.echo(INTERRUPTED, err=True)
        else:
            click.echo("ibsync: aborted", err=True)
        return EXIT_INTERRUPTED
    except IbsyncError as e:
        if debug:
            raise
        click.echo(f"ibsync: error: {printable(e)}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo(INTERRUPTED, err=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILED
    except Exception as e:
        if debug:
            raise
        click.echo(
            f"ibsync: internal error: {e.__class__.__name__}: {printable(e)} (set IBSYNC_DEBUG=1 for details, and please report it)",
            err=True,
        )
        return EXIT_INTERNAL


def run() -> None:
    sys.exit(main())
