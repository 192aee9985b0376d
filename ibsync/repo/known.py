"""What this user has seen of repositories: which were encrypted, and which key opened them.

Someone who can write the storage but has no password can delete the key files and rewrite
``config`` as unencrypted; a client that believed it would then store phones in plain text.
The config's MAC cannot stop that (there is no key left to check it with), so the client
remembers, outside the storage, every repository it opened encrypted: by repository id, and
by location (a rewritten config may carry a new id). A repository remembered as encrypted
that now claims to be unencrypted is refused.

The record is one small JSON file in the user's cache folder root, written whether or not the
object cache is used. It holds repository ids, key file names (both public in the storage
anyway) and a BLAKE3 hash of each location, never the location itself (a URL may carry a user
name or a secret). Deleting the file forgets what it remembers, nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import blake3

from ..errors import RepoError

KNOWN_FILE = "known-repositories.json"


def _location_key(url: str) -> str:
    return blake3.blake3(b"ibsync location\x00" + url.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class KnownRepositories:
    root: Path  # the user's cache folder root (repo/cache.py: cache_root())

    @property
    def path(self) -> Path:
        return self.root / KNOWN_FILE

    def _load(self) -> dict:
        # Only this user writes it (atomically); anything unreadable counts as "nothing known".
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {"repositories": {}, "locations": {}}
        if not isinstance(doc, dict):
            doc = {}
        repos = doc.get("repositories")
        locations = doc.get("locations")
        return {
            "repositories": repos if isinstance(repos, dict) else {},
            "locations": locations if isinstance(locations, dict) else {},
        }

    def _entry(self, doc: dict, repo_id: str) -> dict:
        entry = doc["repositories"].get(repo_id)
        return entry if isinstance(entry, dict) else {}

    def check(self, url: str, repo_id: str, encrypted: bool) -> None:
        """Refuse an unencrypted repository where an encrypted one was seen before."""
        if encrypted:
            return
        doc = self._load()
        forget = f"if you re-created it unencrypted yourself, delete {self.path}"
        if self._entry(doc, repo_id).get("encrypted") is True:
            raise RepoError(
                f"{url}: repository {repo_id[:8]} was encrypted when last opened here but its config now says "
                f"unencrypted; it may have been tampered with ({forget})"
            )
        before = doc["locations"].get(_location_key(url))
        if isinstance(before, str) and before != repo_id and self._entry(doc, before).get("encrypted") is True:
            raise RepoError(
                f"{url} held encrypted repository {before[:8]} when last opened here; it now holds an unencrypted "
                f"one ({repo_id[:8]}); it may have been tampered with ({forget})"
            )

    def key_hint(self, repo_id: str) -> str | None:
        """The key file that opened this repository last time (tried first)."""
        key = self._entry(self._load(), repo_id).get("key")
        return key if isinstance(key, str) else None

    def remember(self, url: str, repo_id: str, encrypted: bool, key_name: str | None) -> None:
        """Best effort: a cache folder that cannot be written loses the memory, not the command."""
        doc = self._load()
        entry = self._entry(doc, repo_id)
        # once seen encrypted, a repository id stays encrypted here
        new = {"encrypted": encrypted or entry.get("encrypted") is True, "key": key_name}
        location = _location_key(url)
        if entry == new and doc["locations"].get(location) == repo_id:
            return  # nothing new: most commands write nothing
        doc["repositories"][repo_id] = new
        doc["locations"][location] = repo_id
        self._write(doc)

    def _write(self, doc: dict) -> None:
        tmp = self.root / f".tmp-known-{secrets.token_hex(6)}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": 1, **doc}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
