"""The one training loop: any registered stage, any mesh, resumable, observable.

``train(config, workdir)`` builds the stage's state shard by shard (or restores the
latest checkpoint in ``workdir/checkpoints`` onto the current mesh), feeds batches
from a background thread, runs the donated, sharded ``jit`` train step, and reports
(``metrics.jsonl``, TensorBoard, progress bar, sample PNGs) from process 0.

Determinism: the step-s key is ``fold_in(root, s)`` and the data iterator restarts at
batch s (from the ``get_state()`` saved with the checkpoint when the iterator has one),
so a run that is killed and rerun with the same command takes exactly the steps of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import parallel
from unclip_jax.compute_options import COMPUTE_DTYPES
from unclip_jax.config import ConfigError
from unclip_jax.data import DataError
from unclip_jax.train import checkpoint as ckpt_lib
from unclip_jax.train import metrics as metrics_lib
from unclip_jax.train import optim, state as state_lib
from unclip_jax.train.stage import Stage, get_stage


def validate_config(config, mesh=None) -> None:
    """Raises ValueError naming the key for settings that cannot work, before any compile."""
    t = config.train
    for key in ("batch_size", "steps", "log_every", "grad_accum"):
        if int(t[key]) <= 0:
            raise ValueError(f"config.train.{key} must be positive, got {t[key]}")
    for key in ("ckpt_every", "eval_every", "sample_every", "keep_ckpts"):
        if int(t[key]) < 0:
            raise ValueError(f"config.train.{key} must be >= 0, got {t[key]}")
    if t.batch_size % t.grad_accum:
        raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by "
                         f"config.train.grad_accum={t.grad_accum}")
    if t.batch_size % jax.process_count():
        raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    data = config.get("data", {})
    if data.get("kind") == "tar" and int(data.get("num_epochs", 0)) > 0 and jax.process_count() > 1:
        # Each process streams its own shards, whose sample counts differ: one would run out
        # while the others wait for it in the next step's collectives.
        raise ValueError(f"config.data.num_epochs={data.num_epochs} with tar shards and "
                         f"{jax.process_count()} processes: the processes would run out of data at "
                         "different steps; use data.num_epochs=0 (repeat) and bound the run with "
                         "train.steps")
    if mesh is not None:
        shards = parallel.batch_shard_count(mesh)
        micro = t.batch_size // t.grad_accum
        if micro % shards:
            raise ValueError(f"microbatch batch_size/grad_accum = {micro} is not divisible by the "
                             f"mesh's data×fsdp = {shards} batch shards")
    dtype = config.model.get("dtype", "float32")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.model.dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    if not 0.0 <= float(config.optim.ema_decay) < 1.0:
        raise ValueError(f"config.optim.ema_decay must be in [0, 1), got {config.optim.ema_decay}")


def make_train_step(stage: Stage, config, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``, to be jitted.

    With ``grad_accum = A > 1`` the batch of B rows is split into A microbatches of B/A
    rows (row i goes to microbatch i mod A, so each device keeps its rows) and the
    gradients are averaged before one update: the same update as the B-row step for a
    mean loss. Microbatch a gets key ``fold_in(step_key, a)``; with A = 1 the loss sees
    the step key itself.

    A step whose loss or gradient norm is not finite leaves params, EMA and optimizer
    state unchanged (only ``step`` advances) and reports ``nonfinite = 1``; the loop then
    stops or goes on (``train.skip_nonfinite``). So a non-finite update never reaches
    the parameters.
    """
    accum = int(config.train.grad_accum)
    ema_decay = float(config.optim.ema_decay)
    ema_warmup = bool(config.optim.get("ema_warmup", True))

    def loss_and_grad(params, batch, key):
        def loss(p):
            value, aux = stage.loss_fn(p, batch, key, config, train=True)
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in dict(aux).items()}
            return jnp.asarray(value, jnp.float32), aux
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, aux, grads

    def accumulated(params, batch, key):
        def split(x):  # (B, ...) -> (A, B/A, ...), microbatch a = rows a, a+A, a+2A, ...
            x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
            spec = P(None, parallel.BATCH_AXES, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        micro = jax.tree_util.tree_map(split, batch)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        zeros = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype),
            jax.eval_shape(loss_and_grad, params, first, key))

        def body(total, inputs):
            index, mb = inputs
            out = loss_and_grad(params, mb, jax.random.fold_in(key, index))
            return jax.tree_util.tree_map(jnp.add, total, out), None

        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        return jax.tree_util.tree_map(lambda x: x / accum, total)

    def train_step(state: state_lib.TrainState, batch):
        key = state.step_key()
        if accum == 1:
            loss, aux, grads = loss_and_grad(state.params, batch, key)
        else:
            loss, aux, grads = accumulated(state.params, batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = optim.ema_decay_at(state.step, ema_decay, ema_warmup)
        ema = (optim.ema_update(state.ema_params, params, decay)
               if state.ema_params is not None else None)

        def keep_if_finite(new, old):
            return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            ema_params=keep_if_finite(ema, state.ema_params) if ema is not None else None,
            opt_state=keep_if_finite(opt_state, state.opt_state))
        metrics = dict(aux)
        metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                       param_norm=optax.global_norm(new_state.params),
                       nonfinite=(~finite).astype(jnp.int32))
        return new_state, metrics

    return train_step


def check_periodic_sources(config, stage: Stage) -> None:
    """Opens the data splits that the periodic evaluation (``eval.split``) and sample
    grids (``sample.split``) will read, so that a missing ``data.eval_path`` or unusable
    eval data fails now (ConfigError / DataError), not at the first ``eval_every`` step."""
    t = config.train
    for every, hook, section in ((t.eval_every, stage.evaluate, "eval"),
                                 (t.sample_every, stage.sample_grid, "sample")):
        split = config[section].get("split") if section in config else None
        if int(every) and hook is not None and split:
            try:
                stage.make_source(config, split, 0, 1)
            except (ConfigError, DataError) as e:
                raise type(e)(f"train.{section}_every={int(every)} reads data split {split!r} "
                              f"({section}.split), which cannot be opened: {e} (or set "
                              f"train.{section}_every=0)") from e


class Trainer:
    """The compiled pieces of one run: optimizer, state layout, sharded init and step."""

    def __init__(self, config, stage: Stage | None = None, mesh=None):
        self.config = config
        self.stage = stage or get_stage(config.stage)
        self.mesh = mesh if mesh is not None else parallel.mesh_from_config(config.mesh)
        validate_config(config, self.mesh)
        steps = int(config.train.steps)
        self.schedule = optim.learning_rate_schedule(config.optim, steps)
        self.tx = optim.make_optimizer(config.optim, steps)
        self.init_fn = state_lib.make_init_fn(lambda k: self.stage.init_params(k, config),
                                              self.tx, float(config.optim.ema_decay) > 0)
        self.rules = list(self.stage.param_partition_rules(config) or [])
        self.fsdp_min_size = int(config.mesh.get("fsdp_min_size", 2 ** 14))
        self.abstract = jax.eval_shape(self.init_fn, jax.random.key(int(config.train.seed)))
        state_lib.check_float32_params(self.abstract.params)
        self.shardings = state_lib.state_shardings(self.abstract, self.mesh, self.rules,
                                                   self.fsdp_min_size)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.step_fn = jax.jit(
            make_train_step(self.stage, config, self.tx, self.schedule, self.mesh),
            in_shardings=(self.shardings, self.batch_sharding),
            out_shardings=(self.shardings, parallel.replicated(self.mesh)),
            donate_argnums=0)
        self._compiled = None

    @property
    def num_params(self) -> int:
        return state_lib.count_params(self.abstract.params)

    def init_state(self) -> state_lib.TrainState:
        """Fresh state, each leaf created directly in its shards; with
        ``train.init_from`` the parameters are that directory's (checked against the
        config's shapes before anything is placed)."""
        key = jax.random.key(int(self.config.train.seed))
        source = self.config.train.get("init_from", "")
        if not source:
            with jax.set_mesh(self.mesh):
                return jax.jit(self.init_fn, out_shardings=self.shardings)(key)
        params = load_init_params(source, self.abstract.params)
        use_ema = self.abstract.ema_params is not None
        # Every process holds the whole file; each device takes its shard of it (works on
        # several hosts, where jit refuses host numpy arrays with a sharding).
        params = jax.tree_util.tree_map(
            lambda x, sharding: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]),
            params, self.shardings.params)

        def from_params(key, params):
            return state_lib.state_from_params(params, jax.random.split(key)[1], self.tx, use_ema)
        with jax.set_mesh(self.mesh):
            return jax.jit(from_params, out_shardings=self.shardings)(key, params)

    def restore_target(self):
        return state_lib.abstract_with_shardings(self.abstract, self.shardings)

    def put_batch(self, local_batch: dict[str, np.ndarray]):
        """This process's rows → global batch arrays split over ('data', 'fsdp')."""
        return parallel.global_batch_from_local(local_batch, self.mesh)

    def compile(self, state, batch) -> float:
        """Compiles the step ahead of time for these shapes; returns seconds taken."""
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):  # the context mesh that splash attention shards over
            self._compiled = self.step_fn.lower(state, batch).compile()
        return time.perf_counter() - start

    def step(self, state, batch):
        """One optimizer step; ``state`` is donated (do not use it afterwards)."""
        fn = self._compiled if self._compiled is not None else self.step_fn
        with jax.set_mesh(self.mesh):
            return fn(state, batch)

    def eval_params(self, state):
        """The parameters used for samples and evaluation: EMA when kept."""
        return state.ema_params if state.ema_params is not None else state.params


def check_init_from(path: str) -> None:
    """Fails unless ``path`` (``train.init_from``) is a pretrained directory: checked before
    any data is read or anything compiles; the shapes are checked when the weights load."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"train.init_from={path!r} is not a pretrained directory (no config.json); "
                         "point it at a stage folder of an exported pipeline or a converted checkpoint")


def load_init_params(path: str, expected):
    """The float32 parameters of a pretrained directory (``train.init_from``): a
    ``save_pretrained`` tree, or the ``params`` half of a ``save_prior`` one, checked
    against ``expected`` (the config's abstract params) by the converters' ``assemble``."""
    from flax import traverse_util
    from unclip_jax.convert.common import assemble, load_pretrained
    check_init_from(path)
    tree, _ = load_pretrained(path)
    if isinstance(tree, dict) and "params" in tree and set(tree) <= {"params", "stats"}:
        tree = tree["params"]  # a prior: its normalisation stats come from the config
    return assemble(traverse_util.flatten_dict(tree), expected,
                    model_name=f"this config's model (train.init_from={path!r})")


class _Prefetcher:
    """Yields ``(produce(item), state)`` for the items of ``iterator``, made in a thread
    ``size`` ahead, in order. ``state`` is ``iterator.get_state()`` right after the item
    (None without ``get_state``): the iterator position once that batch is trained on."""

    _DONE = object()

    def __init__(self, iterator: Iterator[Any], produce: Callable[[Any], Any], size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        get_state = getattr(iterator, "get_state", None)

        def work():
            try:
                for item in iterator:
                    if self._stop.is_set():
                        return
                    state = get_state() if get_state is not None else None
                    self._put((produce(item), state))
                self._put(self._DONE)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                self._put(e)

        self._thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise RuntimeError(f"the data pipeline failed: {item!r}") from item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


class _PreemptionWatch:
    """SIGTERM → save a checkpoint and stop. Multi-process runs agree on the step via
    JAX's preemption sync point (its notifier catches the signal); one process uses
    its own handler."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self._multi:
            try:
                from jax.experimental import multihost_utils  # noqa: PLC0415
                if multihost_utils.reached_preemption_sync_point(step):
                    self.requested = True
            except Exception:  # noqa: BLE001 - no preemption service in this runtime
                pass
        return self.requested

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


@dataclasses.dataclass
class TrainResult:
    state: state_lib.TrainState
    step: int
    preempted: bool = False


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
        else json.loads(json.dumps(config, default=str))


def _check_resume_compatible(saved: dict, config, directory: str) -> None:
    """The model a checkpoint holds must be the model this config builds."""
    current = _config_json(config)
    saved_config = saved.get("config") or {}
    problems = []
    if saved_config.get("stage") != current.get("stage"):
        problems.append(f"stage {saved_config.get('stage')!r} vs {current.get('stage')!r}")
    old_model, new_model = saved_config.get("model", {}), current.get("model", {})
    for key in sorted(set(old_model) | set(new_model)):
        if key in ("dtype", "remat", "remat_policy"):  # compute settings, not parameters
            continue
        if old_model.get(key) != new_model.get(key):
            problems.append(f"model.{key} {old_model.get(key)!r} vs {new_model.get(key)!r}")
    old_ema = float(saved_config.get("optim", {}).get("ema_decay", 0.0)) > 0
    if old_ema != (float(config.optim.ema_decay) > 0):
        problems.append(f"EMA {'on' if old_ema else 'off'} vs {'off' if old_ema else 'on'} "
                        "(optim.ema_decay)")
    if problems:
        raise ValueError(f"the checkpoint in {directory} was written with a different model "
                         f"(checkpoint vs this config: {'; '.join(problems)}); use another "
                         "--workdir or the same model config")
    data = saved.get("data", {})
    if data and (data.get("global_batch_size") != int(config.train.batch_size)
                 or data.get("seed") != int(config.train.seed)):
        logging.warning("batch size or seed changed since the checkpoint (%s); the data order "
                        "from here on differs from the original run", data)


def _gather_json(obj) -> list:
    """Every process's JSON-able ``obj``, in process order (a collective when multi-host)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils  # noqa: PLC0415
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(everything[i, :int(sizes[i, 0])]).decode())
            for i in range(everything.shape[0])]


def _open_batches(stage: Stage, source, batch_size: int, seed: int, start: int,
                  saved_data: dict | None):
    """The stage's batch iterator at ``start``, given the iterator state saved for this
    process when there is one (and the process count is unchanged)."""
    states = (saved_data or {}).get("iterator_states")
    kwargs = {}
    if states:
        if len(states) == jax.process_count() and states[jax.process_index()] is not None:
            kwargs["state"] = states[jax.process_index()]
        else:
            logging.warning("the checkpoint holds data-iterator states of %d processes, this run "
                            "has %d: resuming the data from step %d instead", len(states),
                            jax.process_count(), start)
    return stage.batches(source, batch_size, seed=seed, start_step=start, **kwargs)


def _data_stats(source) -> dict[str, float]:
    """Numeric ``source.stats`` (e.g. skipped unreadable samples) as ``data/<name>``."""
    stats = getattr(source, "stats", None)
    if not isinstance(stats, dict):
        return {}
    return {f"data/{k}": float(v) for k, v in stats.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def _host_value(x):
    """A jax.Array that may span several hosts → numpy on every host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def train(config: ml_collections.ConfigDict, workdir: str, *, stage: Stage | None = None,
          mesh=None) -> TrainResult:
    """Trains ``config.stage`` for ``config.train.steps`` steps in ``workdir``; resumes if
    ``workdir/checkpoints`` holds a checkpoint. Returns the final state (and whether the
    run stopped early on SIGTERM, after saving).

    Raises:
      ckpt_lib.NonFiniteError: a non-finite loss with ``train.skip_nonfinite=False``.
    """
    main = jax.process_index() == 0
    stage = stage or get_stage(config.stage)
    t = config.train
    total = int(t.steps)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         keep=int(t.keep_ckpts))
    progress = batches = raw = writer = watch = None  # closed in `finally`, if opened
    try:
        latest = checkpointer.latest_step()
        meta = checkpointer.read_meta(latest) if latest is not None else None
        if latest is None and t.get("init_from", ""):
            check_init_from(t.init_from)  # before prepare_config, which may encode data (the prior)
        stage.prepare_config(config, None if meta is None else meta.get("config"))
        trainer = Trainer(config, stage, mesh)
        check_periodic_sources(config, stage)

        def say(message: str):
            if main:
                (progress.write if progress is not None else
                 lambda m: print(m, file=sys.stderr, flush=True))(message)
            logging.info(message)

        saved_data = None
        if latest is not None:
            _check_resume_compatible(meta, config, checkpointer.directory)
            state, meta = checkpointer.restore(trainer.restore_target(), latest)
            saved_data = meta.get("data")
            say(f"Restored checkpoint at step {latest} from {checkpointer.directory}")
        else:
            state = trainer.init_state()
            say(f"Initialised {stage.name}: {trainer.num_params:,} parameters on mesh "
                f"{dict(trainer.mesh.shape)}")
        start = int(state.step)
        if main:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "config.json"), "w") as f:
                json.dump(_config_json(config), f, indent=2)
        if start >= total:
            say(f"Nothing to do: the checkpoint is at step {start} >= train.steps={total}")
            return TrainResult(state, start)

        writer = metrics_lib.MetricsWriter(workdir, enabled=main, resume_step=start)
        local_bs = parallel.local_batch_size(int(t.batch_size), trainer.mesh)
        source = stage.make_source(config, "train", jax.process_index(), jax.process_count())
        raw = _open_batches(stage, source, local_bs, int(t.seed), start, saved_data)
        batches = _Prefetcher(iter(raw), lambda ex: trainer.put_batch(stage.preprocess(ex, config)),
                              int(t.get("prefetch", 2)))
        data_state = (saved_data or {}).get("iterator_states", [None] * jax.process_count())
        data_state = data_state[jax.process_index()] if len(data_state) == jax.process_count() else None
        watch = _PreemptionWatch()
        devices = trainer.mesh.devices.size
        peak = metrics_lib.peak_flops_per_device(trainer.mesh.devices.flat[0])
        flops = stage.flops_per_example(config)
        sample_key = jax.random.fold_in(jax.random.key(int(t.seed)), 0x5A4D)
        preempted = False

        def meta_for(step: int) -> dict:
            data = {"step": step, "global_batch_size": int(t.batch_size), "seed": int(t.seed),
                    "process_count": jax.process_count()}
            states = _gather_json(data_state)  # collective: every process saves at this step
            if any(s is not None for s in states):
                data["iterator_states"] = states
            return {"step": step, "data": data, "config": _config_json(config)}

        batch, data_state = next(batches)
        compile_s = trainer.compile(state, batch)
        say(f"Compiled the train step in {compile_s:.1f} s")
        writer.scalars(start, {"compile_time_s": compile_s})
        progress = metrics_lib.Progress(total, start, enabled=main)

        window: dict[str, tuple[float, int]] = {}  # name -> (sum, count) since the last log
        skipped_in_window = [0]
        window_steps, window_start, last_loss = 0, time.perf_counter(), float("nan")
        skipped = 0
        pending = None  # metrics of the step in flight, read one step late (no host sync)

        def absorb(step: int, device_metrics) -> None:
            nonlocal window_steps, skipped, last_loss
            values = jax.device_get(device_metrics)
            if int(values["nonfinite"]):
                if not t.skip_nonfinite:
                    raise ckpt_lib.NonFiniteError(
                        f"non-finite loss or gradient at step {step} (loss={float(values['loss'])}, "
                        f"grad_norm={float(values['grad_norm'])}); the update was not applied and "
                        "the run stops. Set config.train.skip_nonfinite=True to skip such steps.")
                skipped += 1
                say(f"Skipped step {step}: non-finite loss {float(values['loss'])}")
            for k, v in values.items():  # a skipped step's NaNs stay out of the means
                if k != "nonfinite" and np.isfinite(v):
                    total_, count = window.get(k, (0.0, 0))
                    window[k] = (total_ + float(v), count + 1)
            skipped_in_window[0] += int(values["nonfinite"])
            window_steps += 1
            last_loss = float(values["loss"])
            progress.update(1, loss=last_loss)

        def flush_pending():
            nonlocal pending
            if pending is not None:
                absorb(*pending)
                pending = None

        def log(step: int) -> None:
            nonlocal window, window_steps, window_start
            flush_pending()
            if not window_steps:
                return
            elapsed = time.perf_counter() - window_start
            out = {k: total_ / count for k, (total_, count) in window.items()}
            out["skipped_steps"] = float(skipped_in_window[0])
            skipped_in_window[0] = 0
            rate = window_steps * int(t.batch_size) / max(elapsed, 1e-9)
            out.update(step_time_s=elapsed / window_steps, examples_per_s=rate,
                       examples_per_s_per_device=rate / devices)
            mfu = metrics_lib.model_flops_utilization(flops, rate, devices, peak)
            if mfu is not None:
                out["mfu"] = mfu
            out.update(_data_stats(source))
            writer.scalars(step, out)
            progress.update(0, loss=out.get("loss", last_loss), ex_per_s=rate,
                            **({"mfu": mfu} if mfu is not None else {}))
            window, window_steps, window_start = {}, 0, time.perf_counter()

        step = start
        while step < total:
            if batch is None:
                try:
                    batch, data_state = next(batches)
                except StopIteration:
                    raise RuntimeError(f"the data ran out after {step} steps; "
                                       "stage.batches must not end before train.steps") from None
            state, device_metrics = trainer.step(state, batch)
            batch = None
            step += 1
            flush_pending()  # the previous step's metrics: ready by now, checked for NaN
            pending = (step, device_metrics)
            stop = watch.should_stop(step)
            # A SIGTERM at the last step just finishes the run (with its evaluation).
            preempting = stop and step < total
            if step % int(t.log_every) == 0 or step == total or stop:
                log(step)
            if (t.ckpt_every and step % int(t.ckpt_every) == 0) or step == total or stop:
                flush_pending()
                checkpointer.save(state, meta_for(step), wait=stop)
            # Evaluation and sample grids: not while the grace period runs out; their time is
            # left out of the examples/s window.
            if (not preempting and t.eval_every and step % int(t.eval_every) == 0
                    and stage.evaluate is not None):
                began = time.perf_counter()
                with jax.set_mesh(trainer.mesh):
                    values = stage.evaluate(trainer.eval_params(state), config)
                writer.scalars(step, {f"eval/{k}": float(_host_value(v)) for k, v in values.items()})
                window_start += time.perf_counter() - began
            if (not preempting and t.sample_every and step % int(t.sample_every) == 0
                    and stage.sample_grid is not None):
                from unclip_jax.image_output import make_grid  # noqa: PLC0415
                began = time.perf_counter()
                with jax.set_mesh(trainer.mesh):
                    images = _host_value(stage.sample_grid(trainer.eval_params(state), config,
                                                           sample_key))
                writer.image(step, "samples", make_grid(images))
                window_start += time.perf_counter() - began
            if preempting:
                preempted = True
                say(f"SIGTERM: saved a checkpoint at step {step}; rerun the same command to resume")
                break
        flush_pending()
        if skipped:
            say(f"{skipped} step(s) skipped for non-finite values")
    finally:
        if batches is not None:
            batches.close()
        if hasattr(raw, "close"):
            try:
                raw.close()
            except Exception as e:  # noqa: BLE001 - e.g. a generator still running in the thread
                logging.warning("closing the batch iterator failed: %r", e)
        for opened in (watch, progress, writer):
            if opened is not None:
                opened.close()
        checkpointer.close()  # waits for the last asynchronous save to be on disk
    return TrainResult(state, step, preempted)
