"""The trainer's pieces in one process (one CPU device): partition rules, optimizer,
gradient accumulation, non-finite handling, checkpoints, metrics files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tests.train_scripts.toy_stage import ToySource, ToyStage, toy_batches, toy_config
from unclip_jax import parallel
from unclip_jax.train import checkpoint as ckpt_lib
from unclip_jax.train import loop, metrics as metrics_lib, optim
from unclip_jax.train.stage import base_config, get_stage


# -- partition rules ------------------------------------------------------------------

class _FakeMesh:
    """Only ``.shape`` is read by ``partition_spec``; lets us test 8-way layouts on 1 CPU."""

    def __init__(self, **shape):
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def test_fsdp_shards_largest_divisible_dim_and_replicates_small_leaves():
    mesh = _FakeMesh(data=2, fsdp=4)
    spec = parallel.partition_spec
    assert spec("enc/kernel", (512, 2048), mesh, fsdp_min_size=1024) == P(None, "fsdp")
    # The largest dim (1001) is not divisible by 4: the next largest is used.
    assert spec("enc/kernel", (1001, 64), mesh, fsdp_min_size=1024) == P(None, "fsdp")
    assert spec("enc/kernel", (7, 9, 33), mesh, fsdp_min_size=1) == P()  # nothing divides
    assert spec("enc/bias", (2048,), mesh, fsdp_min_size=4096) == P()     # small: replicated
    assert spec("step", (), mesh) == P()
    assert spec("enc/kernel", (512, 2048), _FakeMesh(data=8), fsdp_min_size=1) == P()


def test_tensor_rules_come_first_and_fsdp_takes_another_dim():
    mesh = _FakeMesh(fsdp=2, tensor=2)
    rules = [(r"mlp/fc1/kernel$", P(None, "tensor")), (r"attn/.*/kernel$", P("tensor", None))]
    spec = parallel.partition_spec
    assert spec("block/mlp/fc1/kernel", (64, 256), mesh, rules, 1) == P("fsdp", "tensor")
    assert spec("block/attn/q/kernel", (64, 32), mesh, rules, 1) == P("tensor", "fsdp")
    # The same rule matches the Adam moment of that kernel (its path ends the same).
    assert spec("opt_state/0/mu/block/mlp/fc1/kernel", (64, 256), mesh, rules, 1) == P("fsdp", "tensor")
    with pytest.raises(ValueError, match="not divisible by mesh axis tensor"):
        spec("block/mlp/fc1/kernel", (64, 255), mesh, rules, 1)


def test_make_mesh_errors_name_the_sizes():
    n = jax.device_count()
    assert dict(parallel.make_mesh().shape) == {"data": n, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match=r"= 2 devices, but 1 are available"):
        parallel.make_mesh(data=n + 1) if n == 1 else parallel.make_mesh(data=2 * n)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        parallel.make_mesh(data=-1, fsdp=-1)


def test_init_distributed_is_a_no_op_for_one_process(monkeypatch):
    for key in ("UNCLIP_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "UNCLIP_NUM_PROCESSES"):
        monkeypatch.delenv(key, raising=False)
    assert parallel.init_distributed() is False
    with pytest.raises(ValueError, match="needs all of coordinator_address, num_processes"):
        parallel.init_distributed(coordinator_address="localhost:1234")



@pytest.mark.parametrize("env, expected", [
    ({"SLURM_NTASKS": "4"}, {}),                         # launchers: JAX reads their variables
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),               # a single-host TPU VM: one process
    ({"SLURM_NTASKS": "1"}, None),
    ({"UNCLIP_COORDINATOR_ADDRESS": "h:1", "UNCLIP_NUM_PROCESSES": "2", "UNCLIP_PROCESS_ID": "1"},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
])
def test_init_distributed_detects_launchers(monkeypatch, env, expected):
    for key in ("UNCLIP_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "JAX_NUM_PROCESSES",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "UNCLIP_NUM_PROCESSES", "UNCLIP_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert parallel.init_distributed() is (expected is not None)
    assert calls == ([] if expected is None else [expected])


# -- optimizer --------------------------------------------------------------------------

def _toy_param_shapes():
    config = toy_config()
    return jax.eval_shape(lambda k: ToyStage().init_params(k, config), jax.random.key(0))


def test_weight_decay_mask_excludes_norms_biases_embeddings():
    mask = optim.weight_decay_mask(_toy_param_shapes())
    assert mask["fc1"]["kernel"] and mask["fc2"]["kernel"] and mask["head"]["kernel"]
    assert not mask["fc1"]["bias"] and not mask["head"]["bias"]
    assert not mask["norm"]["scale"] and not mask["norm"]["bias"]
    assert not mask["class_embed"]["embedding"]
    # Name-based exclusions beyond the 1-D rule: 2-D embedding tables and norms.
    extra = optim.weight_decay_mask({"positional_embedding": jnp.ones((4, 4)),
                                     "time_embed": {"kernel": jnp.ones((4, 4))},
                                     "block": {"norm_gain": jnp.ones((4, 4))}})
    assert not extra["positional_embedding"] and not extra["block"]["norm_gain"]
    assert extra["time_embed"]["kernel"]  # a Dense kernel inside an embedding MLP decays


def test_adamw_decays_only_masked_params():
    config = toy_config()
    config.optim.update(lr=0.1, warmup=0, schedule="constant", weight_decay=0.5, clip_norm=0.0)
    params = {"fc": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.ones((4,))},
              "norm": {"scale": jnp.ones((4,))}, "tok_embedding": jnp.ones((5, 4))}
    tx = optim.make_optimizer(config.optim, 10)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    mask = optim.weight_decay_mask(params)
    for (path, p), n, m in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(mask)):
        if m:  # p <- p - lr * wd * p
            np.testing.assert_allclose(n, p * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=str(path))
        else:
            np.testing.assert_array_equal(n, p, err_msg=str(path))


def test_schedule_warmup_then_cosine_and_linear():
    base = dict(lr=1.0, warmup=10, end_lr_factor=0.1)
    cos = optim.learning_rate_schedule({**base, "schedule": "cosine"}, 110)
    lin = optim.learning_rate_schedule({**base, "schedule": "linear"}, 110)
    const = optim.learning_rate_schedule({**base, "schedule": "constant"}, 110)
    np.testing.assert_allclose([cos(0), cos(5), cos(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose([cos(60), cos(110)], [0.55, 0.1], atol=1e-6)
    np.testing.assert_allclose([lin(60), lin(110)], [0.55, 0.1], atol=1e-6)
    np.testing.assert_allclose([const(5), const(100)], [0.5, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="config.optim.schedule"):
        optim.learning_rate_schedule({**base, "schedule": "exp"}, 110)


# -- train step -------------------------------------------------------------------------

def test_ema_warmup_forgets_the_initialisation():
    decays = [float(optim.ema_decay_at(s, 0.995, True)) for s in (0, 10, 190, 5000)]
    assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(11 / 20)
    assert decays[2] == pytest.approx(191 / 200) and decays[3] == pytest.approx(0.995)
    assert float(optim.ema_decay_at(0, 0.995, False)) == pytest.approx(0.995)
    # the weight the average still gives the initial parameters after 200 updates
    kept = np.prod([float(optim.ema_decay_at(s, 0.995, True)) for s in range(200)])
    assert kept < 1e-3 < 0.995 ** 200


def test_nonfinite_step_changes_nothing_but_the_step():
    config = toy_config()
    source = ToySource(config.data.num_examples, config.data.dim)
    first = next(toy_batches(source, 8, seed=0, start_step=0, process_index=0, process_count=1))
    config.data.nan_id = first[0]["id"]
    trainer = loop.Trainer(config, ToyStage())
    state = trainer.init_state()
    before = jax.device_get(state)
    state, metrics = trainer.step(state, trainer.put_batch(ToyStage().preprocess(first, config)))
    after = jax.device_get(state)
    assert int(metrics["nonfinite"]) == 1 and np.isnan(metrics["loss"])
    assert int(after.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves((after.params, after.ema_params, after.opt_state)),
                    jax.tree_util.tree_leaves((before.params, before.ema_params, before.opt_state))):
        np.testing.assert_array_equal(a, b)


def _nan_config(skip):
    """A 4-step toy run whose step 3 holds example ``nan_id``: its loss is NaN."""
    config = toy_config()
    config.train.update(steps=4, ckpt_every=2, skip_nonfinite=skip)
    source = ToySource(config.data.num_examples, config.data.dim)
    third = next(toy_batches(source, 8, seed=config.train.seed, start_step=2,
                             process_index=0, process_count=1))
    config.data.nan_id = third[0]["id"]
    return config


def test_nonfinite_loss_stops_the_run_without_a_bad_checkpoint(tmp_path):
    config = _nan_config(skip=False)
    with pytest.raises(ckpt_lib.NonFiniteError, match=r"non-finite loss or gradient at step 3.*"
                                                      r"skip_nonfinite=True"):
        loop.train(config, str(tmp_path))
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    assert checkpointer.all_steps() == [2]  # nothing written at or after the NaN step
    checkpointer.close()


def test_skip_nonfinite_skips_the_step_and_finishes(tmp_path):
    config = _nan_config(skip=True)
    result = loop.train(config, str(tmp_path))
    assert result.step == 4 and int(result.state.step) == 4
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    skipped = {l["step"]: l["skipped_steps"] for l in lines if "skipped_steps" in l}
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}
    assert [("loss" in l) for l in lines if "skipped_steps" in l] == [True, True, False, True]
    params = ckpt_lib.load_params_from_train_checkpoint(str(tmp_path / "checkpoints"), ema=False)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


# -- checkpoints, exports, metrics --------------------------------------------------------

def test_train_writes_metrics_samples_and_exportable_params(tmp_path):
    config = toy_config()
    config.train.update(steps=4, ckpt_every=2, keep_ckpts=1, sample_every=2, eval_every=4,
                        log_every=2)
    config.model.dtype = "bfloat16"  # compute dtype only: parameters stay float32
    result = loop.train(config, str(tmp_path))
    assert {x.dtype for x in jax.tree_util.tree_leaves(result.state.params)} == {jnp.dtype("float32")}
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["step"] for l in lines if "loss" in l] == [2, 4]
    assert "compile_time_s" in lines[0] and "mfu" not in lines[1]  # CPU: no peak, no MFU
    assert any("eval/mse" in l for l in lines)
    assert sorted(os.listdir(tmp_path / "samples")) == ["samples_00000002.png",
                                                        "samples_00000004.png"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert json.load(open(tmp_path / "config.json"))["stage"] == config.stage
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    assert checkpointer.all_steps() == [4]  # keep_ckpts=1
    meta = checkpointer.read_meta()
    assert meta["data"] == {"step": 4, "global_batch_size": 8, "seed": 3, "process_count": 1,
                            "iterator_states": [{"next_step": 4}]}
    checkpointer.close()
    ema = ckpt_lib.load_params_from_train_checkpoint(str(tmp_path / "checkpoints"))
    for a, b in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(result.state.ema_params)):
        np.testing.assert_array_equal(a, b)
    ckpt_lib.export_params(str(tmp_path / "export"), ema, config)
    loaded = ckpt_lib.load_params(str(tmp_path / "export"))
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(ema)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(ema)):
        np.testing.assert_array_equal(a, b)
    # Rerunning a finished run does nothing; a different model is refused.
    assert loop.train(config, str(tmp_path)).step == 4
    config.model.hidden = 16
    config.train.steps = 6
    with pytest.raises(ValueError, match=r"different model.*model.hidden 32 vs 16"):
        loop.train(config, str(tmp_path))


def test_metrics_truncated_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 8))
                    + '{"step": 8, "lo')  # a line cut off by a kill
    writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=4)
    writer.scalars(5, {"loss": np.float32(0.5)})
    writer.close()
    assert [json.loads(l)["step"] for l in open(path)] == [1, 2, 3, 4, 5]


def test_peak_flops_and_mfu():
    assert metrics_lib.peak_flops_per_device(jax.devices("cpu")[0]) is None

    class Dev:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    assert metrics_lib.peak_flops_per_device(Dev()) == 989e12
    Dev.platform, Dev.device_kind = "tpu", "TPU v5 lite"
    assert metrics_lib.peak_flops_per_device(Dev()) == 197e12
    assert metrics_lib.model_flops_utilization(1e12, 100.0, 4, 1e14) == pytest.approx(0.25)
    assert metrics_lib.model_flops_utilization(None, 100.0, 4, 1e14) is None


def test_config_errors_before_compiling():
    config = toy_config()
    config.train.update(batch_size=10, grad_accum=4)
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by config.train.grad_accum=4"):
        loop.Trainer(config, ToyStage())
    config = toy_config()
    config.model.dtype = "fp8"
    with pytest.raises(ValueError, match="config.model.dtype"):
        loop.Trainer(config, ToyStage())
    with pytest.raises(ValueError, match="unknown stage 'nonexistent'"):
        get_stage("nonexistent")
    assert isinstance(get_stage("tests.train_scripts.toy_stage:toy"), ToyStage)
    assert set(base_config()) == {"stage", "model", "data", "train", "optim", "mesh"}



def test_finite_tar_epochs_are_refused_with_several_processes(monkeypatch):
    config = toy_config()
    config.data.kind, config.data.num_epochs = "tar", 2
    loop.validate_config(config)  # one process: it stops with a clear error when the data ends
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="run out of data at different steps"):
        loop.validate_config(config)
    config.data.num_epochs = 0
    loop.validate_config(config)


def test_a_config_error_in_train_closes_the_checkpointer(tmp_path, monkeypatch):
    closed = []
    real_close = ckpt_lib.Checkpointer.close
    monkeypatch.setattr(ckpt_lib.Checkpointer, "close", lambda self: (closed.append(1), real_close(self)))
    config = toy_config()
    config.model.dtype = "fp8"  # Trainer raises before any step
    with pytest.raises(ValueError, match="config.model.dtype"):
        loop.train(config, str(tmp_path))
    assert closed == [1]


def test_init_from_starts_from_a_pretrained_directory_and_checks_its_layout(tmp_path):
    from unclip_jax.convert.common import save_pretrained
    config = toy_config()
    config.train.update(steps=2, ckpt_every=0)
    first = loop.train(config, str(tmp_path / "first"))
    # float16 storage, as the package ships its model: loading casts back to float32.
    save_pretrained(str(tmp_path / "pretrained"), first.state.ema_params, {"stage": config.stage},
                    storage_dtype="float16")
    config.train.init_from = str(tmp_path / "pretrained")
    trainer = loop.Trainer(config, ToyStage())
    state = trainer.init_state()
    assert int(state.step) == 0
    for got, ema, want in zip(jax.tree_util.tree_leaves(state.params),
                              jax.tree_util.tree_leaves(state.ema_params),
                              jax.tree_util.tree_leaves(first.state.ema_params)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)  # float16 round trip
        np.testing.assert_array_equal(ema, got)
    assert all(float(jnp.abs(m).max()) == 0.0 for m in jax.tree_util.tree_leaves(state.opt_state)
               if jnp.issubdtype(m.dtype, jnp.floating))
    # A resumed run reads its own checkpoint: init_from is not read again.
    config.train.update(steps=3, ckpt_every=1)
    assert loop.train(config, str(tmp_path / "tuned")).step == 3
    config.train.update(steps=4, init_from=str(tmp_path / "gone"))
    assert loop.train(config, str(tmp_path / "tuned")).step == 4
    config.train.init_from = str(tmp_path / "pretrained")
    config.model.hidden = 16  # another model: refused before any step, naming the leaves
    with pytest.raises(ValueError, match=r"(?s)does not fit this config's model.*mis-shaped:.*checkpoint \(\d+, \d+\) vs model \(\d+, \d+\)"):
        loop.Trainer(config, ToyStage()).init_state()
    config.train.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a pretrained directory"):
        loop.Trainer(config, ToyStage()).init_state()


    class MeasuringStage(ToyStage):
        def prepare_config(self, config, saved=None):  # the prior encodes data here
            raise AssertionError("prepare_config ran before init_from was checked")

    with pytest.raises(ValueError, match="not a pretrained directory"):  # a fresh run: checked first
        loop.train(config, str(tmp_path / "fresh"), stage=MeasuringStage())


@pytest.mark.parametrize("stop_at, preempted", [(2, True), (3, False)])
def test_sigterm_skips_evaluation_and_at_the_last_step_just_finishes(tmp_path, monkeypatch, stop_at, preempted):
    monkeypatch.setattr(loop._PreemptionWatch, "should_stop", lambda self, step: step == stop_at)
    config = toy_config()
    config.train.update(steps=3, ckpt_every=0, eval_every=1, log_every=1)
    result = loop.train(config, str(tmp_path))
    assert (result.step, result.preempted) == (stop_at, preempted)
    evaluated = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl") if "eval/mse" in l]
    # Preempted: no evaluation in the grace period; a SIGTERM at the last step finishes the run.
    assert evaluated == ([1] if preempted else [1, 2, 3])
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    assert checkpointer.latest_step() == stop_at
    checkpointer.close()


def test_progress_bar_keeps_examples_per_second_between_logging_steps():
    progress = metrics_lib.Progress(total=3, initial=0, enabled=True)
    progress.update(1, loss=0.5, ex_per_s=12.0, mfu=0.25)  # a logging step
    progress.update(1, loss=0.4)  # the next step's loss
    shown = progress._bar.postfix
    progress.close()
    assert "loss=0.4" in shown and "ex_per_s=12" in shown and "mfu=0.25" in shown, shown


def test_periodic_evaluation_data_is_opened_before_training(tmp_path):
    import ml_collections
    from unclip_jax.config import ConfigError

    class NoEvalDataStage(ToyStage):  # like a tar decoder run whose data.eval_path is empty
        def make_source(self, config, split, process_index, process_count):
            if split != "train":
                raise ConfigError("data.eval_path is empty")
            return super().make_source(config, split, process_index, process_count)

    config = toy_config()
    config.train.update(steps=2, sample_every=1, ckpt_every=0)
    config.sample = ml_collections.ConfigDict({"split": "test"})
    with pytest.raises(ConfigError, match=r"train.sample_every=1 reads data split 'test'.*eval_path is empty"):
        loop.train(config, str(tmp_path), stage=NoEvalDataStage())
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # before any step
    config.train.sample_every = 0  # no sample grids: the split is never read
    assert loop.train(config, str(tmp_path), stage=NoEvalDataStage()).step == 2
