"""A conformance suite every storage backend must pass (restic's backend/test, kopia's
VerifyStorage). Backends' tests call ``run_conformance(storage)`` on an empty root."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..errors import AlreadyExists, NotFound, StorageError
from .base import Kind, Storage


def _expect(exc: type[BaseException], fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except exc:
        return
    raise AssertionError(f"{fn.__name__}{args} did not raise {exc.__name__}")


def check_empty(s: Storage) -> None:
    assert s.is_empty(), "a fresh root is empty"
    assert not s.exists(), "a fresh root has no config"
    for kind in Kind:
        if kind is not Kind.CONFIG:
            assert list(s.list(kind)) == [], f"nothing listed under {kind.value}"
    _expect(NotFound, s.get, Kind.SNAPSHOTS, "00" * 32)
    _expect(NotFound, s.stat, Kind.SNAPSHOTS, "00" * 32)
    # Deleting a missing object: NotFound where the backend can tell, silence on object stores
    # (an S3 DELETE of a missing key succeeds); never another error.
    try:
        s.delete(Kind.SNAPSHOTS, "00" * 32)
    except NotFound:
        pass


def check_put_get(s: Storage) -> None:
    data = os.urandom(100_000)
    name = "ab" + "12" * 31
    s.put(Kind.PACKS, name, [data[:10], data[10:]])
    assert s.get(Kind.PACKS, name) == data
    assert s.get(Kind.PACKS, name, 5, 100) == data[5:105]
    assert s.get(Kind.PACKS, name, 99_990) == data[99_990:]
    assert s.stat(Kind.PACKS, name).size == len(data)
    assert [(i.name, i.size) for i in s.list(Kind.PACKS)] == [(name, len(data))]
    _expect(StorageError, s.get, Kind.PACKS, name, 99_990, 100)  # short read is an error
    s.put(Kind.CONFIG, "config", b"{}", exclusive=True)
    assert s.exists() and not s.is_empty()
    _expect(AlreadyExists, s.put, Kind.CONFIG, "config", b"{}", exclusive=True)
    snap = "5e" * 32
    s.put(Kind.SNAPSHOTS, snap, b"")
    assert s.get(Kind.SNAPSHOTS, snap) == b""
    s.delete(Kind.SNAPSHOTS, snap)
    _expect(NotFound, s.get, Kind.SNAPSHOTS, snap)
    s.delete(Kind.PACKS, name)
    assert list(s.list(Kind.PACKS)) == []


def check_many(s: Storage) -> None:
    names = {f"{i:02x}" + os.urandom(31).hex(): os.urandom(i * 7) for i in range(40)}
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda kv: s.put(Kind.INDEX, kv[0], kv[1]), names.items()))
    listed = {i.name: i.size for i in s.list(Kind.INDEX)}
    assert listed == {n: len(d) for n, d in names.items()}
    for n, d in names.items():
        assert s.get(Kind.INDEX, n) == d
    for n in names:
        s.delete(Kind.INDEX, n)
    assert list(s.list(Kind.INDEX)) == []


def check_staged(s: Storage) -> None:
    data = os.urandom(300_000)
    staged = s.stage(Kind.PACKS)
    for i in range(0, len(data), 70_000):
        staged.write(data[i : i + 70_000])
    assert list(s.list(Kind.PACKS)) == [], "a staged object is invisible until committed"
    name = "cd" + "34" * 31
    staged.commit(name)
    assert s.get(Kind.PACKS, name) == data
    assert [i.name for i in s.list(Kind.PACKS)] == [name]
    dropped = s.stage(Kind.PACKS)
    dropped.write(b"never committed")
    dropped.abort()
    assert [i.name for i in s.list(Kind.PACKS)] == [name]
    s.delete(Kind.PACKS, name)


def check_names_and_leftovers(s: Storage) -> None:
    """Only object names make paths; a repository ibsync wrote has no strays, and its fresh
    writes are never taken for stale leftovers."""
    for bad in ("../config", "s1", "AB" * 32, "ab/" + "cd" * 31):
        _expect(StorageError, s.put, Kind.SNAPSHOTS, bad, b"x")
        _expect(StorageError, s.get, Kind.SNAPSHOTS, bad)
        _expect(StorageError, s.delete, Kind.SNAPSHOTS, bad)
    s.put(Kind.PACKS, "ef" * 32, b"pack")
    s.put(Kind.LOCKS, "10" * 32, b"lock")
    for kind in Kind:
        assert s.strays(kind) == [], f"strays in {kind.value}: {s.strays(kind)}"
    # (the count may include old staging files of killed processes in this machine's temp folder)
    s.remove_stale_temporary(3600)
    assert s.get(Kind.PACKS, "ef" * 32) == b"pack" and s.get(Kind.LOCKS, "10" * 32) == b"lock"
    s.delete(Kind.PACKS, "ef" * 32)
    s.delete(Kind.LOCKS, "10" * 32)


CHECKS = [check_empty, check_put_get, check_many, check_staged, check_names_and_leftovers]


def run_conformance(s: Storage) -> None:
    for check in CHECKS:
        check(s)
