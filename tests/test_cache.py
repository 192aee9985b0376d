"""The local cache of a remote repository's index and snapshots: fewer reads, never trusted blindly."""

import uuid

from ibsync.ingest.folder_import import import_folder
from ibsync.repo.repository import Repository
from ibsync.storage import Kind
from ibsync.storage.remote import FsspecStorage

from conftest import FAST_KDF, MIT_BACKUP, PASSWORD, copy_folder


class Counting(FsspecStorage):
    def __init__(self, url):
        super().__init__(url)
        self.gets: list[tuple[str, str]] = []

    def get(self, kind, name, offset=0, length=None):
        self.gets.append((kind.value, name))
        return super().get(kind, name, offset, length)


def _open(url, cache_dir):
    storage = Counting(url)
    repo = Repository.open(storage, lambda: PASSWORD)
    repo.use_cache(cache_dir)
    repo.load_index()
    return repo, storage


def test_second_open_reads_no_index_or_snapshot_objects(tmp_path):
    url = f"memory://ibsync-cache-{uuid.uuid4().hex}"
    Repository.init(FsspecStorage(url), PASSWORD, kdf=FAST_KDF)
    repo, _ = _open(url, tmp_path / "cache")
    import_folder(repo, copy_folder(MIT_BACKUP, tmp_path / "a" / "sample_backup"), allow_unfinished=True)
    repo.snapshots()

    repo, storage = _open(url, tmp_path / "cache")
    snaps = repo.snapshots()
    assert len(snaps) == 1
    assert [k for k, _ in storage.gets if k in ("index", "snapshots")] == []  # all from the cache
    assert repo.cache.hits >= 2

    # an altered cache entry is detected by its hash and fetched again, never used
    cached = next((tmp_path / "cache" / repo.id / "snapshots").iterdir())
    cached.write_bytes(b"tampered")
    repo, storage = _open(url, tmp_path / "cache")
    assert repo.snapshots()[0].id == snaps[0].id
    assert ("snapshots", snaps[0].id) in storage.gets

    # objects gone from the repository leave the cache too
    storage.delete(Kind.SNAPSHOTS, snaps[0].id)
    repo, storage = _open(url, tmp_path / "cache")
    assert repo.snapshots() == []
    assert not any((tmp_path / "cache" / repo.id / "snapshots").iterdir())


def test_tree_packs_are_fetched_whole_once_and_checked_on_use(tmp_path):
    from ibsync.reader.walk import walk

    url = f"memory://ibsync-cache-{uuid.uuid4().hex}"
    Repository.init(FsspecStorage(url), PASSWORD, kdf=FAST_KDF)
    repo, _ = _open(url, tmp_path / "cache")
    import_folder(repo, copy_folder(MIT_BACKUP, tmp_path / "a" / "sample_backup"), allow_unfinished=True)

    def walk_all(repo):
        snap = repo.snapshots()[0]
        return [path for path, _ in walk(repo, snap.tree)]

    repo, storage = _open(url, tmp_path / "cache")
    paths = walk_all(repo)
    pack_reads = [g for g in storage.gets if g[0] == "packs"]
    assert len(pack_reads) == len(set(pack_reads)) >= 1  # whole tree packs, each once

    repo, storage = _open(url, tmp_path / "cache")
    assert walk_all(repo) == paths
    assert [g for g in storage.gets if g[0] == "packs"] == []  # every tree from the cache

    # a damaged cached pack fails authentication, is dropped, and the trees come from the repository
    for p in (tmp_path / "cache" / repo.id / "packs").iterdir():
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 1
        p.write_bytes(bytes(data))
    repo, storage = _open(url, tmp_path / "cache")
    assert walk_all(repo) == paths
    assert any(g[0] == "packs" for g in storage.gets)
