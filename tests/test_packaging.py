"""What `pip install ibsync` puts on a machine: the package with the web app's templates and
assets, and not the test helpers (simulated device, storage servers, data generator), which
serve tests, benchmarks and the quickstart from a checkout (an editable install still has them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_web_app_and_not_the_test_helpers(tmp_path):
    # built from a copy of what the repository holds: a build/ folder left in a checkout by an
    # earlier build would otherwise be packaged as it is
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ibsync", src / "ibsync", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [wheel] = tmp_path.glob("ibsync-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("ibsync/testing/")]
    assert "ibsync/web/templates/base.html" in names and "ibsync/web/static/app.js" in names
    assert "ibsync/cli/__init__.py" in names and "ibsync/reader/browse.py" in names


def test_a_checkout_still_has_the_test_helpers():
    import ibsync.testing.device

    assert Path(ibsync.testing.device.__file__).is_relative_to(ROOT)
