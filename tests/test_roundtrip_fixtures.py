"""Import -> restore round trips on real backup folders from public projects."""

import json
import os

import pytest

from conftest import ENCRYPTED_BACKUP, MIT_BACKUP, copy_folder, tree_state


@pytest.mark.parametrize("fixture", [MIT_BACKUP, ENCRYPTED_BACKUP], ids=["unencrypted", "ios-encrypted"])
def test_import_restore_is_byte_identical(env, cli, tmp_path, fixture):
    src = copy_folder(fixture, tmp_path / "src" / fixture.name)
    before = tree_state(src)
    cli("init")
    out, _ = cli("import", src, "--allow-unfinished", "--json")
    summary = json.loads(out)["snapshots"][0]
    assert summary["status"] == "created"
    assert summary["ios_encrypted"] is (fixture == ENCRYPTED_BACKUP)
    cli("restore", "latest", tmp_path / "out")
    restored = tmp_path / "out" / fixture.name  # the UDID falls back to the folder name here
    assert tree_state(restored) == before
    assert tree_state(src) == before, "import must not write into the folder it reads"
    cli("check", "--read-data")


def test_unencrypted_repository(env, cli, tmp_path, monkeypatch):
    monkeypatch.delenv("IBSYNC_PASSWORD")
    src = copy_folder(MIT_BACKUP, tmp_path / "sample_backup")
    cli("init", "--no-encryption")
    cli("import", src, "--allow-unfinished")
    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / "sample_backup") == tree_state(src)
    # with no encryption the file names are still not in the repository in clear... but data is:
    assert json.loads((env / "config").read_text())["encryption"] == "none"


def test_encrypted_repository_reveals_no_names(env, cli, tmp_path):
    src = copy_folder(MIT_BACKUP, tmp_path / "sample_backup")
    cli("init")
    cli("import", src, "--allow-unfinished")
    blob = b"".join(p.read_bytes() for p in env.rglob("*") if p.is_file())
    for needle in (
        b"Manifest.db",
        b"sample_backup",
        b"12e90d5b620bbdeaaa88de34607ebf880fa708f5",
        b"HomeDomain",
        b"SQLite",
    ):
        assert needle not in blob


def test_unfinished_backup_is_refused_without_flag(env, cli, tmp_path):
    src = copy_folder(MIT_BACKUP, tmp_path / "sample_backup")
    cli("init")
    _, err = cli("import", src, expect=1)
    assert "not finished" in err and "--allow-unfinished" in err
    assert len(err.strip().splitlines()) == 1


def test_manifest_db_opened_without_side_files(env, cli, tmp_path):
    """The MIT fixture's Manifest.db is in WAL mode: a normal open would create -wal/-shm files."""
    src = copy_folder(MIT_BACKUP, tmp_path / "sample_backup")
    os.chmod(src, 0o555)  # and a read-only source folder is fine
    try:
        cli("init")
        cli("import", src, "--allow-unfinished")
        assert sorted(p.name for p in src.iterdir()) == [
            "12",
            "Info.plist",
            "Manifest.db",
            "Manifest.plist",
            "Status.plist",
        ]
    finally:
        os.chmod(src, 0o755)
