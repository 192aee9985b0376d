"""The package's layering (pyproject's [tool.importlinter] contracts, docs/design.md "Code
layout"), checked as CI checks it: a lower layer importing a higher one fails here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency (pip install -e '.[test]')"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in r.stdout


def test_no_two_modules_of_the_package_import_each_other():
    import grimp

    graph = grimp.build_graph("ibsync", exclude_type_checking_imports=True)
    production = [m for m in graph.modules if not m.startswith("ibsync.testing")]
    mutual = sorted(
        (a, b)
        for a in production
        for b in graph.find_modules_directly_imported_by(a)
        if a < b and a in graph.find_modules_directly_imported_by(b)
    )
    assert mutual == []
