"""Encryption, keyed ids and the password-protected key files.

A repository has one random master key: 32 bytes for AES-256-GCM, 32 bytes keying the BLAKE3
blob ids (so ids do not reveal which known files a repository holds) and a 64-bit seed that
permutes the chunker's gear table (so chunk sizes do not fingerprint known files either).
Each key file wraps the master key under a key derived from one password with Argon2id, so
passwords can be added or changed without touching data.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Protocol

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import InvalidData, RepoError, WrongPassword

NONCE_SIZE = 12
TAG_SIZE = 16
ID_SIZE = 32

# Every command derives the key once, so this cost is paid per command, and its memory is part
# of every command's peak. 32 MiB, 3 passes, 4 lanes is above OWASP's minimum for Argon2id
# (19 MiB, 2 passes) and near restic's scrypt (N=2^15..2^16, r=8: 32-64 MiB); it takes about
# 0.06 s on the 2-core reference machine. The parameters are stored in each key file, so a
# stronger setting can be chosen per key without changing the format.
DEFAULT_KDF = {"name": "argon2id", "memory_kib": 32768, "iterations": 3, "lanes": 4}


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class Cipher(Protocol):
    overhead: int

    def seal(self, data: bytes | memoryview, aad: bytes = b"") -> bytes: ...

    def seal_parts(self, data: bytes | memoryview, aad: bytes = b"") -> tuple[bytes | memoryview, ...]:
        """``seal`` as pieces to write one after the other, sparing a copy of the data."""

    def open(self, data: bytes | memoryview, aad: bytes = b"") -> bytes: ...


class AesGcmCipher:
    """AES-256-GCM with a random 96-bit nonce per message: nonce || ciphertext || tag."""

    overhead = NONCE_SIZE + TAG_SIZE

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, data: bytes | memoryview, aad: bytes = b"") -> bytes:
        return b"".join(self.seal_parts(data, aad))

    def seal_parts(self, data: bytes | memoryview, aad: bytes = b"") -> tuple[bytes, bytes]:
        # Joining nonce and ciphertext would copy every blob while holding the GIL; the pack
        # writer writes the two pieces instead.
        nonce = os.urandom(NONCE_SIZE)
        return nonce, self._aead.encrypt(nonce, data, aad)

    def open(self, data: bytes | memoryview, aad: bytes = b"") -> bytes:
        if len(data) < self.overhead:
            raise InvalidData("ciphertext too short")
        view = memoryview(data)
        try:
            return self._aead.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
        except InvalidTag:
            raise InvalidData("authentication failed: data was altered or belongs elsewhere") from None


class NullCipher:
    """For repositories created with --no-encryption: bytes pass through unchanged."""

    overhead = 0

    def seal(self, data: bytes | memoryview, aad: bytes = b"") -> bytes:
        return bytes(data)

    def seal_parts(self, data: bytes | memoryview, aad: bytes = b"") -> tuple[bytes | memoryview]:
        return (data,)

    def open(self, data: bytes | memoryview, aad: bytes = b"") -> bytes:
        return bytes(data)


@dataclass(frozen=True)
class MasterKey:
    encrypt: bytes
    id_key: bytes
    chunker_seed: int

    @classmethod
    def generate(cls) -> "MasterKey":
        # 62 bits: pyfastcdc shifts the seed left by one in a uint64
        return cls(os.urandom(32), os.urandom(32), (int.from_bytes(os.urandom(8), "little") >> 2) | 1)

    def to_json(self) -> bytes:
        return json.dumps(
            {"encrypt": b64e(self.encrypt), "id": b64e(self.id_key), "chunker_seed": self.chunker_seed}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "MasterKey":
        d = json.loads(data)
        return cls(b64d(d["encrypt"]), b64d(d["id"]), int(d["chunker_seed"]))

    def cipher(self) -> AesGcmCipher:
        return AesGcmCipher(self.encrypt)

    def mac(self, data: bytes) -> str:
        """A tag binding repository metadata (the config) to this key."""
        return blake3.blake3(b"ibsync config mac\x00" + data, key=self.id_key).hexdigest()


class IdHasher(Protocol):
    def __call__(self, data: bytes | memoryview) -> bytes: ...


def keyed_id_hasher(key: bytes) -> IdHasher:
    def blob_id(data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=key, max_threads=1).digest()

    return blob_id


def plain_id_hasher() -> IdHasher:
    def blob_id(data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, max_threads=1).digest()

    return blob_id


def storage_name(data: bytes | memoryview) -> str:
    """Name of an object in storage: BLAKE3 of its stored bytes, so `check` can verify any object
    without the key, and a truncated or altered object never passes for the right one."""
    return blake3.blake3(data).hexdigest()


def derive_kek(password: str, salt: bytes, params: dict) -> bytes:
    if params.get("name") != "argon2id":
        raise RepoError(f"unknown key derivation '{params.get('name')}' in key file")
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    return Argon2id(
        salt=salt,
        length=32,
        iterations=int(params["iterations"]),
        lanes=int(params["lanes"]),
        memory_cost=int(params["memory_kib"]),
    ).derive(password.encode("utf-8"))


def make_key_file(master: MasterKey, password: str, *, meta: dict, kdf: dict | None = None) -> bytes:
    params = dict(kdf or DEFAULT_KDF)
    salt = os.urandom(16)
    kek = derive_kek(password, salt, params)
    sealed = AesGcmCipher(kek).seal(master.to_json(), b"ibsync key")
    doc = {"version": 1, **meta, "kdf": {**params, "salt": b64e(salt)}, "data": b64e(sealed)}
    return json.dumps(doc, indent=1).encode()


def open_key_file(data: bytes, password: str) -> MasterKey:
    """Unwrap a master key; WrongPassword if the password does not fit this key file."""
    try:
        doc = json.loads(data)
        params = dict(doc["kdf"])
        salt = b64d(params.pop("salt"))
        sealed = b64d(doc["data"])
    except (ValueError, KeyError, TypeError) as e:
        raise RepoError(f"malformed key file: {e}") from e
    kek = derive_kek(password, salt, params)
    try:
        plain = AesGcmCipher(kek).open(sealed, b"ibsync key")
    except InvalidData:
        raise WrongPassword("wrong password") from None
    return MasterKey.from_json(plain)
