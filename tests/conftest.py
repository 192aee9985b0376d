from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ibsync.cli import main
from ibsync.testing import FAST_KDF  # noqa: F401  (tests import it from here)

FIXTURES = Path(__file__).parent / "fixtures"
MIT_BACKUP = FIXTURES / "sample-backup-mit" / "sample_backup"
ENCRYPTED_BACKUP = FIXTURES / "encrypted-backup-gpl3" / "assembled_encrypted_backup"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A repository location and password in the environment, as a user would set them."""
    repo = tmp_path / "repo"
    monkeypatch.setenv("IBSYNC_REPO", str(repo))
    monkeypatch.setenv("IBSYNC_PASSWORD", PASSWORD)
    monkeypatch.setenv("IBSYNC_CACHE_DIR", str(tmp_path / "cache"))  # never the user's own cache
    monkeypatch.delenv("IBSYNC_PASSWORD_FILE", raising=False)
    monkeypatch.setattr("ibsync.format.crypto.DEFAULT_KDF", FAST_KDF)
    return repo


class Cli:
    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args: str, expect: int = 0) -> tuple[str, str]:
        self.capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        assert code == expect, (
            f"ibsync {' '.join(map(str, args))} exited {code}, expected {expect}\nstdout:\n{out}\nstderr:\n{err}"
        )
        return out, err


@pytest.fixture
def cli(capsys):
    return Cli(capsys)


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def run_subprocess(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ibsync", *map(str, args)], env=env, capture_output=True, text=True, **kw
    )


# Runs ibsync in a child and writes the child's own peak RSS (VmHWM, KiB) to argv[1]. Not
# ru_maxrss: Linux carries it over fork and exec, so a child of a large pytest process would
# report pytest's size (seen: 1,082 MB for a 100,000-file import in the full suite).
_PEAK_RSS_CHILD = (
    "import sys\nfrom ibsync.cli import main\nout = sys.argv.pop(1)\n"
    "try:\n    rc = main(sys.argv[1:])\nfinally:\n"
    "    hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "    open(out, 'w').write(hwm)\n"
    "sys.exit(rc)"
)


def ibsync_peak_rss(args: list[str], env: dict, scratch: Path, **kw) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``ibsync ARGS`` in a child process; (its result, its own peak RSS in bytes)."""
    out = scratch / f"vmhwm-{os.getpid()}-{len(list(scratch.glob('vmhwm-*')))}"
    r = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, str(out), *map(str, args)], env=env, **kw)
    return r, int(out.read_text()) * 1024


def one_line_error(err: str, *needles: str) -> None:
    """Bad input's promise: one line on stderr, 'ibsync: error: ...', no traceback."""
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("ibsync: error:"), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def open_repo(path: Path):
    """The repository at ``path``, opened with the test password, index loaded."""
    from ibsync.repo.repository import Repository
    from ibsync.storage import LocalStorage

    repo = Repository.open(LocalStorage(path), lambda: PASSWORD)
    repo.load_index()
    return repo


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry below root: bytes (files), mode and mtime (ns)."""
    st = root.stat()
    out = {".": ("dir", st.st_mode, st.st_mtime_ns)}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", str(p.readlink()), st.st_mtime_ns)
        elif p.is_dir():
            out[rel] = ("dir", st.st_mode, st.st_mtime_ns)
        else:
            out[rel] = ("file", p.read_bytes(), st.st_mode, st.st_mtime_ns)
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On CI (``CI`` set, as .ci/run does) a skipped test is a failed one: a skip there means an
    install step is missing (a server, mount, /proc), and CI must say so rather than pass."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped on CI ({reason}); .ci/run must install what this test needs"
