"""The config file names repositories; secrets come from files, commands or the environment and
are never printed."""

import json
import os

import pytest

from ibsync.config import expand_secrets, load_config, resolve_repo
from ibsync.errors import UserError
from ibsync.storage.remote import redact_url

from conftest import MIT_BACKUP, PASSWORD, copy_folder, one_line_error, run_subprocess, tree_state


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def configured(tmp_path, monkeypatch):
    """A config naming a local repository whose password comes from a command; no IBSYNC_* env."""
    for var in ("IBSYNC_REPO", "IBSYNC_PASSWORD", "IBSYNC_PASSWORD_FILE", "IBSYNC_PASSWORD_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(
        "ibsync.format.crypto.DEFAULT_KDF", {"name": "argon2id", "memory_kib": 8192, "iterations": 1, "lanes": 1}
    )
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD)
    cfg = _write(
        tmp_path / "config.toml",
        f"""
[repositories.drive]
url = "{tmp_path / "repo"}"
password-command = "cat {secret}"

[repositories.other]
url = "{tmp_path / "other"}"
password-env = "OTHER_PW"
""",
    )
    monkeypatch.setenv("IBSYNC_CONFIG", str(cfg))
    return tmp_path


def test_named_repository_end_to_end(configured, cli):
    src = copy_folder(MIT_BACKUP, configured / "sample_backup")
    cli("init", "--repo", "drive")
    assert (configured / "repo" / "config").is_file()
    cli("import", src, "--allow-unfinished", "--repo", "drive")
    out, _ = cli("snapshots", "--json", "--repo", "drive")
    assert len(json.loads(out)) == 1
    cli("restore", "latest", configured / "out", "--repo", "drive")
    assert tree_state(configured / "out" / "sample_backup") == tree_state(src)


def test_password_env_and_override(configured, cli, monkeypatch):
    _, err = cli("init", "--repo", "other", expect=2)
    assert "OTHER_PW is not set" in err
    monkeypatch.setenv("OTHER_PW", "another secret")
    cli("init", "--repo", "other")
    cli("snapshots", "--repo", "other")
    pw = configured / "pwfile"
    pw.write_text("wrong")
    _, err = cli("snapshots", "--repo", "other", "--password-file", pw, expect=4)  # the option wins
    assert "wrong password" in err


def test_bad_config_is_one_line_and_quotes_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SECRET", "s3cr3t-value")
    bad = _write(tmp_path / "bad.toml", '[repositories.x]\nurl = "/tmp/x"\npasword-file = "typo"\n')
    e = {**os.environ, "IBSYNC_CONFIG": str(bad)}
    r = run_subprocess(["snapshots", "--repo", "x"], e)
    one_line_error(r.stderr, "unknown key(s) pasword-file")
    broken = _write(tmp_path / "broken.toml", "[repositories.x\nurl=1")
    r = run_subprocess(["snapshots", "--repo", "x", "--config", broken], {**os.environ})
    one_line_error(r.stderr, "broken.toml")
    r = run_subprocess(["snapshots", "--repo", "x", "--config", tmp_path / "nope.toml"], {**os.environ})
    one_line_error(r.stderr, "does not exist")
    # a failing password command: its output (which may hold a secret) is not shown
    cfg = _write(
        tmp_path / "c.toml",
        f'[repositories.x]\nurl = "{tmp_path / "r"}"\npassword-command = "echo $MY_SECRET; exit 3"\n',
    )
    r = run_subprocess(["init", "--repo", "x", "--config", cfg], {**os.environ})
    one_line_error(r.stderr, "password command failed with exit code 3")
    assert "s3cr3t-value" not in r.stderr + r.stdout


def test_secret_references_and_storage_options(tmp_path, monkeypatch):
    cfg = _write(
        tmp_path / "c.toml",
        """
[repositories.mem]
url = "memory://ibsync-config-test"
[repositories.mem.options]
token = "${TOKEN}"
nested = { key = "k-${TOKEN}" }
""",
    )
    repos = load_config(cfg)
    rc = resolve_repo("mem", repos)
    with pytest.raises(UserError, match="TOKEN is not set"):
        expand_secrets(rc.options, "repository 'mem'")
    monkeypatch.setenv("TOKEN", "abc")
    assert expand_secrets(rc.options, "x") == {"token": "abc", "nested": {"key": "k-abc"}}
    assert rc.options["token"] == "${TOKEN}"  # the loaded config keeps only the reference
    from ibsync.storage import open_storage

    storage = open_storage(rc.url, expand_secrets(rc.options, "x"))
    assert storage.fs.storage_options["token"] == "abc"  # handed to the fsspec filesystem
    assert resolve_repo("/some/path", repos).url == "/some/path"  # not a name: a URL or path


def test_default_config_location(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert load_config(None) == {}  # no file: no named repositories, no error
    (tmp_path / "xdg" / "ibsync").mkdir(parents=True)
    _write(tmp_path / "xdg" / "ibsync" / "config.toml", '[repositories.home]\nurl = "/backups/ibsync"\n')
    assert load_config(None)["home"].url == "/backups/ibsync"


def test_urls_shown_without_passwords():
    assert redact_url("sftp://me:hunter2@nas.local/vol") == "sftp://me:***@nas.local/vol"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"
