"""Encrypted iOS backups: unlocking the keybag and decrypting Manifest.db and payloads.

The keybag in Manifest.plist is unlocked with the backup password (pyiosbackup's ``Keybag``:
PBKDF2-SHA256 with DPIC rounds, then PBKDF2-SHA1, then AES key unwrap of each class key; about
2 s), once per keybag and command (:class:`BackupKeyring`). Manifest.db is AES-256-CBC (zero IV,
no padding) under the key wrapped in ``ManifestKey``; each payload is AES-256-CBC (zero IV,
PKCS7) under the key wrapped in its ``EncryptionKey``. The password is never stored.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Iterable, Iterator

from ..errors import InvalidData, WrongBackupPassword

_AES_BLOCK = 16


class BackupKeys:
    """The unlocked keybag of an encrypted iOS backup."""

    def __init__(self, keybag) -> None:
        self._keybag = keybag  # pyiosbackup.keybag.Keybag: class -> class key

    @classmethod
    def unlock(cls, manifest_plist: dict, password: str) -> BackupKeys:
        from cryptography.hazmat.primitives.keywrap import InvalidUnwrap
        from pyiosbackup.keybag import Keybag
        from pyiosbackup.manifest_plist import ManifestPlist

        plist = dict(manifest_plist)
        lockdown = dict(plist.get("Lockdown") or {})
        # Manifest.db backups are iOS 10 or later; the version decides whether the keybag's
        # DPSL/DPIC stage applies, and every iOS 10.2+ keybag has it
        lockdown.setdefault("ProductVersion", "10.2.1")
        plist["Lockdown"] = lockdown
        if not plist.get("BackupKeyBag"):
            raise InvalidData("the encrypted backup's Manifest.plist has no BackupKeyBag")
        try:
            keybag = Keybag.from_manifest(ManifestPlist(plist), password)
        except InvalidUnwrap:
            raise WrongBackupPassword("wrong iOS backup password") from None
        except Exception as e:
            raise InvalidData(f"the backup's keybag is unreadable ({e.__class__.__name__}: {e})") from None
        return cls(keybag)

    def unwrap(self, wrapped: bytes) -> bytes:
        """A file's (or Manifest.db's) AES key from ``u32le class || wrapped key``."""
        from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

        if len(wrapped) < 4 + 24:
            raise InvalidData("a wrapped key is too short")
        (protection_class,) = struct.unpack_from("<I", wrapped)
        try:
            class_key = self._keybag.get_key(protection_class)
        except KeyError:
            raise InvalidData(f"the keybag has no key for protection class {protection_class}") from None
        try:
            return aes_key_unwrap(class_key, wrapped[4:])
        except InvalidUnwrap:
            raise InvalidData("a file key does not unwrap with the keybag (damaged metadata)") from None

    def decrypt_database(self, chunks: Iterable[bytes], manifest_key: bytes) -> Iterator[bytes]:
        """Manifest.db: AES-256-CBC, zero IV, no padding (sqlite pages are whole blocks)."""
        dec = _cbc_decryptor(self.unwrap(manifest_key))
        for chunk in chunks:
            out = dec.update(chunk)
            if out:
                yield out
        try:
            tail = dec.finalize()
        except ValueError:
            raise InvalidData("the encrypted Manifest.db is not a whole number of AES blocks") from None
        if tail:
            yield tail

    def decrypt_file(self, chunks: Iterable[bytes], wrapped_key: bytes, size: int) -> Iterator[bytes]:
        """A payload: AES-256-CBC, zero IV, PKCS7 padding (checked and removed), trimmed to the
        recorded ``size`` when it is shorter. Streams; holds back the last block only."""
        dec = _cbc_decryptor(self.unwrap(wrapped_key))
        held = b""
        emitted = 0

        def emit(data: bytes) -> bytes:
            nonlocal emitted
            if size > 0:
                data = data[: max(0, size - emitted)]
            emitted += len(data)
            return data

        for chunk in chunks:
            out = dec.update(chunk)
            if not out:
                continue
            buf = held + out if held else out
            held = buf[-_AES_BLOCK:]
            body = emit(buf[:-_AES_BLOCK])
            if body:
                yield body
        try:
            held += dec.finalize()
        except ValueError:
            raise InvalidData("the encrypted file is not a whole number of AES blocks") from None
        if not held:
            if size:
                raise InvalidData(f"the encrypted file is empty, its metadata says {size} bytes")
            return
        pad = held[-1]
        if not 1 <= pad <= _AES_BLOCK or held[-pad:] != bytes((pad,)) * pad:
            raise InvalidData("the file does not decrypt with its key (bad padding)")
        last = emit(held[:-pad])
        if last:
            yield last


def _cbc_decryptor(key: bytes):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.CBC(b"\0" * _AES_BLOCK)).decryptor()


class BackupKeyring:
    """Keybags unlocked during one command: the password is asked for once, when the first
    encrypted snapshot needs it, and each distinct keybag is unlocked once."""

    def __init__(self, password: Callable[[], str]) -> None:
        self._password_source = password
        self._password: str | None = None
        self._unlocked: dict[bytes, BackupKeys] = {}
        self._lock = threading.Lock()

    def keys_for(self, manifest_plist: dict) -> BackupKeys:
        bag = bytes(manifest_plist.get("BackupKeyBag") or b"")
        digest = hashlib.sha256(bag).digest()
        with self._lock:
            keys = self._unlocked.get(digest)
            if keys is None:
                if self._password is None:
                    self._password = self._password_source()
                keys = self._unlocked[digest] = BackupKeys.unlock(manifest_plist, self._password)
            return keys
