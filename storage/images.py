"""Tile image bytes: HxWx3 uint8 arrays to PNG/JPEG/WebP and back (Pillow).

``png`` and ``webp-lossless`` keep every pixel; ``jpg`` and ``webp`` (quality 95) are lossy.
A format's file extension (the shard member's) is ``image_extension(fmt)``: ``webp-lossless`` is ``.webp``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("png", "jpg", "webp", "webp-lossless")
LOSSLESS_FORMATS = ("png", "webp-lossless")
# What decoding untrusted bytes may raise: not an image, truncated, a decompression bomb (more
# pixels than Pillow's MAX_IMAGE_PIXELS), a pixel format with no faithful 8-bit RGB form.
UNREADABLE_IMAGE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "webp-lossless": "WEBP"}


def image_extension(fmt: str) -> str:
    """The file extension of format ``fmt`` (``"webp-lossless"`` -> ``"webp"``)."""
    return fmt.removesuffix("-lossless")


def check_image(array: np.ndarray) -> None:
    """Raise ValueError unless ``array`` is an HxWx3 uint8 RGB image."""
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        shape = getattr(array, "shape", None)
        dtype = getattr(array, "dtype", type(array).__name__)
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {shape} dtype {dtype}")


def encode_image(array: np.ndarray, fmt: str = "png", *, quality: int = 95) -> bytes:
    """Encode an HxWx3 uint8 array; PNG is lossless and deterministic (same array, same bytes)."""
    check_image(array)
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {', '.join(IMAGE_FORMATS)}")
    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(array))
    if fmt == "png":
        # No optimize pass and no metadata chunks: output depends on the pixels alone.
        image.save(buf, format="PNG", compress_level=6, optimize=False)
    elif fmt == "webp-lossless":
        image.save(buf, format="WEBP", lossless=True, quality=80, method=4, exact=True)
    else:
        image.save(buf, format=_PIL_FORMAT[fmt], quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/WebP bytes to an HxWx3 uint8 RGB array.

    16-bit greyscale keeps its top 8 bits (Pillow's own convert would clip it to 255, a white
    tile); 32-bit integer and float images have no agreed 8-bit scale and are refused.
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in _16_BIT_MODES:
            grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if image.mode in ("I", "F"):
            raise ValueError(f"{image.mode!r} ({'32-bit integer' if image.mode == 'I' else 'float'}) images are not supported; "
                             "use 8-bit or 16-bit images")
        return np.asarray(image.convert("RGB")).copy()
