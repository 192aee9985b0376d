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
    def generate(cls) -> MasterKey:
        # 62 bits: pyfastcdc shifts the seed left by one in a uint64
        return cls(os.urandom(32), os.urandom(32), (int.from_bytes(os.urandom(8), "little") >> 2) | 1)

    def to_json(self) -> bytes:
        return json.dumps(
            {"encrypt": b64e(self.encrypt), "id": b64e(self.id_key), "chunker_seed": self.chunker_seed}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> MasterKey:
        d = json.loads(data)
        key = cls(b64d(d["encrypt"]), b64d(d["id"]), int(d["chunker_seed"]))
        if len(key.encrypt) != 32 or len(key.id_key) != 32 or not 0 < key.chunker_seed < 1 << 62:
            raise ValueError("master key fields of the wrong size")
        return key

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


# Bounds on the key derivation a key file may ask for. Anyone who can write the storage can
# plant a key file, and its parameters are derived before we know whether it is ours: without
# bounds one file asking for 64 GiB or a million passes exhausts memory or runs for days.
# The bounds are far above what ibsync writes (32 MiB x 3 passes) and at or above the strongest
# presets in common use: libsodium's "sensitive" (1 GiB x 4 passes), Bitwarden's maximum
# (1 GiB, 10 passes), RFC 9106's second recommendation (64 MiB x 3). The total work
# (memory x passes) is bounded too, at libsodium's sensitive preset: a few seconds on a laptop.
MAX_MEMORY_KIB = 1 << 20  # 1 GiB
MAX_ITERATIONS = 64
MAX_LANES = 64  # RFC 9106 recommends 4; more lanes than cores buys nothing
MAX_WORK_KIB = 4 << 20  # memory_kib x iterations: 1 GiB x 4 passes
SALT_SIZES = range(8, 65)  # Argon2 needs at least 8 bytes; we write 16
MAX_KEY_FILE_SIZE = 64 << 10  # a real key file is about 500 bytes
MAX_SEALED_SIZE = 1024  # the sealed master key is about 170 bytes
# Above this work a derivation runs in a child process: Argon2 here holds the GIL, so in this
# process Ctrl-C and SIGTERM would wait for it to end. The default (96 MiB x passes, about
# 0.06 s) stays in process; only unusual or planted key files pay the child's start-up.
IN_PROCESS_WORK_KIB = 256 << 10


class MalformedKey(RepoError):
    """A key file that cannot be a key file ibsync wrote: skipped, never derived."""


@dataclass(frozen=True)
class KdfParams:
    memory_kib: int
    iterations: int
    lanes: int
    salt: bytes

    @property
    def work(self) -> int:
        return self.memory_kib * self.iterations

    @classmethod
    def from_doc(cls, kdf: object) -> KdfParams:
        """Validate a key file's "kdf" object; MalformedKey for anything outside the bounds."""
        if not isinstance(kdf, dict):
            raise MalformedKey("'kdf' is not an object")
        if kdf.get("name") != "argon2id":
            raise MalformedKey(f"unknown key derivation {str(kdf.get('name'))[:40]!r}")
        memory, iterations, lanes = (
            _bounded_int(kdf, k, hi)
            for k, hi in (("memory_kib", MAX_MEMORY_KIB), ("iterations", MAX_ITERATIONS), ("lanes", MAX_LANES))
        )
        if memory < 8 * lanes:
            raise MalformedKey("memory_kib is below 8 x lanes (Argon2's minimum)")
        if memory * iterations > MAX_WORK_KIB:
            raise MalformedKey(f"memory_kib x iterations exceeds {MAX_WORK_KIB} (1 GiB x 4 passes)")
        salt = _b64_field(kdf, "salt", "kdf.salt")
        if len(salt) not in SALT_SIZES:
            raise MalformedKey(f"salt of {len(salt)} bytes (accepted: {SALT_SIZES.start}..{SALT_SIZES.stop - 1})")
        return cls(memory, iterations, lanes, salt)

    def to_doc(self) -> dict:
        return {
            "name": "argon2id",
            "memory_kib": self.memory_kib,
            "iterations": self.iterations,
            "lanes": self.lanes,
            "salt": b64e(self.salt),
        }


def _bounded_int(doc: dict, key: str, hi: int) -> int:
    value = doc.get(key)
    if type(value) is not int:  # bool is an int too, and "3" is not a number here
        raise MalformedKey(f"{key} is not an integer")
    if not 1 <= value <= hi:
        raise MalformedKey(f"{key} {value} is outside 1..{hi}")
    return value


def _b64_field(doc: dict, key: str, label: str) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str):
        raise MalformedKey(f"{label} is not a string")
    try:
        return b64d(value)
    except ValueError:
        raise MalformedKey(f"{label} is not base64") from None


def derive_kek(password: str, params: KdfParams) -> bytes:
    """The key-encrypting key; in a child process when the work is large (see
    IN_PROCESS_WORK_KIB), so that Ctrl-C and SIGTERM end the command at once."""
    if params.work <= IN_PROCESS_WORK_KIB:
        return _argon2id(password.encode("utf-8"), params)
    return _derive_in_child(password, params)


def _argon2id(password: bytes, params: KdfParams) -> bytes:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    return Argon2id(
        salt=params.salt, length=32, iterations=params.iterations, lanes=params.lanes, memory_cost=params.memory_kib
    ).derive(password)


def _derive_in_child(password: str, params: KdfParams) -> bytes:
    import subprocess
    import sys

    # The password goes through a pipe, never the command line (ps shows that).
    request = json.dumps({"password": password, **params.to_doc()}).encode()
    child = subprocess.Popen(
        [sys.executable, "-c", "from ibsync.format.crypto import derive_child_main; derive_child_main()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        out, _ = child.communicate(request)  # a signal's KeyboardInterrupt is raised here
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0 or len(out) != 64:
        raise RepoError(f"key derivation failed in its helper process (exit status {child.returncode})")
    return bytes.fromhex(out.decode("ascii"))


def derive_child_main() -> None:
    """Entry point of the helper process: read a request on stdin, print the key in hex."""
    import sys

    doc = json.loads(sys.stdin.buffer.read())
    params = KdfParams.from_doc(doc)
    sys.stdout.write(_argon2id(doc["password"].encode("utf-8"), params).hex())


@dataclass(frozen=True)
class KeyFile:
    """A key file's fields, validated but not yet unlocked."""

    kdf: KdfParams
    sealed: bytes

    @classmethod
    def parse(cls, data: bytes) -> KeyFile:
        if len(data) > MAX_KEY_FILE_SIZE:
            raise MalformedKey(f"{len(data)} bytes, more than a key file can be")
        try:
            doc = json.loads(data)
        except ValueError:
            raise MalformedKey("not JSON") from None
        if not isinstance(doc, dict):
            raise MalformedKey("not a JSON object")
        if doc.get("version") != 1:
            raise MalformedKey(f"unknown key file version {str(doc.get('version'))[:20]!r}")
        sealed = _b64_field(doc, "data", "data")
        if not AesGcmCipher.overhead < len(sealed) <= MAX_SEALED_SIZE:
            raise MalformedKey(f"sealed key of {len(sealed)} bytes")
        return cls(KdfParams.from_doc(doc.get("kdf")), sealed)

    def unwrap(self, password: str) -> MasterKey:
        """The master key; WrongPassword if the password does not open this key file."""
        kek = derive_kek(password, self.kdf)
        try:
            plain = AesGcmCipher(kek).open(self.sealed, b"ibsync key")
        except InvalidData:
            raise WrongPassword("wrong password") from None
        try:
            return MasterKey.from_json(plain)
        except (ValueError, KeyError, TypeError) as e:
            raise MalformedKey(f"the unlocked master key is malformed ({e.__class__.__name__})") from None


def make_key_file(master: MasterKey, password: str, *, meta: dict, kdf: dict | None = None) -> bytes:
    chosen = dict(kdf or DEFAULT_KDF)
    # what we write must pass what we accept on reading
    params = KdfParams.from_doc({**chosen, "salt": b64e(os.urandom(16))})
    sealed = AesGcmCipher(derive_kek(password, params)).seal(master.to_json(), b"ibsync key")
    doc = {"version": 1, **meta, "kdf": params.to_doc(), "data": b64e(sealed)}
    return json.dumps(doc, indent=1).encode()


def open_key_file(data: bytes, password: str) -> MasterKey:
    """Unwrap a master key; WrongPassword if the password does not fit this key file,
    MalformedKey if the file is not a key file within the accepted bounds."""
    return KeyFile.parse(data).unwrap(password)
