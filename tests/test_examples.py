"""The files in examples/ are what people copy, so each is checked the way ibsync itself reads it:

- every config file through ibsync's own loader (the [repositories] tables as commands read them,
  [agent] and [devices] as the agent reads them, notification and health-check URLs as the agent
  checks them at start), so a typo fails here and not on someone's NAS;
- the service files are byte for byte what `ibsync agent install --print` writes today, for a
  fixed user (regenerate them with `python tests/test_examples.py --regenerate`);
- the nightly off-site copy script runs against two local repositories.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ibsync.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CONFIGS = sorted((EXAMPLES / "config").glob("*.toml"))
SERVICES = EXAMPLES / "services"

# The user the committed service files are written for. The interpreter is where pipx puts
# ibsync's; Windows' is substituted after rendering (on this machine a Windows path is not
# absolute, and `agent install` makes the interpreter's path absolute).
SERVICE_USERS = {
    "linux": {
        "file": "ibsync-agent.service",
        "python": "/home/alice/.local/share/pipx/venvs/ibsync/bin/python",
        "env": {"HOME": "/home/alice", "USER": "alice", "PATH": "/home/alice/.local/bin:/usr/local/bin:/usr/bin:/bin"},
    },
    "macos": {
        "file": "org.ibsync.agent.plist",
        "python": "/Users/alice/.local/pipx/venvs/ibsync/bin/python",
        "env": {
            "HOME": "/Users/alice",
            "USER": "alice",
            "PATH": "/Users/alice/.local/bin:/opt/homebrew/bin:/usr/bin:/bin",
        },
    },
    "windows": {
        "file": "ibsync-agent.xml",
        "python": r"C:\Users\alice\pipx\venvs\ibsync\Scripts\python.exe",
        "env": {
            "HOME": "/home/alice",
            "USERNAME": "alice",
            "USERDOMAIN": "DESKTOP-ALICE",
            "PATH": r"C:\Windows\system32",
        },
    },
}
_PLACEHOLDER_PYTHON = "/ibsync-example-python"


# --- config files ------------------------------------------------------------------------------


def test_every_kind_of_example_is_there():
    names = {p.name for p in CONFIGS}
    assert {
        "external-drive.toml",
        "nas-sftp.toml",
        "nas-smb.toml",
        "webdav-nextcloud.toml",
        "s3.toml",
        "s3-compatible.toml",
        "family.toml",
    } <= names
    assert {p.name for p in SERVICES.iterdir() if p.name != "README.md"} == {u["file"] for u in SERVICE_USERS.values()}
    assert (EXAMPLES / "nightly-offsite-copy.sh").exists()


def _env_refs(value) -> set[str]:
    if isinstance(value, str):
        return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value))
    if isinstance(value, dict):
        return set().union(*map(_env_refs, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_env_refs, value)) if value else set()
    return set()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_ibsyncs_own_loader(path, monkeypatch):
    from ibsync.agent.notify import Notifier, check_health_url
    from ibsync.agent.settings import parse_agent_settings
    from ibsync.config import expand_secrets, load_config, load_document

    doc, _ = load_document(path)
    repos = load_config(path)
    assert repos, f"{path.name} names no repository"
    settings = parse_agent_settings(doc, f"config file {path}")

    for name, rc in repos.items():
        # every ${VARIABLE} an option names is found and substituted, as when a command runs
        refs = _env_refs(rc.options)
        for var in refs:
            monkeypatch.setenv(var, f"value-of-{var}")
        options = expand_secrets(rc.options, f"repository '{name}'")
        assert not _env_refs(options)
        # a password source, so the agent and scripts never need a prompt
        assert rc.password_file or rc.password_command or rc.password_env, f"{name}: no password source"
        # a URL of a kind ibsync has a tested backend for (not opened: that would connect)
        scheme = rc.url.split("://", 1)[0] if "://" in rc.url else "local"
        assert scheme in {"local", "s3", "sftp", "smb", "webdav+https"}, (name, rc.url)

    # every repository the agent tables name exists in [repositories]
    named = [settings.defaults.repository, *(t.get("repository") for t in settings.devices.values())]
    for repo in filter(None, named):
        assert repo in repos, f"{path.name}: the agent names repository '{repo}', which is not defined"
    # the checks the agent makes when it starts
    if settings.notify:
        Notifier(list(settings.notify))
    for url in filter(
        None, [settings.defaults.healthcheck, *(t.get("healthcheck") for t in settings.devices.values())]
    ):
        check_health_url(url)


def test_family_example_covers_several_phones_and_an_offsite_copy():
    from ibsync.agent.settings import parse_agent_settings
    from ibsync.config import load_config, load_document

    path = EXAMPLES / "config" / "family.toml"
    doc, _ = load_document(path)
    settings = parse_agent_settings(doc, str(path))
    assert len(settings.devices) >= 3
    assert settings.defaults.repository == "home"
    assert {"home", "offsite"} <= set(load_config(path))
    # the per-device overrides are applied as the agent applies them
    bob = settings.policy("00008110-0011223344556677", None)
    assert bob.interval.days == 7 and bob.keep == {"weekly": 8, "monthly": 12}
    assert settings.policy("X", "Grandma's iPhone").enabled is False
    assert settings.policy("Y", "Alice's iPhone").only_when_charging is True
    assert settings.check_subset == (1, 7) and settings.prune_every is not None


def test_a_typo_in_an_example_would_fail(tmp_path):
    """The loader this file relies on refuses a misspelt key (so the tests above mean something)."""
    from ibsync.agent.settings import parse_agent_settings
    from ibsync.config import load_document
    from ibsync.errors import UserError

    bad = tmp_path / "family.toml"
    bad.write_text((EXAMPLES / "config" / "family.toml").read_text().replace("check-subset", "check_subset"))
    doc, _ = load_document(bad)
    with pytest.raises(UserError, match="check_subset"):
        parse_agent_settings(doc, str(bad))


# --- service files -------------------------------------------------------------------------------


def render_service(platform: str, monkeypatch, capsys) -> str:
    """What `ibsync agent install --print --platform PLATFORM` prints for the example user."""
    user = SERVICE_USERS[platform]
    for var in ("IBSYNC_CONFIG", "XDG_CONFIG_HOME", "LOCALAPPDATA", "USER", "USERNAME", "USERDOMAIN"):
        monkeypatch.delenv(var, raising=False)
    for var, value in user["env"].items():
        monkeypatch.setenv(var, value)
    python = _PLACEHOLDER_PYTHON if platform == "windows" else user["python"]
    monkeypatch.setattr(sys, "executable", python)
    capsys.readouterr()
    code = main(["agent", "install", "--print", "--platform", platform])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.replace(_PLACEHOLDER_PYTHON, user["python"]) if platform == "windows" else out


@pytest.mark.parametrize("platform", sorted(SERVICE_USERS))
def test_service_file_is_what_agent_install_prints(platform, monkeypatch, capsys):
    expected = render_service(platform, monkeypatch, capsys)
    committed = (SERVICES / SERVICE_USERS[platform]["file"]).read_text(encoding="utf-8")
    assert committed == expected, (
        f"examples/services/{SERVICE_USERS[platform]['file']} differs from `ibsync agent install --print "
        f"--platform {platform}`; run `python tests/test_examples.py --regenerate`"
    )
    # and it runs the agent through the interpreter, never a password
    assert "-m" in committed and "agent" in committed and "PASSWORD" not in committed.upper()


# --- the nightly copy script -------------------------------------------------------------------


def _init(repo: Path, password_file: Path, monkeypatch, capsys) -> None:
    from ibsync.testing import FAST_KDF

    monkeypatch.setattr("ibsync.format.crypto.DEFAULT_KDF", FAST_KDF)
    capsys.readouterr()
    assert main(["init", "--repo", str(repo), "--password-file", str(password_file)]) == 0, capsys.readouterr()


def _snapshot_ids(repo: Path, password_file: Path, env: dict) -> list[tuple]:
    """What identifies a snapshot across repositories (ids differ: each repository has its own key)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ibsync",
            "snapshots",
            "--json",
            "--repo",
            str(repo),
            "--password-file",
            str(password_file),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(
        (s["device"]["udid"], s["backup_date"], s["summary"]["files"], s["summary"]["total_bytes"])
        for s in json.loads(out.stdout)
    )


def test_nightly_offsite_copy_script(tmp_path, monkeypatch, capsys):
    from ibsync.errors import WrongPassword

    home, offsite = tmp_path / "home", tmp_path / "offsite"
    home_pw, offsite_pw = tmp_path / "home.pass", tmp_path / "offsite.pass"
    home_pw.write_text("the home repository's password\n")
    offsite_pw.write_text("a different password off-site\n")
    monkeypatch.setenv("IBSYNC_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("IBSYNC_REPO", "IBSYNC_PASSWORD", "IBSYNC_PASSWORD_COMMAND", "IBSYNC_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    _init(home, home_pw, monkeypatch, capsys)
    _init(offsite, offsite_pw, monkeypatch, capsys)
    backup = tmp_path / "Backup"
    subprocess.run(
        [sys.executable, "-m", "ibsync.testing.generator", "generate", str(backup), "--size-mib", "2", "--seed", "5"],
        check=True,
        capture_output=True,
    )
    assert main(["import", str(backup), "--repo", str(home), "--password-file", str(home_pw), "--quiet"]) == 0

    # the script calls `ibsync` from PATH: this checkout's, whatever else is installed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "ibsync"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ibsync "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IBSYNC_")}
    env.update(
        {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "IBSYNC_CACHE_DIR": str(tmp_path / "cache"),
            "IBSYNC_CONFIG": str(tmp_path / "no-config.toml"),
            "FROM": str(home),
            "TO": str(offsite),
            "IBSYNC_FROM_PASSWORD_FILE": str(home_pw),
            "IBSYNC_PASSWORD_FILE": str(offsite_pw),
        }
    )
    (tmp_path / "no-config.toml").write_text("")
    script = EXAMPLES / "nightly-offsite-copy.sh"

    run = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no errors were found" in run.stdout
    assert re.search(r"data subset [1-7]/7", run.stdout)
    source_ids = _snapshot_ids(home, home_pw, env)
    assert source_ids and _snapshot_ids(offsite, offsite_pw, env) == source_ids

    # the copy restores byte for byte from the off-site repository, with its own password
    out = tmp_path / "restored"
    restore = subprocess.run(
        [
            sys.executable,
            "-m",
            "ibsync",
            "restore",
            "latest",
            str(out),
            "--repo",
            str(offsite),
            "--password-file",
            str(offsite_pw),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert restore.returncode == 0, restore.stderr
    (restored,) = out.iterdir()
    (device,) = backup.iterdir()
    originals = {p.relative_to(device): p.read_bytes() for p in device.rglob("*") if p.is_file()}
    assert {p.relative_to(restored): p.read_bytes() for p in restored.rglob("*") if p.is_file()} == originals

    # the next night sends nothing new, and still succeeds
    again = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _snapshot_ids(offsite, offsite_pw, env) == source_ids

    # a wrong source password fails the script with ibsync's status, before anything is copied
    env["IBSYNC_FROM_PASSWORD_FILE"] = str(offsite_pw)
    bad = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == WrongPassword.exit_code and "wrong password" in bad.stderr
    assert "== check" not in bad.stdout


# --- regenerating the service files --------------------------------------------------------------


def _regenerate() -> None:
    """Rewrite examples/services/ from `ibsync agent install --print` (run after changing the
    service templates in ibsync/agent/service.py)."""
    import contextlib
    import io

    for platform, user in SERVICE_USERS.items():
        saved_env, saved_exe = dict(os.environ), sys.executable
        try:
            for var in ("IBSYNC_CONFIG", "XDG_CONFIG_HOME", "LOCALAPPDATA", "USER", "USERNAME", "USERDOMAIN"):
                os.environ.pop(var, None)
            os.environ.update(user["env"])
            sys.executable = _PLACEHOLDER_PYTHON if platform == "windows" else user["python"]
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert main(["agent", "install", "--print", "--platform", platform]) == 0
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            sys.executable = saved_exe
        text = buf.getvalue().replace(_PLACEHOLDER_PYTHON, user["python"])
        (SERVICES / user["file"]).write_text(text, encoding="utf-8", newline="")
        print(f"wrote examples/services/{user['file']}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_examples.py --regenerate")
    _regenerate()
