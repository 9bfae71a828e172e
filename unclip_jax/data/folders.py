"""Image–caption pairs from a folder: ``a.jpg`` + ``a.txt`` side by side, random access.

Every ``jpg jpeg png webp`` file under ``path`` (recursively, sorted by relative path)
whose same-stem ``.txt`` exists in the same folder is one example; images without a
caption are counted in ``stats['missing_caption']`` and left out. Indices are stable
for a fixed folder content, so the source shards across processes like any
random-access source (grain ``RandomAccessDataSource`` protocol: ``__len__``,
``__getitem__``).

An image that does not decode is counted once in ``stats['skipped_corrupt']`` and
replaced by the next decodable example (index + 1, wrapping), so every index yields
an example. A folder with no decodable pair fails when the source is made.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from unclip_jax.data import DataError
from unclip_jax.data import images


def list_pairs(path: str) -> tuple[list[tuple[str, str]], int]:
    """([(image path, caption path), ...] sorted, number of images without caption)."""
    if not os.path.isdir(path):
        raise DataError(f"image folder {path!r} does not exist or is not a directory")
    pairs, missing = [], 0
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        names = set(files)
        for name in sorted(files):
            if images.image_extension(name) is None:
                continue
            caption = name.rsplit(".", 1)[0] + ".txt"
            if caption in names:
                pairs.append((os.path.join(root, name), os.path.join(root, caption)))
            else:
                missing += 1
    return pairs, missing


class FolderSource:
    """Random-access pairs of a folder: ``source[i]`` → ``{'image': uint8 (S, S, 3),
    'caption': str, 'key': str (relative path without extension)}``.

    Args:
      path: the folder.
      image_size: side S; shortest side resized to S, then cropped.
      crop: 'center', or 'random' (offset drawn from (seed, index), or from the rng
        given to ``example``).
      seed: seed of the random crops of ``source[i]``.
      process_index, process_count: recorded for ``batches`` (which gives each process
        its slice of every global batch); the source itself holds all examples.
    """

    def __init__(self, path: str, *, image_size: int = 64, crop: str = "center", seed: int = 0,
                 process_index: int = 0, process_count: int = 1):
        if crop not in images.CROPS:
            raise ValueError(f"crop must be one of {images.CROPS}, got {crop!r}")
        self.path, self.image_size, self.crop, self.seed = path, int(image_size), crop, int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.pairs, missing = list_pairs(path)
        self.stats = {"skipped_corrupt": 0, "missing_caption": missing}
        self._bad: set[int] = set()
        for i in range(len(self.pairs)):
            if self._load(i, None) is not None:
                break
        else:
            raise DataError(f"no decodable image/caption pairs found in {path!r} (checked "
                            f"{len(self.pairs)} pairs; {missing} images had no .txt caption)")
        self.stats["skipped_corrupt"] = 0  # the probe's failures count again when read

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int, rng: np.random.Generator | None) -> dict[str, Any] | None:
        image_path, caption_path = self.pairs[index]
        try:
            image = images.load_image(image_path, self.image_size,
                                      crop=self.crop if rng is not None else "center", rng=rng)
            with open(caption_path, "rb") as f:
                caption = f.read().decode("utf-8", errors="replace").strip()
        except (images.CorruptImage, OSError):
            return None
        key = os.path.splitext(os.path.relpath(image_path, self.path))[0]
        return {"image": image, "caption": caption, "key": key}

    def example(self, index: int, *, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Example ``index`` with random crops from ``rng`` (default: from (seed, index))."""
        n = len(self.pairs)
        index = int(index)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        if rng is None and self.crop == "random":
            rng = np.random.default_rng([self.seed, index])
        if self.crop != "random":
            rng = None
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            out = self._load(i, rng)
            if out is not None:
                return out
            self._bad.add(i)
            self.stats["skipped_corrupt"] += 1
        raise DataError(f"no decodable image/caption pairs left in {self.path!r} "
                        f"(checked {n} pairs)")

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(index)

    def __repr__(self) -> str:
        return f"FolderSource({self.path!r}, examples={len(self)}, image_size={self.image_size})"
