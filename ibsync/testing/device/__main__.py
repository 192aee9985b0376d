"""Run a simulated iPhone behind a simulated usbmuxd until stopped, for trying ibsync without a
phone (``examples/quickstart.sh``) and for poking at it by hand::

    python -m ibsync.testing.device serve FOLDER [--size-mib 16] [--seed 1] [--name NAME]

When the phone is ready, ``FOLDER/env.sh`` holds the environment that points ibsync at it
(``. FOLDER/env.sh``: the usbmuxd socket, and a HOME inside FOLDER so that pymobiledevice3's
pairing files stay out of the real one). SIGHUP makes the next day happen on the phone (files
rewritten, deleted and added, databases edited), and then ``FOLDER/day`` holds its number;
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
from pathlib import Path

from ..generator import MIB, generate_content
from .model import SimDevice
from .usbmuxd import run_sim_usbmuxd


def serve(folder: Path, *, size_mib: int, seed: int, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    device = SimDevice.from_content(generate_content(seed=seed, size_bytes=size_mib * MIB, device_name=name))
    stop = threading.Event()
    next_day = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: next_day.set())
    day = 0
    with run_sim_usbmuxd([device], folder / "usbmuxd") as mux:
        env = mux.env(home=folder / "home")
        lines = [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]
        tmp = folder / "env.sh.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(folder / "env.sh")  # whole or absent: the script waits for it
        print(f"{name} ({device.udid}) is connected; . {folder / 'env.sh'} to reach it", flush=True)
        while not stop.is_set():
            if next_day.wait(0.2):
                next_day.clear()
                day += 1
                device.next_day(seed=seed * 1000 + day)
                (folder / "day").write_text(f"{day}\n")
                print(f"day {day}: the phone's files changed", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ibsync.testing.device", description="A simulated iPhone behind a simulated usbmuxd."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run one generated phone until SIGTERM (SIGHUP: the next day)")
    run.add_argument("folder", type=Path)
    run.add_argument("--size-mib", type=int, default=16)
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--name", default="Quickstart iPhone")
    args = parser.parse_args()
    serve(args.folder, size_mib=args.size_mib, seed=args.seed, name=args.name)


if __name__ == "__main__":
    main()
