"""The ibsync command line. Only this package imports click; only ``main`` formats errors."""

from __future__ import annotations

import os
import signal
import sys

import click

from .. import __version__
from .cmd_browse import diff_cmd, extract_cmd, find_cmd, ls_cmd
from .cmd_check import check_cmd
from .cmd_forget import forget_cmd
from .cmd_import import import_cmd
from .cmd_init import init_cmd
from .cmd_key import key_group
from .cmd_prune import prune_cmd
from .cmd_repair import repair_group
from .cmd_restore import restore_cmd
from .cmd_snapshots import snapshots_cmd
from .cmd_stats import stats_cmd
from .cmd_unlock import unlock_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


for command in (init_cmd, import_cmd, snapshots_cmd, restore_cmd, ls_cmd, find_cmd, extract_cmd, diff_cmd, forget_cmd, check_cmd, stats_cmd, prune_cmd, repair_group, unlock_cmd, key_group):
    cli.add_command(command)


INTERRUPTED = "ibsync: interrupted; data stored so far is kept and the next run reuses it"


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so uploaded packs get indexed
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from ..errors import IbsyncError

    debug = bool(os.environ.get("IBSYNC_DEBUG"))
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="ibsync", standalone_mode=False)
        return 0
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
        return 130
    except IbsyncError as e:
        if debug:
            raise
        click.echo(f"ibsync: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo(INTERRUPTED, err=True)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:
        if debug:
            raise
        click.echo(
            f"ibsync: internal error: {e.__class__.__name__}: {e} (set IBSYNC_DEBUG=1 for details, and please report it)",
            err=True,
        )
        return 3


def run() -> None:
    sys.exit(main())
