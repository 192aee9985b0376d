"""A fast reader for the small binary plists a device sends on DeviceLink, with plistlib behind it.

A backup sends one DeviceLink message per file it moves into place (``DLMessageMoveItems``):
at 300,000 files, ``plistlib.loads`` (a BytesIO, a seek and a read per object) was a tenth of
the host's CPU. :func:`loads` parses the binary plists such messages are (arrays, dictionaries,
strings, integers, reals, booleans, data) straight from the bytes with ``struct``.

It is total by deferring, not by guessing: any input it does not fully understand (another
format, a type it leaves out such as dates or UIDs, a short read, an offset or reference out of
range, a reference cycle, a nesting deeper than ``MAX_DEPTH``) is handed to ``plistlib.loads``,
which then parses it or raises exactly as before. What it returns itself is what plistlib
(Python 3.11) returns for the same bytes; ``tests/test_capture_scale.py`` checks that on
generated and mutated messages.
"""

from __future__ import annotations

import plistlib
import struct
from collections.abc import Callable
from typing import Any

_TRAILER = struct.Struct(">6xBBQQQ")
_FMT = {1: "B", 2: "H", 4: "L", 8: "Q"}
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
MAX_DEPTH = 64  # DeviceLink messages nest 3 deep; deeper goes to plistlib


class _Defer(Exception):
    """The fast reader does not handle this input: plistlib decides."""


def loads(data: bytes, fallback: Callable[[bytes], Any] = plistlib.loads) -> Any:
    """``fallback(data)`` (plistlib.loads, or a wrapper of it), faster for binary plists."""
    if data[:8] == b"bplist00":
        try:
            return _Reader(data).top()
        except (_Defer, struct.error, IndexError, ValueError, UnicodeDecodeError, TypeError, RecursionError):
            pass
    return fallback(data)


class _Reader:
    __slots__ = ("data", "offsets", "ref_size", "ref_fmt", "busy", "top_object")

    def __init__(self, data: bytes) -> None:
        if len(data) < 40:
            raise _Defer
        self.data = data
        offset_size, ref_size, count, top, table = _TRAILER.unpack_from(data, len(data) - 32)
        fmt = _FMT.get(offset_size)
        if fmt is None or ref_size not in _FMT or table + count * offset_size > len(data) - 32 or not count:
            raise _Defer
        self.offsets = struct.unpack_from(f">{count}{fmt}", data, table)
        self.ref_size = ref_size
        self.ref_fmt = _FMT[ref_size]
        self.busy: set[int] = set()
        self.top_object = top

    def top(self) -> Any:
        if self.top_object >= len(self.offsets):
            raise _Defer
        return self._object(self.top_object, 0)

    def _bytes(self, pos: int, n: int) -> bytes:
        end = pos + n
        if end > len(self.data):
            raise _Defer  # plistlib reads short here and decides what that means
        return self.data[pos:end]

    def _size(self, low: int, pos: int) -> tuple[int, int]:
        """An object's length from its marker's low nibble (0xF: an integer follows)."""
        if low != 0xF:
            return low, pos
        if pos >= len(self.data):
            raise _Defer
        n = 1 << (self.data[pos] & 0x3)  # as plistlib: the size marker's high nibble is not checked
        raw = self._bytes(pos + 1, n)
        return int.from_bytes(raw, "big"), pos + 1 + n

    def _refs(self, pos: int, n: int) -> tuple[int, ...]:
        raw = self._bytes(pos, n * self.ref_size)
        return struct.unpack(f">{n}{self.ref_fmt}", raw)

    def _object(self, ref: int, depth: int) -> Any:
        if ref >= len(self.offsets) or ref in self.busy or depth > MAX_DEPTH:
            raise _Defer  # out of range (plistlib raises), a cycle (plistlib returns one), too deep
        data = self.data
        pos = self.offsets[ref]
        if pos >= len(data):
            raise _Defer
        token = data[pos]
        high, low = token & 0xF0, token & 0x0F
        pos += 1
        if token == 0x00:
            return None
        if token == 0x08:
            return False
        if token == 0x09:
            return True
        if token == 0x0F:
            return b""
        if high == 0x10:
            if low > 3:
                raise _Defer  # 16-byte and larger integers
            return int.from_bytes(self._bytes(pos, 1 << low), "big", signed=low >= 3)
        if token == 0x22:
            return _F32.unpack(self._bytes(pos, 4))[0]
        if token == 0x23:
            return _F64.unpack(self._bytes(pos, 8))[0]
        if high == 0x40:
            n, pos = self._size(low, pos)
            return self._bytes(pos, n)
        if high == 0x50:
            n, pos = self._size(low, pos)
            return self._bytes(pos, n).decode("ascii")
        if high == 0x60:
            n, pos = self._size(low, pos)
            return self._bytes(pos, n * 2).decode("utf-16be")
        if high == 0xA0:
            n, pos = self._size(low, pos)
            refs = self._refs(pos, n)
            self.busy.add(ref)
            out = [self._object(r, depth + 1) for r in refs]
            self.busy.discard(ref)
            return out
        if high == 0xD0:
            n, pos = self._size(low, pos)
            keys = self._refs(pos, n)
            values = self._refs(pos + n * self.ref_size, n)
            self.busy.add(ref)
            out_d: dict = {}
            for k, v in zip(keys, values):
                key = self._object(k, depth + 1)
                if isinstance(key, (list, dict)):
                    raise _Defer  # unhashable: plistlib raises
                out_d[key] = self._object(v, depth + 1)
            self.busy.discard(ref)
            return out_d
        raise _Defer  # dates, UIDs, sets, unknown markers
