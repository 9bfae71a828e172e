"""Runs the toy stage's train step on several meshes of 8 fake CPU devices; prints JSON.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the test).
For each layout: the loss of 2 steps, the final params, and the partition specs of
a large kernel and of its Adam moment.
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from tests.train_scripts.toy_stage import ToySource, ToyStage, spec_text, toy_batches, toy_config
from unclip_jax import parallel
from unclip_jax.train.loop import Trainer
from unclip_jax.train.stage import register_stage

jax.config.update("jax_default_matmul_precision", "highest")


class TensorToy(ToyStage):
    def param_partition_rules(self, config):
        return [(r"fc2/kernel$", P(None, "tensor")), (r"head/kernel$", P("tensor", None))]


register_stage("toy_tensor", TensorToy)


def run(mesh_shape, grad_accum=1, stage=None, steps=2):
    config = toy_config()
    config.model.input_noise = 0.0  # deterministic: microbatch keys cannot matter
    config.train.grad_accum = grad_accum
    config.train.batch_size = 16
    data, fsdp, tensor = mesh_shape
    devices = jax.devices()[: data * fsdp * tensor]
    mesh = parallel.make_mesh(data, fsdp, tensor, devices=devices)
    trainer = Trainer(config, stage or ToyStage(), mesh)
    state = trainer.init_state()
    source = ToySource(config.data.num_examples, config.data.dim)
    it = toy_batches(source, 16, seed=0, start_step=0, process_index=0, process_count=1)
    losses, grad_norms = [], []
    for _ in range(steps):
        batch = trainer.put_batch(trainer.stage.preprocess(next(it), config))
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    params = jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), jax.device_get(state.params))
    mu = state.opt_state[1][0].mu
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "params": params,
        "fc1_spec": spec_text(state.params["fc1"]["kernel"].sharding.spec),
        "fc1_mu_spec": spec_text(mu["fc1"]["kernel"].sharding.spec),
        "fc2_spec": spec_text(state.params["fc2"]["kernel"].sharding.spec),
        "bias_spec": spec_text(state.params["fc1"]["bias"].sharding.spec),
        "fc1_shard_shape": list(state.params["fc1"]["kernel"].addressable_shards[0].data.shape),
    }


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    out = {
        "single": run((1, 1, 1)),
        "data4_fsdp2": run((4, 2, 1)),
        "data2_fsdp2_tensor2": run((2, 2, 2), stage=TensorToy()),
        "accum2_data4_fsdp2": run((4, 2, 1), grad_accum=2),
        "accum4_single": run((1, 1, 1), grad_accum=4),
    }
    json.dump(out, sys.stdout)
