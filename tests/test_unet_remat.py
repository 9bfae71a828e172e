"""UNet rematerialisation policies: same gradients, less recompute with 'convs'."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxpr_counts import primitive_counts
from unclip_jax.models.unet import UNet


def _unet(**options) -> UNet:
    return UNet(in_channels=3, out_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,), mid_attention=True, head_channels=8, context_dim=None,
                added_embedding=False, num_groups=8, **options)


def test_remat_policies_change_recompute_not_gradients():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    t = jnp.asarray([3.0, 700.0])
    params = _unet().init(jax.random.key(0), x, t)["params"]
    convs, grads = {}, {}
    for name, options in {"none": {}, "full": dict(remat=True),
                          "convs": dict(remat=True, remat_policy="convs")}.items():
        model = _unet(**options)
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, t) ** 2)
        convs[name] = primitive_counts(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)["conv_general_dilated"]
        grads[name] = jax.jit(jax.grad(loss))(params)
    # Full remat runs every block's convolutions again in the backward pass; 'convs' keeps
    # their outputs and recomputes none.
    assert convs["none"] == convs["convs"] < convs["full"]
    for name in ("full", "convs"):
        for a, b in zip(jax.tree_util.tree_leaves(grads[name]), jax.tree_util.tree_leaves(grads["none"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="remat_policy"):
        _unet(remat=True, remat_policy="everything").init(jax.random.key(0), x, t)
