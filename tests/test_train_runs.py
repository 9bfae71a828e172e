"""Whole training runs in subprocesses (``python train.py ...``) on fake CPU devices:
sharded steps, kill-and-resume across device counts, SIGTERM.

The subprocesses share a JAX compilation cache, so a program compiled by one run is
loaded by the next.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from unclip_jax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=tests/train_scripts/toy_config.py"
STEPS, EXAMPLES, BATCH = 16, 64, 8


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _env(devices, cache_dir):
    env = dict(os.environ)
    # Backend optimisation level 0 halves XLA:CPU compile time for these tiny programs.
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
               "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
    return env


def _start(workdir, devices, cache_dir, *overrides):
    """Starts ``python train.py`` on the toy stage; output goes to ``workdir.log``."""
    cmd = [sys.executable, "train.py", CONFIG, f"--workdir={workdir}",
           "--config.model.log_ids=True", *overrides]
    log = open(f"{workdir}.log", "a")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices, cache_dir), stdout=log,
                            stderr=subprocess.STDOUT)


def _finish(proc, workdir, timeout=240):
    rc = proc.wait(timeout=timeout)
    return rc, open(f"{workdir}.log").read()


def _run(workdir, devices, cache_dir, *overrides):
    rc, log = _finish(_start(workdir, devices, cache_dir, *overrides), workdir)
    assert rc == 0, log[-3000:]
    return log


def _per_step(workdir):
    """{step: (loss, [example ids])} from metrics.jsonl (one line per step)."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = (rec["loss"], [int(rec[f"id_{i}"]) for i in range(BATCH)])
    return out


def _final(workdir, step=None):
    ckpts = os.path.join(workdir, "checkpoints")
    return (ckpt_lib.load_params_from_train_checkpoint(ckpts, step, ema=False),
            ckpt_lib.load_params_from_train_checkpoint(ckpts, step, ema=True))


def _assert_trees_close(a, b, tol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _wait_for(predicate, proc, what, timeout=180):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc={proc.returncode}) before {what}")
        if time.time() - start > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted 16-step run on one device."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    _run(workdir, 1, cache_dir, "--config.mesh.fsdp=1")
    return workdir


def test_sharded_step_equals_single_device_step():
    env = _env(8, os.environ.get("JAX_COMPILATION_CACHE_DIR", ""))
    env.pop("JAX_COMPILATION_CACHE_DIR")
    out = subprocess.run([sys.executable, "-m", "tests.train_scripts.sharded_step"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout)
    single = runs["single"]
    assert single["fc1_spec"] == "P()"
    for name in ("data4_fsdp2", "data2_fsdp2_tensor2", "accum2_data4_fsdp2", "accum4_single"):
        np.testing.assert_allclose(runs[name]["losses"], single["losses"], rtol=1e-5, err_msg=name)
        # Clipping and Adam hide a gradient's scale (summed instead of averaged over shards or
        # microbatches): its norm does not.
        np.testing.assert_allclose(runs[name]["grad_norms"], single["grad_norms"], rtol=1e-5, err_msg=name)
        _assert_trees_close(runs[name]["params"], single["params"], 1e-5)
    # FSDP really splits the big kernel (16 x 32 -> 16 x 16 per device) and its Adam moment.
    fsdp = runs["data4_fsdp2"]
    assert fsdp["fc1_spec"] == fsdp["fc1_mu_spec"] == "P(None, 'fsdp')"
    assert fsdp["fc1_shard_shape"] == [16, 16] and fsdp["bias_spec"] == "P()"
    assert runs["data2_fsdp2_tensor2"]["fc2_spec"] == "P('fsdp', 'tensor')"


def test_killed_run_resumes_on_fewer_devices_with_identical_steps(tmp_path, reference, cache_dir):
    """SIGKILL on 8 devices after the step-8 checkpoint; the same command on 2 devices
    resumes and takes the same steps (same example ids, same losses, same parameters)."""
    workdir = str(tmp_path / "run")
    command = ("--config.mesh.fsdp=2", "--config.data.sleep_s=0.25")
    proc = _start(workdir, 8, cache_dir, *command)
    _wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "8")), proc,
              "the step-8 checkpoint")
    proc.send_signal(signal.SIGKILL)
    rc, log = _finish(proc, workdir)
    assert rc == -signal.SIGKILL
    logged = _per_step(workdir)
    assert 8 <= max(logged) < STEPS, "the kill must land mid-run"
    assert "data': 4, 'fsdp': 2" in log

    log = _run(workdir, 2, cache_dir, *command)
    resumed = int(log.split("Restored checkpoint at step ")[-1].split()[0])
    assert 8 <= resumed < STEPS
    # The data iterator's own saved position came back (not one of the prefetched batches).
    assert f"toy: iterator state {{'next_step': {resumed}}} (start_step {resumed})" in log

    ref, got = _per_step(reference), _per_step(workdir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step][1] == ref[step][1], f"step {step} saw other examples"
        np.testing.assert_allclose(got[step][0], ref[step][0], rtol=1e-5, err_msg=f"step {step}")
    # Each example once per epoch: nothing skipped, nothing seen twice.
    per_epoch = EXAMPLES // BATCH
    for epoch in range(STEPS // per_epoch):
        ids = [i for s in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1) for i in got[s][1]]
        assert sorted(ids) == list(range(EXAMPLES))
    _assert_trees_close(_final(workdir), _final(reference), 1e-5)


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(tmp_path, reference, cache_dir):
    workdir = str(tmp_path / "run")
    command = ("--config.mesh.fsdp=1", "--config.data.sleep_s=0.3")
    proc = _start(workdir, 1, cache_dir, *command)
    metrics = os.path.join(workdir, "metrics.jsonl")
    _wait_for(lambda: os.path.exists(metrics) and open(metrics).read().count('"loss"') >= 5,
              proc, "step 5")
    proc.send_signal(signal.SIGTERM)
    rc, log = _finish(proc, workdir)
    assert rc == 143, log[-3000:]
    saved = int(log.split("SIGTERM: saved a checkpoint at step ")[-1].split(";")[0])
    assert 5 <= saved < STEPS
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert checkpointer.latest_step() == saved
    checkpointer.close()
    # Restorable, with finite values; that it holds the right state shows below, where the run
    # resumed from it repeats the uninterrupted run's losses bit for bit.
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(_final(workdir, saved)))

    log = _run(workdir, 1, cache_dir, *command)
    assert f"Restored checkpoint at step {saved}" in log
    ref, got = _per_step(reference), _per_step(workdir)
    assert got == ref  # same device count: bit-identical losses and ids
    _assert_trees_close(_final(workdir), _final(reference), 1e-6)


def test_init_from_places_pretrained_params_in_fsdp_shards(tmp_path):
    env = _env(8, os.environ.get("JAX_COMPILATION_CACHE_DIR", ""))
    env.pop("JAX_COMPILATION_CACHE_DIR")
    out = subprocess.run([sys.executable, "-m", "tests.train_scripts.init_from_sharded", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["equal"]
    assert "P(None, 'fsdp')" in result["specs"]  # the big kernel really is split
