"""Our whole text → image cascade (CLIP text → prior → decoder → super-res), timed.

    python -m bench.sampling --size karlo --batches 8,32,1 --attention auto --exported-batches 8 \\
        --cache-dir /tmp/jax_cache --out OUT/ours_cold.jsonl                      # first process
    python -m bench.sampling --size karlo --batches 1,8,32 --reps 1 --warm-start --exported-batches 8 \\
        --cache-dir /tmp/jax_cache --no-flops --out OUT/ours_warm.jsonl           # second process
    python -m bench.sampling --size tiny --dtype float32 --param-dtype float32 --batches 1  # CPU

Random weights of ``bench/arch.py`` (``--size``), bf16 compute (``--dtype``), weights stored
in ``--param-dtype`` (bf16 by default: inference needs no fp32 master copy), 25/25/7 steps
with guidance 4/8. For each batch size (in the order given) it prints JSON lines:

- ``compile``: seconds to trace+lower and to compile the one jitted cascade program
  (a first process with an empty ``--cache-dir`` compiles; ``--warm-start`` measures the
  load from the persistent compilation cache of a second process);
- ``sampling``: images/s (best and mean of ``--reps`` full calls after one warm-up call,
  tokenising and the copy of the images to the host included), the device's
  ``peak_bytes_in_use`` so far (JAX cannot reset it: it is the peak of the process so far,
  so give batches in ascending order for a per-batch figure; a first process may also
  count the compiler's autotuning scratch, a warm start loads programs and has none), and
  the executable's static memory (arguments + outputs + temporaries);
- ``flops`` (last, unless ``--no-flops``): TFLOP per image (matmuls + convolutions of this
  very program) and the device's ceiling in images/s at its dense bf16 peak
  (``bench/report.py`` divides images/s by it: the fraction of the ceiling reached).

``--api pipeline`` times the user-facing API instead, ``unclip_jax.pipeline.UnCLIPPipeline.
text_to_image`` (one jitted program per stage, per-example noise, uint8 images) with the same
weights and settings (one prior candidate, as diffusers): ``compile`` then holds the first
call's XLA compile seconds (``jax.monitoring``) and its wall time.

``--compile-by-stage`` only compiles CLIP, the prior, the decoder and the super-res stage
each as its own program (no cache) and prints one ``stage_compile`` line per batch: where a
cold compile of the cascade spends its time.

``--fast-norm`` builds the UNets with one-pass GroupNorm statistics (an A/B of
``UNet.norm_fast_variance``: one read of each activation for the statistics instead of two).

``--exported-batches 8`` builds the batch-8 program through ``jax.export`` instead of ``jax.jit``
tracing: the first process serialises it into ``--cache-dir`` (``export_s`` = tracing and
lowering) and compiles the deserialised form; a warm start reads that file and compiles
it (a persistent-cache hit), without tracing any Python. Needs the ``flatbuffers`` package;
without it the batch falls back to the plain path and an error line says why.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench import common


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="karlo", choices=["karlo", "tiny"])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype")
    ap.add_argument("--param-dtype", default="bfloat16", help="weight storage dtype")
    ap.add_argument("--attention", default="auto", choices=["xla", "auto", "cudnn", "splash"])
    ap.add_argument("--cache-dir", default="", help="persistent compilation cache directory")
    ap.add_argument("--warm-start", action="store_true",
                    help="second process: the cache is expected to hold the programs")
    ap.add_argument("--exported-batches", default="",
                    help="batch sizes whose program goes through jax.export (needs --cache-dir)")
    ap.add_argument("--fast-norm", action="store_true",
                    help="UNets with one-pass GroupNorm statistics (UNet.norm_fast_variance)")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (saves a trace)")
    ap.add_argument("--api", default="cascade", choices=["cascade", "pipeline"],
                    help="cascade: bench/cascade.py, one jitted program; pipeline: unclip_jax.pipeline")
    ap.add_argument("--compile-by-stage", action="store_true",
                    help="only compile each stage (CLIP, prior, decoder, super-res) as its own program "
                         "per batch and report the seconds (no persistent cache: a cold compile split by stage)")
    ap.add_argument("--out", default="")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def export_path(cache_dir: str, size: str, batch: int, attention: str) -> str:
    return os.path.join(cache_dir, f"cascade_{size}_{attention}_b{batch}.jax_export")


def main(argv=None):
    args = parse(argv)
    setting = (f"ours{' pipeline API' if args.api == 'pipeline' else ''} {args.attention} "
               f"{args.dtype}/{args.param_dtype}" + (" fast-norm" if args.fast_norm else "")
               + (" warm" if args.warm_start else ""))
    emit = common.Emitter(args.out, side="ours", setting=setting)
    if args.cache_dir:
        common.enable_compilation_cache(args.cache_dir)
    import jax
    from bench import flops as flops_lib
    from bench.cascade import Prompts, Runner, exported_callable, tokenizer_files
    from bench.stack import count, random_stack, with_fast_norm

    emit("setup", command=common.argv_string(), **common.versions(), **common.jax_device_info(),
         cache_dir=args.cache_dir or None, warm_start=args.warm_start, since_start_s=common.since_start())

    t0 = time.perf_counter()
    configs, params = random_stack(args.size, dtype=args.dtype, attention=args.attention,
                                   param_dtype=args.param_dtype, seed=args.seed)
    if args.fast_norm:
        configs = with_fast_norm(configs)
    jax.block_until_ready(params)
    emit("init", init_s=round(time.perf_counter() - t0, 2),
         params={k: count(v) for k, v in params.items() if k != "prior_stats"}, peak_mem_GB=common.peak_gb())

    tok_dir = tokenizer_files(os.path.join(args.cache_dir or "/tmp", "bench_tokenizer"))
    runner = Runner(configs, params, Prompts(tok_dir), seed=args.seed)
    batches = [int(b) for b in args.batches.split(",")]
    if args.compile_by_stage:
        from bench.cascade import stage_compile_times
        if args.cache_dir:
            raise SystemExit("--compile-by-stage times cold compiles: leave out --cache-dir")
        for b in batches:
            emit.guard(f"stage compile batch {b}", lambda: emit(
                "stage_compile", batch=b, stages=stage_compile_times(configs, runner.abstract_args(b))), batch=b)
        return
    if args.api == "pipeline":
        for b in batches:
            emit.guard(f"pipeline API batch {b}", lambda: pipeline_batch(args, emit, configs, params, runner, b),
                       batch=b)
        return

    exported_batches = {int(b) for b in args.exported_batches.split(",") if b}
    if exported_batches and not args.cache_dir:
        raise SystemExit("--exported-batches needs --cache-dir (the serialised programs are kept there)")

    def compile_batch(b: int):
        if b in exported_batches:
            c = emit.guard(f"exported program batch {b}", lambda: compile_exported(args, runner, b, exported_callable),
                           batch=b)
            if c is not None:
                return c
        return {"exported": False, **runner.compile(b)}

    def one_batch(b: int):
        c = compile_batch(b)
        emit("compile", batch=b, from_cache=args.warm_start, since_start_s=common.since_start(), **c)
        first_s, images = runner.run(b)  # warm-up: first execution (module loading, allocations)
        times = [runner.run(b)[0] for _ in range(args.reps)]
        stats = common.timing_stats(times, b)
        record = dict(batch=b, shape=list(images.shape), first_call_s=round(first_s, 3), **stats,
                      peak_mem_GB=common.peak_gb(), executable=common.executable_gb(runner.compiled[b]),
                      finite=bool(np.isfinite(images).all()), exported=c["exported"])
        emit("sampling", **record)

    for b in batches:
        emit.guard(f"sampling batch {b}", lambda: one_batch(b), batch=b)

    # Last, so that it delays no compile figure: TFLOP per image of this program (XLA
    # attention: cuDNN custom calls would not be counted) and the device's ceiling.
    if not args.no_flops:
        def count_flops():
            from bench.stack import with_options
            xla = with_options(configs, dtype=args.dtype, attention="xla")
            fn = Runner(xla, params, runner.prompts).fn
            return flops_lib.count_flops(fn, *runner.abstract_args(1)) / 1e12
        tflop_per_image = emit.guard("flop count", count_flops)
        peak = flops_lib.peak_flops()
        emit("flops", tflop_per_image=tflop_per_image, device_peak_tflops=peak and peak / 1e12,
             ceiling_images_per_s=(peak / (tflop_per_image * 1e12)) if (peak and tflop_per_image) else None)


_PIPELINES: dict = {}


def pipeline_batch(args, emit, configs, params, runner, b: int) -> None:
    """``UnCLIPPipeline.text_to_image`` at batch ``b`` (module doc)."""
    from bench.arch import PROMPT, SAMPLING
    from unclip_jax.pipeline import DEFAULT_SETTINGS, UnCLIPPipeline, Upsampler
    if "pipe" not in _PIPELINES:
        settings = dict(DEFAULT_SETTINGS, prior_steps=SAMPLING["prior_steps"], prior_guidance=SAMPLING["prior_guidance"],
                        prior_clip_range=SAMPLING["prior_clip_range"], best_of_n=1,
                        decoder_steps=SAMPLING["decoder_steps"], decoder_guidance=SAMPLING["decoder_guidance"],
                        upsampler_steps=SAMPLING["super_res_steps"])
        _PIPELINES["pipe"] = UnCLIPPipeline(
            tokenizer=runner.prompts.tokenizer, clip_config=configs["clip"], clip_params=params["clip"],
            prior_config=configs["prior"], prior_params=params["prior"], prior_stats=params["prior_stats"],
            decoder_config=configs["decoder"], decoder_params=params["decoder"],
            upsamplers=[Upsampler(configs["super_res"], params["sr_first"], params["sr_last"])], defaults=settings)
    pipe = _PIPELINES["pipe"]
    prompts = [PROMPT] * b

    def call(seed):
        t0 = time.perf_counter()
        out = pipe.text_to_image(prompts, seed=seed)
        return time.perf_counter() - t0, out

    first_s, out = call(args.seed)
    compile_s = sum(t.get("compile_s", 0.0) for t in out["timings"].values())
    emit("compile", batch=b, from_cache=args.warm_start, exported=False, compile_s=round(compile_s, 3),
         first_call_s=round(first_s, 3), since_start_s=common.since_start(),
         stages={k: {n: round(v, 3) for n, v in t.items()} for k, t in out["timings"].items()})
    times = [call(args.seed + 1 + i)[0] for i in range(args.reps)]
    emit("sampling", batch=b, shape=list(out["images"].shape), **common.timing_stats(times, b),
         peak_mem_GB=common.peak_gb(), exported=False)


def compile_exported(args, runner, b: int, exported_callable) -> dict:
    """The batch-``b`` program through ``jax.export`` (module doc). First process: export
    (trace + lower) and write the file; both: read, deserialise, lower the call, compile."""
    path = export_path(args.cache_dir, args.size, b, args.attention)
    export_s = 0.0
    if not args.warm_start:
        t0 = time.perf_counter()
        blob = runner.export(b)
        with open(path, "wb") as f:
            f.write(blob)
        export_s = time.perf_counter() - t0
    elif not os.path.exists(path):
        raise FileNotFoundError(f"no exported program {path} (run the first process with --exported-batches)")
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        blob = f.read()
    fn = exported_callable(blob)
    load_s = time.perf_counter() - t0
    c = runner.compile(b, fn)
    return {"exported": True, "export_s": round(export_s, 3), "load_s": round(load_s, 3),
            "trace_lower_s": c["trace_lower_s"], "compile_s": c["compile_s"],
            "total_s": round(export_s + load_s + c["total_s"], 3), "blob_MB": round(len(blob) / 1e6, 2)}


if __name__ == "__main__":
    main()
