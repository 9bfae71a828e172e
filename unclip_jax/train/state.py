"""The train state pytree and its shape-first, sharded initialisation.

Shape-first (big_vision style): ``jax.eval_shape`` gives every leaf's shape without
computing anything, the partition rules turn shapes into shardings, and
``jax.jit(init, out_shardings=...)`` materialises each parameter directly in its
shards — no device ever holds an unsharded copy of the weights.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from unclip_jax import parallel


@flax.struct.dataclass
class TrainState:
    """Everything that a resumed run needs, as one pytree of arrays.

    Attributes:
      step: int32 scalar, optimizer updates done so far (= batches consumed).
      params: the model parameters θ (float32).
      ema_params: exponential moving average of θ, or None when ``optim.ema_decay`` is 0.
      opt_state: the optax state (AdamW moments, step counts).
      rng: uint32 raw key data of the run's root PRNG key; the key of step s is
        ``fold_in(root, s)``, so a resumed run draws the same randomness.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array

    def step_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def make_init_fn(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 use_ema: bool) -> Callable[[jax.Array], TrainState]:
    """``init(key) -> TrainState``; ``key`` is a typed PRNG key."""
    def init(key):
        params_key, run_key = jax.random.split(key)
        return state_from_params(init_params(params_key), run_key, tx, use_ema)
    return init


def state_from_params(params, run_key: jax.Array, tx: optax.GradientTransformation,
                      use_ema: bool) -> TrainState:
    """A step-0 state around ``params`` (fresh or pretrained): EMA = params, zero moments."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        # A separate buffer (not an alias of params): both are donated each step.
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
        opt_state=tx.init(params),
        rng=jax.random.key_data(run_key),
    )


def check_float32_params(abstract_params) -> None:
    """Parameters are stored in float32 (compute dtype is separate); fail early otherwise."""
    bad = [f"{parallel.path_str(p)}: {x.dtype}"
           for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)
           if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32]
    if bad:
        raise ValueError("parameters must be float32 (set config.model.dtype for the compute "
                         "dtype instead); got " + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))


def state_shardings(abstract_state: TrainState, mesh: Mesh, rules=(), fsdp_min_size: int = 2 ** 14):
    """Shardings for every leaf: parameters, EMA and optimizer moments alike by path/shape."""
    return parallel.tree_shardings(abstract_state, mesh, rules, fsdp_min_size)


def create_train_state(init_fn: Callable[[jax.Array], TrainState], seed: int, mesh: Mesh,
                       rules=(), fsdp_min_size: int = 2 ** 14):
    """Returns ``(state, shardings, abstract_state)``: the state built shard by shard."""
    key = jax.random.key(seed)
    abstract = jax.eval_shape(init_fn, key)
    check_float32_params(abstract.params)
    shardings = state_shardings(abstract, mesh, rules, fsdp_min_size)
    state = jax.jit(init_fn, out_shardings=shardings)(key)
    return state, shardings, abstract


def abstract_with_shardings(abstract_state, shardings):
    """``ShapeDtypeStruct`` leaves carrying their target sharding (restore targets)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
