"""Data: the captioned-shapes dataset with its pixel oracle, and readers for real data.

* ``shapes``     — deterministic captioned 64×64 / 32×32 shapes, held-out combinations,
                   ``ShapesSource`` (random access), ``parse_prompt``.
* ``oracle``     — reads colour / shape / size / position from pixels; ``score``.
* ``tar_shards`` — img2dataset-style ``.tar`` shards, streamed, resumable iterator state.
* ``folders``    — an image folder with same-name ``.txt`` captions (random access).
* ``embeddings`` — precomputed CLIP embeddings (clip-retrieval layout; random access).
* ``images``     — decode / resize / crop to uint8 HWC.
* ``sources``    — ``make_source(config, split=...)``, ``default_data_config(kind)``,
                   ``batches(source, batch_size, seed=..., start_step=...)``.

Examples are dicts of numpy arrays and str (images uint8 HWC, captions str). Readers
skip and count what they cannot read (``source.stats``); a source with nothing
readable raises ``DataError`` when it is made.

``make_source``, ``default_data_config`` and ``batches`` are importable from here; they
load on first use, so ``import unclip_jax.data.shapes`` stays light (no grain).
"""

from __future__ import annotations


class DataError(RuntimeError):
    """Data that cannot be used: no readable sample, a broken layout, a bad split."""


_LAZY = {"make_source": "sources", "default_data_config": "sources", "batches": "sources",
         "first_examples": "sources"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # noqa: PLC0415
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataError", "make_source", "default_data_config", "batches", "first_examples"]
