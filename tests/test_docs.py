"""The documentation site stays true to the code:

- its command reference (generated at build time by docs/hooks/cli_reference.py) names every
  command and option click knows;
- its exit-code table covers every status the code can end with;
- the agent page's key table lists every [agent] and [devices] key the agent accepts;
- every `ibsync ...` command line in docs/, examples/ and README.md names a real command and
  real options;
- `mkdocs build --strict` succeeds (a broken link, a broken anchor or a page missing from the
  nav fails here and in CI), and fails on a broken link.

Needs the `docs` extra (pip install -e '.[docs]'): mkdocs and mkdocs-material.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "docs" / "hooks" / "cli_reference.py"


def _hook():
    spec = importlib.util.spec_from_file_location("ibsync_docs_cli_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def click_commands(root: click.Command) -> dict[str, tuple[click.Command, click.Context]]:
    """Every visible command under ``root`` by its full name, as click itself resolves them
    (written here again rather than borrowed from the hook, so a walk that skips something is
    caught)."""
    found: dict[str, tuple[click.Command, click.Context]] = {}

    def visit(cmd: click.Command, name: str, parent: click.Context | None) -> None:
        ctx = cmd.make_context(name.split()[-1], [], parent=parent, resilient_parsing=True)
        found[name] = (cmd, ctx)
        if isinstance(cmd, click.Group):
            for sub_name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, sub_name)
                assert sub is not None, f"'{name} {sub_name}' is listed but cannot be loaded"
                if not sub.hidden:
                    visit(sub, f"{name} {sub_name}", ctx)

    visit(root, "ibsync", None)
    return found


def sections(page: str) -> dict[str, str]:
    """The reference page cut into its command sections: heading name -> text."""
    parts = re.split(r"^#{2,5} (ibsync(?: [\w-]+)*) \{ #[\w-]+ \}$", page, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def missing_from(page: str, root: click.Command) -> list[str]:
    """Commands and options click knows that the page does not document, each in its own section."""
    docs = sections(page)
    missing = []
    for name, (cmd, ctx) in click_commands(root).items():
        if name not in docs:
            missing.append(f"command '{name}'")
            continue
        text = docs[name]
        if cmd.help and cmd.help.strip().split()[0] not in text:
            missing.append(f"help of '{name}'")
        for param in cmd.get_params(ctx):
            if isinstance(param, click.Argument):
                if param.human_readable_name not in text:
                    missing.append(f"argument {param.human_readable_name} of '{name}'")
                continue
            if param.hidden or set(param.opts) == set(ctx.help_option_names):
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                if not re.search(rf"`[^`]*(?<![\w-]){re.escape(opt)}(?![\w-])[^`]*`", text):
                    missing.append(f"option {opt} of '{name}'")
    head = page.split("\n## ", 1)[0]
    for opt in click_commands(root)["ibsync"][1].help_option_names:
        if f"`{opt}`" not in head:
            missing.append(f"help option {opt}")
    return missing


def test_reference_documents_every_command_and_option():
    from ibsync.cli import cli

    page = _hook().render_reference()
    assert missing_from(page, cli) == []
    # the commands people use most are there, with their options, from the code itself
    docs = sections(page)
    for name in ("ibsync backup", "ibsync restore", "ibsync agent install", "ibsync repair packs", "ibsync key passwd"):
        assert name in docs
    assert "--read-data-subset" in docs["ibsync check"] and "--to-device" in docs["ibsync restore"]
    assert "Environment: `IBSYNC_REPO`" in docs["ibsync backup"]


def test_the_check_catches_an_undocumented_command_or_option():
    """missing_from really fails when something is left out (else the test above proves nothing)."""
    from ibsync.cli import cli

    page = _hook().render_reference()
    without_option = re.sub(r"^`--read-data-subset [^`]*`$", "`(gone)`", page, flags=re.MULTILINE)
    assert missing_from(without_option, cli) == ["option --read-data-subset of 'ibsync check'"]
    without_command = page.replace("## ibsync unlock { #ibsync-unlock }", "## something else")
    assert "command 'ibsync unlock'" in missing_from(without_command, cli)

    @click.group()
    def toy() -> None:
        """A toy group."""

    @toy.command("new")
    @click.option("--shiny", is_flag=True, help="A brand new option.")
    @click.option("--secret", hidden=True)
    def new(shiny: bool, secret: str) -> None:
        """A command added tomorrow."""

    hook = _hook()
    toy_page = "\n".join(hook.render_entry(e) for e in hook.walk(toy))
    assert "`--shiny`" in toy_page and "--secret" not in toy_page
    assert [m for m in missing_from(toy_page, toy) if not m.startswith("help option")] == []


def test_reference_escapes_what_markdown_would_eat():
    page = _hook().render_reference()
    restore = sections(page)["ibsync restore"]
    assert "TARGET/&lt;UDID&gt;" in restore  # not an HTML tag
    assert "```text\nibsync restore latest ./out\n" in restore  # click's \b block stays as written


def _ibsync_error_classes() -> list[type]:
    """Every exception class ibsync raises on purpose, all modules imported."""
    import pkgutil

    import ibsync
    from ibsync.errors import IbsyncError

    for info in pkgutil.walk_packages(ibsync.__path__, "ibsync."):
        if not info.name.startswith("ibsync.testing") and info.name != "ibsync.__main__":
            importlib.import_module(info.name)
    out, todo = [], [IbsyncError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return [c for c in out if c.__module__.startswith("ibsync.") and not c.__module__.startswith("ibsync.testing")]


def test_exit_codes_page_lists_every_status_the_code_uses():
    from ibsync.errors import EXIT_CODES

    page = (ROOT / "docs" / "exit-codes.md").read_text(encoding="utf-8")
    table = _hook().exit_codes_table()
    assert _hook().EXIT_CODES_MARKER in page
    for code in EXIT_CODES:
        assert f"| **{code}** |" in table
    # every status a command can end with is in that table: each error class's, click.Exit's
    used = {cls.exit_code for cls in _ibsync_error_classes()}
    for path in (ROOT / "ibsync").rglob("*.py"):
        if "testing" not in path.parts:
            used |= {int(n) for n in re.findall(r"Exit\((\d+)\)", path.read_text(encoding="utf-8"))}
    assert len(used) > 3 and used - set(EXIT_CODES) == set()
    # the page's own example uses statuses as the table means them
    labels = re.findall(r"^\s+([\d|]+)\)\s+echo \"([^\"]*)\"", page, flags=re.MULTILINE)
    assert labels
    for codes, said in labels:
        for code in map(int, codes.split("|")):
            assert code in EXIT_CODES, code
            if "try again later" in said:
                assert "try again later" in EXIT_CODES[code], (code, EXIT_CODES[code])
            if said == "interrupted":
                assert "interrupted" in EXIT_CODES[code]


def _text(page: str) -> str:
    """A built page's text: tags (syntax highlighting splits code into spans) removed."""
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", page))


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.fail("mkdocs and mkdocs-material are needed: pip install -e '.[docs]'")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    run = _mkdocs_build(ROOT / "mkdocs.yml", site)
    assert run.returncode == 0, run.stdout + run.stderr
    reference = (site / "reference" / "commands" / "index.html").read_text(encoding="utf-8")
    from ibsync.cli import cli

    for name in click_commands(cli):
        assert f'id="{name.replace(" ", "-")}"' in reference, name
    # the exit-code table is filled in from ibsync.errors
    exit_page = _text((site / "exit-codes" / "index.html").read_text(encoding="utf-8"))
    assert "exit-codes-table" not in exit_page and "try again later" in exit_page
    # the examples are included from examples/ as they are
    examples = _text((site / "examples" / "index.html").read_text(encoding="utf-8"))
    assert "check-subset" in examples and "ExecStart=" in examples and "ibsync copy --from-repo" in examples
    # every page of the nav was built, and the hook's own source is not published
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def pages(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    for page in pages(nav):
        built = site / (page.removesuffix(".md").removesuffix("index") + "/index.html").lstrip("/")
        assert built.exists(), page
    assert not (site / "hooks").exists()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """What CI relies on: `mkdocs build --strict` refuses a link to a missing page or anchor."""
    for name in ("docs", "examples"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "restore.md"
    page.write_text(
        page.read_text(encoding="utf-8") + "\nSee [the anchor](checking.md#no-such-section).\n", encoding="utf-8"
    )
    run = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert run.returncode != 0
    assert "no-such-section" in run.stdout + run.stderr


def test_automatic_backups_page_lists_every_agent_key():
    """The [agent] and [devices] keys the agent accepts are the rows of docs/automatic.md's table
    (a key added to ibsync/agent/settings.py without a row fails here)."""
    from ibsync.agent import settings

    page = (ROOT / "docs" / "automatic.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([\w-]+)` \| ([^|]+) \|", page, flags=re.MULTILINE))
    assert set(rows) == settings._AGENT_KEYS | settings._DEVICE_KEYS
    for key in settings._DEVICE_KEYS:
        assert "device" in rows[key], f"{key}: a device table takes it"
    for key in settings._AGENT_KEYS:
        assert "agent" in rows[key], f"{key}: the [agent] table takes it"


# --- every command line the documentation shows exists -----------------------------------------

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def command_lines(path: Path) -> list[str]:
    """The `ibsync ...` command lines a page or example shows: in shell and text blocks of a
    page, in inline code, and in an example file's own lines and indented comment examples."""
    text = path.read_text(encoding="utf-8")
    lines: list[str] = []
    if path.suffix == ".md":
        for lang, body in _FENCE.findall(text):
            if lang in ("sh", "", "text", "bash"):
                lines += body.splitlines()
        lines += re.findall(r"`(ibsync [^`]+)`", _FENCE.sub("", text))
    else:
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped.startswith("#"):
                lines.append(stripped)  # the file's own commands
            elif stripped.startswith("#  "):
                lines.append(stripped.lstrip("# "))  # an indented example in a comment; not prose
    out = []
    for line in lines:
        line = line.strip().removeprefix("$ ")
        # ibsync as a shell command: first on the line, or after &&, ;, |, ( and VAR=value words
        m = re.search(r"(?:^|&&|;|\||\(|\$\()\s*(?:[A-Za-z_]+=\S*\s+)*(ibsync(?: .*)?)$", line)
        if m and not m.group(1).startswith("ibsync:"):
            out.append(m.group(1))
    return out


def unknown_in(line: str, root: click.Command) -> list[str]:
    """What in ``line`` click would not accept: a command that does not exist or an option that
    the command does not take. Values, arguments and placeholders are not checked."""
    import shlex

    try:
        words = shlex.split(line.split(" # ")[0].split("  #")[0], comments=False)
    except ValueError:
        words = line.split()
    words = words[1:]  # "ibsync"
    cmd, ctx, name = root, root.make_context("ibsync", [], resilient_parsing=True), "ibsync"
    problems = []
    i = 0
    shell = ("|", "||", "&&", ";", ">", ">>", "2>&1")
    while i < len(words) and isinstance(cmd, click.Group) and not words[i].startswith("-") and words[i] not in shell:
        sub = cmd.get_command(ctx, words[i])
        if sub is None:
            if words[i] not in ("COMMAND", "…", "..."):
                problems.append(f"'{name} {words[i]}' is not a command")
            return problems
        name = f"{name} {words[i]}"
        cmd, ctx = sub, sub.make_context(words[i], [], parent=ctx, resilient_parsing=True)
        i += 1
    known = {o for p in cmd.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}
    for word in words[i:]:
        if word in shell or word.startswith((">", "2>")):
            break  # the rest is the shell's
        if word.startswith("-") and len(word) > 1 and word not in ("-", "--"):
            opt = word.split("=", 1)[0]
            if opt not in known and not re.fullmatch(r"-[a-zA-Z]{2,}", opt):
                problems.append(f"'{name}' has no option {opt}")
    return problems


def test_every_command_line_in_the_docs_and_examples_exists():
    """A page or example that shows an `ibsync` command or option click does not know fails here
    (the documentation describes what exists, and stays so when an option is renamed)."""
    from ibsync.cli import cli

    files = [p for p in (ROOT / "docs").glob("*.md")] + [p for p in (ROOT / "examples").rglob("*") if p.is_file()]
    files.append(ROOT / "README.md")
    seen, problems = 0, []
    for path in sorted(files):
        for line in command_lines(path):
            seen += 1
            problems += [f"{path.relative_to(ROOT)}: {line}: {p}" for p in unknown_in(line, cli)]
    assert seen > 100
    assert problems == []


def test_the_command_line_check_catches_a_wrong_option():
    from ibsync.cli import cli

    assert unknown_in("ibsync backup --device X --full", cli) == []
    assert unknown_in("ibsync check --read-data-subset 1/7 --repo nas", cli) == []
    assert unknown_in("ibsync backup --no-such-flag", cli) == ["'ibsync backup' has no option --no-such-flag"]
    assert unknown_in("ibsync --repo drive init", cli) == ["'ibsync' has no option --repo"]
    assert unknown_in("ibsync frobnicate now", cli) == ["'ibsync frobnicate' is not a command"]
    assert unknown_in("ibsync agent install --print --platform linux", cli) == []
