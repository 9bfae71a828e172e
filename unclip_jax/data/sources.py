"""One entry point for training data: ``make_source(config.data, split=...)`` and ``batches``.

The data section of a stage config is ``default_data_config(kind)`` (every key, for every
kind, so configs stay locked and overridable from the command line):

===================  ==========  ==================================================
key                  default     meaning
===================  ==========  ==================================================
kind                 'shapes'    'shapes' | 'tar' | 'folder' | 'embeddings'
path                 ''          tar: folder of ``*.tar`` / glob / file / comma list;
                                 folder: image folder; embeddings: layout root
eval_path            ''          the same for every split but 'train' (not shapes)
image_size           64          side S of the uint8 (S, S, 3) images
crop                 'center'    'center' | 'random' (tar, folder)
shuffle              True        batches: shuffled order (random access); tar: shard
                                 order and shuffle buffer
shuffle_buffer       1000        tar: samples held for shuffling (≤ 1: stream order)
num_epochs           0           tar: passes over the shards (0 = forever)
num_examples         100_000     shapes: length of the 'train' split
num_eval_examples    2_000       shapes: length of the 'test' and 'heldout' splits
dataset_seed         0           shapes: which images exist (not the shuffling seed)
require_hidden       True        embeddings: text_hidden/text_mask must exist
shape_twins          False       shapes, train split: each item = an image + its shape twin
two_object_fraction  0.4         shapes, train split: share of two-object images
colorless_captions   0.0         shapes, train split: share of captions without colours
unnamed_colors       0.0         shapes, train split: share of images in colours outside
                                 the vocabulary, captioned without colours
===================  ==========  ==================================================

Splits: shapes has 'train', 'test' (alias 'eval', 'val', 'validation') and 'heldout'
(see ``shapes``); the readers use ``path`` for 'train' and ``eval_path`` otherwise.

``batches(source, batch_size, seed=..., start_step=s)`` yields this process's batches of
``batch_size`` examples (stacked: arrays → (B, ...), str → list) and is exact on resume:

* random-access sources (shapes, folder, embeddings): the global example stream is
  epoch after epoch of a permutation of [0, N) drawn from (seed, epoch) (grain's
  ``index_shuffle``, O(1) memory); global batch g = batch_size × process_count takes
  stream positions [s g, (s+1) g) and process p the p-th slice of it. Step s is a pure
  function of (seed, s), so ``start_step=s`` continues exactly.
* tar sources stream: each process reads its own shards. ``get_state()`` of the
  returned iterator holds the tar position; ``batches(..., state=saved)`` resumes
  exactly at once. ``start_step=s`` without a state also resumes exactly, by replaying
  (decoding) the first s × batch_size samples — slow on big runs, so save the state.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np
from grain.experimental import index_shuffle

from unclip_jax.config import ConfigError
from unclip_jax.data import DataError
from unclip_jax.data import embeddings as embeddings_lib
from unclip_jax.data import folders, images, shapes, tar_shards

KINDS = ("shapes", "tar", "folder", "embeddings")
_SHAPES_SPLITS = {"train": "train", "test": "test", "eval": "test", "val": "test",
                  "validation": "test", "heldout": "heldout"}


def default_data_config(kind: str = "shapes") -> ml_collections.ConfigDict:
    """The data config section with every key (see the module table); ``kind`` set."""
    if kind not in KINDS:
        raise ConfigError(f"unknown data kind {kind!r}; choose one of {KINDS}")
    return ml_collections.ConfigDict(dict(
        kind=kind,
        path="",
        eval_path="",
        image_size=64,
        crop="center",
        shuffle=True,
        shuffle_buffer=1000,
        num_epochs=0,
        num_examples=100_000,
        num_eval_examples=2_000,
        dataset_seed=0,
        require_hidden=True,
        shape_twins=False,
        two_object_fraction=shapes.P_TWO_OBJECTS,
        colorless_captions=0.0,
        unnamed_colors=0.0,
    ))


def _get(config, key: str):
    defaults = default_data_config("shapes")
    return config.get(key, defaults[key]) if hasattr(config, "get") else defaults[key]


def make_source(data_config, *, split: str = "train", process_index: int = 0,
                process_count: int = 1, seed: int = 0):
    """The source of ``split`` for process ``process_index`` of ``process_count``.

    Returns a ``ShapesSource`` / ``FolderSource`` / ``EmbeddingSource`` (random access:
    ``len``, ``[i]``; all N examples, ``batches`` slices per process) or a
    ``TarShardSource`` (a grain ``IterDataset`` over this process's shards). Every
    source has ``stats`` (skip counters to log), ``process_index``, ``process_count``
    and ``shuffle``. ``seed`` seeds random crops (the shuffling seed is ``batches``').
    Raises ``ConfigError`` for a bad key value and ``DataError`` for unusable data.
    """
    kind = _get(data_config, "kind")
    if kind not in KINDS:
        raise ConfigError(f"data.kind={kind!r}: choose one of {KINDS}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    crop = _get(data_config, "crop")
    if crop not in images.CROPS:
        raise ConfigError(f"data.crop={crop!r}: choose one of {images.CROPS}")
    image_size = int(_get(data_config, "image_size"))
    if image_size <= 0:
        raise ConfigError(f"data.image_size={image_size} must be positive")
    proc = dict(process_index=process_index, process_count=process_count)
    twins = bool(_get(data_config, "shape_twins"))
    if twins and kind != "shapes":
        raise ConfigError(f"data.shape_twins needs data.kind='shapes', not {kind!r}")

    # Shares of the shapes train split; the ShapesSource arguments of the same names.
    train_shares = {k: float(_get(data_config, k)) for k in ("two_object_fraction", "colorless_captions",
                                                              "unnamed_colors")}
    for key, share in train_shares.items():
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"data.{key}={share} must be in [0, 1]")
    if kind == "shapes":
        if split not in _SHAPES_SPLITS:
            raise DataError(f"unknown shapes split {split!r}; choose one of "
                            f"{sorted(_SHAPES_SPLITS)}")
        name = _SHAPES_SPLITS[split]
        n = int(_get(data_config, "num_examples" if name == "train" else "num_eval_examples"))
        source = shapes.ShapesSource(name, n, image_size=image_size,
                                     seed=int(_get(data_config, "dataset_seed")),
                                     shape_twins=twins and name == "train", **proc,
                                     **(train_shares if name == "train" else {}))
    else:
        key = "path" if split == "train" else "eval_path"
        path = _get(data_config, key)
        if not path:
            raise ConfigError(f"data.{key} is empty: set it to the {kind} data of split "
                              f"{split!r}")
        if kind == "tar":
            source = tar_shards.TarShardSource(
                path, image_size=image_size, crop=crop,
                shuffle_buffer=int(_get(data_config, "shuffle_buffer")),
                shuffle_shards=bool(_get(data_config, "shuffle")),
                num_epochs=int(_get(data_config, "num_epochs")), seed=seed, **proc)
        elif kind == "folder":
            source = folders.FolderSource(path, image_size=image_size, crop=crop, seed=seed,
                                          **proc)
        else:
            source = embeddings_lib.EmbeddingSource(
                path, require_hidden=bool(_get(data_config, "require_hidden")), **proc)
    source.shuffle = bool(_get(data_config, "shuffle"))
    if kind == "tar" and not source.shuffle:
        source.shuffle_buffer = 1
    return source


def first_examples(source, num: int) -> list[dict[str, Any]]:
    """The first ``num`` examples of a source (fewer if it has fewer): indexed for
    random-access sources, read from the stream for a ``TarShardSource`` (which has no
    ``len`` or ``[i]``). For sample grids and measurements, not for training batches."""
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return [source[i] for i in range(min(int(num), len(source)))]
    return list(itertools.islice(iter(source), int(num)))


# --------------------------------------------------------------------------- batching

def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Example dicts → one dict: arrays and numbers stacked (B, ...), anything else a list."""
    out = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if isinstance(values[0], (np.ndarray, np.generic, bool, int, float)):
            out[key] = np.stack([np.asarray(v) for v in values])
        else:
            out[key] = values
    return out


def _epoch_seed(seed: int, epoch: int) -> int:
    return tar_shards.hash_ints(seed, epoch, 0x5EED) & 0xFFFFFFFF  # index_shuffle takes uint32


class IndexedBatches(Iterator[dict[str, Any]]):
    """Batches of a random-access source; the position is the step (see module doc)."""

    def __init__(self, source, batch_size: int, *, seed: int, start_step: int = 0,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None):
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.shuffle, self.num_epochs = shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.size = len(source)
        if self.size <= 0:
            raise DataError(f"{source!r} is empty")
        self.step = int(start_step)

    def index(self, position: int) -> tuple[int, int]:
        """(example index, epoch) at a global stream position."""
        epoch, j = divmod(int(position), self.size)
        if self.shuffle and self.size > 1:
            j = index_shuffle(j, max_index=self.size - 1, seed=_epoch_seed(self.seed, epoch),
                              rounds=4)
        return j, epoch

    def indices(self, step: int) -> list[int]:
        """This process's example indices of batch ``step``."""
        start = (step * self.process_count + self.process_index) * self.batch_size
        return [self.index(start + k)[0] for k in range(self.batch_size)]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        global_batch = self.batch_size * self.process_count
        if self.num_epochs and (self.step + 1) * global_batch > self.num_epochs * self.size:
            raise StopIteration
        start = (self.step * self.process_count + self.process_index) * self.batch_size
        examples = []
        for k in range(self.batch_size):
            index, epoch = self.index(start + k)
            if hasattr(self.source, "example"):  # per-epoch random crops
                rng = np.random.default_rng([self.seed, epoch, index])
                examples.append(self.source.example(index, rng=rng))
            else:
                examples.append(self.source[index])
        self.step += 1
        return collate(examples)

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise DataError(f"batch state is for batch_size {state['batch_size']}, not "
                            f"{self.batch_size}")
        self.step, self.seed = int(state["step"]), int(state.get("seed", self.seed))


class StreamBatches(Iterator[dict[str, Any]]):
    """Batches of a streamed (tar) source; the position is the source iterator's state."""

    def __init__(self, source, batch_size: int, *, seed: int, start_step: int = 0,
                 state: dict[str, Any] | None = None):
        self.source, self.batch_size = source, int(batch_size)
        self._it = source.iterate(seed)
        self.step = 0
        if state is not None:
            self.set_state(state)
        else:
            for _ in range(int(start_step)):
                self._take()
            self.step = int(start_step)

    def _take(self) -> list[dict[str, Any]]:
        return [next(self._it) for _ in range(self.batch_size)]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        examples = self._take()  # a partial last batch of a finite stream is dropped
        self.step += 1
        return collate(examples)

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "batch_size": self.batch_size, "source": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise DataError(f"batch state is for batch_size {state['batch_size']}, not "
                            f"{self.batch_size}")
        self._it.set_state(state["source"])
        self.step = int(state["step"])

    def close(self) -> None:
        self._it.close()


def batches(source, batch_size: int, *, seed: int, start_step: int = 0,
            state: dict[str, Any] | None = None, shuffle: bool | None = None,
            num_epochs: int | None = None, process_index: int | None = None,
            process_count: int | None = None) -> IndexedBatches | StreamBatches:
    """This process's batches of ``batch_size`` examples from step ``start_step`` on.

    Deterministic and exact on resume (see the module docstring). ``shuffle``,
    ``process_index`` and ``process_count`` default to the source's attributes (set by
    ``make_source``). ``num_epochs`` (random access only) stops before the first batch
    that would pass that many epochs; default: forever. ``state`` (tar only) is a
    ``get_state()`` of an earlier iterator. The returned iterator has ``step``,
    ``get_state()`` and ``set_state()``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(source, tar_shards.TarShardSource):
        return StreamBatches(source, batch_size, seed=seed, start_step=start_step, state=state)
    def default(value, name, fallback):
        return getattr(source, name, fallback) if value is None else value

    it = IndexedBatches(
        source, batch_size, seed=seed, start_step=start_step,
        shuffle=default(shuffle, "shuffle", True),
        process_index=default(process_index, "process_index", 0),
        process_count=default(process_count, "process_count", 1),
        num_epochs=num_epochs)
    if state is not None:
        it.set_state(state)
    return it
