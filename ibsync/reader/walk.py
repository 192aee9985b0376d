"""Walking a snapshot's trees."""

from __future__ import annotations

from typing import Iterator

from ..model import Node
from ..repo.repository import Repository


def walk(repo: Repository, tree_id: bytes, prefix: str = "") -> Iterator[tuple[str, Node]]:
    """Every node below a tree as (relative path, node), each folder before its contents."""
    for node in repo.load_tree(tree_id):
        path = f"{prefix}/{node.name}" if prefix else node.name
        yield path, node
        if node.type == "dir" and node.subtree is not None:
            yield from walk(repo, node.subtree, path)


def collect_blobs(repo: Repository, tree_id: bytes, blobs: set[bytes]) -> None:
    """Add every blob below a tree (trees included) to ``blobs``; trees already there (shared
    with a snapshot collected before) are not walked again."""
    stack = [tree_id]
    while stack:
        tid = stack.pop()
        if tid in blobs:
            continue
        blobs.add(tid)
        for node in repo.load_tree(tid):
            if node.type == "dir" and node.subtree is not None:
                stack.append(node.subtree)
            elif node.type == "file":
                blobs.update(node.content)
