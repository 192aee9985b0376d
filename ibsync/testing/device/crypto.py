"""Encrypted backups, device side: the keybag, the per-file keys and the ciphers.

What the format requires (read from pyiosbackup 0.2.4 and pymobiledevice3's
``_decrypt_backup_manifest_db``; see also ibsync/reader/ios_crypto.py):

* ``Manifest.plist`` ``BackupKeyBag``: Apple's TLV keybag. Its class keys are AES-wrapped with a
  key-encryption key derived from the backup password: ``pbkdf2_sha1(pbkdf2_sha256(pw, DPSL, DPIC),
  SALT, ITER)`` (the SHA-256 stage applies from iOS 10.2 on).
* ``ManifestKey``: ``u32le class || aes_key_wrap(class key, key)``; Manifest.db is AES-256-CBC under
  that key, zero IV, no padding (sqlite pages are whole blocks).
* Each file's ``MBFile.EncryptionKey`` (an NSMutableData): the same layout; the payload is
  AES-256-CBC under that key, zero IV, PKCS7.

What the simulator chooses (inferred, not read from a device): every key is derived from the UDID,
so one device always produces the same keys and an unchanged file the same ciphertext from one
backup to the next (real devices keep a file's key for the life of the file, which is why an
incremental backup can leave unchanged payloads in place). Files and Manifest.db use protection
class 3, the class the generator's rows carry.
"""

from __future__ import annotations

import hashlib
import plistlib
import struct

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from ..generator import BackupFile, mbfile_archive

#: Classes a backup keybag carries (class 4 has no key in one, as far as public write-ups show).
KEYBAG_CLASSES = (1, 2, 3, 5, 6, 7, 8, 9, 10, 11)
FILE_CLASS = 3
MANIFEST_CLASS = 3
#: PBKDF2-SHA1 rounds of the second stage (ITER), as in real backup keybags.
KEYBAG_ITER = 10_000
_ZERO_IV = b"\0" * 16


class WrongPassword(Exception):
    """The password does not unlock the backup's keybag."""


def _derive(secret: bytes, *label: object) -> bytes:
    return hashlib.sha256(secret + ":".join(map(str, label)).encode()).digest()


def _tlv(tag: bytes, value: bytes | int) -> bytes:
    raw = value.to_bytes(4, "big") if isinstance(value, int) else value
    return tag + len(raw).to_bytes(4, "big") + raw


def _cbc(key: bytes):
    return Cipher(algorithms.AES(key), modes.CBC(_ZERO_IV))


def encrypt_payload(key: bytes, data: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    enc = _cbc(key).encryptor()
    return enc.update(padder.update(data) + padder.finalize()) + enc.finalize()


def decrypt_payload(key: bytes, data: bytes, size: int | None = None) -> bytes:
    dec = _cbc(key).decryptor()
    plain = dec.update(data) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(plain) + unpadder.finalize()
    return plain if size is None else plain[:size]


def _wrap(class_: int, kek: bytes, key: bytes) -> bytes:
    return struct.pack("<I", class_) + aes_key_wrap(kek, key)


class DeviceKeys:
    """One device's backup keys for one password (``password=None``: backups are not encrypted, the
    keybag is still sent, as real devices do, but its class keys are not wrapped by any password).

    Building one runs the keybag's key derivation (``rounds`` PBKDF2-SHA256 rounds) once."""

    def __init__(self, udid: str, password: str | None, rounds: int) -> None:
        self.udid = udid
        self.password = password
        self.rounds = rounds  # DPIC
        self._secret = _derive(b"ibsync-simdevice", udid)
        self.class_keys = {c: _derive(self._secret, "class", c) for c in KEYBAG_CLASSES}
        self._manifest_db_key = _derive(self._secret, "manifest-db")
        #: ManifestKey: u32le class || the wrapped Manifest.db key
        self.manifest_key = _wrap(MANIFEST_CLASS, self.class_keys[MANIFEST_CLASS], self._manifest_db_key)
        self.keybag = self._build_keybag()

    def _build_keybag(self) -> bytes:
        s = self._secret
        salt, dpsl = _derive(s, "salt")[:20], _derive(s, "dpsl")[:20]
        out = [
            _tlv(b"VERS", 4),
            _tlv(b"TYPE", 1),
            _tlv(b"UUID", _derive(s, "uuid")[:16]),
            _tlv(b"HMCK", _derive(s, "hmck") + _derive(s, "hmck2")[:8]),
            _tlv(b"WRAP", 0),
            _tlv(b"SALT", salt),
            _tlv(b"ITER", KEYBAG_ITER),
            _tlv(b"DPWT", 1),
            _tlv(b"DPIC", self.rounds),
            _tlv(b"DPSL", dpsl),
        ]
        kek = None
        if self.password is not None:
            stage1 = hashlib.pbkdf2_hmac("sha256", self.password.encode(), dpsl, self.rounds, 32)
            kek = hashlib.pbkdf2_hmac("sha1", stage1, salt, KEYBAG_ITER, 32)
        for c in KEYBAG_CLASSES:
            wpky = aes_key_wrap(kek, self.class_keys[c]) if kek else (_derive(s, "wpky", c) + _derive(s, "x", c))[:40]
            out += [
                _tlv(b"UUID", _derive(s, "class-uuid", c)[:16]),
                _tlv(b"CLAS", c),
                _tlv(b"WRAP", 3 if c < 5 else 2),
                _tlv(b"KTYP", 0),
                _tlv(b"WPKY", wpky),
            ]
        return b"".join(out)

    @property
    def encrypts(self) -> bool:
        return self.password is not None

    def file_key(self, fid: str) -> bytes:
        return _derive(self._secret, "file", fid)

    def wrapped_file_key(self, fid: str) -> bytes:
        return _wrap(FILE_CLASS, self.class_keys[FILE_CLASS], self.file_key(fid))

    def encrypt_file(self, fid: str, data: bytes) -> bytes:
        return encrypt_payload(self.file_key(fid), data)

    def encrypt_manifest_db(self, image: bytes) -> bytes:
        enc = _cbc(self._manifest_db_key).encryptor()
        return enc.update(image) + enc.finalize()

    def decrypt_manifest_db(self, blob: bytes) -> bytes:
        """The device reading back its own encrypted Manifest.db from the host (incremental backups)."""
        if len(blob) % 16:
            raise ValueError("an encrypted Manifest.db is a whole number of AES blocks")
        dec = _cbc(self._manifest_db_key).decryptor()
        return dec.update(blob) + dec.finalize()

    def mbfile_blob(self, f: BackupFile) -> bytes:
        """A Manifest.db ``file`` column with the file's wrapped key: the generator's MBFile archive
        plus ``EncryptionKey`` (an NSMutableData, the class bpylist2 and so pyiosbackup map)."""
        archive = mbfile_archive(f)
        objects = archive["$objects"]
        objects[1]["EncryptionKey"] = plistlib.UID(len(objects))
        objects.append({"NS.data": self.wrapped_file_key(f.file_id), "$class": plistlib.UID(len(objects) + 1)})
        objects.append({"$classname": "NSMutableData", "$classes": ["NSMutableData", "NSData", "NSObject"]})
        return plistlib.dumps(archive, fmt=plistlib.FMT_BINARY, sort_keys=False)


class UnlockedBackup:
    """A backup's keybag opened with its password: what a device restoring an encrypted backup (or a
    test reading one) needs. Uses pyiosbackup's keybag code, independent of ibsync's reader."""

    def __init__(self, keybag, manifest_key: bytes) -> None:
        self._keybag = keybag  # pyiosbackup.keybag.Keybag: protection class -> class key
        self._manifest_key = manifest_key

    @classmethod
    def open(cls, manifest_plist: dict, password: str) -> UnlockedBackup:
        from pyiosbackup.keybag import Keybag
        from pyiosbackup.manifest_plist import ManifestPlist

        try:
            keybag = Keybag.from_manifest(ManifestPlist(manifest_plist), password)
        except InvalidUnwrap:
            raise WrongPassword("the password does not unlock the backup keybag") from None
        return cls(keybag, bytes(manifest_plist["ManifestKey"]))

    def unwrap(self, wrapped: bytes) -> bytes:
        (class_,) = struct.unpack_from("<I", wrapped)
        return aes_key_unwrap(self._keybag.get_key(class_), wrapped[4:])

    def decrypt_manifest_db(self, blob: bytes) -> bytes:
        dec = _cbc(self.unwrap(self._manifest_key)).decryptor()
        return dec.update(blob) + dec.finalize()

    def decrypt_file(self, data: bytes, wrapped_key: bytes | None, size: int) -> bytes:
        if not wrapped_key:
            raise ValueError("an encrypted backup's file row has no EncryptionKey")
        return decrypt_payload(self.unwrap(wrapped_key), data, size)
