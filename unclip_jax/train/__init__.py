"""The generic trainer: one loop for every stage (clip, prior, decoder, upsampler).

* ``stage``      — the ``Stage`` interface, ``register_stage``/``get_stage``, ``base_config``;
* ``state``      — ``TrainState`` and shape-first sharded initialisation;
* ``optim``      — AdamW, schedules, weight-decay mask, EMA;
* ``checkpoint`` — orbax checkpoints (train state) and params-only exports;
* ``metrics``    — metrics.jsonl, TensorBoard, progress bar, MFU;
* ``loop``       — ``Trainer`` (compiled pieces) and ``train(config, workdir)``.

Only ``stage`` is imported eagerly (config files import ``base_config``); the rest load
on first attribute access, so importing this package stays cheap.
"""

import importlib

from unclip_jax.train.stage import Stage, base_config, get_stage, register_stage  # noqa: F401

_LAZY = {
    "train": ("unclip_jax.train.loop", "train"),
    "Trainer": ("unclip_jax.train.loop", "Trainer"),
    "TrainState": ("unclip_jax.train.state", "TrainState"),
    "Checkpointer": ("unclip_jax.train.checkpoint", "Checkpointer"),
    "export_params": ("unclip_jax.train.checkpoint", "export_params"),
    "load_params": ("unclip_jax.train.checkpoint", "load_params"),
    "load_params_from_train_checkpoint": ("unclip_jax.train.checkpoint",
                                          "load_params_from_train_checkpoint"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'unclip_jax.train' has no attribute {name!r}")
