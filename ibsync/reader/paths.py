"""iOS paths as ``Domain/relative/path`` and the glob patterns that select them."""

from __future__ import annotations

import os
import re

from ..model import name_problem


def entry_path(domain: str, relative_path: str) -> str:
    return f"{domain}/{relative_path}" if relative_path else domain


_WILDCARDS = re.compile(r"[*?\[]")


class PathPattern:
    """A glob over ``Domain/relative/path``: ``*`` and ``?`` stay within one path component,
    ``**`` crosses ``/`` (``a/**/b`` also matches ``a/b``), ``[...]`` is a character class.

    A pattern matches a path and everything below it, so ``HomeDomain/Library/SMS`` selects
    that folder's files. A pattern without ``/`` and without wildcards is a file name that
    matches anywhere (``sms.db``)."""

    def __init__(self, pattern: str | None) -> None:
        text = (pattern or "").strip().strip("/")
        self.text = text
        if not text or text == "**":
            self.regex = None  # everything
            self.domain = None
            return
        anywhere = "/" not in text and not _WILDCARDS.search(text)
        body = ("(?:.*/)?" + re.escape(text)) if anywhere else translate_glob(text)
        self.regex = re.compile(f"(?:{body})(?:/.*)?", re.DOTALL)
        first = text.split("/", 1)[0]
        # the first component is the domain: a literal one narrows the query to an index lookup
        self.domain = first if "/" in text and not _WILDCARDS.search(first) else None

    def matches(self, domain: str, relative_path: str) -> bool:
        if self.regex is None:
            return True
        return self.regex.fullmatch(entry_path(domain, relative_path)) is not None

    def __str__(self) -> str:
        return self.text or "**"


def translate_glob(pattern: str) -> str:
    """A glob as a regular expression (unanchored; callers use ``fullmatch``)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                while i < n and pattern[i] == "*":
                    i += 1
                if i < n and pattern[i] == "/":  # "**/": any number of whole components, or none
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                out.append(re.escape(c))
            else:
                inner = pattern[i + 1 : j]
                negate = inner[:1] in ("!", "^")
                if negate:
                    inner = inner[1:]
                inner = inner.replace("\\", "\\\\")
                out.append(f"[^/{inner}]" if negate else f"[{inner}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


# What separates path components here: "/" everywhere, "\\" too on Windows. An iOS file name may
# hold a backslash; on a system where it is an ordinary character it is extracted as it is.
_SEPARATORS = "".join(dict.fromkeys(("/", os.sep, os.altsep or "/")))


class BadName(ValueError):
    """A Manifest.db row's domain or path that cannot name a file below the output folder."""


def output_parts(domain: str, relative_path: str) -> tuple[str, ...]:
    """The folder names and file name under which ``extract`` writes a row:
    ``(domain, *relative_path.split("/"))``, each one path component by the rule of tree names
    (``model.name_problem``, with this system's separators).

    Raises BadName for a path that is empty (the domain's own folder), has an empty, ``.`` or
    ``..`` component, a NUL or a separator in a name, or a name too long for the filesystem."""
    if not relative_path:
        raise BadName("its path is empty: it names its domain's folder, not a file in it")
    parts = (domain, *relative_path.split("/"))
    for part in parts:
        problem = name_problem(part, separators=_SEPARATORS, subject="a name in its path")
        if problem:
            raise BadName(problem)
    return parts
