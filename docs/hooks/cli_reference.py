"""MkDocs hook: the command reference page, rendered from ibsync's click commands at build time,
and the exit-code table of docs/exit-codes.md, rendered from ``ibsync.errors.EXIT_CODES``.

Nothing is written to disk: ``on_files`` adds ``reference/commands.md`` to the build as a
generated file, so the page is made from the code being documented and cannot go stale. Every
command (groups and their subcommands, recursively) gets a section with its usage line, its help
text as ``ibsync COMMAND --help`` prints it, and every option with its help, default, range and
environment variable. Hidden commands and options are left out, as ``--help`` leaves them out.

``render_reference()`` is also what tests/test_docs.py checks against click's own view.

The exit-code table replaces the line ``<!-- exit-codes-table -->`` of exit-codes.md: the
statuses and their meanings are the ones ``ibsync --help`` prints, from the same table.
"""

from __future__ import annotations

import html
import inspect
import re
from dataclasses import dataclass

import click

PAGE = "reference/commands.md"
EXIT_CODES_PAGE = "exit-codes.md"
EXIT_CODES_MARKER = "<!-- exit-codes-table -->"
_CODE_SPAN = re.compile(r"(`[^`\n]+`)")
# Markdown would read these outside code spans as emphasis, links, tables or HTML
_SPECIAL = re.compile(r"([\\*_\[\]|#])")


@dataclass(frozen=True)
class Entry:
    """One command as the reference shows it: ``path`` is ("ibsync", "repair", "index")."""

    path: tuple[str, ...]
    command: click.Command
    ctx: click.Context

    @property
    def name(self) -> str:
        return " ".join(self.path)

    @property
    def anchor(self) -> str:
        return "-".join(self.path)


def walk(root: click.Command | None = None) -> list[Entry]:
    """Every visible command under ``root`` (default: the ``ibsync`` group), parents first,
    each group's commands in the order ``--help`` lists them."""
    if root is None:
        from ibsync.cli import cli as root
    out: list[Entry] = []

    def visit(cmd: click.Command, path: tuple[str, ...], parent: click.Context | None) -> None:
        ctx = click.Context(cmd, info_name=path[-1], parent=parent, **cmd.context_settings)
        out.append(Entry(path, cmd, ctx))
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    visit(sub, (*path, name), ctx)

    visit(root, ("ibsync",), None)
    return out


def _prose(text: str) -> str:
    """Help prose as Markdown: code spans kept, everything else escaped so ``<UDID>``,
    ``'**'`` or ``_apple-mobdev2._tcp`` show as written."""
    parts = _CODE_SPAN.split(text)
    return "".join(p if i % 2 else _SPECIAL.sub(r"\\\1", html.escape(p, quote=False)) for i, p in enumerate(parts))


def _help_blocks(text: str) -> list[str]:
    """Click's help text in Markdown, paragraph by paragraph as ``--help`` treats it: one that
    starts with click's ``\\b`` marker (kept as written: examples, tables) becomes a code block;
    the others are rewrapped, so their lines are joined."""
    blocks = []
    text = inspect.cleandoc(click.unstyle(text or "").split("\f")[0])  # click's \f: what follows is not help
    for para in re.split(r"\n\s*\n", text.strip("\n")):
        lines = para.splitlines()
        if not lines:
            continue
        if lines[0].strip() == "\b":
            indent = min((len(x) - len(x.lstrip()) for x in lines[1:] if x.strip()), default=0)
            body = "\n".join(x[indent:] for x in lines[1:])
            blocks.append(f"```text\n{body.rstrip()}\n```")
        else:
            blocks.append(_prose(" ".join(x.strip() for x in lines)))
    return blocks


def _is_help_option(param: click.Parameter, ctx: click.Context) -> bool:
    return isinstance(param, click.Option) and set(param.opts) == set(ctx.help_option_names)


def _option(param: click.Option, ctx: click.Context) -> str:
    record = param.get_help_record(ctx)
    names, help_text = record if record else (", ".join(param.opts), "")
    extra = []
    envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
    if envvars and "[env var:" not in help_text:
        extra.append("Environment: " + ", ".join(f"`{v}`" for v in envvars) + ".")
    body = " ".join(filter(None, [_prose(help_text), *extra])) or "&nbsp;"
    return f"`{names}`\n:   {body}\n"


def render_entry(entry: Entry) -> str:
    cmd, ctx = entry.command, entry.ctx
    depth = min(len(entry.path), 4)  # ibsync: h2, ibsync agent: h3, ibsync agent install: h4
    out = [f"{'#' * (depth + 1)} {entry.name} {{ #{entry.anchor} }}", ""]
    usage = " ".join([entry.name, *cmd.collect_usage_pieces(ctx)])
    out += ["```text", f"Usage: {usage}", "```", ""]
    for block in _help_blocks(cmd.help or ""):
        out += [block, ""]
    options = [
        p for p in cmd.get_params(ctx) if isinstance(p, click.Option) and not p.hidden and not _is_help_option(p, ctx)
    ]
    if options:
        out += ["**Options**", ""]
        for p in options:
            out += [_option(p, ctx)]
    if isinstance(cmd, click.Group):
        subs = [(n, cmd.get_command(ctx, n)) for n in cmd.list_commands(ctx)]
        visible = [(n, c) for n, c in subs if c is not None and not c.hidden]
        if visible:
            out += ["**Commands**", ""]
            for n, c in visible:
                out.append(f"- [`{entry.name} {n}`](#{entry.anchor}-{n}): {_prose(c.get_short_help_str(limit=200))}")
            out.append("")
    return "\n".join(out)


def render_reference() -> str:
    entries = walk()
    root_ctx = entries[0].ctx
    helps = ", ".join(f"`{h}`" for h in root_ctx.help_option_names)
    head = [
        "# Command reference",
        "",
        "Generated from the commands themselves when this site is built, so it always matches",
        f"`ibsync COMMAND --help`. Every command also takes {helps} (show its help and exit).",
        "Each group lists its commands; the table of contents lists them all.",
        "Exit statuses are described in [Exit codes](../exit-codes.md).",
        "",
    ]
    return "\n".join([*head, *(render_entry(e) for e in entries)]) + "\n"


def exit_codes_table() -> str:
    from ibsync.errors import EXIT_CODES

    rows = [f"| **{code}** | {_prose(meaning)} |" for code, meaning in sorted(EXIT_CODES.items())]
    return "\n".join(["| status | meaning |", "|---|---|", *rows])


# --- the MkDocs side -------------------------------------------------------------------------


def on_files(files, config):  # noqa: ANN001  (MkDocs hook signature)
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render_reference()))
    return files


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001  (MkDocs hook signature)
    if page.file.src_uri == EXIT_CODES_PAGE:
        if EXIT_CODES_MARKER not in markdown:
            raise ValueError(f"{EXIT_CODES_PAGE} lost its {EXIT_CODES_MARKER} line")
        markdown = markdown.replace(EXIT_CODES_MARKER, exit_codes_table())
    return markdown
