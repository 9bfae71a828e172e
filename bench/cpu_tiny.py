"""CPU side by side: the tiny cascade of diffusers' UnCLIPPipeline against ours, one process.

    python -m bench.cpu_tiny --batches 1 --reps 3 [--stages] --out OUT/cpu_tiny.jsonl

Both sides run the SAME network: the tiny pipeline of ``bench/arch.py`` is built in diffusers
with random weights, saved with ``save_pretrained`` and read by our converters
(``unclip_jax.convert.{clip,prior,unet}``); the CLIP text encodings of the prompt are
compared as a check that the weights arrived. Same prompt, same tokenizer files, same
steps and guidance (25/25/7, 4/8), fp32 on both sides.

Timing: our program is compiled first (reported apart, not timed with the runs); each
side gets one warm-up call per batch size; then ``--reps`` rounds, each timing diffusers
then ours back to back (interleaved, so that load from other jobs on the machine hits
both sides alike). Reported per batch: images/s of each side (mean and best over the
rounds), the ratio of means, the median of the per-round ratios, and ``cpu_steal``: the
share of the host's CPU time the hypervisor gave to other guests meanwhile (on a shared VM
it slows the two sides unevenly; 0.034 in the session-22 run of ``bench/RESULTS.md``), over
all rounds and (``round_cpu_steal``) during each side's call of each round.
``--stages`` adds a ``stages`` line: seconds per stage at batch 1, diffusers' from timed
``forward`` calls of each stage's modules during whole pipeline calls (the rest as ``other``),
ours from each stage jitted alone, and the ratio per stage.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from bench import common
from bench.arch import PROMPT


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--stages", action="store_true",
                    help="also time each stage alone on both sides at batch 1 (a 'stages' line)")
    common.add_xla_cpu_convolutions_flag(ap)
    return ap.parse_args(argv)


# diffusers' pipeline modules of each cascade stage (text_proj runs inside the decoder stage)
TORCH_STAGES = {"clip_text": ("text_encoder",), "prior": ("prior",), "decoder": ("text_proj", "decoder"),
                "super_res": ("super_res_first", "super_res_last")}


def torch_stage_seconds(pipe, run, reps: int) -> dict[str, float]:
    """Mean seconds per pipeline call spent in each stage's modules (their ``forward`` calls,
    timed by a wrapper), over ``reps`` calls of ``run()``; 'other' is the rest of the call
    (schedulers, guidance arithmetic, tokenising, image conversion)."""
    spent = {stage: 0.0 for stage in TORCH_STAGES}
    originals = {}
    for stage, names in TORCH_STAGES.items():
        for name in names:
            module = getattr(pipe, name)
            originals[name] = module.forward

            def timed(*a, _forward=module.forward, _stage=stage, **k):
                start = time.perf_counter()
                out = _forward(*a, **k)
                spent[_stage] += time.perf_counter() - start
                return out
            module.forward = timed
    try:
        start = time.perf_counter()
        for _ in range(reps):
            run()
        total = (time.perf_counter() - start) / reps
    finally:
        for name, forward in originals.items():
            getattr(pipe, name).forward = forward
    out = {stage: round(seconds / reps, 3) for stage, seconds in spent.items()}
    out["other"] = round(total - sum(spent.values()) / reps, 3)
    return out


def our_stage_seconds(runner, reps: int) -> dict[str, float]:
    """Median seconds of each stage of our cascade at batch 1, each jitted alone (compiled
    first, not timed) and fed the previous stage's outputs."""
    import jax
    from bench.cascade import cascade_stages, stage_keys
    stage = {name: jax.jit(fn) for name, fn in cascade_stages(runner.configs).items()}
    params, ids, mask, null_ids, null_mask, seed = runner.args(1)
    k_prior, k_dec, k_sr = stage_keys(seed)
    calls = {"clip_text": lambda: stage["clip_text"](params, ids, null_ids)}
    embed, hidden, null_embed, null_hidden = jax.block_until_ready(calls["clip_text"]())
    calls["prior"] = lambda: stage["prior"](params, embed, hidden, mask, null_embed, null_hidden, null_mask, k_prior)
    z_i = jax.block_until_ready(calls["prior"]())
    calls["decoder"] = lambda: stage["decoder"](params, z_i, embed, hidden, mask, null_embed, null_hidden, null_mask,
                                                k_dec)
    low = jax.block_until_ready(calls["decoder"]())
    calls["super_res"] = lambda: stage["super_res"](params, low, k_sr)
    jax.block_until_ready(calls["super_res"]())
    out = {}
    for name, call in calls.items():
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
        out[name] = round(statistics.median(times), 3)
    return out


def main(argv=None):
    args = parse(argv)
    common.choose_xla_cpu_convolutions(args)
    emit = common.Emitter(args.out, side="both", setting="cpu tiny fp32")
    import torch
    import jax
    import jax.numpy as jnp
    from bench.anchor_diffusers_unclip import build, param_counts, run_pipe
    from bench.cascade import Prompts, Runner
    from bench.stack import count, stack_from_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    emit("setup", command=common.argv_string(), **common.versions(("jax", "jaxlib", "flax", "numpy", "torch",
                                                                    "diffusers", "transformers")),
         **common.jax_device_info(), torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
         loadavg=os.getloadavg())

    work = tempfile.mkdtemp(prefix="bench_cpu_tiny_")
    tok_dir, pipe_dir = os.path.join(work, "tokenizer"), os.path.join(work, "pipeline")
    os.makedirs(tok_dir)
    torch.manual_seed(0)
    pipe = build("tiny", torch.float32, "cpu", tokenizer_dir=tok_dir)
    pipe.save_pretrained(pipe_dir)
    t0 = time.perf_counter()
    configs, params = stack_from_pipeline(pipe_dir, dtype="float32", attention="xla")
    prompts = Prompts(tok_dir)
    runner = Runner(configs, params, prompts)
    emit("convert", convert_s=round(time.perf_counter() - t0, 2),
         params_ours={k: count(v) for k, v in params.items() if k != "prior_stats"},
         params_diffusers=param_counts(pipe))

    # The weights arrived: CLIP text encodings of the prompt on both sides.
    ids, mask = prompts(1)
    with torch.no_grad():
        ref = pipe.text_encoder(torch.as_tensor(np.asarray(ids), dtype=torch.long))
    from unclip_jax.models.clip import CLIPModel
    ours_embed, ours_hidden = CLIPModel(configs["clip"]).apply({"params": params["clip"]}, jnp.asarray(ids), None,
                                                                method="encode_text")
    emit("check", what="CLIP text encodings, ours vs diffusers (same converted weights)",
         embed_max_abs_diff=float(np.abs(np.asarray(ours_embed) - ref.text_embeds.numpy()).max()),
         hidden_max_abs_diff=float(np.abs(np.asarray(ours_hidden) - ref.last_hidden_state.numpy()).max()))

    batches = sorted(int(b) for b in args.batches.split(","))
    for b in batches:
        c = emit.guard(f"compile batch {b}", lambda: runner.compile(b))
        if c:
            emit("compile", batch=b, **c)

    def diffusers_call(b):
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        images = run_pipe(pipe, [PROMPT] * b, g)
        return time.perf_counter() - t, images

    for b in batches:
        def measure():
            d0, d_images = diffusers_call(b)  # warm-ups
            o0, o_images = runner.run(b)
            if d_images.shape != o_images.shape:
                raise ValueError(f"image shapes differ: diffusers {d_images.shape}, ours {o_images.shape}")
            d_times, o_times, d_steal, o_steal = [], [], [], []
            with common.StealMeter() as steal:
                for _ in range(args.reps):
                    with common.StealMeter() as round_steal:
                        d_times.append(diffusers_call(b)[0])
                    d_steal.append(round_steal.share)
                    with common.StealMeter() as round_steal:
                        o_times.append(runner.run(b)[0])
                    o_steal.append(round_steal.share)
            d_mean, o_mean = statistics.fmean(d_times), statistics.fmean(o_times)
            emit("sampling_pair", batch=b, shape=list(o_images.shape), reps=args.reps,
                 diffusers=common.timing_stats(d_times, b), ours=common.timing_stats(o_times, b),
                 warmup_s={"diffusers": round(d0, 3), "ours": round(o0, 3)},
                 ratio_of_means=round(d_mean / o_mean, 3),
                 median_round_ratio=round(statistics.median(d / o for d, o in zip(d_times, o_times)), 3),
                 cpu_steal=steal.share, round_cpu_steal={"diffusers": d_steal, "ours": o_steal},
                 loadavg=os.getloadavg())
        emit.guard(f"sampling batch {b}", measure, batch=b)

    if args.stages:
        def stages():
            run = lambda: run_pipe(pipe, [PROMPT], torch.Generator().manual_seed(0))
            with common.StealMeter() as steal:
                diffusers_s = torch_stage_seconds(pipe, run, args.reps)
                ours_s = our_stage_seconds(runner, args.reps)
            emit("stages", batch=1, reps=args.reps, diffusers_s=diffusers_s, ours_s=ours_s,
                 ratio={k: round(diffusers_s[k] / ours_s[k], 3) for k in ours_s if ours_s[k] > 0},
                 cpu_steal=steal.share, loadavg=os.getloadavg())
        emit.guard("stages", stages)


if __name__ == "__main__":
    main()
