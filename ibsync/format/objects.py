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
# (4.6 MB), a snapshot a few KB. A zstd frame states its own size and zstd allocates that much
# whatever the caller's limit, so the stated size is checked before decompressing.
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
        return _decompress(body)
    raise InvalidData(f"unknown object encoding {encoding}")


def _decompress(body: bytes) -> bytes:
    import zstandard

    try:
        stated = zstandard.frame_content_size(body)  # -1: not stated
        if stated > MAX_OBJECT_SIZE:
            raise InvalidData(f"object claims {stated} bytes, more than an object can be")
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_OBJECT_SIZE)
    except zstandard.ZstdError as e:
        raise InvalidData(f"corrupt object: {e}") from e
