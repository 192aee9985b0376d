"""Object ids typed by a person: a full 64-digit name or a unique prefix of one."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import UserError

_HEX = re.compile(r"[0-9a-f]+")


def resolve_prefix(typed: str, names: Iterable[str], what: str, *, hint: str, min_length: int = 1) -> str:
    """The one name in ``names`` that starts with ``typed`` (case and spaces ignored).
    ``what`` names the kind in messages ("key", "pack"); ``hint`` says where ids are shown."""
    prefix = typed.strip().lower()
    if len(prefix) < min_length or not _HEX.fullmatch(prefix):
        raise UserError(f"no {what} with id '{typed}' (an id is {min_length} to 64 hex digits); {hint}")
    matches = [n for n in names if n.startswith(prefix)]
    if not matches:
        raise UserError(f"no {what} with id '{prefix}'; {hint}")
    if len(matches) > 1:
        raise UserError(f"{what} id '{prefix}' is ambiguous: {', '.join(m[:12] for m in matches)}")
    return matches[0]
