"""The README's first command, as a new user runs it: the quickstart script, which backs up a
simulated iPhone over usbmuxd (full, then incremental), restores it, and imports, restores and
compares a generated backup folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IBSYNC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this ibsync, this python
    r = subprocess.run(
        ["sh", str(ROOT / "examples" / "quickstart.sh"), str(tmp_path / "qs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "full, " in out and "incremental, " in out  # the phone was backed up twice over the protocol
    assert "restored folder is byte-identical to the backup folder" in out
    assert "no errors were found" in out
    assert "ibsync ui" in out.splitlines()[-1]
    restored = list((tmp_path / "qs" / "restored-phone").iterdir())
    assert len(restored) == 1 and (restored[0] / "Manifest.db").stat().st_size > 0
    ps = subprocess.run(["pgrep", "-f", f"ibsync.testing.device serve {tmp_path / 'qs'}"], capture_output=True)
    assert ps.returncode == 1, "the simulated phone was left running"
