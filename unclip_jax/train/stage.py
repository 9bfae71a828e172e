"""The interface through which a stage (clip, prior, decoder, upsampler) plugs into the trainer.

A stage is a ``Stage`` subclass registered under a name::

    @register_stage("prior")
    class PriorStage(Stage):
        def init_params(self, key, config): ...
        def loss_fn(self, params, batch, key, config, *, train): ...
        def make_source(self, config, split, process_index, process_count): ...
        def preprocess(self, examples, config): ...
        def flops_per_example(self, config): ...

and ``config.stage = "prior"`` selects it (``get_stage`` imports
``unclip_jax.stages.<name>`` on first use, so the stage module registers itself).
``config.stage = "some.module:name"`` imports ``some.module`` first (research code,
tests).

Config convention — every stage config file starts from ``base_config()`` and fills in:

* ``config.stage``  — the registered stage name;
* ``config.model``  — model hyper-parameters; always has ``dtype`` (compute dtype,
  'float32' | 'bfloat16'; parameters stay float32) and ``remat`` (rematerialise blocks);
* ``config.data``   — the data section (``unclip_jax.data.default_data_config(kind)``);
* ``config.train``  — batch_size (global, per optimizer step), steps, log_every,
  ckpt_every, keep_ckpts, eval_every, sample_every (0 = never), grad_accum (microbatches
  per step), skip_nonfinite, seed;
* ``config.optim``  — lr, warmup, schedule ('cosine' | 'linear' | 'constant'),
  end_lr_factor, b1, b2, eps, weight_decay, no_decay_regex, clip_norm (0 = off),
  ema_decay (0 = no EMA copy), ema_warmup (decay ramps up from 0.1 over early steps);
* ``config.mesh``   — data, fsdp, tensor axis sizes (one may be -1) and fsdp_min_size.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Mapping

import ml_collections
import numpy as np

Config = ml_collections.ConfigDict


class Stage:
    """What the generic trainer needs from one training stage. Subclass and override.

    Required: ``init_params``, ``loss_fn``, ``make_source``, ``preprocess``.
    Optional: ``flops_per_example`` (MFU), ``sample_grid`` (PNG grids), ``evaluate``,
    ``param_partition_rules`` (tensor parallelism), ``batches`` (the batch iterator).
    """

    name: str = ""

    # -- model ------------------------------------------------------------------------
    def init_params(self, key, config: Config):
        """Initial parameters (a pytree of float32 arrays) from a PRNG ``key``.

        Called under ``jax.eval_shape`` first (shapes only) and then under
        ``jax.jit(out_shardings=...)``, so it must be a pure JAX function of ``key``.
        """
        raise NotImplementedError

    def loss_fn(self, params, batch: Mapping[str, Any], key, config: Config, *,
                train: bool) -> tuple[Any, Mapping[str, Any]]:
        """``(scalar loss, {name: scalar metric})`` for one (micro)batch; pure JAX.

        ``batch`` is the dict that ``preprocess`` made, as global arrays whose leading
        dimension is the (micro)batch. The loss is the mean over the batch, so that
        gradient accumulation over equal microbatches equals the big-batch gradient.
        ``key`` is derived from the run seed and the step (and microbatch index).
        """
        raise NotImplementedError

    def param_partition_rules(self, config: Config) -> list[tuple[str, Any]]:
        """Tensor-parallel rules ``[(regex on 'a/b/kernel' path, PartitionSpec), ...]``.

        Leaves that match no rule are FSDP-sharded by size (see ``parallel.partition_spec``).
        """
        return []

    # -- data -------------------------------------------------------------------------
    def make_source(self, config: Config, split: str, process_index: int, process_count: int):
        """A random-access source of examples for this process (its share of the data)."""
        raise NotImplementedError

    def batches(self, source, batch_size: int, *, seed: int, start_step: int,
                state: dict | None = None) -> Iterator[Any]:
        """Per-process batches of ``batch_size`` raw examples, starting at ``start_step``.

        Resumable: ``batches(..., start_step=s)`` yields exactly what the uninterrupted
        iterator yields from its ``s``-th batch on. If the iterator has ``get_state()``
        (a small JSON-able dict), the trainer stores it in each checkpoint and passes it
        back as ``state`` on resume (streamed sources continue without replaying); it is
        only passed when there is one. Default: ``unclip_jax.data.batches``.
        """
        from unclip_jax import data  # noqa: PLC0415 - lazily: configs import this module
        return data.batches(source, batch_size, seed=seed, start_step=start_step, state=state)

    def preprocess(self, examples, config: Config) -> dict[str, np.ndarray]:
        """Raw examples (what ``batches`` yields) → dict of numpy arrays, batch first.

        Runs on the host, in a background thread (tokenisation, uint8 → float, ...).
        """
        raise NotImplementedError

    # -- accounting and hooks ---------------------------------------------------------
    def prepare_config(self, config: Config, saved: Mapping[str, Any] | None = None) -> None:
        """Fills in values measured from the data, in place, before the run's config.json
        is written (e.g. the prior's ``l2_norm``). ``saved``: the config (JSON dict) stored
        with the checkpoint a run resumes from, or None for a fresh run; a value measured
        then is reused rather than measured again. Deterministic, so every process fills
        in the same. Default: nothing."""

    def flops_per_example(self, config: Config) -> float | None:
        """Training FLOPs (forward + backward, ≈ 3 × forward) per example, or None."""
        return None

    sample_grid: Callable[..., np.ndarray] | None = None
    """Optional ``sample_grid(params, config, key) -> uint8 (N, H, W, 3)`` for generative
    stages; called every ``train.sample_every`` steps with the EMA parameters."""

    evaluate: Callable[..., Mapping[str, float]] | None = None
    """Optional ``evaluate(params, config) -> {name: float}``; called every
    ``train.eval_every`` steps with the EMA parameters (or the parameters without EMA)."""


class FunctionStage(Stage):
    """A ``Stage`` assembled from a stage module's plain functions, so that each module
    (``unclip_jax.stages.decoder``, ...) registers itself without a delegating class:

        register_stage("decoder", FunctionStage(init_params=init_params, loss_fn=loss_fn,
                                                make_source=make_source, preprocess=preprocess))

    The functions take the arguments of the ``Stage`` methods of the same names.
    """

    def __init__(self, *, init_params: Callable, loss_fn: Callable, make_source: Callable,
                 preprocess: Callable, flops_per_example: Callable | None = None,
                 sample_grid: Callable | None = None, evaluate: Callable | None = None):
        self._init_params, self._loss_fn = init_params, loss_fn
        self._make_source, self._preprocess = make_source, preprocess
        self._flops_per_example = flops_per_example
        self.sample_grid, self.evaluate = sample_grid, evaluate

    def init_params(self, key, config: Config):
        return self._init_params(key, config)

    def loss_fn(self, params, batch, key, config: Config, *, train: bool):
        return self._loss_fn(params, batch, key, config, train=train)

    def make_source(self, config: Config, split: str, process_index: int, process_count: int):
        return self._make_source(config, split, process_index, process_count)

    def preprocess(self, examples, config: Config) -> dict[str, np.ndarray]:
        return self._preprocess(examples, config)

    def flops_per_example(self, config: Config) -> float | None:
        return None if self._flops_per_example is None else self._flops_per_example(config)


_REGISTRY: dict[str, Stage] = {}


def register_stage(name: str, stage: Stage | type | None = None):
    """Registers ``stage`` (a ``Stage`` instance or subclass) under ``name``.

    Usable as a decorator on a ``Stage`` subclass: ``@register_stage("prior")``.
    Registering a name again replaces the earlier stage (module reloads).
    """
    def register(obj):
        instance = obj() if isinstance(obj, type) else obj
        if not isinstance(instance, Stage):
            raise TypeError(f"register_stage({name!r}) wants a Stage subclass or instance, "
                            f"got {obj!r}")
        instance.name = name
        _REGISTRY[name] = instance
        return obj

    return register if stage is None else register(stage)


def get_stage(name: str) -> Stage:
    """The stage registered as ``name``; imports its module on first use.

    ``"prior"`` imports ``unclip_jax.stages.prior``; ``"pkg.mod:toy"`` imports ``pkg.mod``
    and looks up ``toy``.
    """
    if not name:
        raise ValueError("config.stage is empty; set it to a registered stage name "
                         "(e.g. 'prior') or 'module.path:name'")
    module, _, stage_name = name.rpartition(":")
    if stage_name not in _REGISTRY:
        target = module or f"unclip_jax.stages.{stage_name}"
        try:
            importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and target.startswith(e.name):
                raise ValueError(f"unknown stage {name!r}: no module {target!r}; registered "
                                 f"stages: {sorted(_REGISTRY)}") from e
            raise
    if stage_name not in _REGISTRY:
        raise ValueError(f"unknown stage {name!r}: {module or 'unclip_jax.stages.' + stage_name} "
                         f"registers none by that name; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[stage_name]


def registered_stages() -> list[str]:
    return sorted(_REGISTRY)


def base_config() -> Config:
    """The sections every stage config shares, with defaults; stage configs extend it."""
    c = ml_collections.ConfigDict()
    c.stage = ""
    c.model = ml_collections.ConfigDict(dict(dtype="float32", remat=False))
    c.data = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64,        # global examples per optimizer step (all microbatches)
        steps=10_000,
        log_every=50,
        ckpt_every=1_000,
        keep_ckpts=3,
        eval_every=0,         # 0 = never
        sample_every=0,       # 0 = never
        grad_accum=1,         # microbatches per step; batch_size must divide evenly
        skip_nonfinite=False,  # True: skip steps with a non-finite loss/gradient; False: stop
        seed=0,
        prefetch=2,           # batches prepared ahead on the host
        # A pretrained directory (an exported pipeline's stage folder, a converted
        # checkpoint: what save_pretrained/save_prior write) whose parameters start the run
        # instead of a random init: fine-tuning. Optimizer moments start at zero; a resumed
        # run reads its own checkpoint and ignores this.
        init_from="",
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4,
        warmup=500,
        schedule="cosine",    # 'cosine' | 'linear' | 'constant' (after linear warmup)
        end_lr_factor=0.0,    # final lr = lr * end_lr_factor
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        # Parameters whose leaf name matches get no weight decay (embedding tables,
        # positional embeddings, norms); so do all 0-/1-D leaves (biases, norm scales).
        no_decay_regex=r"(^|/)[^/]*(embed|norm)[^/]*$",
        clip_norm=1.0,        # 0 = no clipping
        ema_decay=0.9999,     # 0 = no EMA copy of the parameters
        ema_warmup=True,      # decay min(ema_decay, (1+step)/(10+step)): forgets the init early
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, fsdp_min_size=2 ** 14))
    return c
