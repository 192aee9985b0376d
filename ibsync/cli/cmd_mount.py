"""ibsync mount: snapshots as a read-only file tree, over FUSE or WebDAV."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import click

from ..errors import NameNotFound, UserError
from ..ui.text import printable
from .app import App, common_options
from .cmd_browse import backup_password_option, backup_password_source


@contextlib.contextmanager
def _signals_blocked():
    """Threads started in here (the repository lock's refresher) never take SIGINT, SIGTERM or
    SIGHUP: libfuse's handler must run in the thread that waits in its loop, or the loop would
    not wake up to unmount."""
    from ..mount.fuse import HANDLED_SIGNALS

    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _open_repo(app: App, *, fuse: bool):
    """``App.open_repo`` (shared lock until the command ends, index loaded), with the lock's
    refresher thread started under ``_signals_blocked`` for a FUSE mount. The password is asked
    for before, so that Ctrl-C still works at its prompt."""
    from ..repo.lock import RepoLock

    if not fuse:
        return app.open_repo()
    repo = app.open_unlocked()
    with _signals_blocked():
        held = RepoLock(repo, exclusive=False, command="mount").acquire()
    click.get_current_context().call_on_close(held.release)
    repo.load_index()
    return repo


@click.command("mount")
@click.argument("args", nargs=-1, metavar="MOUNTPOINT [SNAPSHOT]")
@click.option("--device", metavar="UDID|NAME", help="Only this device's snapshots (with 'latest': its latest one).")
@click.option(
    "--webdav",
    is_flag=True,
    help="Serve over WebDAV on 127.0.0.1 instead of mounting: no MOUNTPOINT, the URL is printed.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    metavar="N",
    help="With --webdav: the port to listen on (default: a free one).",
)
@backup_password_option
@common_options
def mount_cmd(
    app: App,
    args: tuple[str, ...],
    device: str | None,
    webdav: bool,
    port: int | None,
    backup_password_file: str | None,
) -> None:
    """Show snapshots as a read-only folder tree, until Ctrl-C.

    \b
    ibsync mount MOUNTPOINT             every snapshot: MOUNTPOINT/<device>/<backup date>/<Domain>/<path>
    ibsync mount MOUNTPOINT SNAPSHOT    one snapshot: MOUNTPOINT/<Domain>/<path>
    ibsync mount --webdav [SNAPSHOT]    the same over WebDAV, for Finder or Explorer (no FUSE needed)

    Files have their real names, sizes and modification times; files of an encrypted iOS
    backup are decrypted (the backup password is asked for once). Backup dates are UTC, to the
    minute (2026-12-04T0312); <device>/latest links to a device's newest snapshot. MOUNTPOINT
    must be an empty folder; FUSE needs fuse3 (Linux) or macFUSE. The WebDAV share listens on
    127.0.0.1 only, under a secret URL printed on the first line (open it in Finder with
    Go > Connect to Server, or map it as a network drive in Explorer). Ctrl-C or SIGTERM
    unmounts and ends the command; the repository stays locked (shared) meanwhile.
    """
    from ..platforms import require_folder_writing

    require_folder_writing("mount")  # a file being read is spilled with pwrite/pread
    if webdav:
        if len(args) > 1:
            raise UserError("with --webdav there is no MOUNTPOINT: ibsync mount --webdav [SNAPSHOT]")
        mountpoint, spec = None, (args[0] if args else None)
        if spec is not None and ("/" in spec or "\\" in spec):
            raise UserError(
                f"with --webdav there is no MOUNTPOINT ({printable(spec)}): ibsync mount --webdav [SNAPSHOT]"
            )
    else:
        if port is not None:
            raise UserError("--port goes with --webdav")
        if not args:
            raise UserError("give a MOUNTPOINT (an empty folder), or --webdav")
        if len(args) > 2:
            raise UserError("too many arguments: ibsync mount MOUNTPOINT [SNAPSHOT]")
        mountpoint, spec = args[0], (args[1] if len(args) > 1 else None)

    from ..mount.tree import MountTree
    from ..reader.ios_crypto import BackupKeyring, WrongBackupPassword
    from ..reader.manifest_cache import ManifestCache

    mp = None
    if mountpoint is not None:
        from ..mount.fuse import check_mountpoint, load_mfusepy

        mp = check_mountpoint(Path(mountpoint).expanduser())
        load_mfusepy()  # a missing libfuse is one line, before the repository is opened
    repo = _open_repo(app, fuse=mp is not None)
    snaps = repo.snapshots()
    if spec is not None:
        chosen = [repo.find_snapshot(spec, device, snaps)]
    else:
        chosen = [s for s in snaps if s.of_device(device)]
        if not chosen:
            raise NameNotFound(
                f"no snapshot of a device '{device}'" if device else "the repository has no snapshots yet"
            )
    keyring = BackupKeyring(backup_password_source(backup_password_file))
    tree = MountTree(repo, chosen, keyring, cache=ManifestCache.for_repository(repo), single=spec is not None)
    try:
        # the password of an encrypted iOS backup is asked for (and checked) now, not by the
        # first program that looks into the mount
        encrypted = [s for s in chosen if s.ios_encrypted]
        if encrypted:
            try:
                tree.view(encrypted[-1])
            except WrongBackupPassword:
                raise
            except UserError as e:
                if spec is not None:
                    raise
                # every snapshot: the others are still worth a mount without the password
                click.echo(
                    f"ibsync: warning: {printable(e)}; without it the encrypted snapshots' folders will not open",
                    err=True,
                )
        if spec is not None:
            tree.view(chosen[0]).prepare()  # the index of its names: the first listing is then quick
        what = (
            f"snapshot {chosen[0].short_id}"
            if spec is not None
            else f"{len(chosen)} snapshot(s) of {len(tree.devices)} device(s)"
        )
        if mp is not None:
            _serve_fuse(app, tree, mp, what)
        else:
            _serve_webdav(app, tree, port or 0, what)
    finally:
        tree.close()


def _serve_fuse(app: App, tree, mp: Path, what: str) -> None:
    from ..mount.fuse import mount

    def ready() -> None:
        if app.json:
            app.emit_json({"mountpoint": str(mp)})
        else:
            app.say(
                f"mounted {what} at {printable(mp)} (read-only); Ctrl-C or 'fusermount3 -u {printable(mp)}' unmounts"
            )

    mount(tree, mp, ready=ready)
    app.say(f"unmounted {printable(mp)}")


def _serve_webdav(app: App, tree, port: int, what: str) -> None:
    import threading

    from ..mount.webdav import WebDAVServer

    server = WebDAVServer(tree, port=port)
    if app.json:
        app.emit_json({"url": server.url})
    else:
        click.echo(server.url)  # first line, even with --quiet: it is the only way in
        app.say(f"serving {what} read-only over WebDAV at the URL above (127.0.0.1 only); Ctrl-C stops")
    stop = threading.Event()
    # Ctrl-C, SIGTERM and SIGHUP are how this command ends: they ask the server to stop rather
    # than raise into it (see WebDAVServer.serve)
    signals = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    saved = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in signals}
    try:
        server.serve(stop)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    app.say("stopped")
