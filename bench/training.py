"""Training-step throughput and MFU of the Karlo-size decoder (64px) and prior.

    python -m bench.training --stage prior --batch 512 --steps 5 --out OUT/train.jsonl
    python -m bench.training --stage decoder --batch 128 --steps 5 --out OUT/train.jsonl
    python -m bench.training --stage decoder --config-variant tiny --batch 4 --steps 2   # CPU smoke
    python -m bench.training --stage decoder --config-file configs/shapes_decoder.py --batch 32  # the recipe's

One jitted, donated optimizer step: the stage's loss (``unclip_jax.stages.decoder.loss_fn``:
hybrid loss with conditioning dropout; ``unclip_jax.stages.prior.prior_loss``: x0-MSE with
text dropout), its gradient, and the project's optax AdamW (``unclip_jax.train.optim.
make_optimizer``: global-norm clipping + AdamW with the config's hyper-parameters). No EMA
copy, no data loading: random batches already on the device. fp32 parameters and optimizer
state, ``--dtype`` compute (bf16), rematerialisation per ``--remat`` (the config's by default:
on at Karlo size; the backward pass then recomputes each block's forward).

Prints (JSON lines): ``compile`` (seconds; the executable's static memory), ``training``
(seconds per step over ``--steps`` timed steps after ``--warmup`` steps, examples/s, FLOPs
per example and MFU = examples/s × FLOPs per example / device dense bf16 peak).
FLOPs per example = 3 × the forward's matmul + convolution FLOPs (``bench.flops``, counted
on this program's loss with XLA attention; recomputation not counted), and the stage's own
``flops_per_example`` beside it as a cross-check.
"""

from __future__ import annotations

import argparse
import time

from bench import common


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", required=True, choices=["decoder", "prior"])
    ap.add_argument("--config-variant", default="karlo", help="configs/<stage>.py variant")
    ap.add_argument("--config-file", default="",
                    help="another stage config FILE[:VARIANT] instead, e.g. configs/shapes_decoder.py "
                         "(the shapes recipe's decoder; its clip.kind does not matter: batches are random)")
    ap.add_argument("--batch", type=int, default=0, help="examples per step (0: a size-dependent default)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="", help="compute dtype (default: the config's)")
    ap.add_argument("--remat", default="config", choices=["config", "on", "off"])
    ap.add_argument("--remat-policy", default="", choices=["", "full", "dots", "convs"],
                    help="what a rematerialised block keeps (default: the config's; 'convs' is for the decoder)")
    ap.add_argument("--attention", default="", help="attention implementation (default: the config's)")
    ap.add_argument("--max-mem-fraction", type=float, default=0.95,
                    help="skip running when the executable needs more of the device memory than this")
    ap.add_argument("--out", default="")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


DEFAULT_BATCH = {("decoder", "karlo"): 128, ("prior", "karlo"): 512}


def load_stage_config(args):
    from unclip_jax.config import load_config
    overrides = []
    if args.dtype:
        overrides.append(f"model.dtype={args.dtype}")
    if args.remat != "config":
        overrides.append(f"model.remat={args.remat == 'on'}")
    if args.attention:
        overrides.append(f"model.attention_impl={args.attention}")
    if args.remat_policy:
        overrides.append(f"model.remat_policy={args.remat_policy}")
    return load_config(args.config_file or f"configs/{args.stage}.py:{args.config_variant}", overrides)


def stage_pieces(stage: str, config, batch: int, seed: int):
    """(abstract params, loss(params, batch, key), random batch, stage flops_per_example fn)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(seed)

    def text(b, length, d):
        lengths = rng.integers(4, 20, b)
        mask = np.arange(length)[None, :] < lengths[:, None]
        hidden = rng.standard_normal((b, length, d)).astype(np.float32) * mask[..., None]
        return {"text_embed": rng.standard_normal((b, d)).astype(np.float32), "text_hidden": hidden,
                "text_mask": mask}

    if stage == "decoder":
        from unclip_jax.stages import decoder as dec
        spec = dec.decoder_spec(config)
        d, size = spec["text_proj"]["clip_embeddings_dim"], spec["image_size"]
        length = int(config.clip.get("text_len", 77)) if "clip" in config else 77
        shapes = jax.eval_shape(lambda k: dec.init_params(k, config), jax.random.key(0))
        data = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
                "image_embed": rng.standard_normal((batch, d)).astype(np.float32), **text(batch, length, d)}
        loss = lambda p, bt, k: dec.loss_fn(p, bt, k, config, train=True)
        return shapes, loss, data, lambda: dec.flops_per_example(config)

    from unclip_jax.stages import prior as pri
    model = pri.build_model(config)
    d, length = model.embed_dim, model.num_text_tokens
    shapes = jax.eval_shape(lambda k: pri.init_prior_params(model, k), jax.random.key(0))
    stats = {"clip_mean": jnp.zeros((d,), jnp.float32), "clip_std": jnp.ones((d,), jnp.float32)}
    data = {"image_embed": rng.standard_normal((batch, d)).astype(np.float32), **text(batch, length, d)}
    loss = lambda p, bt, k: pri.prior_loss(p, stats, bt, k, config, train=True)
    return shapes, loss, data, lambda: pri.flops_per_example(config)


def main(argv=None):
    args = parse(argv)
    batch = args.batch or DEFAULT_BATCH.get((args.stage, args.config_variant), 8)
    emit = common.Emitter(args.out, side="ours",
                          setting=f"train {args.stage} {args.config_file or args.config_variant}")
    import jax
    import jax.numpy as jnp
    import optax
    from bench import flops as flops_lib
    from bench.stack import count, random_like
    from unclip_jax.train import optim

    config = load_stage_config(args)
    emit("setup", command=common.argv_string(), **common.versions(), **common.jax_device_info(), batch=batch,
         dtype=config.model.dtype, remat=bool(config.model.remat),
         remat_policy=config.model.get("remat_policy", "full") if config.model.remat else None,
         attention=config.model.get("attention_impl", "xla"), since_start_s=common.since_start())

    shapes, loss_fn, data, stage_flops = stage_pieces(args.stage, config, batch, args.seed)
    t0 = time.perf_counter()
    params = random_like(shapes, args.seed, "float32")
    tx = optim.make_optimizer(config.optim, 1_000_000)
    opt_state = jax.jit(tx.init)(params)
    data = jax.device_put(data)
    jax.block_until_ready((params, opt_state))
    emit("init", init_s=round(time.perf_counter() - t0, 2), params=count(params), peak_mem_GB=common.peak_gb())

    # FLOPs per example: 3 × forward, counted at batch 1 on the XLA-attention form of the loss.
    def count_forward():
        one = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype), data)
        cfg = config.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.model.attention_impl = "xla"
            cfg.model.remat = False
        _, xla_loss, _, _ = stage_pieces(args.stage, cfg, 1, args.seed)
        return flops_lib.count_flops(lambda p, b: xla_loss(p, b, jax.random.key(0))[0], shapes, one)
    forward = emit.guard("flop count", count_forward)
    per_example = 3.0 * forward if forward else None
    stage_value = emit.guard("stage flops_per_example", stage_flops)
    peak = flops_lib.peak_flops()
    emit("flops", forward_tflop_per_example=forward and forward / 1e12,
         train_tflop_per_example=per_example and per_example / 1e12,
         stage_flops_per_example_tflop=stage_value and stage_value / 1e12, device_peak_tflops=peak and peak / 1e12)

    def step(params, opt_state, batch, key):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jstep = jax.jit(step, donate_argnums=(0, 1))
    key = jax.random.key(args.seed)

    def run():
        nonlocal params, opt_state
        t0 = time.perf_counter()
        lowered = jstep.lower(params, opt_state, data, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = common.executable_gb(compiled)
        stats = common.memory_stats() or {}
        limit = stats.get("bytes_limit")
        emit("compile", batch=batch, trace_lower_s=round(t1 - t0, 3), compile_s=round(t2 - t1, 3), executable=mem,
             device_bytes_limit_GB=limit and round(limit / 1e9, 2))
        if mem and limit and mem["total_GB"] * 1e9 > args.max_mem_fraction * limit:
            raise MemoryError(f"the step needs {mem['total_GB']} GB, the device has {limit / 1e9:.1f} GB: "
                              "use a smaller --batch or --remat on")
        losses = []
        for i in range(args.warmup):
            params, opt_state, loss = compiled(params, opt_state, data, jax.random.fold_in(key, i))
        jax.block_until_ready(params)
        t = time.perf_counter()
        for i in range(args.steps):
            params, opt_state, loss = compiled(params, opt_state, data, jax.random.fold_in(key, 1000 + i))
            losses.append(loss)
        jax.block_until_ready((params, opt_state))
        seconds = (time.perf_counter() - t) / args.steps
        record = dict(batch=batch, sec_per_step=round(seconds, 4), examples_per_s=round(batch / seconds, 2),
                      losses=[round(float(x), 5) for x in losses], peak_mem_GB=common.peak_gb())
        if per_example:  # on a CPU (no known peak) the achieved rate is the figure to compare
            record["achieved_tflops"] = round(batch / seconds * per_example / 1e12, 5)
        if per_example and peak:
            record["mfu"] = round(batch / seconds * per_example / peak, 4)
        if stage_value and peak:
            record["mfu_stage_flops"] = round(batch / seconds * stage_value / peak, 4)
        emit("training", **record)

    emit.guard(f"training {args.stage} batch {batch}", run, batch=batch)


if __name__ == "__main__":
    main()
