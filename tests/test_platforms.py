"""Where a platform lacks the calls safe writing into a folder needs (Windows: no dir_fd, no
os.pwrite before Python 3.13), restore, extract and export refuse in one line before writing
anything, instead of writing through a planted link or failing half way."""

from __future__ import annotations

import os
import sys

import pytest

from ibsync.errors import UserError
from ibsync.platforms import folder_writing_missing, require_folder_writing


def test_this_platform_has_what_folder_writing_needs():
    assert folder_writing_missing() is None  # CI runs on Linux


def test_windows_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(UserError) as e:
        require_folder_writing("restore to a folder")
    text = str(e.value)
    assert "\n" not in text and text.startswith("restore to a folder is not supported on this platform (win32")
    assert "WSL" in text


def test_a_missing_pwrite_is_named(monkeypatch):
    monkeypatch.delattr(os, "pwrite")
    assert folder_writing_missing() == "os.pwrite"


def test_restore_extract_and_export_check_before_writing(monkeypatch, tmp_path):
    from ibsync.reader import export, extract, restorer

    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(UserError, match="restore to a folder is not supported"):
        restorer.restore_folder(None, None, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="extract is not supported"):
        extract.extract(None, None, "**", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="export is not supported"):
        export.run_export(*([None] * _positional(export.run_export)))
    assert list(tmp_path.iterdir()) == []


def _positional(fn) -> int:
    import inspect

    return sum(
        1
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    )
