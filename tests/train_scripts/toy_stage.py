"""A tiny regression stage for the trainer's tests; not part of the package.

Example i of a deterministic random-access source is (x_i ∈ R^dim, class_i = i mod 4,
y_i = <w, x_i> + class offset). The global batch of step s is fixed by (seed, s) alone,
whatever the process count, and each process takes its contiguous slice, so runs on
1 or 2 processes see the same global batches. The loss can log the example ids it
saw (``model.log_ids``), and example ``data.nan_id`` can be given a NaN target, which
makes the loss of its step NaN (on the host: the compiled step stays the same).
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.train.stage import Stage, base_config, register_stage

NAME = "tests.train_scripts.toy_stage:toy"


def toy_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.stage = NAME
    c.model = ml_collections.ConfigDict(dict(dtype="float32", remat=False, hidden=32,
                                             log_ids=False, input_noise=0.05))
    c.data = ml_collections.ConfigDict(dict(num_examples=64, dim=16, sleep_s=0.0, nan_id=-1))
    c.train.update(batch_size=8, steps=16, log_every=1, ckpt_every=4, keep_ckpts=10, seed=3)
    c.optim.update(lr=3e-2, warmup=3, schedule="cosine", weight_decay=0.1, clip_norm=1.0,
                   ema_decay=0.9)
    c.mesh.update(fsdp_min_size=256)
    return c


class ToySource:
    """Random access: ``source[i]`` is the same dict on every call and every host."""

    def __init__(self, num_examples: int, dim: int, sleep_s: float = 0.0):
        self.num_examples, self.dim, self.sleep_s = num_examples, dim, sleep_s
        self._w = np.random.default_rng(1234).normal(size=(dim,)).astype(np.float32)

    def __len__(self):
        return self.num_examples

    def __getitem__(self, i: int) -> dict:
        x = np.random.default_rng(10_000 + int(i)).normal(size=(self.dim,)).astype(np.float32)
        cls = int(i) % 4
        return {"id": int(i), "x": x, "cls": cls,
                "y": np.float32(np.dot(self._w, x) / np.sqrt(self.dim) + 0.5 * cls)}


class ToyBatches:
    """Global batch s = a slice of epoch e's permutation; this process's rows of it.

    Has ``get_state()`` like the data package's iterators, so the trainer saves the
    position and hands it back on resume.
    """

    def __init__(self, source: ToySource, batch_size: int, *, seed: int, start_step: int,
                 process_index: int, process_count: int):
        self.source, self.batch_size, self.seed, self.step = source, batch_size, seed, start_step
        self.process_index, self.process_count = process_index, process_count

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        global_bs = self.batch_size * self.process_count
        epoch, k = divmod(self.step, len(self.source) // global_bs)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        rows = order[k * global_bs: (k + 1) * global_bs]
        mine = rows[self.process_index * self.batch_size: (self.process_index + 1) * self.batch_size]
        self.step += 1
        return [self.source[int(i)] for i in mine]

    def get_state(self) -> dict:
        return {"next_step": self.step}


def toy_batches(source, batch_size, *, seed, start_step, process_index, process_count):
    return ToyBatches(source, batch_size, seed=seed, start_step=start_step,
                      process_index=process_index, process_count=process_count)


class ToyMLP(nn.Module):
    hidden: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, cls):
        h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        h = h + nn.Embed(4, self.hidden, name="class_embed")(cls).astype(h.dtype)
        h = nn.gelu(nn.LayerNorm(dtype=self.dtype, name="norm")(h))
        h = nn.Dense(self.hidden, dtype=self.dtype, name="fc2")(h)
        return nn.Dense(1, dtype=self.dtype, name="head")(nn.gelu(h))[:, 0]


@register_stage("toy")
class ToyStage(Stage):
    def _model(self, config):
        return ToyMLP(hidden=config.model.hidden, dtype=config.model.dtype)

    def init_params(self, key, config):
        x = jnp.zeros((1, config.data.dim), jnp.float32)
        return self._model(config).init(key, x, jnp.zeros((1,), jnp.int32))["params"]

    def loss_fn(self, params, batch, key, config, *, train):
        x = batch["x"]
        if config.model.input_noise:
            x = x + config.model.input_noise * jax.random.normal(key, x.shape)
        pred = self._model(config).apply({"params": params}, x, batch["cls"])
        loss = jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2)
        metrics = {"mse": loss}
        if config.model.log_ids:
            metrics.update({f"id_{i}": batch["id"][i] for i in range(batch["id"].shape[0])})
        return loss, metrics

    def make_source(self, config, split, process_index, process_count):
        source = ToySource(config.data.num_examples, config.data.dim, config.data.sleep_s)
        source.process_index, source.process_count = process_index, process_count
        return source

    def batches(self, source, batch_size, *, seed, start_step, state=None):
        if state is not None:  # the trainer's saved position wins over start_step
            print(f"toy: iterator state {state} (start_step {start_step})", flush=True)
            start_step = state["next_step"]
        return toy_batches(source, batch_size, seed=seed, start_step=start_step,
                           process_index=source.process_index, process_count=source.process_count)

    def preprocess(self, examples, config):
        if config.data.sleep_s:
            time.sleep(config.data.sleep_s)  # lets a test catch the run mid-way
        ids = np.array([e["id"] for e in examples], np.int32)
        y = np.array([e["y"] for e in examples], np.float32)
        y[ids == config.data.nan_id] = np.nan
        return {"id": ids, "x": np.stack([e["x"] for e in examples]),
                "cls": np.array([e["cls"] for e in examples], np.int32), "y": y}

    def flops_per_example(self, config):
        d, h = config.data.dim, config.model.hidden
        return 6.0 * (d * h + h * h + h)

    def sample_grid(self, params, config, key):
        w = jnp.tanh(params["fc1"]["kernel"][:8, :8])
        img = jnp.stack([w, -w, w * w], axis=-1)[None].repeat(2, axis=0)
        return jnp.round((img + 1) * 127.5).astype(jnp.uint8)

    def evaluate(self, params, config):
        source = ToySource(config.data.num_examples, config.data.dim)
        examples = [source[i] for i in range(16)]
        x = np.stack([e["x"] for e in examples])
        cls = np.array([e["cls"] for e in examples], np.int32)
        pred = self._model(config).apply({"params": params}, x, cls)
        return {"mse": jnp.mean((pred - np.array([e["y"] for e in examples])) ** 2)}


def spec_text(spec) -> str:
    """A partition spec as "P(None, 'fsdp')" on every JAX version (JAX 0.7 prints
    PartitionSpec(None, 'fsdp'), later versions P(None, 'fsdp'))."""
    return "P(" + ", ".join(repr(axis) for axis in spec) + ")"
