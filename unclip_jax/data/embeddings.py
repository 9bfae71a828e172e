"""Precomputed CLIP embeddings in the clip-retrieval layout, random access.

Layout under ``path`` (clip-retrieval writes the first two; the per-token text
encodings that a Karlo-style prior attends to sit beside them the same way)::

    img_emb/img_emb_0.npy          (N0, D)      image embeddings z_i
    img_emb/img_emb_1.npy          (N1, D)
    text_emb/text_emb_0.npy        (N0, D)      text embeddings z_t
    text_hidden/text_hidden_0.npy  (N0, L, Dh)  per-token text encodings (final LN)
    text_mask/text_mask_0.npy      (N0, L)      attention mask (bool / 0-1)
    ...

Shard ``k`` of every kind holds the same rows; shards are ordered by the integer ``k``
(``_10`` after ``_9``). Arrays may be float16 (as clip-retrieval stores them); examples
are float32. Files are opened with ``np.load(mmap_mode='r')`` so only the rows read are
paged in. ``text_hidden``/``text_mask`` are optional (``require_hidden=False``).

``source[i]`` → ``{'image_embed': (D,), 'text_embed': (D,), 'text_hidden': (L, Dh),
'text_mask': bool (L,)}``. A shard that cannot be read, or whose kinds disagree in
row count, is left out and counted in ``stats['corrupt_files']``; a row with a
non-finite value is counted once in ``stats['skipped_corrupt']`` and replaced by the
next good row. ``write_embeddings`` produces this layout.
"""

from __future__ import annotations

import bisect
import os
import re
from typing import Any, Mapping

import numpy as np

from unclip_jax.data import DataError

KINDS = ("img_emb", "text_emb", "text_hidden", "text_mask")
EXAMPLE_KEYS = {"img_emb": "image_embed", "text_emb": "text_embed",
                "text_hidden": "text_hidden", "text_mask": "text_mask"}
_NDIM = {"img_emb": 2, "text_emb": 2, "text_hidden": 3, "text_mask": 2}


def _shard_files(path: str, kind: str) -> dict[int, str]:
    folder = os.path.join(path, kind)
    if not os.path.isdir(folder):
        return {}
    pattern = re.compile(rf"^{kind}_(\d+)\.npy$")
    return {int(m.group(1)): os.path.join(folder, name)
            for name in os.listdir(folder) if (m := pattern.match(name))}


class EmbeddingSource:
    """Random-access CLIP embeddings (see the module docstring for the layout).

    Args:
      path: the folder holding ``img_emb/``, ``text_emb/`` [, ``text_hidden/``, ``text_mask/``].
      require_hidden: fail unless per-token ``text_hidden`` and ``text_mask`` exist.
      process_index, process_count: recorded for ``batches``; the source holds all rows.
    """

    def __init__(self, path: str, *, require_hidden: bool = True, process_index: int = 0,
                 process_count: int = 1):
        self.path = path
        self.process_index, self.process_count = process_index, process_count
        if not os.path.isdir(path):
            raise DataError(f"embedding folder {path!r} does not exist")
        files = {kind: _shard_files(path, kind) for kind in KINDS}
        # Per-token encodings need both folders; one without the other is unusable.
        has_hidden = bool(files["text_hidden"] and files["text_mask"])
        if require_hidden and not has_hidden:
            missing = [f"{k}/" for k in ("text_hidden", "text_mask") if not files[k]]
            raise DataError(f"{path!r} has no {' and no '.join(missing)} shards, which this "
                            "source requires (per-token text encodings); set "
                            "require_hidden=False to read image/text embeddings only")
        self.kinds = KINDS if has_hidden else KINDS[:2]
        self.stats = {"skipped_corrupt": 0, "corrupt_files": 0}
        indices = sorted(set().union(*(files[k] for k in self.kinds)))
        checked = sum(len(files[k]) for k in self.kinds)
        self._arrays: list[dict[str, np.ndarray]] = []
        self._paths: list[dict[str, str]] = []
        for index in indices:
            paths = {k: files[k].get(index) for k in self.kinds}
            arrays = self._open_shard(paths)
            if arrays is None:
                self.stats["corrupt_files"] += 1
            elif len(arrays["img_emb"]):
                self._arrays.append(arrays)
                self._paths.append(paths)
        if not self._arrays:
            raise DataError(f"no readable embedding shards found in {path!r} (checked "
                            f"{checked} files of kinds {list(self.kinds)})")
        self._starts = np.cumsum([0] + [len(a["img_emb"]) for a in self._arrays]).tolist()
        self._bad: set[int] = set()
        first = self._arrays[0]
        self.embed_dim = first["img_emb"].shape[1]
        self.text_embed_dim = first["text_emb"].shape[1]
        if has_hidden:
            self.text_len, self.hidden_dim = first["text_hidden"].shape[1:]

    def _open_shard(self, paths: Mapping[str, str | None]) -> dict[str, np.ndarray] | None:
        arrays = {}
        for kind, p in paths.items():
            if p is None:
                return None
            try:
                a = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                return None
            if a.ndim != _NDIM[kind]:
                return None
            arrays[kind] = a
        rows = {len(a) for a in arrays.values()}
        if len(rows) != 1:
            return None
        if self._arrays:  # every shard must match the first one's trailing shapes
            ref = self._arrays[0]
            if any(arrays[k].shape[1:] != ref[k].shape[1:] for k in arrays):
                return None
        if "text_hidden" in arrays and (arrays["text_mask"].shape[1]
                                        != arrays["text_hidden"].shape[1]):
            return None
        return arrays

    def __getstate__(self):
        # Pickled (e.g. to grain worker processes) without the memory maps, which would
        # otherwise be copied in full; they are reopened on arrival.
        state = dict(self.__dict__)
        del state["_arrays"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arrays = [{k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
                        for paths in self._paths]

    def __len__(self) -> int:
        return self._starts[-1]

    def _row(self, index: int) -> dict[str, np.ndarray] | None:
        shard = bisect.bisect_right(self._starts, index) - 1
        arrays, row = self._arrays[shard], index - self._starts[shard]
        out = {}
        for kind, a in arrays.items():
            value = np.asarray(a[row])
            if kind == "text_mask":
                out[EXAMPLE_KEYS[kind]] = value.astype(bool)
            else:
                value = value.astype(np.float32)
                if not np.all(np.isfinite(value)):
                    return None
                out[EXAMPLE_KEYS[kind]] = value
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self)
        index = int(index)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} embeddings")
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            out = self._row(i)
            if out is not None:
                return out
            self._bad.add(i)
            self.stats["skipped_corrupt"] += 1
        raise DataError(f"no finite embedding rows in {self.path!r}")

    def __repr__(self) -> str:
        return f"EmbeddingSource({self.path!r}, rows={len(self)}, kinds={list(self.kinds)})"


def write_embeddings(directory: str, arrays: Mapping[str, Any], shard_size: int = 100_000, *,
                     dtype: Any = None) -> int:
    """Writes ``arrays`` in the layout above; returns the number of shards.

    ``arrays`` maps layout names (``img_emb``, ``text_emb``, ``text_hidden``,
    ``text_mask``) or example names (``image_embed``, ``text_embed``, ...) to arrays with
    the same leading N; ``img_emb`` and ``text_emb`` are required. ``dtype`` (e.g.
    ``np.float16``) casts the float arrays; masks are stored as bool. Refuses to write
    into a kind folder that already holds shards (stale shards would mix in).
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    by_kind: dict[str, np.ndarray] = {}
    inverse = {v: k for k, v in EXAMPLE_KEYS.items()}
    for name, value in arrays.items():
        kind = name if name in KINDS else inverse.get(name)
        if kind is None:
            raise ValueError(f"unknown embedding array {name!r}; use {KINDS} or "
                             f"{tuple(EXAMPLE_KEYS.values())}")
        a = np.asarray(value)
        if a.ndim != _NDIM[kind]:
            raise ValueError(f"{name} must have {_NDIM[kind]} dims, got shape {a.shape}")
        if kind == "text_mask":
            a = a.astype(bool)
        elif dtype is not None:
            a = a.astype(dtype)
        by_kind[kind] = a
    for required in ("img_emb", "text_emb"):
        if required not in by_kind:
            raise ValueError(f"write_embeddings needs {required!r}")
    if ("text_hidden" in by_kind) != ("text_mask" in by_kind):
        raise ValueError("text_hidden and text_mask go together")
    sizes = {k: len(a) for k, a in by_kind.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays disagree in length: {sizes}")
    n = next(iter(sizes.values()))
    num_shards = max(1, -(-n // shard_size))
    for kind in by_kind:
        if _shard_files(directory, kind):
            raise DataError(f"{os.path.join(directory, kind)} already holds {kind} shards; "
                            "write into an empty folder")
    for kind, a in by_kind.items():
        folder = os.path.join(directory, kind)
        os.makedirs(folder, exist_ok=True)
        for s in range(num_shards):
            np.save(os.path.join(folder, f"{kind}_{s}.npy"), a[s * shard_size:(s + 1) * shard_size])
    return num_shards
