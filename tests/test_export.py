"""ibsync export: presets written under real names, with their file times, from plain and
encrypted iOS backups; hostile names refused without writing outside OUT."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from ibsync.reader.export import PRESETS, parse_exif_time
from ibsync.testing.generator import (
    FLAG_FILE,
    MODE_FILE,
    BackupFile,
    generate,
    write_rows_folder,
)

from conftest import one_line_error

T = 1_690_000_000
IOS_PASSWORD = "open sesame"
EXIF_TIME = "2023:06:01 12:34:56"  # +02:00: 10:34:56 UTC
EXIF_UTC = 1_685_615_696


def _photo(fmt: str, offset: str | None) -> bytes:
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = EXIF_TIME
    if offset:
        exif.get_ifd(0x8769)[0x9011] = offset
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(out, fmt, exif=exif)
    return out.getvalue()


def _f(domain: str, rel: str, data: bytes, mtime: int) -> BackupFile:
    return BackupFile(domain, rel, FLAG_FILE, mtime, MODE_FILE, len(data), data)


CAM, MEDIA, HOME = "CameraRollDomain", "MediaDomain", "HomeDomain"
VM_GROUP = "AppDomainGroup-group.com.apple.VoiceMemos.shared"
WA_GROUP = "AppDomainGroup-group.net.whatsapp.WhatsApp.shared"


def _rows() -> list[BackupFile]:
    return [
        _f(CAM, "Media/DCIM/100APPLE/IMG_0001.JPG", _photo("JPEG", "+02:00"), T + 1),  # EXIF time wins
        _f(CAM, "Media/DCIM/100APPLE/IMG_0002.JPG", _photo("JPEG", None), T + 2),  # no offset: MBFile time
        _f(CAM, "Media/DCIM/101APPLE/IMG_0003.HEIC", _photo("HEIF", "+02:00"), T + 3),
        _f(CAM, "Media/DCIM/101APPLE/IMG_0004.MOV", b"\0\0\0\x14ftypqt  movie", T + 4),
        _f(CAM, "Media/DCIM/100APPLE/IMG_0001.AAE", b"<plist>edits</plist>", T + 5),  # a sidecar: left out
        _f(CAM, "Media/PhotoData/Thumbnails/V2/x.JPG", b"thumb", T + 6),  # not DCIM: left out
        _f(MEDIA, "Media/Recordings/20240101 101010.m4a", b"memo-old", T + 7),
        _f(MEDIA, "Media/Recordings/20240101 101010.waveform", b"wave", T + 8),  # not a recording
        _f(MEDIA, "Media/Recordings/Sub/nested.m4a", b"nested", T + 9),  # '*' stays in the folder
        _f(VM_GROUP, "Recordings/20240202 020202-5C1E.m4a", b"memo-new", T + 10),
        _f(HOME, "Library/Voicemail/1.amr", b"#!AMR\nvoice-1", T + 11),
        _f(HOME, "Library/Voicemail/2.amr", b"#!AMR\nvoice-2", T + 12),
        _f(HOME, "Library/Voicemail/voicemail.db", b"db", T + 13),
        _f(WA_GROUP, "Message/Media/4912345@s.whatsapp.net/a/b/e1c2.jpg", b"wa-photo", T + 14),
        _f(WA_GROUP, "Message/Media/4912345@s.whatsapp.net/c/d/voice.opus", b"wa-voice", T + 15),
        _f(WA_GROUP, "Message/Other/x.txt", b"not media", T + 16),
        _f(MEDIA, "Library/SMS/Attachments/ab/11/GUID-1/IMG_5000.jpeg", b"sms-photo", T + 17),
        _f(MEDIA, "Library/SMS/Attachments/cd/02/GUID-2/Ünïcode file.pdf", b"%PDF-sms", T + 18),
        _f(HOME, "Library/SMS/sms.db", b"not an attachment", T + 19),
    ]


EXPECTED = {  # preset -> {path below OUT: (source path, mtime)}
    "photos": {
        "100APPLE/IMG_0001.JPG": (f"{CAM}/Media/DCIM/100APPLE/IMG_0001.JPG", EXIF_UTC),
        "100APPLE/IMG_0002.JPG": (f"{CAM}/Media/DCIM/100APPLE/IMG_0002.JPG", T + 2),
        "101APPLE/IMG_0003.HEIC": (f"{CAM}/Media/DCIM/101APPLE/IMG_0003.HEIC", EXIF_UTC),
        "101APPLE/IMG_0004.MOV": (f"{CAM}/Media/DCIM/101APPLE/IMG_0004.MOV", T + 4),
    },
    "voice-memos": {
        "20240101 101010.m4a": (f"{MEDIA}/Media/Recordings/20240101 101010.m4a", T + 7),
        "20240202 020202-5C1E.m4a": (f"{VM_GROUP}/Recordings/20240202 020202-5C1E.m4a", T + 10),
    },
    "voicemail": {
        "1.amr": (f"{HOME}/Library/Voicemail/1.amr", T + 11),
        "2.amr": (f"{HOME}/Library/Voicemail/2.amr", T + 12),
    },
    "whatsapp-media": {
        "4912345@s.whatsapp.net/a/b/e1c2.jpg": (
            f"{WA_GROUP}/Message/Media/4912345@s.whatsapp.net/a/b/e1c2.jpg",
            T + 14,
        ),
        "4912345@s.whatsapp.net/c/d/voice.opus": (
            f"{WA_GROUP}/Message/Media/4912345@s.whatsapp.net/c/d/voice.opus",
            T + 15,
        ),
    },
    "sms-attachments": {
        "ab/11/GUID-1/IMG_5000.jpeg": (f"{MEDIA}/Library/SMS/Attachments/ab/11/GUID-1/IMG_5000.jpeg", T + 17),
        "cd/02/GUID-2/Ünïcode file.pdf": (f"{MEDIA}/Library/SMS/Attachments/cd/02/GUID-2/Ünïcode file.pdf", T + 18),
    },
}


def _files_below(out: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(out)): (p.read_bytes(), int(p.stat().st_mtime))
        for p in sorted(out.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


@pytest.fixture
def backups(env, cli, tmp_path):
    """A repository holding the rows above as a plain backup and as an encrypted one."""
    rows = _rows()
    by_path = {f"{r.domain}/{r.relative_path}": r.data for r in rows}
    cli("init")
    plain = write_rows_folder(tmp_path / "plain", rows, udid="1" * 40, device_name="Plain")
    enc = write_rows_folder(tmp_path / "enc", rows, udid="2" * 40, device_name="Locked", password=IOS_PASSWORD)
    cli("import", plain)
    cli("import", enc)
    pw = tmp_path / "ios-pw"
    pw.write_text(IOS_PASSWORD + "\n")
    return {"data": by_path, "pw": pw, "tmp": tmp_path}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_every_preset(backups, cli, tmp_path, encrypted, monkeypatch):
    monkeypatch.delenv("IBSYNC_BACKUP_PASSWORD", raising=False)
    device = "Locked" if encrypted else "Plain"
    extra = ["--backup-password-file", backups["pw"]] if encrypted else []
    for name, expected in EXPECTED.items():
        out = tmp_path / f"out-{name}-{device}"
        stdout, _ = cli("export", name, "latest", out, "--device", device, "--json", *extra)
        report = json.loads(stdout)
        assert (report["preset"], report["files"], report["failed"]) == (name, len(expected), [])
        assert report["bytes"] == sum(len(backups["data"][src]) for src, _ in expected.values())
        got = _files_below(out)
        assert got == {rel: (backups["data"][src], mtime) for rel, (src, mtime) in expected.items()}, name


def test_encrypted_needs_its_password(backups, cli, tmp_path, monkeypatch):
    monkeypatch.delenv("IBSYNC_BACKUP_PASSWORD", raising=False)
    _, err = cli("export", "voicemail", "latest", tmp_path / "o", "--device", "Locked", expect=2)
    one_line_error(err, "--backup-password-file")
    monkeypatch.setenv("IBSYNC_BACKUP_PASSWORD", "wrong")
    _, err = cli("export", "voicemail", "latest", tmp_path / "o", "--device", "Locked", expect=4)
    one_line_error(err, "wrong iOS backup password")
    assert not (tmp_path / "o").exists()


def test_list(cli):
    out, _ = cli("export", "--list")
    for name, p in PRESETS.items():
        assert f"{name}: " in out
        for s in p.sources:
            assert f"{s.domain}/{s.base}/{s.include}" in out
    assert "CameraRollDomain/Media/DCIM/**" in out and "HomeDomain/Library/Voicemail/*.amr" in out
    assert "AppDomainGroup-group.com.apple.VoiceMemos.shared/Recordings/*.m4a" in out
    data = json.loads(cli("export", "--list", "--json")[0])
    assert [p["name"] for p in data["presets"]] == [
        "photos",
        "voice-memos",
        "voicemail",
        "whatsapp-media",
        "sms-attachments",
    ]
    out, _ = cli("export", "--help")
    assert "--list" in out and "--overwrite" in out and "--backup-password-file" in out and "--device" in out


def test_bad_input(backups, cli, tmp_path):
    _, err = cli("export", "selfies", "latest", tmp_path / "o", expect=2)
    one_line_error(err, "no export preset 'selfies'")
    _, err = cli("export", "photos", expect=2)
    one_line_error(err, "ibsync export PRESET SNAPSHOT OUT")
    # an existing file is kept unless --overwrite, and nothing is written
    out = tmp_path / "again"
    cli("export", "voicemail", "latest", out, "--device", "Plain")
    (out / "1.amr").write_bytes(b"mine")
    _, err = cli("export", "voicemail", "latest", out, "--device", "Plain", expect=2)
    one_line_error(err, "1.amr exists", "--overwrite")
    assert (out / "1.amr").read_bytes() == b"mine"
    cli("export", "voicemail", "latest", out, "--device", "Plain", "--overwrite")
    assert (out / "1.amr").read_bytes() == b"#!AMR\nvoice-1"
    # a snapshot without the preset's folders: nothing to do, said plainly
    generated = generate(tmp_path / "gen", seed=5, size_bytes=2 << 20, udid="3" * 40)
    cli("import", generated)
    stdout, _ = cli("export", "voicemail", "latest", tmp_path / "none", "--device", "3" * 40)
    assert "holds no voicemail" in stdout and not (tmp_path / "none").exists()


def test_hostile_names(env, cli, tmp_path):
    """Rows that climb out ('..'), names too long for a folder, and a symlink planted in OUT:
    each refused and named, the others written, nothing written outside OUT, exit 1."""
    rows = [
        _f(HOME, "Library/Voicemail/good.amr", b"good", T),
        _f(HOME, "Library/Voicemail/../../../../../../escape.amr", b"escaped", T),
        _f(HOME, "Library/Voicemail/" + "x" * 300 + ".amr", b"long", T),
        _f(HOME, "Library/Voicemail/./voicemail.db", b"db", T),  # unusable, but not a voicemail: not named
        _f(CAM, "Media/DCIM/100APPLE/IMG_1.JPG", b"photo-1", T),
        _f(CAM, "Media/DCIM/evil/IMG_2.JPG", b"photo-2", T),
    ]
    folder = write_rows_folder(tmp_path / "hostile", rows, udid="4" * 40, directories=False)
    cli("init")
    cli("import", folder)
    out = tmp_path / "out"
    _, err = cli("export", "voicemail", "latest", out, expect=1)
    assert list(out.iterdir()) == [out / "good.amr"] and (out / "good.amr").read_bytes() == b"good"
    assert "cannot export HomeDomain/Library/Voicemail/../../../../../../escape.amr" in err
    assert "cannot export HomeDomain/Library/Voicemail/xxxx" in err and "2 file(s) could not be exported" in err
    assert not list(tmp_path.rglob("escape.amr"))
    # a symlink in OUT where a folder goes: not followed, even with --overwrite
    outside = tmp_path / "outside"
    outside.mkdir()
    photos = tmp_path / "photos"
    photos.mkdir()
    os.symlink(outside, photos / "evil")
    _, err = cli("export", "photos", "latest", photos, "--overwrite", expect=1)
    assert "cannot export CameraRollDomain/Media/DCIM/evil/IMG_2.JPG" in err and "symlink" in err
    assert list(outside.iterdir()) == []
    assert (photos / "100APPLE" / "IMG_1.JPG").read_bytes() == b"photo-1"


def test_exif_times():
    assert parse_exif_time("2023:06:01 12:34:56", "+02:00") == EXIF_UTC
    assert parse_exif_time("2023:06:01 12:34:56\x00", "-03:30") == EXIF_UTC + 2 * 3600 + 3 * 3600 + 1800
    for when, offset in (
        ("2023:06:01 12:34:56", None),
        ("garbage", "+02:00"),
        (b"x", "+02:00"),
        ("2023:06:01 12:34:56", "02:00"),
        ("0000:00:00 00:00:00", "+00:00"),
    ):
        assert parse_exif_time(when, offset) is None


def test_unreadable_file_is_named_and_the_rest_written(env, cli, tmp_path):
    """A file whose payload the backup lacks fails alone: named on stderr, exit 1, the others
    written with their bytes, nothing partial left behind."""
    rows = [_f(HOME, f"Library/Voicemail/{i}.amr", f"voice-{i}".encode(), T + i) for i in range(5)]
    folder = write_rows_folder(tmp_path / "gone", rows, udid="5" * 40)
    lost = rows[2].file_id
    (folder / lost[:2] / lost).unlink()
    cli("init")
    cli("import", folder)
    out = tmp_path / "out"
    stdout, err = cli("export", "voicemail", "latest", out, "--json", expect=1)
    assert "cannot export HomeDomain/Library/Voicemail/2.amr" in err
    report = json.loads(stdout)
    assert report["files"] == 4 and [f["path"] for f in report["failed"]] == ["HomeDomain/Library/Voicemail/2.amr"]
    assert _files_below(out) == {f"{i}.amr": (f"voice-{i}".encode(), T + i) for i in (0, 1, 3, 4)}
