"""Writing generated images: per-image PNGs, a grid, and a manifest of what made them."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (N, H, W, C) float -> uint8 in [0, 255], as diffusers' (x/2+0.5).clamp(0,1)."""
    images = np.asarray(images, np.float32)
    return np.round(np.clip(images / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2,
              background: int = 255) -> np.ndarray:
    """Tiles uint8 (N, H, W, C) images into one (rows·(H+pad)+pad, cols·(W+pad)+pad, C) image."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"make_grid wants a non-empty (N, H, W, C) batch, got shape {images.shape}")
    n, h, w, c = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), background, np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = image
    return grid


def save_images(out_dir: str, images: np.ndarray, records: Sequence[dict[str, Any]],
                settings: dict[str, Any], prefix: str = "image") -> dict[str, Any]:
    """Writes one PNG per image, ``grid.png`` and ``manifest.json``; returns the manifest.

    Args:
      images: uint8 (N, H, W, 3).
      records: one dict per image (prompt, seed, ...); the file name is added.
      settings: the sampling settings shared by all images (steps, guidance, checkpoint).
    """
    images = np.asarray(images)
    if len(records) != len(images):
        raise ValueError(f"{len(images)} images but {len(records)} records")
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for i, (image, record) in enumerate(zip(images, records)):
        name = f"{prefix}_{i:04d}.png"
        Image.fromarray(image).save(os.path.join(out_dir, name))
        entries.append({**record, "file": name})
    Image.fromarray(make_grid(images)).save(os.path.join(out_dir, "grid.png"))
    manifest = {"settings": settings, "images": entries, "grid": "grid.png"}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest
