from ibsync.storage import LocalStorage, open_storage
from ibsync.storage.base import Kind
from ibsync.storage.local import TEMP_PREFIX
from ibsync.storage.remote import FsspecStorage
from ibsync.storage.testing import run_conformance


def test_local_conformance(tmp_path):
    run_conformance(LocalStorage(tmp_path / "repo"))


def test_fsspec_memory_conformance(tmp_path):
    # the generic fsspec path, as S3/SFTP/SMB/WebDAV will use it
    url = f"memory://ibsync-test-{tmp_path.name}"
    run_conformance(FsspecStorage(url))


def test_open_storage_dispatch(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage("memory://x"), FsspecStorage)


def test_local_ignores_leftover_temp_files(tmp_path):
    s = LocalStorage(tmp_path)
    s.put(Kind.PACKS, "aa" + "0" * 62, b"x")
    (tmp_path / "packs" / "aa" / f"{TEMP_PREFIX}dead").write_bytes(b"half a pack")
    assert [i.name for i in s.list(Kind.PACKS)] == ["aa" + "0" * 62]


def test_local_write_leaves_no_temp_file(tmp_path):
    s = LocalStorage(tmp_path)
    s.put(Kind.SNAPSHOTS, "5e" * 32, b"data")
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["5e" * 32]
