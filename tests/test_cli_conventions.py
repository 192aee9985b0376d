"""CLI conventions: shell completion (click's), no colour or escape sequence off a terminal or
with NO_COLOR, and --json on the agent's install and uninstall."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import MIT_BACKUP, copy_folder


def _complete(words: str, cword: int) -> list[str]:
    env = {**os.environ, "_IBSYNC_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    r = subprocess.run([sys.executable, "-m", "ibsync"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_completion_scripts_and_completing_a_command():
    for shell, marker in (
        ("bash", "complete -o nosort -F _ibsync_completion ibsync"),
        ("zsh", "#compdef ibsync"),
        ("fish", "complete --no-files --command ibsync"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "ibsync"],
            env={**os.environ, "_IBSYNC_COMPLETE": f"{shell}_source"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0 and marker in r.stdout, (shell, r.stdout, r.stderr)
        assert "_IBSYNC_COMPLETE=" in r.stdout  # the script calls ibsync back to complete
    assert _complete("ibsync sn", 1) == ["plain,snapshots"]
    assert _complete("ibsync re", 1) == ["plain,restore", "plain,repair"]
    assert "plain,--keep-last" in _complete("ibsync forget --keep-l", 2)
    assert sorted(_complete("ibsync key ", 2)) == ["plain,add", "plain,list", "plain,passwd", "plain,remove"]


@pytest.fixture
def imported(env, cli, tmp_path):
    cli("init")
    cli("import", copy_folder(MIT_BACKUP, tmp_path / "src"), "--allow-unfinished")
    return dict(os.environ)


COMMANDS = [
    ["--help"],
    ["snapshots"],
    ["ls", "latest"],
    ["find", "Manifest*"],
    ["stats"],
    ["check"],
    ["diff", "latest", "latest"],
    ["ls", "deadbeef"],
]


def test_no_escape_sequence_when_output_is_not_a_terminal(imported):
    for args in COMMANDS:
        r = subprocess.run([sys.executable, "-m", "ibsync", *args], env=imported, capture_output=True, timeout=120)
        assert r.stdout or r.stderr, args
        assert b"\x1b" not in r.stdout and b"\x1b" not in r.stderr, (args, r.stdout, r.stderr)


def _on_a_terminal(args: list[str], env: dict) -> bytes:
    """stdout of ``ibsync ARGS`` written to a pseudo-terminal, as a user's shell would show it."""
    main, child = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ibsync", *args],
            env=env,
            stdout=child,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        os.close(child)
        out = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=120)
    finally:
        os.close(main)
    return out


def test_no_escape_sequence_on_a_terminal_with_no_color(imported):
    env = {**imported, "NO_COLOR": "1"}
    for args in COMMANDS[:4]:
        out = _on_a_terminal(args, env)
        assert out and b"\x1b" not in out, (args, out)


def test_no_color_strips_styling_even_on_a_terminal(imported, monkeypatch, capsys):
    """Styling click would print to a terminal (none is printed today) is stripped under NO_COLOR."""
    import click

    from ibsync.cli import main

    monkeypatch.setattr("click._compat.isatty", lambda stream: True)  # as if stdout were a terminal

    def styled(*args, **kwargs):
        click.echo(click.style("red", fg="red"))

    monkeypatch.setattr("ibsync.cli.cmd_snapshots.snapshots_cmd.callback", styled)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert main(["snapshots"]) == 0
    assert capsys.readouterr().out == "\x1b[31mred\x1b[0m\n"  # the spy works: a terminal gets colour
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["snapshots"]) == 0
    assert capsys.readouterr().out == "red\n"


def test_agent_install_and_uninstall_json(tmp_path, monkeypatch):
    from ibsync.cli.cmd_agent_service import install_cmd, uninstall_cmd

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CONFIG_HOME", "LOCALAPPDATA", "IBSYNC_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "config.toml"
    config.write_text('[agent]\nrepository = "/srv/ibsync"\ninterval = "12h"\n')
    unit = home / ".config" / "systemd" / "user" / "ibsync-agent.service"
    runner = CliRunner()

    r = runner.invoke(
        install_cmd, ["--platform", "linux", "--print", "--json", "--config", str(config)], catch_exceptions=False
    )
    doc = json.loads(r.output)
    assert doc["path"] == str(unit) and "ExecStart=" in doc["service_file"] and not unit.exists()

    r = runner.invoke(
        install_cmd, ["--platform", "linux", "--no-start", "--json", "--config", str(config)], catch_exceptions=False
    )
    doc = json.loads(r.output)
    assert doc == {
        "platform": "linux",
        "path": str(unit),
        "changed": True,
        "started": False,
        "ran": [],
        "next_steps": doc["next_steps"],
    }
    assert (
        "systemctl --user" in doc["next_steps"]
        and unit.read_text()
        == json.loads(
            runner.invoke(install_cmd, ["--platform", "linux", "--print", "--json", "--config", str(config)]).output
        )["service_file"]
    )
    again = json.loads(
        runner.invoke(install_cmd, ["--platform", "linux", "--no-start", "--json", "--config", str(config)]).output
    )
    assert again["changed"] is False

    r = runner.invoke(uninstall_cmd, ["--platform", "linux", "--no-stop", "--print", "--json"], catch_exceptions=False)
    assert json.loads(r.output) == {"platform": "linux", "path": str(unit), "exists": True, "would_run": []}
    r = runner.invoke(uninstall_cmd, ["--platform", "linux", "--no-stop", "--json"], catch_exceptions=False)
    assert json.loads(r.output) == {"platform": "linux", "path": str(unit), "removed": True, "ran": []}
    assert not unit.exists()
    r = runner.invoke(uninstall_cmd, ["--platform", "linux", "--no-stop", "--json"], catch_exceptions=False)
    assert json.loads(r.output)["removed"] is False


def test_every_listing_or_reporting_command_takes_json():
    """Every command but the web app's server (ui: its only stdout is the login link) accepts --json."""
    from ibsync.cli import cli

    missing = []

    def walk(cmd, path):
        import click

        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name])
        elif not any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option)):
            missing.append(" ".join(path))

    walk(cli, [])
    assert missing == ["ui"], missing
