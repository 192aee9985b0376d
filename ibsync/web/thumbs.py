"""Thumbnails and previews of a snapshot's photos (JPEG, PNG, HEIC, ...), as JPEG.

Images come from a backup, which anyone who can write a snapshot chooses: the bytes read are
capped before decoding (MAX_IMAGE_BYTES) and so are the pixels (MAX_PIXELS, checked from the
header before anything is decoded), so a "decompression bomb" is refused, not rendered.
Thumbnails are kept in a small in-memory LRU keyed by the file's content, so the photos of a
folder cost one decode each however often the page is shown, and a photo unchanged between
snapshots is not decoded again.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Hashable

from PIL import Image, ImageOps

try:  # HEIC/HEIF (the iPhone's own photo format)
    import pillow_heif
except ImportError:  # pragma: no cover - a dependency; without it HEIC photos simply get no preview
    pass
else:
    pillow_heif.register_heif_opener()

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".heic", ".heif", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
MAX_IMAGE_BYTES = 48 << 20
MAX_PIXELS = 64_000_000
THUMB_SIDE = 160
PREVIEW_SIDE = 1600


class ImageProblem(Exception):
    """Not an image this module renders (unknown format, damaged, too large)."""


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_SUFFIXES


def to_jpeg(data: bytes, max_side: int, *, quality: int = 82) -> bytes:
    """``data`` (any format Pillow or pillow_heif reads) as a JPEG no larger than ``max_side``
    on either side, turned upright as its EXIF orientation says."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageProblem("the image is too large to preview")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            im: Image.Image = opened  # a file-backed image, then the plain images made from it
            w, h = im.size
            if w <= 0 or h <= 0 or w * h > MAX_PIXELS:
                raise ImageProblem(f"the image is too large to preview ({w}x{h} pixels)")
            if im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))  # decode at a reduced scale: much faster
            im = ImageOps.exif_transpose(im)
            im.thumbnail((max_side, max_side))
            if im.mode not in ("RGB", "L"):
                im = _flatten(im)
            out = io.BytesIO()
            im.save(out, "JPEG", quality=quality)
            return out.getvalue()
    except ImageProblem:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # Pillow's "cannot identify"
        raise ImageProblem(f"not an image that can be previewed ({e.__class__.__name__})") from None


def _flatten(im: Image.Image) -> Image.Image:
    """Transparency over white (JPEG has none)."""
    rgba = im.convert("RGBA")
    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return bg


class ThumbnailCache:
    """A bounded LRU of thumbnails (bytes), safe between threads."""

    def __init__(self, max_entries: int = 2000, max_bytes: int = 48 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            got = self._items.get(key)
            if got is not None:
                self._items.move_to_end(key)
            return got

    def put(self, key: Hashable, data: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._items and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
