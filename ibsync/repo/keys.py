"""Key files: several passwords opening one repository (design.md §4).

Every key file wraps the same master key, so adding, removing or changing a password writes or
deletes one small object in ``keys/`` and never touches data. Listing reads only each key
file's plain metadata; adding needs the unlocked master key (``repo.master``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import InvalidData, UserError
from ..format.crypto import make_key_file, storage_name
from ..model import utc_iso
from ..storage import Kind
from .ids import resolve_prefix
from .repository import Repository, _who

NOT_ENCRYPTED = "the repository is not encrypted; it has no keys"


@dataclass
class KeyInfo:
    id: str  # the key file's name: 64 hex digits
    created: str  # UTC ISO 8601, as written in the key file ("" if absent)
    hostname: str
    username: str
    kdf: dict  # key derivation parameters, without the salt
    current: bool  # the key the password of this session opened
    error: str | None = None  # why the key file's metadata could not be read, if it could not

    @property
    def short_id(self) -> str:
        return self.id[:8]


def require_encrypted(repo: Repository) -> None:
    if repo.master is None:
        raise UserError(NOT_ENCRYPTED)


def _read_info(repo: Repository, name: str) -> KeyInfo:
    # A damaged key file is listed (so it can be seen and removed), not fatal.
    try:
        doc = json.loads(repo.storage.get(Kind.KEYS, name))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        return KeyInfo(name, "", "", "", {}, name == repo.key_name, error=f"malformed key file ({e})")
    kdf = doc.get("kdf")
    kdf = {k: v for k, v in kdf.items() if k != "salt"} if isinstance(kdf, dict) else {}
    return KeyInfo(
        id=name,
        created=str(doc.get("created") or ""),
        hostname=str(doc.get("hostname") or ""),
        username=str(doc.get("username") or ""),
        kdf=kdf,
        current=name == repo.key_name,
    )


def _key_names(repo: Repository) -> list[str]:
    return sorted(info.name for info in repo.storage.list(Kind.KEYS))


def list_keys(repo: Repository) -> list[KeyInfo]:
    """Every key file's metadata, oldest first; key files are not unlocked."""
    require_encrypted(repo)
    keys = [_read_info(repo, name) for name in _key_names(repo)]
    return sorted(keys, key=lambda k: (k.created, k.id))


def add_key(repo: Repository, new_password: str, *, kdf: dict | None = None) -> str:
    """Write a new key file wrapping the repository's master key under ``new_password``;
    returns its name. ``kdf=None`` uses the default Argon2id parameters."""
    require_encrypted(repo)
    assert repo.master is not None
    if not new_password:
        raise UserError("an empty password is not allowed")
    meta = {"created": utc_iso(datetime.now(UTC)), **_who()}
    data = make_key_file(repo.master, new_password, meta=meta, kdf=kdf)
    name = storage_name(data)
    repo.storage.put(Kind.KEYS, name, data, exclusive=True)
    # Read it back: a password change deletes the old key only once the new one is surely stored.
    if repo.storage.get(Kind.KEYS, name) != data:
        raise InvalidData(f"keys/{name[:8]}: the key file just written reads back differently")
    return name


def resolve_key(repo: Repository, key_id_or_prefix: str) -> str:
    """The full name of the one key file whose name starts with the given id or prefix."""
    return resolve_prefix(key_id_or_prefix, _key_names(repo), "key", hint="'ibsync key list' shows the ids")


def remove_key(repo: Repository, key_id_or_prefix: str) -> str:
    """Delete one key file; returns its full name. Refuses the last key (the repository would
    become unreadable) and the key the current password opened."""
    require_encrypted(repo)
    name = resolve_key(repo, key_id_or_prefix)
    if len(_key_names(repo)) <= 1:
        raise UserError(f"key {name[:8]} is the only key; removing it would make the repository unreadable")
    if name == repo.key_name:
        raise UserError(
            f"key {name[:8]} is the one your password opened; remove it using another password, "
            "or use 'ibsync key passwd' to replace it"
        )
    repo.storage.delete(Kind.KEYS, name)
    return name


def change_password(repo: Repository, new_password: str, *, kdf: dict | None = None) -> str:
    """Replace the current key by one for ``new_password``; returns the new key's name.

    The new key is written (and read back) before the old one is deleted, so an interruption
    leaves both passwords working, never neither."""
    require_encrypted(repo)
    old = repo.key_name
    new = add_key(repo, new_password, kdf=kdf)
    repo.key_name = new  # this session now holds the master key through the new key
    if old is not None and old != new:
        remove_key(repo, old)
    return new
