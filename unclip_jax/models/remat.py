"""Rematerialisation policies by name, for the prior's and the UNets' remat'd blocks.

``jax.checkpoint`` keeps what a policy marks saveable and recomputes the rest in the
backward pass. A block's FLOPs sit in its matmuls and convolutions, its memory traffic in
norms and activations, so keeping the heavy ops' outputs and recomputing the cheap ones
buys most of the speed of no remat for a fraction of its memory.
"""

from __future__ import annotations

import jax

_dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _convs_and_dots(prim, *avals, **params) -> bool:
    return prim.name == "conv_general_dilated" or _dots(prim, *avals, **params)


POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing, recompute the whole block
    # matmuls without batch dimensions are the Dense layers (attention's batched products
    # are recomputed)
    "dots": _dots,
    # and the convolutions too (UNet blocks): only norms, activations, adds and attention's
    # core are recomputed
    "convs": _convs_and_dots,
}


def remat_policy(name: str):
    """``jax.checkpoint`` policy of a ``remat_policy`` name ("full", "dots" or "convs")."""
    if name not in POLICIES:
        raise ValueError(f"remat_policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]
