"""Several passwords for one repository: ibsync key list | add | remove | passwd."""

import json
import os
import subprocess

import pytest

from ibsync.errors import UserError
from ibsync.repo.keys import add_key, change_password, list_keys, remove_key
from ibsync.repo.repository import Repository
from ibsync.storage import open_storage

from conftest import FAST_KDF, MIT_BACKUP, PASSWORD, copy_folder, one_line_error, run_subprocess, tree_state

OTHER = "another password, for the laptop"
THIRD = "a third one"


def _keys(cli) -> list[dict]:
    out, _ = cli("key", "list", "--json")
    return json.loads(out)


def _add(cli, monkeypatch, password: str) -> str:
    monkeypatch.setenv("IBSYNC_NEW_PASSWORD", password)
    try:
        out, _ = cli("key", "add", "--json")
    finally:
        monkeypatch.delenv("IBSYNC_NEW_PASSWORD")
    return json.loads(out)["added"]


def _opens(cli, monkeypatch, password: str, expect: int = 0) -> str:
    monkeypatch.setenv("IBSYNC_PASSWORD", password)
    _, err = cli("snapshots", expect=expect)
    return err


def test_add_list_remove(env, cli, monkeypatch, tmp_path):
    cli("init")
    first = _keys(cli)
    assert len(first) == 1 and first[0]["current"]
    added = _add(cli, monkeypatch, OTHER)

    # either password opens the repository; the key file it opened is the current one
    _opens(cli, monkeypatch, PASSWORD)
    keys = _keys(cli)
    assert len(keys) == 2
    assert {k["id"] for k in keys} == {first[0]["id"], added}
    assert [k["id"] for k in keys if k["current"]] == [first[0]["id"]]
    assert all(k["hostname"] and k["created"] and "salt" not in k["kdf"] for k in keys)
    assert keys[0]["kdf"] == FAST_KDF  # env patches the default: key add uses it too

    pw_file = tmp_path / "pw"
    pw_file.write_text(OTHER + "\n")
    monkeypatch.delenv("IBSYNC_PASSWORD")
    cli("snapshots", "--password-file", pw_file)
    keys = json.loads(cli("key", "list", "--json", "-p", pw_file)[0])
    assert [k["id"] for k in keys if k["current"]] == [added]

    # the text table: short ids, one '*'
    out, _ = cli("key", "list", "-p", pw_file)
    assert added[:8] in out and first[0]["id"][:8] in out and added not in out
    marked = [line for line in out.splitlines() if line.rstrip().endswith("*")]
    assert len(marked) == 1 and marked[0].startswith(added[:8])
    assert "2 key(s)" in out

    # with the second password, remove the first key by a prefix
    out, _ = cli("key", "remove", first[0]["id"][:6], "-p", pw_file)
    assert f"removed key {first[0]['id'][:8]}" in out
    err = _opens(cli, monkeypatch, PASSWORD, expect=4)
    one_line_error(err, "wrong password")
    _opens(cli, monkeypatch, OTHER)
    assert [k["id"] for k in _keys(cli)] == [added]


def test_remove_refuses_current_and_last_key(env, cli, monkeypatch):
    cli("init")
    (only,) = _keys(cli)
    _, err = cli("key", "remove", only["id"][:8], expect=2)
    one_line_error(err, "only key")

    added = _add(cli, monkeypatch, OTHER)
    _, err = cli("key", "remove", only["id"], expect=2)
    one_line_error(err, "your password opened", "key passwd")

    monkeypatch.setenv("IBSYNC_PASSWORD", OTHER)
    _, err = cli("key", "remove", added[:8], expect=2)
    one_line_error(err, "your password opened")
    assert len(_keys(cli)) == 2


def test_remove_unknown_and_ambiguous_ids(env, cli, monkeypatch):
    cli("init")
    _add(cli, monkeypatch, OTHER)
    _, err = cli("key", "remove", "zz", expect=2)
    one_line_error(err, "no key with id")
    _, err = cli("key", "remove", "", expect=2)
    one_line_error(err, "no key with id")
    # two key files sharing a prefix (a crafted name: listing does not check names)
    (only,) = [k for k in _keys(cli) if k["current"]]
    twin = only["id"][:4] + ("0" * 60 if only["id"][4] != "0" else "1" * 60)
    (env / "keys" / twin).write_bytes((env / "keys" / only["id"]).read_bytes())
    _, err = cli("key", "remove", only["id"][:4], expect=2)
    one_line_error(err, "ambiguous", only["id"][:12], twin[:12])
    (env / "keys" / twin).unlink()
    assert len(_keys(cli)) == 2


def test_passwd_keeps_data(env, cli, monkeypatch, tmp_path):
    src = copy_folder(MIT_BACKUP, tmp_path / "sample_backup")
    before = tree_state(src)
    cli("init")
    cli("import", src, "--allow-unfinished")
    (old_key,) = _keys(cli)

    new_pw = tmp_path / "new-pw"
    new_pw.write_text(THIRD + "\n")
    out, _ = cli("key", "passwd", "--new-password-file", new_pw)
    assert "password changed" in out

    err = _opens(cli, monkeypatch, PASSWORD, expect=4)
    one_line_error(err, "wrong password")
    _opens(cli, monkeypatch, THIRD)
    (new_key,) = _keys(cli)
    assert new_key["id"] != old_key["id"] and new_key["current"]

    cli("restore", "latest", tmp_path / "out")
    assert tree_state(tmp_path / "out" / "sample_backup") == before
    cli("check", "--read-data")


def test_passwd_json_and_same_password(env, cli, monkeypatch):
    cli("init")
    monkeypatch.setenv("IBSYNC_NEW_PASSWORD", PASSWORD)
    _, err = cli("key", "passwd", expect=2)
    one_line_error(err, "same as the current")
    monkeypatch.setenv("IBSYNC_NEW_PASSWORD", OTHER)
    out, _ = cli("key", "passwd", "--json")
    result = json.loads(out)
    monkeypatch.setenv("IBSYNC_PASSWORD", OTHER)
    assert [k["id"] for k in _keys(cli)] == [result["added"]]
    assert result["removed"] != result["added"]


def test_new_password_needed(env, cli, tmp_path, monkeypatch):
    cli("init")
    monkeypatch.delenv("IBSYNC_NEW_PASSWORD", raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    for sub in ("add", "passwd"):
        _, err = cli("key", sub, expect=2)
        one_line_error(err, "no new password given", "--new-password-file")
    empty = tmp_path / "empty"
    empty.write_text("")
    _, err = cli("key", "add", "--new-password-file", empty, expect=2)
    one_line_error(err, "is empty")
    _, err = cli("key", "add", "--new-password-file", tmp_path / "missing", expect=2)
    one_line_error(err, "cannot read password file")
    assert len(_keys(cli)) == 1


def test_interactive_new_password(env, cli, monkeypatch):
    cli("init")
    monkeypatch.delenv("IBSYNC_NEW_PASSWORD", raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    answers = iter([OTHER, "typo"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    _, err = cli("key", "add", expect=2)
    one_line_error(err, "do not match")
    answers = iter([OTHER, OTHER])
    cli("key", "add")
    _opens(cli, monkeypatch, OTHER)


def test_unencrypted_repository_has_no_keys(env, cli, monkeypatch):
    monkeypatch.delenv("IBSYNC_PASSWORD")
    monkeypatch.setenv("IBSYNC_NEW_PASSWORD", OTHER)
    cli("init", "--no-encryption")
    for args in (["list"], ["list", "--json"], ["add"], ["remove", "abcd"], ["passwd"]):
        _, err = cli("key", *args, expect=2)
        one_line_error(err, "the repository is not encrypted; it has no keys")
    assert not (env / "keys").exists() or not any((env / "keys").iterdir())


def test_library_api(env, cli, tmp_path):
    cli("init")
    repo = Repository.open(open_storage(str(env)), lambda: PASSWORD)
    original = repo.key_name
    name = add_key(repo, OTHER)
    keys = list_keys(repo)
    assert {k.id for k in keys} == {original, name}
    assert [k.id for k in keys if k.current] == [original]
    with pytest.raises(UserError, match="empty password"):
        add_key(repo, "")
    new = change_password(repo, THIRD)
    assert repo.key_name == new
    assert {k.id for k in list_keys(repo)} == {name, new}
    for pw, key in ((OTHER, name), (THIRD, new)):
        assert Repository.open(open_storage(str(env)), lambda pw=pw: pw).key_name == key
    # a damaged key file is listed, not fatal
    (env / "keys" / ("0" * 64)).write_bytes(b"\xff not json")
    damaged = [k for k in list_keys(repo) if k.error]
    assert [k.id for k in damaged] == ["0" * 64]
    remove_key(repo, "0" * 64)

    unencrypted = tmp_path / "plain"
    cli("init", "--no-encryption", "--repo", unencrypted)
    plain = Repository.open(open_storage(str(unencrypted)), lambda: PASSWORD)
    for call in (
        lambda: list_keys(plain),
        lambda: add_key(plain, OTHER),
        lambda: remove_key(plain, "ab"),
        lambda: change_password(plain, OTHER),
    ):
        with pytest.raises(UserError, match="not encrypted"):
            call()


def test_as_a_user_runs_it(env, cli):
    """In a real process: wrong current password and passwd, one line each, no traceback."""
    cli("init")
    e = dict(os.environ, IBSYNC_PASSWORD="not it", IBSYNC_NEW_PASSWORD=OTHER)
    e.pop("IBSYNC_DEBUG", None)
    r = run_subprocess(["key", "passwd"], e, stdin=subprocess.DEVNULL)
    assert r.returncode == 4
    one_line_error(r.stderr, "wrong password")
    e["IBSYNC_PASSWORD"] = PASSWORD
    # the subprocess does not see the test's fast KDF, so it pays the real Argon2 cost once
    r = run_subprocess(["key", "passwd"], e, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "password changed" in r.stdout and not r.stderr
    r = run_subprocess(["key", "list"], e, stdin=subprocess.DEVNULL)
    one_line_error(r.stderr, "wrong password")
    e["IBSYNC_PASSWORD"] = OTHER
    r = run_subprocess(["key", "list", "--json"], e, stdin=subprocess.DEVNULL)
    (key,) = json.loads(r.stdout)
    assert key["current"] and key["kdf"]["memory_kib"] == 32768
