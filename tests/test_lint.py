"""Lint and types, checked as CI checks them: ruff (pyproject's [tool.ruff]) on the package, the
tests and the benchmarks, and mypy (pyproject's [tool.mypy]) on the package. A finding fails here
with the tool's own report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    # the tools of this interpreter's environment (the test extra installs both)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def test_ruff_finds_nothing():
    r = _run(["ruff", "check", "--no-cache", "ibsync", "tests", "bench"], timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_mypy_finds_nothing(tmp_path):
    # a fresh cache: about 15 s on two cores, and nothing left in the checkout
    r = _run(["mypy", "--cache-dir", str(tmp_path / "mypy-cache")], timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "Success: no issues found" in r.stdout


def test_code_is_formatted_as_ruff_formats_it():
    r = _run(["ruff", "format", "--check", "--no-cache", "ibsync", "tests", "bench"], timeout=300)
    assert r.returncode == 0, "run 'ruff format ibsync tests bench':\n" + r.stdout[-6000:] + r.stderr[-2000:]
