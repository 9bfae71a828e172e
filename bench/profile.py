"""Where the cascade's device time goes: one profiled call, split by stage and kind of kernel.

    python -m bench.profile --size karlo --batches 8,32 --cache-dir /tmp/jax_cache \\
        --exported-batches 8,32 --out OUT/profile.jsonl --trace-dir OUT/profile

Run after ``bench.sampling`` with the same ``--cache-dir`` (and ``--exported-batches``): the
programs then load from the persistent cache in seconds. For each batch: one warm-up call,
then one call under ``jax.profiler.trace`` (a Perfetto trace in ``--trace-dir``), and a
``profile`` JSON line with

- ``wall_s`` of the profiled call and ``device_busy_s``: the summed durations of the
  device's op events (XLA's "XLA Ops" line when the trace has one, else its kernels;
  the other line, if any, is summarised the same way under ``kernels_summary``);
- ``by_stage``: seconds per stage (clip_text / prior / decoder / super_res / other), from the
  stage ``jax.named_scope`` of ``bench/cascade.py`` found in each HLO instruction's
  metadata of the compiled program;
- ``by_kind``: seconds per kind of op (convolution, matmul, attention, fusion = XLA's own
  elementwise/reduction kernels, copy/transpose, other), overall and per stage;
- ``top``: the 40 ops with the most time (stage, op group, kind, count, seconds); an op
  group is the op's path inside the sampling loop without block indices, or a library
  kernel's family (cuDNN convolution/attention and cuBLAS kernels carry no HLO name: in
  stream order they take the stage of the op before them).

The compiled program's HLO text goes to ``--trace-dir`` too (``hlo_b{B}.txt.gz``), for a
closer look offline; ``--analyse`` re-reads a saved ``--trace-dir`` without a device. On a
CPU the trace has no device line; the script then reports the host's XLA op events
(``--size tiny``: a dry run of this script).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import time
from typing import Any, Mapping

from bench import common

STAGES = ("clip_text", "prior", "decoder", "super_res")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="karlo", choices=["karlo", "tiny"])
    ap.add_argument("--batches", default="8")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--param-dtype", default="bfloat16")
    ap.add_argument("--attention", default="auto", choices=["xla", "auto", "cudnn", "splash"])
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--exported-batches", default="", help="as bench.sampling: load these batches' exported programs")
    ap.add_argument("--trace-dir", required=True)
    ap.add_argument("--analyse", action="store_true",
                    help="re-analyse the traces and HLO already in --trace-dir (no device, no run)")
    ap.add_argument("--out", default="")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def instruction_table(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name → (stage, op group) from its metadata's op_name: the stage scope
    of ``bench/cascade.py``, and the op's path inside the sampling loop with block indices
    dropped (``UNet/down_blocks/resnets/norm1/reduce_sum``): what one kind of layer costs."""
    table = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, op_name = m.groups()
        stage = next((s for s in STAGES if f"/{s}/" in f"/{op_name}/"), "other")
        group = re.sub(r"_\d+\b", "", op_name.split("/while/body/")[-1].replace("eval_jaxpr/", ""))
        table[name] = (stage, group[-90:])
    return table


def kind_of(name: str, long_name: str = "") -> str:
    """A coarse kind for an op or kernel name (HLO instruction or CUDA kernel)."""
    text = f"{name} {long_name}".lower()
    if re.search(r"fmha|sdpa|flash|attention", text):
        return "attention"
    if re.search(r"conv|fprop|dgrad|wgrad", text):
        return "convolution"
    if re.search(r"gemm|matmul|dot|nvjet|cublas|xmma", text):
        return "matmul"
    if re.search(r"copy|transpose|memcpy|memset", text):
        return "copy/transpose"
    if re.search(r"fusion|reduce|elementwise|loop_|input_", text):
        return "fusion"
    return "other"


def load_trace(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no trace under {trace_dir}")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_lines(events: list[dict]) -> dict[str, list[dict]]:
    """The trace's device events: {"ops": XLA's "XLA Ops" line, "kernels": the kernel streams}
    of a GPU/TPU process (either may be missing: with CUDA graphs, an op line may hold one
    command buffer where the streams hold its kernels); on a CPU {"ops": the host's XLA ops}."""
    pnames, tnames = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pnames[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            tnames[(e["pid"], e["tid"])] = e["args"]["name"]
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device_pids = {p for p, n in pnames.items() if re.search(r"/device:(GPU|TPU)", n)}
    lines = {}
    for line, pattern in (("ops", r"^XLA Ops$"), ("kernels", r"Stream")):
        tids = {k for k, n in tnames.items() if k[0] in device_pids and re.search(pattern, n)}
        chosen = [e for e in complete if (e["pid"], e["tid"]) in tids]
        if chosen:
            lines[line] = chosen
    if not lines:
        tids = {k for k, n in tnames.items() if re.search(r"XLA|Eigen|tf_", n)}
        # Runtime frames ("ThunkExecutor::Execute") wrap the ops: counting them would count twice.
        lines["host_ops"] = [e for e in complete if (e["pid"], e["tid"]) in tids and "::" not in e["name"]]
    return lines


def _instruction(name: str, table: Mapping[str, Any]) -> str:
    """An event's HLO instruction: its name, or a kernel's name with its '_N' suffix as '.N'."""
    name = name.lstrip("%").split(" ")[0]
    if name not in table:
        dotted = re.sub(r"_(\d+)$", r".\1", name)
        if dotted in table:
            return dotted
    return name


def summarise(events: list[dict], table: dict[str, tuple[str, str]]) -> dict:
    """Seconds by stage, by kind, by stage × kind, and the ops (groups) with the most time.

    Library kernels (cuDNN convolutions and attention, cuBLAS matmuls) carry no HLO name in
    the trace; in stream order each takes the stage of the op before it (the stages run one
    after another) and is grouped by its kernel family."""
    by_stage = collections.Counter()
    by_kind = collections.Counter()
    by_stage_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_group: dict[tuple[str, str], list] = {}
    stage = "other"
    for e in sorted(events, key=lambda e: e.get("ts", 0)):
        args = e.get("args") or {}
        name = _instruction(e["name"], table)
        if name not in table:
            name = _instruction(str(args.get("hlo_op", "")), table) or name
        if name in table:
            stage, group = table[name]
            kind = kind_of(name)  # the instruction says what ran; its op path, only if it does not
            kind = kind_of("", group) if kind == "other" else kind
        else:  # a library kernel: the stage carries over; family = name up to its tile sizes
            group = "kernel " + re.sub(r"_\d+x\d+.*", "", e["name"])[:60]
            kind = kind_of(e["name"])
        seconds = e["dur"] * 1e-6
        by_stage[stage] += seconds
        by_kind[kind] += seconds
        by_stage_kind[stage][kind] += seconds
        entry = per_group.setdefault((stage, group), [kind, 0, 0.0])
        entry[1] += 1
        entry[2] += seconds
    top = sorted(per_group.items(), key=lambda kv: -kv[1][2])[:40]
    r = lambda c: {k: round(v, 4) for k, v in sorted(c.items(), key=lambda kv: -kv[1])}
    return {
        "device_busy_s": round(sum(by_stage.values()), 4),
        "events": len(events),
        "by_stage": r(by_stage),
        "by_kind": r(by_kind),
        "by_stage_kind": {s: r(c) for s, c in by_stage_kind.items()},
        "top": [{"stage": s, "op": g, "kind": k, "count": c, "s": round(t, 4)} for (s, g), (k, c, t) in top],
    }


def analyse(trace_dir: str, hlo_path: str) -> dict:
    """The ``profile`` summary of a saved trace (``--trace-dir``/b{B}) and compiled HLO text."""
    with gzip.open(hlo_path, "rt") as f:
        table = instruction_table(f.read())
    lines = device_lines(load_trace(trace_dir))
    line = "ops" if "ops" in lines else next(iter(lines))
    others = {f"{name}_summary": summarise(ev, table) for name, ev in lines.items() if name != line}
    return {"line": line, "instructions_with_stage": len(table), **summarise(lines[line], table), **others}


def main(argv=None):
    args = parse(argv)
    if args.analyse:  # a saved run: no device needed
        emit = common.Emitter(args.out, side="ours", setting="profile (re-analysed)")
        for b in (int(x) for x in args.batches.split(",")):
            emit("profile", batch=b, trace_dir=args.trace_dir,
                 **analyse(os.path.join(args.trace_dir, f"b{b}"), os.path.join(args.trace_dir, f"hlo_b{b}.txt.gz")))
        return
    emit = common.Emitter(args.out, side="ours", setting=f"profile {args.attention} {args.dtype}/{args.param_dtype}")
    if args.cache_dir:
        common.enable_compilation_cache(args.cache_dir)
    import jax
    from bench.cascade import Prompts, Runner, exported_callable, tokenizer_files
    from bench.sampling import compile_exported
    from bench.stack import random_stack

    emit("setup", command=common.argv_string(), **common.versions(), **common.jax_device_info())
    configs, params = random_stack(args.size, dtype=args.dtype, attention=args.attention,
                                   param_dtype=args.param_dtype, seed=args.seed)
    tok_dir = tokenizer_files(os.path.join(args.cache_dir or "/tmp", "bench_tokenizer"))
    runner = Runner(configs, params, Prompts(tok_dir), seed=args.seed)
    exported = {int(b) for b in args.exported_batches.split(",") if b}
    os.makedirs(args.trace_dir, exist_ok=True)

    def one_batch(b: int):
        if b in exported:  # the first process's exported program: a persistent-cache hit
            loader = argparse.Namespace(cache_dir=args.cache_dir, size=args.size, attention=args.attention,
                                        warm_start=True)
            c = compile_exported(loader, runner, b, exported_callable)
        else:
            c = runner.compile(b)
        hlo_path = os.path.join(args.trace_dir, f"hlo_b{b}.txt.gz")
        with gzip.open(hlo_path, "wt") as f:
            f.write(runner.compiled[b].as_text())
        runner.run(b)  # warm-up
        trace_dir = os.path.join(args.trace_dir, f"b{b}")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            wall_s, _ = runner.run(b)
        emit("profile", batch=b, compile_total_s=c["total_s"], wall_s=round(wall_s, 4),
             **analyse(trace_dir, hlo_path))

    for b in (int(x) for x in args.batches.split(",")):
        t0 = time.perf_counter()
        emit.guard(f"profile batch {b}", lambda: one_batch(b), batch=b)
        emit("timing", batch=b, seconds=round(time.perf_counter() - t0, 2))


if __name__ == "__main__":
    main()
