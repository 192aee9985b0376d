from __future__ import annotations

import json

import click

from ..ui.text import table


@click.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")
def devices_cmd(as_json: bool) -> None:
    """Connected iPhones and iPads: UDID, name, model, iOS version, whether this computer is
    paired with them, and whether their backups are encrypted.

    Devices come from usbmuxd (USB, or Wi-Fi for devices synced over the network);
    $USBMUXD_SOCKET_ADDRESS points elsewhere. Listing never asks the phone to trust this
    computer; `ibsync backup` does, when needed.
    """
    from ..capture.discovery import list_connected, run

    devices = run(list_connected())
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in devices], indent=2))
        return
    if not devices:
        click.echo("no device connected")
        return

    def yes_no(v: bool | None) -> str:
        return "?" if v is None else ("yes" if v else "no")

    rows = [[d.udid, d.name or "?", d.model or "?", d.ios or "?", d.connection, yes_no(d.paired), yes_no(d.encrypts_backups)]
            for d in devices]
    click.echo(table(["UDID", "Name", "Model", "iOS", "Via", "Paired", "Encrypted backups"], rows))
