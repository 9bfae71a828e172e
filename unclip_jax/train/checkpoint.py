"""Checkpoints: orbax ``CheckpointManager`` behind one small class, plus params-only exports.

A train checkpoint ``DIR/checkpoints/<step>/`` holds two items:

* ``state`` — the ``TrainState`` (step, params, EMA params, optimizer state, PRNG key),
  written shard by shard by every process (multi-host safe);
* ``meta``  — a small JSON dict: ``{"step", "data": <iterator position>, "config"}``.

Saves are asynchronous (training continues while files are written) and atomic (a
step directory appears only once complete), the last ``keep`` are kept, and restoring
takes target shardings, so a checkpoint written on 8 devices restores onto 2 or onto
another mesh shape. A state whose parameters are not all finite is never written.

A params-only export ``DIR/`` (``params/`` + ``config.json``) is what the sampler loads.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from unclip_jax.train import optim


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter that is NaN or infinite."""


_finite_jit = jax.jit(optim.all_finite)


def check_finite_params(state) -> None:
    """Raises ``NonFiniteError`` if the params or EMA params hold a NaN/inf."""
    trees = {"params": state.params}
    if state.ema_params is not None:
        trees["ema_params"] = state.ema_params
    for name, tree in trees.items():
        if not bool(_finite_jit(tree)):
            raise NonFiniteError(f"refusing to checkpoint step {int(state.step)}: {name} "
                                 "contain NaN or inf values")


class Checkpointer:
    """Saves and restores train states in ``directory`` (one sub-directory per step)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            enable_async_checkpointing=async_save, create=True,
            # Leftovers of a save killed mid-way are removed rather than read.
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state, meta: Mapping[str, Any], *, wait: bool = False) -> int:
        """Starts writing ``state`` at its step (returns at once unless ``wait``).

        Raises:
          NonFiniteError: the parameters are not all finite; nothing is written.
        """
        check_finite_params(state)
        step = int(state.step)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)
        if wait:
            self._manager.wait_until_finished()
        return step

    def restore(self, target, step: int | None = None):
        """``(state, meta)`` at ``step`` (default: latest) onto ``target``'s shardings.

        Args:
          target: the abstract state, ``ShapeDtypeStruct`` leaves carrying the shardings of
            the *current* mesh (``state.abstract_with_shardings``).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def read_meta(self, step: int | None = None) -> dict:
        """Only the JSON ``meta`` item (config, data position) of a checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract_from_metadata(tree_metadata, sharding_fn):
    def one(m):
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding_fn(m.shape))
    return jax.tree_util.tree_map(one, tree_metadata)


def _default_sharding(shape):
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def export_params(directory: str, params, config: Mapping[str, Any] | None = None) -> str:
    """Writes a params-only checkpoint: ``directory/params`` and ``directory/config.json``."""
    directory = os.path.abspath(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), params, force=True)
        ckptr.wait_until_finished()
    if config is not None and jax.process_index() == 0:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(_jsonable(config), f, indent=2)
    return directory


def load_params(directory: str, shardings=None):
    """Loads an ``export_params`` checkpoint.

    Args:
      shardings: a pytree of shardings matching the params, or a function
        ``shape -> Sharding``; default: everything on the first local device.
    """
    path = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no params-only checkpoint at {directory} (expected {path})")
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(path).item_metadata.tree
        return ckptr.restore(path, _target(metadata, shardings))


def _target(metadata, shardings):
    if shardings is None or callable(shardings):
        return _abstract_from_metadata(metadata, shardings or _default_sharding)
    return jax.tree_util.tree_map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), metadata, shardings)


def load_params_from_train_checkpoint(directory: str, step: int | None = None, *,
                                      ema: bool = True, shardings=None):
    """The (EMA) parameters of a train checkpoint, without reading the optimizer state.

    Args:
      directory: the checkpoints directory (``WORKDIR/checkpoints``).
      ema: the EMA parameters if the run kept them, else the raw parameters.
    """
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    tree = manager.item_metadata(step).state
    key = "ema_params" if ema and tree.get("ema_params") else "params"
    target = {key: _target(tree[key], shardings)}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
    manager.close()
    return restored.state[key]


def _jsonable(config) -> Any:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))
