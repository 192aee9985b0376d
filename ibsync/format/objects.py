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
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompress(body)
        except zstandard.ZstdError as e:
            raise InvalidData(f"corrupt object: {e}") from e
    raise InvalidData(f"unknown object encoding {encoding}")
