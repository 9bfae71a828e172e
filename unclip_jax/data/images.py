"""Image decoding and resizing for the real-data readers: bytes → uint8 (S, S, 3).

``load_image`` decodes JPEG / PNG / WebP with PIL (EXIF orientation applied,
transparency composited on white, RGB), resizes the shortest side to S (bicubic,
antialiased) and crops an S × S square: the centre, or a random one along the longer
side. Anything that fails raises ``CorruptImage``, which the readers count and skip.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from unclip_jax.data import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CROPS = ("center", "random")


class CorruptImage(DataError):
    """Bytes that PIL cannot decode into an image (truncated, not an image, too large)."""


def _open(data: bytes | str | os.PathLike, draft_size: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning becomes an error: such a file is not a sample.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
            img = Image.open(src)
            if draft_size and img.format == "JPEG":
                # JPEG DCT scaling: decode at the smallest scale still >= the target size.
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                                            rgba)
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise CorruptImage(f"cannot decode image: {type(e).__name__}: {e}") from e


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    """An RGB PIL image from encoded bytes or a path; ``CorruptImage`` if undecodable."""
    return _open(data, None)


def check_crop(crop: str, rng: np.random.Generator | None = None) -> None:
    """Raises ValueError for an unknown crop mode, or 'random' without an rng."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng")


def resize_and_crop(img: Image.Image, size: int, *, crop: str = "center",
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Shortest side → ``size`` (bicubic), then an S × S crop; uint8 (size, size, 3).

    ``crop='random'`` draws the offset along the longer side from ``rng`` (required).
    """
    check_crop(crop, rng)
    w, h = img.size
    if w < 1 or h < 1:
        raise CorruptImage(f"empty image of size {w}x{h}")
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    if crop == "center":
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left = int(rng.integers(0, new_w - size + 1))
        top = int(rng.integers(0, new_h - size + 1))
    out = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return out.reshape(size, size, 3)


def load_image(data: bytes | str | os.PathLike, size: int, *, crop: str = "center",
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Decode + resize + crop: uint8 (size, size, 3). Raises ``CorruptImage``."""
    check_crop(crop, rng)
    img = _open(data, size)
    try:
        return resize_and_crop(img, size, crop=crop, rng=rng)
    except OSError as e:
        raise CorruptImage(f"cannot resize image: {e}") from e


def image_extension(name: str) -> str | None:
    """The lower-case image extension of a file name if it is one we read, else None."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext if ext in IMAGE_EXTENSIONS else None
