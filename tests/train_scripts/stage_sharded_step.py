"""Three train steps of a real stage (its ``:tiny`` config) on 1 device and on a
data=4 x fsdp=2 mesh of 8 fake CPU devices, same batch and key; prints JSON with the
largest differences. Run with XLA_FLAGS=--xla_force_host_platform_device_count=8.

    python -m tests.train_scripts.stage_sharded_step configs/prior.py:tiny [override ...]
"""

import json
import sys

import jax
import numpy as np

from unclip_jax import parallel
from unclip_jax.config import load_config
from unclip_jax.train.loop import Trainer

jax.config.update("jax_default_matmul_precision", "highest")


def one_step(config, mesh_shape, batch_np):
    data, fsdp, tensor = mesh_shape
    mesh = parallel.make_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])
    trainer = Trainer(config, None, mesh)
    state, init = trainer.init_state(), None
    init = jax.device_get(state.params)
    losses, grad_norms = [], []
    for _ in range(3):  # the first step has learning rate 0 under warmup
        state, metrics = trainer.step(state, trainer.put_batch(batch_np))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))  # Adam's update hides a gradient's scale
    return losses, grad_norms, init, jax.device_get(state.params)


def main(spec: str, overrides=()) -> dict:
    # Adam's eps at 1e-6 (the prior's own; the UNets use 1e-8): a conv bias that feeds a
    # GroupNorm of one channel per group (the tiny UNets' 32-channel level) has a gradient
    # that is zero in exact arithmetic, ~1e-9 of rounding noise in float32, which eps=1e-8
    # would turn into a full-size update of random sign on each mesh.
    config = load_config(spec, ["train.batch_size=8", "train.grad_accum=1", "optim.eps=1e-6", *overrides])
    trainer = Trainer(config, None, parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    stage = trainer.stage
    source = stage.make_source(config, "train", 0, 1)
    batch_np = stage.preprocess(next(iter(stage.batches(source, 8, seed=0, start_step=0))), config)
    loss_1, grad_norm_1, init, params_1 = one_step(config, (1, 1, 1), batch_np)
    loss_8, grad_norm_8, _, params_8 = one_step(config, (4, 2, 1), batch_np)

    def max_abs(a, b):
        return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))), a, b)))
    # The 8-device parameters must differ from the 1-device ones far less than the steps moved them.
    return {"losses_1": loss_1, "losses_8": loss_8, "grad_norms_1": grad_norm_1, "grad_norms_8": grad_norm_8,
            "max_abs_param_diff": max_abs(params_1, params_8),
            "max_abs_update": max_abs(init, params_1)}


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    json.dump(main(sys.argv[1], sys.argv[2:]), sys.stdout)
