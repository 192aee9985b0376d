"""``ibsync agent install | uninstall``: the agent as a per-user service that starts at login
and is restarted when it fails.

- Linux: a systemd user unit, ``~/.config/systemd/user/ibsync-agent.service``
  (``$XDG_CONFIG_HOME`` is honoured), enabled with ``systemctl --user enable --now``. On a
  headless box (a NAS) ``loginctl enable-linger $USER`` starts it at boot without a login.
- macOS: a launchd agent, ``~/Library/LaunchAgents/org.ibsync.agent.plist``, loaded with
  ``launchctl bootstrap gui/<uid>``; its output goes to ``~/Library/Logs/ibsync/agent.log``.
- Windows: a Task Scheduler task ``ibsync-agent`` (at logon, restarted on failure), registered
  from ``%LOCALAPPDATA%\\ibsync\\ibsync-agent.xml`` with ``schtasks /Create /XML``.

The files are rendered by pure functions of a ``ServiceSpec``; ``install``/``uninstall`` write or
remove them and run the platform's commands. The agent exits 0 when stopped (SIGTERM), so
"restart on failure" never fights a deliberate stop. No secret goes into a service file: the
agent reads its passwords the way every command does (password file, command, environment
named in the config file).
"""

from __future__ import annotations

import os
import plistlib
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from ..errors import UserError

PLATFORMS = ("linux", "macos", "windows")
UNIT_NAME = "ibsync-agent.service"
LAUNCHD_LABEL = "org.ibsync.agent"
TASK_NAME = "ibsync-agent"
#: seconds before a failed agent is started again (systemd RestartSec, launchd ThrottleInterval)
RESTART_SECONDS = 30
#: environment variable names that must never be written into a service file
_SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL|AUTH", re.IGNORECASE)

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs: ``program`` (the interpreter and ``-m ibsync``, or the ``ibsync``
    entry point) followed by ``agent`` and ``--config FILE`` when one is given."""

    program: list[str]
    config: Path | None = None
    #: variables set for the agent (PATH, IBSYNC_CONFIG); never secrets
    env: dict[str, str] = field(default_factory=dict)
    #: where launchd writes the agent's output (systemd has the journal, Windows the task history)
    log_dir: Path = Path("~/Library/Logs/ibsync")
    #: the Windows account the logon trigger is for (DOMAIN\\user)
    user: str = ""

    def __post_init__(self) -> None:
        if not self.program:
            raise UserError("the service needs a program to run")
        for name in self.env:
            if _SECRET_NAME.search(name):
                raise UserError(
                    f"environment variable {name} looks like a secret and is not written into a "
                    "service file: name a password file or command in the config file instead"
                )
        for arg in [*self.argv, *self.env.values(), *self.env]:
            if "\n" in arg or "\r" in arg or "\0" in arg:
                raise UserError("a service command line or environment value cannot contain a line break")

    @property
    def argv(self) -> list[str]:
        return [*self.program, "agent", *(["--config", str(self.config)] if self.config else [])]


def current_platform() -> str:
    return {"darwin": "macos", "win32": "windows"}.get(sys.platform, "linux")


def default_spec(
    platform: str, config: Path | None = None, *, home: Path | None = None, environ: Mapping[str, str] | None = None
) -> ServiceSpec:
    """The spec for this installation: the current interpreter (its absolute path, not resolved,
    so a virtual environment stays the one that runs) with ``-m ibsync``, so the service runs
    the very ibsync that installed it whatever PATH the service manager gives it."""
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else home
    env: dict[str, str] = {}
    if environ.get("PATH") and platform != "windows":  # Task Scheduler has no per-task environment
        env["PATH"] = environ["PATH"]
    if config is not None and platform != "windows":
        env["IBSYNC_CONFIG"] = str(config)
    user = environ.get("USERNAME") or environ.get("USER") or ""
    if platform == "windows" and environ.get("USERDOMAIN") and user:
        user = f"{environ['USERDOMAIN']}\\{user}"
    return ServiceSpec(
        program=[os.path.abspath(sys.executable), "-m", "ibsync"],
        config=config,
        env=env,
        log_dir=home / "Library" / "Logs" / "ibsync",
        user=user,
    )


# --- rendering ----------------------------------------------------------------------------


def _systemd_quote(arg: str, *, exec_line: bool = True) -> str:
    """One word of ExecStart (or, ``exec_line=False``, of Environment): ``%`` starts a specifier
    in both, ``$`` a variable only in ExecStart."""
    text = arg.replace("%", "%%")
    if exec_line:
        text = text.replace("$", "$$")
    if text and not re.search(r'[\s"\'\\;]', text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd(spec: ServiceSpec) -> str:
    env_lines = "".join(f"Environment={_systemd_quote(f'{k}={v}', exec_line=False)}\n" for k, v in spec.env.items())
    return (
        "# Written by `ibsync agent install`; `ibsync agent uninstall` removes it.\n"
        "[Unit]\n"
        "Description=ibsync agent: back up iPhones and iPads when they are due\n"
        "# never give up restarting: a NAS that is asleep at boot must not end the agent for good\n"
        "StartLimitIntervalSec=0\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={' '.join(_systemd_quote(a) for a in spec.argv)}\n"
        f"{env_lines}"
        "Restart=on-failure\n"
        f"RestartSec={RESTART_SECONDS}\n"
        "# SIGTERM interrupts a running backup the way Ctrl-C does; indexing what was uploaded takes a moment\n"
        "TimeoutStopSec=120\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def render_launchd(spec: ServiceSpec) -> str:
    log = str(spec.log_dir / "agent.log")
    plist = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": spec.argv,
        "RunAtLoad": True,
        # restarted when it exits with an error, not when it was stopped (exit 0)
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": RESTART_SECONDS,
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "EnvironmentVariables": dict(spec.env),
        "ProcessType": "Standard",
    }
    return plistlib.dumps(plist, sort_keys=False).decode("utf-8")


def _windows_quote(arg: str) -> str:
    """One argument as CommandLineToArgvW reads it back (the rules Python's own
    subprocess.list2cmdline follows)."""
    return subprocess.list2cmdline([arg])


def render_windows_task(spec: ServiceSpec) -> str:
    """Task Scheduler XML (schema 1.2, Windows 7 and later). Returned as text whose declaration
    says UTF-16: ``install`` writes it in UTF-16, the encoding schtasks expects."""
    command, *args = spec.argv
    arguments = " ".join(_windows_quote(a) for a in args)
    user = f"\n      <UserId>{escape(spec.user)}</UserId>" if spec.user else ""
    return f"""<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>ibsync agent: back up iPhones and iPads when they are due. Written by `ibsync agent install`.</Description>
    <URI>\\{TASK_NAME}</URI>
  </RegistrationInfo>
  <Triggers>
    <LogonTrigger>
      <Enabled>true</Enabled>{user}
    </LogonTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">{user}
      <LogonType>InteractiveToken</LogonType>
      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <AllowHardTerminate>true</AllowHardTerminate>
    <StartWhenAvailable>true</StartWhenAvailable>
    <RunOnlyIfNetworkAvailable>false</RunOnlyIfNetworkAvailable>
    <IdleSettings>
      <StopOnIdleEnd>false</StopOnIdleEnd>
      <RestartOnIdle>false</RestartOnIdle>
    </IdleSettings>
    <AllowStartOnDemand>true</AllowStartOnDemand>
    <Enabled>true</Enabled>
    <Hidden>false</Hidden>
    <RunOnlyIfIdle>false</RunOnlyIfIdle>
    <WakeToRun>false</WakeToRun>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <Priority>7</Priority>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>999</Count>
    </RestartOnFailure>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{escape(command)}</Command>
      <Arguments>{escape(arguments)}</Arguments>
    </Exec>
  </Actions>
</Task>
"""


def render(platform: str, spec: ServiceSpec) -> str:
    return {"linux": render_systemd, "macos": render_launchd, "windows": render_windows_task}[platform](spec)


# --- where the files go -------------------------------------------------------------------


def service_file(platform: str, home: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The file ``install`` writes for ``platform`` under ``home``."""
    environ = {} if environ is None else environ
    if platform == "linux":
        base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else home / ".config"
        return base / "systemd" / "user" / UNIT_NAME
    if platform == "macos":
        return home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    if platform == "windows":
        base = Path(environ["LOCALAPPDATA"]) if environ.get("LOCALAPPDATA") else home / "AppData" / "Local"
        return base / "ibsync" / f"{TASK_NAME}.xml"
    raise UserError(f"unknown platform {platform!r} (one of {', '.join(PLATFORMS)})")


def _encode(platform: str, text: str) -> bytes:
    return text.encode("utf-16") if platform == "windows" else text.encode("utf-8")


# --- the platform's commands --------------------------------------------------------------


def start_commands(platform: str, path: Path, replaced: bool, uid: int, loaded: bool = False) -> list[list[str]]:
    """What registers and starts the service. ``replaced``: the file changed under a service that
    may be running; ``loaded``: launchd already has the agent."""
    if platform == "linux":
        cmds = [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", UNIT_NAME]]
        if replaced:  # enable --now leaves a running agent on its old unit
            cmds.append(["systemctl", "--user", "restart", UNIT_NAME])
        return cmds
    if platform == "macos":
        target = f"gui/{uid}/{LAUNCHD_LABEL}"
        if loaded and not replaced:  # start it if it is not running; never interrupt a backup
            return [["launchctl", "kickstart", target]]
        # a loaded agent must be booted out before its plist is loaded again
        return [
            *([["launchctl", "bootout", target]] if loaded else []),
            ["launchctl", "bootstrap", f"gui/{uid}", str(path)],
        ]
    return [["schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(path), "/F"], ["schtasks", "/Run", "/TN", TASK_NAME]]


def stop_commands(platform: str, uid: int) -> list[list[str]]:
    if platform == "linux":
        return [["systemctl", "--user", "disable", "--now", UNIT_NAME]]
    if platform == "macos":
        return [["launchctl", "bootout", f"gui/{uid}/{LAUNCHD_LABEL}"]]
    return [["schtasks", "/End", "/TN", TASK_NAME], ["schtasks", "/Delete", "/TN", TASK_NAME, "/F"]]


def shell_line(cmds: Sequence[Sequence[str]]) -> str:
    return " && ".join(
        subprocess.list2cmdline(c) if current_platform() == "windows" else " ".join(_sh_quote(a) for a in c)
        for c in cmds
    )


def _sh_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)


def _first_line(text: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def user_id() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


@dataclass(frozen=True)
class Result:
    """What ``install``/``uninstall`` did, for the command to report."""

    path: Path
    changed: bool  # the file was written (or removed)
    ran: list[str] = field(default_factory=list)  # the commands run, as shell lines
    #: what to run to finish by hand (``start=False``)
    next_steps: str = ""


def install(
    platform: str,
    spec: ServiceSpec,
    *,
    start: bool = True,
    force: bool = False,
    home: Path | None = None,
    environ: Mapping[str, str] | None = None,
    run: Runner = _run,
) -> Result:
    """Write the service file and (``start``) register and start it. An existing file that
    differs is replaced only with ``force``; an identical one is left as it is."""
    home = Path.home() if home is None else home
    path = service_file(platform, home, os.environ if environ is None else environ)
    data = _encode(platform, render(platform, spec))
    old = _read(path)
    if old is not None and old != data and not force:
        raise UserError(
            f"{path} exists and differs from the service ibsync would write: "
            "--force to replace it, --print to see the new one"
        )
    changed = old != data
    uid = user_id()
    loaded = False
    if platform == "macos" and start:
        out = _try(run, ["launchctl", "print", f"gui/{uid}/{LAUNCHD_LABEL}"])
        loaded = out is not None and out.returncode == 0
    if changed:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if platform == "macos":
                spec.log_dir.expanduser().mkdir(parents=True, exist_ok=True)  # launchd does not make it
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    cmds = start_commands(platform, path, replaced=old is not None and changed, uid=uid, loaded=loaded)
    steps = shell_line(cmds)
    if not start:
        return Result(path, changed, next_steps=steps)
    ran = []
    for cmd in cmds:
        _must(run, cmd, f"the service file is written to {path}; to start it run: {steps}", platform)
        ran.append(shell_line([cmd]))
    return Result(path, changed, ran)


def uninstall(
    platform: str,
    *,
    stop: bool = True,
    home: Path | None = None,
    environ: Mapping[str, str] | None = None,
    run: Runner = _run,
) -> Result:
    """Stop and unregister the service (``stop``) and remove its file. Nothing installed is not
    an error. The file is removed even when the service manager cannot be reached; the error
    then says what is left to do."""
    home = Path.home() if home is None else home
    environ = os.environ if environ is None else environ
    path = service_file(platform, home, environ)
    uid = user_id()
    cmds = stop_commands(platform, uid) if stop else []
    problem = ""
    ran = []
    for cmd in cmds:
        out = _try(run, cmd)
        if out is None or out.returncode != 0:
            detail = _first_line(out.stderr or out.stdout) if out is not None else f"{cmd[0]} not found"
            if not _not_loaded(platform, cmd, detail, out):
                status = f"exit status {out.returncode}" if out is not None else ""  # None: detail says so
                problem = problem or f"{' '.join(cmd[:3])}: {detail or status}"
        else:
            ran.append(shell_line([cmd]))
    existed = path.exists()
    try:
        path.unlink(missing_ok=True)
        if platform == "linux":  # what `disable` would remove, if systemctl could not
            link = path.parent / "default.target.wants" / UNIT_NAME
            if link.is_symlink():
                link.unlink()
    except OSError as e:
        raise UserError(f"cannot remove {path}: {e.strerror or e}") from None
    if platform == "linux" and stop:
        reload = _try(run, ["systemctl", "--user", "daemon-reload"])
        if reload is not None and reload.returncode == 0:
            ran.append("systemctl --user daemon-reload")
    if not existed:
        problem = ""  # no file: nothing was installed here, whatever the service manager says
    if problem:
        gone = f"{path} is removed" if existed else f"{path} was not there"
        raise UserError(
            f"{gone}, but {problem}; if the agent still runs, stop it with: {shell_line(stop_commands(platform, uid))}"
        )
    return Result(path, existed, ran)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _try(run: Runner, cmd: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return run(cmd)
    except (OSError, subprocess.SubprocessError):
        return None


def _must(run: Runner, cmd: Sequence[str], then: str, platform: str) -> None:
    """Run one command of the install; a one-line UserError that says what is left to do."""
    try:
        out = run(cmd)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found; {then}") from None
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"{' '.join(cmd[:3])} failed ({e}); {then}") from None
    if out.returncode == 0:
        return
    detail = _first_line(out.stderr) or _first_line(out.stdout) or f"exit status {out.returncode}"
    hint = ""
    if platform == "linux" and re.search(r"bus|XDG_RUNTIME_DIR", detail, re.IGNORECASE):
        hint = (
            " (no user service manager in this session: log in as the user, or on a headless box "
            "run `sudo loginctl enable-linger $USER` first)"
        )
    raise UserError(f"{' '.join(cmd[:3])} failed: {detail}{hint}; {then}")


def _not_loaded(platform: str, cmd: Sequence[str], detail: str, out: subprocess.CompletedProcess[str] | None) -> bool:
    """An uninstall step that failed only because there was nothing to stop."""
    if out is None:
        return False
    text = detail.lower()
    if platform == "linux":
        return "not loaded" in text or "does not exist" in text or "no such file" in text
    if platform == "macos":
        return out.returncode in (3, 113) or "could not find" in text or "no such process" in text
    return "cannot find" in text or "does not exist" in text or "not running" in text or cmd[1] == "/End"
