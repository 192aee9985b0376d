"""The envelope of unpacked objects (snapshots, index) and of blob payloads.

plaintext = u8 encoding (0 raw, 1 zstd) || body
stored    = seal(plaintext, aad = kind)          (the bytes as they are with --no-encryption)
name      = BLAKE3(stored) as 64 hex digits
"""

from __future__ import annotations

from ..errors import InvalidData
from .compress import Compressor
from .crypto import Cipher

RAW = 0
ZSTD = 1
# The largest unpacked object a reader accepts: an index object holds about 100,000 entries
# (4.6 MB), a snapshot a few KB (Compressor.decompress refuses a frame stating more).
MAX_OBJECT_SIZE = 256 << 20


def seal_object(body: bytes, kind: str, cipher: Cipher, compressor: Compressor) -> bytes:
    packed = compressor.compress(body)
    plain = bytes([ZSTD]) + packed if packed is not None else bytes([RAW]) + body
    return cipher.seal(plain, kind.encode())


def open_object(stored: bytes, kind: str, cipher: Cipher, compressor: Compressor) -> bytes:
    plain = cipher.open(stored, kind.encode())
    if not plain:
        raise InvalidData("empty object")
    encoding, body = plain[0], plain[1:]
    if encoding == RAW:
        return body
    if encoding == ZSTD:
        return compressor.decompress(body, MAX_OBJECT_SIZE, at_most=True)
    raise InvalidData(f"unknown object encoding {encoding}")
