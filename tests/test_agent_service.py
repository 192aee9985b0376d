"""`ibsync agent install | uninstall`: the service files for each platform, and installing them
under a temporary HOME (start=False, and with start on this machine, which has no user bus)."""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from ibsync.agent import service
from ibsync.agent.service import (
    ServiceSpec,
    default_spec,
    render_launchd,
    render_systemd,
    render_windows_task,
)
from ibsync.cli import main
from ibsync.cli.cmd_agent_service import install_cmd, uninstall_cmd
from ibsync.errors import UserError

PY = os.path.abspath(sys.executable)
TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A HOME of our own, so nothing is written into the real one."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setenv("USERPROFILE", str(h))
    for name in ("XDG_CONFIG_HOME", "LOCALAPPDATA", "IBSYNC_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return h


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "my cfg" / "config.toml"
    path.parent.mkdir()
    path.write_text('[agent]\nrepository = "/srv/ibsync"\ninterval = "12h"\n')
    return path


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _systemd_words(line: str) -> list[str]:
    """ExecStart's words the way systemd reads them (quotes, backslash escapes, %% and $$)."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line)]


# --- rendering ----------------------------------------------------------------------------


def test_systemd_unit(config):
    spec = default_spec("linux", config, environ={"PATH": "/usr/local/bin:/usr/bin", "IBSYNC_PASSWORD": "hunter2"})
    text = render_systemd(spec)
    lines = text.splitlines()
    [exec_start] = [line for line in lines if line.startswith("ExecStart=")]
    assert _systemd_words(exec_start.removeprefix("ExecStart=")) == [
        PY,
        "-m",
        "ibsync",
        "agent",
        "--config",
        str(config),
    ]
    assert "Restart=on-failure" in lines and "RestartSec=30" in lines
    assert "Environment=PATH=/usr/local/bin:/usr/bin" in lines
    assert f'Environment="IBSYNC_CONFIG={config}"' in lines
    assert "WantedBy=default.target" in lines and "[Install]" in lines
    assert "hunter2" not in text and "PASSWORD" not in text
    # the sections systemd expects, each key in its own
    assert lines.index("[Unit]") < lines.index("StartLimitIntervalSec=0") < lines.index("[Service]")


def test_systemd_quotes_what_systemd_would_expand(tmp_path):
    odd = tmp_path / 'a "b" 50% $HOME\\x.toml'
    spec = ServiceSpec(program=[PY, "-m", "ibsync"], config=odd, env={"IBSYNC_CONFIG": str(odd)})
    [exec_start] = [line for line in render_systemd(spec).splitlines() if line.startswith("ExecStart=")]
    assert _systemd_words(exec_start.removeprefix("ExecStart="))[-1] == str(odd)
    assert "%%" in exec_start and "$$HOME" in exec_start


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path, config):
    if not shutil.which("systemd-analyze"):
        if os.environ.get("CI"):  # .ci/run installs systemd: CI never skips this
            pytest.fail("systemd-analyze is missing (apt install systemd)", pytrace=False)
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / service.UNIT_NAME
    unit.write_text(render_systemd(default_spec("linux", config)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "Unknown key" not in out.stderr and "ignoring" not in out.stderr.lower(), out.stderr


def test_launchd_plist(config, tmp_path):
    spec = default_spec("macos", config, home=tmp_path, environ={"PATH": "/opt/homebrew/bin:/usr/bin"})
    plist = plistlib.loads(render_launchd(spec).encode())
    assert plist["Label"] == "org.ibsync.agent"
    assert plist["ProgramArguments"] == [PY, "-m", "ibsync", "agent", "--config", str(config)]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    log = str(tmp_path / "Library" / "Logs" / "ibsync" / "agent.log")
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == log
    assert plist["EnvironmentVariables"] == {"PATH": "/opt/homebrew/bin:/usr/bin", "IBSYNC_CONFIG": str(config)}


def test_windows_task_xml():
    config = Path("C:/Users/Anna Smith/ibsync/config.toml")
    spec = default_spec("windows", config, environ={"USERNAME": "anna", "USERDOMAIN": "PC1", "PATH": "C:\\x"})
    text = render_windows_task(spec)
    root = ET.fromstring(text.encode("utf-16"))  # the declaration says UTF-16, as install writes it
    assert root.tag == f"{{{TASK_NS['t']}}}Task"
    assert root.find("t:Triggers/t:LogonTrigger/t:UserId", TASK_NS).text == "PC1\\anna"
    assert root.find("t:Principals/t:Principal/t:LogonType", TASK_NS).text == "InteractiveToken"
    assert root.find("t:Actions/t:Exec/t:Command", TASK_NS).text == PY
    assert root.find("t:Actions/t:Exec/t:Arguments", TASK_NS).text == f'-m ibsync agent --config "{config}"'
    restart = root.find("t:Settings/t:RestartOnFailure", TASK_NS)
    assert restart.find("t:Interval", TASK_NS).text == "PT1M" and int(restart.find("t:Count", TASK_NS).text) > 100
    assert root.find("t:Settings/t:ExecutionTimeLimit", TASK_NS).text == "PT0S"  # no time limit on the agent
    assert root.find("t:Settings/t:DisallowStartIfOnBatteries", TASK_NS).text == "false"
    assert "C:\\x" not in text  # Task Scheduler has no per-task environment: nothing pretends otherwise


def test_no_secret_in_a_service_environment():
    for name in ("IBSYNC_PASSWORD", "AWS_SECRET_ACCESS_KEY", "NTFY_TOKEN"):
        with pytest.raises(UserError, match=name):
            ServiceSpec(program=[PY], env={name: "x"})
    with pytest.raises(UserError, match="line break"):
        ServiceSpec(program=[PY], config=Path("/a\nExecStartPre=/bin/evil"))


# --- installing ---------------------------------------------------------------------------


def test_install_no_start_writes_the_unit_and_uninstall_removes_it(home, config):
    runner = CliRunner()
    result = runner.invoke(
        install_cmd, ["--platform", "linux", "--no-start", "--config", str(config)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    unit = home / ".config" / "systemd" / "user" / "ibsync-agent.service"
    assert unit.read_text() == render_systemd(default_spec("linux", config))
    assert "systemctl --user enable --now ibsync-agent.service" in result.output
    assert _files(home) == [
        ".config",
        ".config/systemd",
        ".config/systemd/user",
        ".config/systemd/user/ibsync-agent.service",
    ]

    again = runner.invoke(install_cmd, ["--platform", "linux", "--no-start", "--config", str(config)])
    assert again.exit_code == 0 and "unchanged" in again.output

    result = runner.invoke(uninstall_cmd, ["--platform", "linux", "--no-stop"], catch_exceptions=False)
    assert result.exit_code == 0 and "removed" in result.output
    assert not unit.exists()
    result = runner.invoke(uninstall_cmd, ["--platform", "linux", "--no-stop"], catch_exceptions=False)
    assert "no agent service was installed" in result.output


def test_a_different_existing_unit_needs_force(home, config, capsys):
    unit = home / ".config" / "systemd" / "user" / "ibsync-agent.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/usr/bin/my-own-thing\n")
    assert main(["agent", "install", "--platform", "linux", "--no-start", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs" in err and "--force" in err
    assert unit.read_text() == "[Service]\nExecStart=/usr/bin/my-own-thing\n"
    assert main(["agent", "install", "--platform", "linux", "--no-start", "--force", "--config", str(config)]) == 0
    assert "ExecStart=" + PY in unit.read_text()


def test_install_no_start_on_macos_and_windows(home, config):
    runner = CliRunner()
    result = runner.invoke(
        install_cmd, ["--platform", "macos", "--no-start", "--config", str(config)], catch_exceptions=False
    )
    assert result.exit_code == 0
    plist_path = home / "Library" / "LaunchAgents" / "org.ibsync.agent.plist"
    plist = plistlib.loads(plist_path.read_bytes())
    assert plist["ProgramArguments"][-3:] == ["agent", "--config", str(config)]
    assert (home / "Library" / "Logs" / "ibsync").is_dir()  # launchd does not create it
    assert f"launchctl bootstrap gui/{os.getuid()} {plist_path}" in result.output

    result = runner.invoke(
        install_cmd, ["--platform", "windows", "--no-start", "--config", str(config)], catch_exceptions=False
    )
    assert result.exit_code == 0
    xml_path = home / "AppData" / "Local" / "ibsync" / "ibsync-agent.xml"
    data = xml_path.read_bytes()
    assert data[:2] in (b"\xff\xfe", b"\xfe\xff")  # UTF-16 with a byte order mark, as schtasks reads it
    assert ET.fromstring(data).find("t:Actions/t:Exec/t:Command", TASK_NS).text == PY
    assert "schtasks /Create /TN ibsync-agent /XML" in result.output

    for platform, path in (("macos", plist_path), ("windows", xml_path)):
        assert runner.invoke(uninstall_cmd, ["--platform", platform, "--no-stop"]).exit_code == 0
        assert not path.exists()


def test_print_changes_nothing(home, config, capsys):
    for platform, check in (
        ("linux", lambda s: "ExecStart=" in s),
        ("macos", lambda s: plistlib.loads(s.encode())),
        ("windows", lambda s: ET.fromstring(s.encode("utf-16"))),
    ):
        assert main(["agent", "install", "--platform", platform, "--print", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert check(out) and str(config) in out
    assert main(["agent", "uninstall", "--platform", "linux", "--print"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert _files(home) == []


def test_config_comes_from_the_agent_group(home, config, capsys, monkeypatch):
    assert main(["agent", "--config", str(config), "install", "--platform", "linux", "--print"]) == 0
    assert f'--config "{config}"' in capsys.readouterr().out
    monkeypatch.setenv("IBSYNC_CONFIG", str(config))
    assert main(["agent", "install", "--platform", "macos", "--print"]) == 0
    assert plistlib.loads(capsys.readouterr().out.encode())["ProgramArguments"][-1] == str(config)
    monkeypatch.delenv("IBSYNC_CONFIG")
    assert main(["agent", "install", "--platform", "linux", "--print"]) == 0  # no config: the agent finds its own
    out = capsys.readouterr().out
    assert "--config" not in out and "IBSYNC_CONFIG" not in out


def test_a_missing_or_wrong_config_is_refused_at_install(home, tmp_path, capsys):
    assert main(["agent", "install", "--platform", "linux", "--no-start", "--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\nintervall = "1d"\n')
    assert main(["agent", "install", "--platform", "linux", "--no-start", "--config", str(bad)]) == 2
    assert "intervall" in capsys.readouterr().err
    assert _files(home) == []


def _user_bus_reachable() -> bool:
    if not shutil.which("systemctl"):
        return False
    out = subprocess.run(["systemctl", "--user", "show-environment"], check=False, capture_output=True, timeout=30)
    return out.returncode == 0


@pytest.mark.skipif(_user_bus_reachable(), reason="a real user service manager is running here: not touching it")
def test_start_without_a_user_bus_is_one_clear_line(home, config, capsys):
    code = main(["agent", "install", "--platform", "linux", "--config", str(config)])
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("ibsync: error: ") and "Traceback" not in err
    unit = home / ".config" / "systemd" / "user" / "ibsync-agent.service"
    assert str(unit) in err and "systemctl --user enable --now ibsync-agent.service" in err
    if shutil.which("systemctl"):
        assert "loginctl enable-linger" in err
    assert unit.exists()  # written, so the user can start it as told

    code = main(["agent", "uninstall", "--platform", "linux"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is removed" in err
    assert not unit.exists()


FAKE_TOOL = """#!/bin/sh
# stands in for the platform's service manager: records each call; launchctl keeps a "loaded" flag
echo "$(basename "$0") $*" >> "$FAKE_LOG"
if [ "$(basename "$0")" = launchctl ]; then
  case "$1" in
    print) [ -f "$FAKE_STATE" ] && exit 0; echo "Could not find service" >&2; exit 113;;
    bootstrap) touch "$FAKE_STATE";;
    bootout) [ -f "$FAKE_STATE" ] || { echo "Boot-out failed: 3: No such process" >&2; exit 3; }; rm "$FAKE_STATE";;
  esac
fi
exit 0
"""


@pytest.fixture
def fake_tools(tmp_path, monkeypatch) -> Path:
    """systemctl, launchctl and schtasks as small programs on PATH that record how they were
    called: the command sequences of each platform, run for real through subprocess."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("systemctl", "launchctl", "schtasks"):
        tool = bin_dir / name
        tool.write_text(FAKE_TOOL)
        tool.chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_STATE", str(tmp_path / "loaded"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def _calls(log: Path) -> list[str]:
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in tools are shell scripts")
def test_install_and_uninstall_run_each_platforms_commands(home, config, tmp_path, fake_tools, capsys):
    other = tmp_path / "other.toml"
    other.write_text("[agent]\n")
    unit = str(home / ".config" / "systemd" / "user" / "ibsync-agent.service")
    plist = str(home / "Library" / "LaunchAgents" / "org.ibsync.agent.plist")
    task = str(home / "AppData" / "Local" / "ibsync" / "ibsync-agent.xml")
    uid = os.getuid()
    expected = {
        "linux": (
            ["systemctl --user daemon-reload", "systemctl --user enable --now ibsync-agent.service"],
            ["systemctl --user daemon-reload", "systemctl --user enable --now ibsync-agent.service"],
            [
                "systemctl --user daemon-reload",
                "systemctl --user enable --now ibsync-agent.service",
                "systemctl --user restart ibsync-agent.service",
            ],
            ["systemctl --user disable --now ibsync-agent.service", "systemctl --user daemon-reload"],
        ),
        "macos": (
            [f"launchctl print gui/{uid}/org.ibsync.agent", f"launchctl bootstrap gui/{uid} {plist}"],
            # already loaded and unchanged: started if it is not running, never interrupted
            [f"launchctl print gui/{uid}/org.ibsync.agent", f"launchctl kickstart gui/{uid}/org.ibsync.agent"],
            [
                f"launchctl print gui/{uid}/org.ibsync.agent",
                f"launchctl bootout gui/{uid}/org.ibsync.agent",
                f"launchctl bootstrap gui/{uid} {plist}",
            ],
            [f"launchctl bootout gui/{uid}/org.ibsync.agent"],
        ),
        "windows": (
            [f"schtasks /Create /TN ibsync-agent /XML {task} /F", "schtasks /Run /TN ibsync-agent"],
            [f"schtasks /Create /TN ibsync-agent /XML {task} /F", "schtasks /Run /TN ibsync-agent"],
            [f"schtasks /Create /TN ibsync-agent /XML {task} /F", "schtasks /Run /TN ibsync-agent"],
            ["schtasks /End /TN ibsync-agent", "schtasks /Delete /TN ibsync-agent /F"],
        ),
    }
    for platform, (first, again, replaced, removed) in expected.items():
        base = ["agent", "install", "--platform", platform]
        assert main([*base, "--config", str(config)]) == 0, capsys.readouterr().err
        assert _calls(fake_tools) == first
        assert main([*base, "--config", str(config)]) == 0
        assert _calls(fake_tools) == again
        assert main([*base, "--config", str(other), "--force"]) == 0
        assert _calls(fake_tools) == replaced
        assert "installed and started" in capsys.readouterr().out
        assert main(["agent", "uninstall", "--platform", platform]) == 0, capsys.readouterr().err
        assert _calls(fake_tools) == removed
        assert not Path({"linux": unit, "macos": plist, "windows": task}[platform]).exists()
