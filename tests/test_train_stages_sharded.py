"""Each real stage's train step (its :tiny config) on a data=4 x fsdp=2 mesh of 8 fake CPU
devices equals the single-device step: same losses, same parameters after 3 steps."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The last case runs the prior's attention through splash attention (interpreted on CPU), which
# the Trainer shards with shard_map over its mesh.
@pytest.mark.parametrize("config", ["configs/prior.py:tiny", "configs/decoder.py:tiny", "configs/upsampler.py:tiny",
                                    "configs/prior.py:tiny model.attention_impl=splash"])
def test_stage_step_on_8_devices_equals_1_device(config):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-m", "tests.train_scripts.stage_sharded_step", *config.split()], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for a, b in zip(out["losses_1"], out["losses_8"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), out
    # The gradient's size too: clipping and Adam give the same update for a gradient summed
    # over shards instead of averaged, so only its norm shows such an error.
    for a, b in zip(out["grad_norms_1"], out["grad_norms_8"]):
        assert abs(a - b) <= 1e-4 * abs(a), out
    # Parameters: within 5e-6 absolute after 3 AdamW steps that moved them by ~3e-4 (float32
    # reduction order across shards gives ~6e-7); a sharding error (a missing all-reduce, a
    # wrong batch split) moves them by the full update. The script sets Adam's eps so that
    # gradients that are zero up to rounding stay out of this (see its comment).
    assert out["max_abs_update"] > 1e-4, out
    assert out["max_abs_param_diff"] <= 5e-6, out
