from __future__ import annotations

import json

import click

from ..ui.text import table


@click.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")
@click.option(
    "--wifi/--no-wifi",
    default=False,
    show_default=True,
    help="Also look for paired phones on the local network, without usbmuxd (Via: Wi-Fi).",
)
def devices_cmd(as_json: bool, wifi: bool) -> None:
    """Connected iPhones and iPads: UDID, name, model, iOS version, how they are reached (Via),
    whether this computer is paired with them, and whether their backups are encrypted.

    Devices come from usbmuxd: USB, and "Network" where usbmuxd itself sees phones on the network
    (Apple's does; stock Linux usbmuxd does not). $USBMUXD_SOCKET_ADDRESS points elsewhere.

    With --wifi, phones paired with this computer are also found directly on the local network
    (Bonjour _apple-mobdev2._tcp, then lockdown over TCP port 62078; no usbmuxd needed), listed
    "Wi-Fi". A phone reachable both ways is listed once, by USB. Off by default: it listens for
    Bonjour adverts for 3 s ($IBSYNC_WIFI_TIMEOUT), none at all when no phone was ever paired
    here; $IBSYNC_WIFI_DEVICES="UDID=HOST:PORT,..." replaces the browse with a fixed list. The
    phone must have been paired over USB and have "Show this iPhone when on Wi-Fi" turned on.

    A listed device that does not answer within 10 s ($IBSYNC_DEVICE_CONNECT_TIMEOUT) is an
    error. Listing never asks the phone to trust this computer; `ibsync backup` does, when needed.
    """
    from ..capture.discovery import list_connected, run

    devices = run(list_connected(wifi=wifi))
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in devices], indent=2))
        return
    if not devices:
        click.echo("no device connected")
        return

    def yes_no(v: bool | None) -> str:
        return "?" if v is None else ("yes" if v else "no")

    rows = [
        [
            d.udid,
            d.name or "?",
            d.model or "?",
            d.ios or "?",
            d.connection,
            yes_no(d.paired),
            yes_no(d.encrypts_backups),
        ]
        for d in devices
    ]
    click.echo(table(["UDID", "Name", "Model", "iOS", "Via", "Paired", "Encrypted backups"], rows))
