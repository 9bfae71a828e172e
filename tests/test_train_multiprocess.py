"""Two processes on localhost (2 CPU devices each, gloo collectives) train the toy stage
together, checkpoint, restore and continue, and stop together on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.subprocesses import free_port
from tests.train_scripts.multiprocess_worker import multiprocess_config
from unclip_jax.train import checkpoint as ckpt_lib
from unclip_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # A shared compilation cache: each worker's second ``train`` call, and the second
    # test, reuse the programs compiled before (the toy programs are identical).
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start_workers(tmp_path, env, workdir, *mode):
    port, procs, logs = free_port(), [], []
    for i in range(2):
        logs.append(tmp_path / f"process{i}.log")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.train_scripts.multiprocess_worker", str(i), str(port),
             workdir, *mode], cwd=ROOT, env=env, stdout=open(logs[-1], "w"),
            stderr=subprocess.STDOUT))
    return procs, logs


def _wait(procs, logs, timeout=300):
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes, [log.read_text() for log in logs]


def _steps(workdir):
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = (rec["loss"], sorted(int(rec[f"id_{i}"]) for i in range(8)))
    return out


def test_two_processes_train_checkpoint_and_restore(tmp_path, env):
    workdir = str(tmp_path / "run")
    codes, texts = _wait(*_start_workers(tmp_path, env, workdir))
    assert codes == [0, 0], "\n\n".join(t[-2000:] for t in texts)
    assert "Restored checkpoint at step 4" in texts[0]
    assert all(f"process {i}: done at step 6" in texts[i] for i in range(2))
    # Each process got its own saved data-iterator position back (gathered at save time).
    assert all("toy: iterator state {'next_step': 4} (start_step 4)" in t for t in texts)

    # The same two calls in this process, on one device.
    ref_dir = str(tmp_path / "reference")
    for steps in (4, 6):
        config = multiprocess_config(steps)
        config.mesh.update(data=1, fsdp=1)
        loop.train(config, ref_dir)
    got, ref = _steps(workdir), _steps(ref_dir)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert got[step][1] == ref[step][1], f"step {step}: other examples"
        np.testing.assert_allclose(got[step][0], ref[step][0], rtol=1e-5, err_msg=f"step {step}")
    for ema in (False, True):
        a = ckpt_lib.load_params_from_train_checkpoint(os.path.join(workdir, "checkpoints"), ema=ema)
        b = ckpt_lib.load_params_from_train_checkpoint(os.path.join(ref_dir, "checkpoints"), ema=ema)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, env):
    workdir = str(tmp_path / "run")
    procs, logs = _start_workers(tmp_path, env, workdir, "sigterm")
    metrics, start = os.path.join(workdir, "metrics.jsonl"), time.time()
    while not (os.path.exists(metrics) and open(metrics).read().count('"loss"') >= 3):
        if any(p.poll() is not None for p in procs) or time.time() - start > 240:
            _wait(procs, logs, timeout=1)
            pytest.fail("the run ended or stalled before step 3:\n" + logs[0].read_text()[-2000:])
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)  # a preemption notice reaches one host
    codes, texts = _wait(procs, logs)
    assert codes == [143, 143], "\n\n".join(t[-2000:] for t in texts)
    stopped = [int(t.split("stopped at step ")[-1].split()[0]) for t in texts]
    assert stopped[0] == stopped[1] and 3 <= stopped[0] < 40
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert checkpointer.latest_step() == stopped[0]
    assert checkpointer.read_meta()["data"]["iterator_states"] == [{"next_step": stopped[0]}] * 2
    checkpointer.close()
