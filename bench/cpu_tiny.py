"""CPU side by side: the tiny cascade of diffusers' UnCLIPPipeline against ours, one process.

    python -m bench.cpu_tiny --batches 1 --reps 3 --out OUT/cpu_tiny.jsonl

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
it slows both sides unevenly: ``top`` showed 33-50 % steal on the 2-core EPYC in session 22).
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
    common.add_xla_cpu_convolutions_flag(ap)
    return ap.parse_args(argv)


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
            d_times, o_times = [], []
            cpu_before = common.cpu_times()
            for _ in range(args.reps):
                d_times.append(diffusers_call(b)[0])
                o_times.append(runner.run(b)[0])
            d_mean, o_mean = statistics.fmean(d_times), statistics.fmean(o_times)
            emit("sampling_pair", batch=b, shape=list(o_images.shape), reps=args.reps,
                 diffusers=common.timing_stats(d_times, b), ours=common.timing_stats(o_times, b),
                 warmup_s={"diffusers": round(d0, 3), "ours": round(o0, 3)},
                 ratio_of_means=round(d_mean / o_mean, 3),
                 median_round_ratio=round(statistics.median(d / o for d, o in zip(d_times, o_times)), 3),
                 cpu_steal=common.steal_share(cpu_before, common.cpu_times()), loadavg=os.getloadavg())
        emit.guard(f"sampling batch {b}", measure, batch=b)


if __name__ == "__main__":
    main()
