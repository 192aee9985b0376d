"""Walking a snapshot's trees."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..errors import IbsyncError, RepoError
from ..model import Node, Rejected, Tree, reports
from ..repo.repository import Repository

# (path of the entry below the walked tree, why it is not yielded)
OnReject = Callable[[str, str], None]
# how the reason of an entry refused for what the snapshot says (not for unreadable data) starts
REFUSED = "refused: "


class UnsafeEntry(RepoError):
    """A tree entry that no reader may use as it is (see ``model.entry_problem``)."""


def join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def walk(
    repo: Repository, tree_id: bytes, prefix: str = "", on_reject: OnReject | None = None
) -> Iterator[tuple[str, Node]]:
    """Every usable node below a tree as (relative path, node), each folder before its contents.

    Entries a folder on disk cannot hold (a name that is not one path component, a name stored
    twice, malformed fields) are never yielded, so no reader joins them to a path of its own.
    With ``on_reject`` they are reported to it per entry, as are folders below the top whose
    tree cannot be read (their contents are skipped), and the walk goes on; without it, the
    first one raises. The top tree itself must read."""
    yield from _entries(repo, _tree(repo, tree_id, prefix, on_reject), prefix, on_reject)


def _entries(
    repo: Repository, nodes: list[Node], prefix: str, on_reject: OnReject | None
) -> Iterator[tuple[str, Node]]:
    for node in nodes:
        path = join(prefix, node.name)
        yield path, node
        if node.type == "dir" and node.subtree is not None:
            yield from _walk_below(repo, node.subtree, path, on_reject)


def _walk_below(
    repo: Repository, tree_id: bytes, prefix: str, on_reject: OnReject | None
) -> Iterator[tuple[str, Node]]:
    try:
        nodes = _tree(repo, tree_id, prefix, on_reject)
    except IbsyncError as e:
        if on_reject is None:
            raise
        on_reject(prefix, f"its folder listing cannot be read: {e}")
        return
    yield from _entries(repo, nodes, prefix, on_reject)


def _tree(repo: Repository, tree_id: bytes, prefix: str, on_reject: OnReject | None) -> Tree | list[Node]:
    nodes = repo.load_tree(tree_id)
    for name, reason in reports(getattr(nodes, "rejected", [])):
        if on_reject is None:
            raise UnsafeEntry(f"'{join(prefix, name)}' in the snapshot cannot be used: {reason}")
        on_reject(join(prefix, name), f"{REFUSED}{reason}")
    return nodes


def rejected_entries(repo: Repository, tree_id: bytes) -> list[tuple[str, str]]:
    """Every entry below a tree that :func:`walk` would not yield, as (path, reason)."""
    found: list[tuple[str, str]] = []
    for _ in walk(repo, tree_id, on_reject=lambda path, why: found.append((path, why))):
        pass
    return found


def collect_blobs(repo: Repository, tree_id: bytes, blobs: set[bytes], *, with_refused: bool = True) -> None:
    """Add every blob below a tree (trees included, with all their node blobs) to ``blobs``;
    trees already there (shared with a snapshot collected before) are not walked again. With
    ``with_refused``, entries readers refuse count too, as far as they can be read: prune must
    not delete what a snapshot still refers to. Without it, only what a reader may use (what
    ``copy`` carries)."""
    stack = [(tree_id, False)]  # (tree, named by a refused entry: may not be a tree at all)
    while stack:
        tid, refused = stack.pop()
        if tid in blobs:
            continue
        blobs.add(tid)
        try:
            nodes = repo.load_tree(tid)
        except IbsyncError:
            if refused:
                continue
            raise
        blobs.update(repo.tree_parts(tid))  # a format-2 folder's other node blobs
        for node in nodes:
            if node.type == "dir" and node.subtree is not None:
                stack.append((node.subtree, refused))
            elif node.type == "file":
                blobs.update(node.content)
        if with_refused:
            for r in getattr(nodes, "rejected", ()):
                _rejected_blobs(r, blobs, stack)


def _rejected_blobs(r: Rejected, blobs: set[bytes], stack: list[tuple[bytes, bool]]) -> None:
    """The blob ids a refused entry names, as far as they read as ids."""
    if not isinstance(r.entry, dict):
        return
    ids = r.entry.get("content")
    for hex_id in ids if isinstance(ids, list) else ():
        blob = _blob_id(hex_id)
        if blob is not None:
            blobs.add(blob)
    sub = _blob_id(r.entry.get("subtree"))
    if sub is not None:
        stack.append((sub, True))


def _blob_id(v: object) -> bytes | None:
    try:
        return bytes.fromhex(v) if isinstance(v, str) else None
    except ValueError:
        return None
