"""zstd compression of blobs and metadata, with one compressor context per thread."""

from __future__ import annotations

import threading

import zstandard

from ..errors import InvalidData

# Photos and videos are most of a phone's bytes and never shrink; storing a chunk raw unless
# zstd saves at least 1/32 of it keeps restore from decompressing what gained nothing.
MIN_SAVING_FRACTION = 32


class Compressor:
    def __init__(self, level: int = 3) -> None:
        self.level = level
        self._local = threading.local()

    def _c(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return c

    def _d(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def compress(self, data: bytes | memoryview) -> bytes | None:
        """The zstd frame, or None when compression does not pay."""
        out = self._c().compress(data)
        if len(out) > len(data) - len(data) // MIN_SAVING_FRACTION:
            return None
        return out

    def decompress(self, data: bytes | memoryview, raw_length: int, *, at_most: bool = False) -> bytes:
        """The frame's content: exactly ``raw_length`` bytes (a blob's recorded length), or with
        ``at_most`` no more than that (an object, whose length nothing records)."""
        try:
            # zstd allocates the size a frame states, whatever max_output_size says: a frame
            # claiming more than the caller allows is refused before it costs memory
            stated = zstandard.frame_content_size(data)  # -1: not stated
            if stated > raw_length or (not at_most and stated not in (-1, raw_length)):
                bound = "allowed" if at_most else "expected"
                raise InvalidData(f"zstd frame states {stated} bytes, {raw_length} {bound}")
            out = self._d().decompress(data, max_output_size=raw_length)
        except zstandard.ZstdError as e:
            raise InvalidData(f"corrupt zstd frame: {e}") from e
        if not at_most and len(out) != raw_length:
            raise InvalidData(f"zstd frame gave {len(out)} bytes, {raw_length} expected")
        return out
