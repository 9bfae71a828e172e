"""Turns a results directory (the JSON-lines files of one ``bench/run_gpu.sh`` run) into
``summary.md`` and ``summary.json``: every figure, the diffusers ratios and the targets.

    python -m bench.report OUTDIR

Files it reads (each optional; a missing or failed part shows up as such):
``diffusers_eager.jsonl``, ``diffusers_compile.jsonl`` (bench.anchor_diffusers_unclip),
``ours_cold.jsonl``, ``ours_warm.jsonl``, ``ours_xla.jsonl``, ``ours_pipeline.jsonl``, ``ours_fastnorm.jsonl``
(bench.sampling),
``train_prior.jsonl``, ``train_prior_dots.jsonl``, ``train_decoder.jsonl``, ``train_decoder_convs.jsonl``
(bench.training), ``profile.jsonl``
(bench.profile), ``cpu_tiny.jsonl``
(bench.cpu_tiny) and ``parts.jsonl`` (run_gpu.sh: exit status and seconds of each part).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

TARGETS = {
    "eager_b32": 2.0,        # ours / diffusers eager fp16 images/s at batch 32
    "compile_b8": 1.3,       # ours / diffusers torch.compile at batch 8
    "compile_first_s": 60.0,
    "compile_second_s": 5.0,
    "mfu_decoder": 0.40,
    "mfu_prior": 0.50,
    "cpu_tiny": 1.5,
}


def read(directory: str, name: str) -> list[dict]:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    out.append({"kind": "error", "what": f"unreadable line in {name}", "error": line[:200]})
    return out


def by_kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("kind") == kind]


def per_batch(records: list[dict], kind: str = "sampling") -> dict[int, dict]:
    return {r["batch"]: r for r in by_kind(records, kind) if "batch" in r}


def ours_memory(b: int, warm: dict, cold: dict, first_cold) -> tuple[float | None, str | None]:
    """Our peak memory at batch ``b`` and where it comes from. ``peak_bytes_in_use`` is the
    peak of the whole process, so it is a per-batch figure only in the warm start (batches
    ascending, no autotuning) or for the first batch of the cold process; otherwise the
    executable's static memory (arguments + outputs + temporaries) stands in for it."""
    if (warm.get(b) or {}).get("peak_mem_GB"):
        return warm[b]["peak_mem_GB"], "warm-start peak"
    if b == first_cold and (cold.get(b) or {}).get("peak_mem_GB"):
        return cold[b]["peak_mem_GB"], "first-process peak"
    total = ((cold.get(b) or {}).get("executable") or {}).get("total_GB")
    return (total, "executable (static)") if total else (None, None)


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def verdict(value, target, higher_is_better=True):
    if value is None:
        return "open (not measured)"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "NOT met"


def fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def summarize(directory: str) -> dict[str, Any]:
    files = {name: read(directory, f"{name}.jsonl") for name in
             ("diffusers_eager", "diffusers_compile", "ours_cold", "ours_warm", "ours_xla", "ours_pipeline",
              "ours_fastnorm",
              "train_prior", "train_prior_dots",
              "train_decoder", "train_decoder_convs", "cpu_tiny", "profile", "parts")}
    eager, dcomp = per_batch(files["diffusers_eager"]), per_batch(files["diffusers_compile"])
    cold, warm, xla = per_batch(files["ours_cold"]), per_batch(files["ours_warm"]), per_batch(files["ours_xla"])
    api, fastnorm = per_batch(files["ours_pipeline"]), per_batch(files["ours_fastnorm"])
    flops = next((r for name in ("ours_cold", "ours_warm", "ours_xla") for r in by_kind(files[name], "flops")
                  if r.get("tflop_per_image")), {})
    tflop, ceiling = flops.get("tflop_per_image"), flops.get("ceiling_images_per_s")

    cold_order = [r["batch"] for r in by_kind(files["ours_cold"], "sampling") if "batch" in r]
    first_cold = cold_order[0] if cold_order else None
    sampling = []
    for b in sorted(set(eager) | set(dcomp) | set(cold) | set(warm) | set(xla) | set(api) | set(fastnorm)):
        ours = cold.get(b) or warm.get(b) or {}
        ours_ips = ours.get("images_per_s")
        ours_mem, mem_source = ours_memory(b, warm, cold, first_cold)
        e, c = eager.get(b, {}), dcomp.get(b, {})
        sampling.append({
            "batch": b, "ours_images_per_s": ours_ips, "ours_mean_images_per_s": ours.get("mean_images_per_s"),
            "ours_peak_mem_GB": ours_mem, "ours_mem_source": mem_source,
            "ours_executable_GB": (ours.get("executable") or {}).get("total_GB"),
            "ours_xla_images_per_s": xla.get(b, {}).get("images_per_s"),
            "ours_pipeline_api_images_per_s": api.get(b, {}).get("images_per_s"),
            "ours_fastnorm_images_per_s": fastnorm.get(b, {}).get("images_per_s"),
            "diffusers_eager_images_per_s": e.get("images_per_s"), "diffusers_eager_peak_mem_GB": e.get("peak_mem_GB"),
            "diffusers_compile_images_per_s": c.get("images_per_s"),
            "diffusers_compile_peak_mem_GB": c.get("peak_mem_GB"),
            "ratio_vs_eager": ratio(ours_ips, e.get("images_per_s")),
            "ratio_vs_compile": ratio(ours_ips, c.get("images_per_s")),
            "fraction_of_ceiling": ratio(ours_ips, ceiling),
            "memory_not_above_eager": (None if not (ours_mem and e.get("peak_mem_GB"))
                                       else ours_mem <= e["peak_mem_GB"]),
        })

    cold_compiles = by_kind(files["ours_cold"], "compile")
    warm_compiles = by_kind(files["ours_warm"], "compile")
    first_compile = cold_compiles[0] if cold_compiles else {}
    best_warm = min(warm_compiles, key=lambda r: r.get("total_s", 1e9)) if warm_compiles else {}
    training = {}
    for stage in ("prior", "prior_dots", "decoder", "decoder_convs"):
        recs = files[f"train_{stage}"]
        t = (by_kind(recs, "training") or [{}])[0]
        f = (by_kind(recs, "flops") or [{}])[0]
        c = (by_kind(recs, "compile") or [{}])[0]
        training[stage] = {**{k: t.get(k) for k in ("batch", "sec_per_step", "examples_per_s", "mfu",
                                                    "mfu_stage_flops", "peak_mem_GB")},
                           "train_tflop_per_example": f.get("train_tflop_per_example"),
                           "stage_flops_per_example_tflop": f.get("stage_flops_per_example_tflop"),
                           "compile_s": c.get("compile_s"), "executable_GB": (c.get("executable") or {}).get("total_GB")}
    # the prior's best remat policy ('full' or 'dots') counts
    prior_mfu = max((training[k]["mfu"] for k in ("prior", "prior_dots") if training[k]["mfu"] is not None),
                    default=None)
    decoder_mfu = max((training[k]["mfu"] for k in ("decoder", "decoder_convs") if training[k]["mfu"] is not None),
                      default=None)
    b32 = next((s for s in sampling if s["batch"] == 32), {})
    b8 = next((s for s in sampling if s["batch"] == 8), {})
    cpu = (by_kind(files["cpu_tiny"], "sampling_pair") or [{}])[0]
    targets = {
        "ours / diffusers eager fp16 at batch 32 >= 2.0": (b32.get("ratio_vs_eager"),
                                                           verdict(b32.get("ratio_vs_eager"), TARGETS["eager_b32"])),
        "ours / diffusers torch.compile at batch 8 >= 1.3": (b8.get("ratio_vs_compile"),
                                                             verdict(b8.get("ratio_vs_compile"), TARGETS["compile_b8"])),
        "peak memory <= diffusers eager, every batch": (
            ", ".join(f"b{s['batch']}: {fmt(s['ours_peak_mem_GB'])} vs {fmt(s['diffusers_eager_peak_mem_GB'])} GB"
                      for s in sampling if s["memory_not_above_eager"] is not None) or None,
            "open (not measured)" if all(s["memory_not_above_eager"] is None for s in sampling) else
            ("met" if all(s["memory_not_above_eager"] in (True, None) for s in sampling) else "NOT met")),
        "compile, first run <= 60 s": (first_compile.get("total_s"),
                                       verdict(first_compile.get("total_s"), TARGETS["compile_first_s"], False)),
        "compile, second process start <= 5 s": (best_warm.get("total_s"),
                                                  verdict(best_warm.get("total_s"), TARGETS["compile_second_s"], False)),
        "decoder training MFU >= 40%": (decoder_mfu, verdict(decoder_mfu, TARGETS["mfu_decoder"])),
        "prior training MFU >= 50%": (prior_mfu, verdict(prior_mfu, TARGETS["mfu_prior"])),
        "CPU tiny cascade ours / diffusers >= 1.5": (cpu.get("ratio_of_means"),
                                                     verdict(cpu.get("ratio_of_means"), TARGETS["cpu_tiny"])),
    }
    errors = [{"file": name, **{k: r.get(k) for k in ("what", "error")}}
              for name, recs in files.items() for r in recs if r.get("kind") == "error"]
    setups = {name: (by_kind(recs, "setup") or [None])[0] for name, recs in files.items() if by_kind(recs, "setup")}
    return {"sampling": sampling, "tflop_per_image": tflop, "ceiling_images_per_s": ceiling,
            "device_peak_tflops": flops.get("device_peak_tflops"), "compile_cold": cold_compiles,
            "compile_warm": warm_compiles, "training": training, "cpu_tiny": cpu, "targets": targets,
            "profile": by_kind(files["profile"], "profile"),
            "errors": errors, "parts": files["parts"], "setups": setups}


KINDS = ("convolution", "matmul", "attention", "fusion", "copy/transpose", "other")  # bench/profile.py


def markdown(s: dict[str, Any]) -> str:
    lines = ["# unclip_jax benchmark summary", ""]
    for name, setup in s["setups"].items():
        keep = {k: v for k, v in setup.items() if k in (
            "device", "device_kind", "backend", "jax", "jaxlib", "flax", "torch", "diffusers", "transformers",
            "python", "command", "params", "batch", "remat", "dtype")}
        lines.append(f"- **{name}**: " + ", ".join(f"{k}={v}" for k, v in keep.items()))
    lines += ["", "## Targets", "", "| target | value | verdict |", "|---|---|---|"]
    for name, (value, v) in s["targets"].items():
        lines.append(f"| {name} | {fmt(value)} | {v} |")
    lines += ["", "## Sampling: the whole cascade (25/25/7 steps, guidance 4/8), images/s", "",
              f"Work per image: {fmt(s['tflop_per_image'])} TFLOP (matmuls + convolutions of our program); "
              f"device dense bf16 peak {fmt(s['device_peak_tflops'])} TFLOP/s; ceiling "
              f"{fmt(s['ceiling_images_per_s'])} images/s.", "",
              "| batch | ours | ours (xla attn) | ours (pipeline API) | ours (fast norm) | diffusers eager fp16 | "
              "diffusers compile fp16 | ours/eager | ours/compile | ours peak GB | eager peak GB | compile peak GB | "
              "fraction of ceiling |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["sampling"]:
        lines.append("| " + " | ".join(fmt(r[k]) for k in (
            "batch", "ours_images_per_s", "ours_xla_images_per_s", "ours_pipeline_api_images_per_s",
            "ours_fastnorm_images_per_s", "diffusers_eager_images_per_s",
            "diffusers_compile_images_per_s", "ratio_vs_eager", "ratio_vs_compile", "ours_peak_mem_GB",
            "diffusers_eager_peak_mem_GB", "diffusers_compile_peak_mem_GB", "fraction_of_ceiling")) + " |")
    sources = sorted({f"b{r['batch']}: {r['ours_mem_source']}" for r in s["sampling"] if r["ours_mem_source"]})
    if sources:
        lines += ["", "Our peak memory from: " + ", ".join(sources) + "."]
    lines += ["", "## Compile (seconds)", "", "| process | batch | exported | trace+lower | compile | total |",
              "|---|---|---|---|---|---|"]
    for label, recs in (("first (cold cache)", s["compile_cold"]), ("second (warm cache)", s["compile_warm"])):
        for r in recs:
            lines.append(f"| {label} | {r.get('batch')} | {r.get('exported')} | "
                         f"{fmt(r.get('export_s') or r.get('trace_lower_s'))} | {fmt(r.get('compile_s'))} | "
                         f"{fmt(r.get('total_s'))} |")
    lines += ["", "## Training steps (fp32 parameters and AdamW state)", "",
              "| stage | batch | s/step | examples/s | TFLOP/example (3×fwd) | stage's count | MFU | peak GB | compile s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for stage, t in s["training"].items():
        lines.append(f"| {stage} | {fmt(t['batch'])} | {fmt(t['sec_per_step'])} | {fmt(t['examples_per_s'])} | "
                     f"{fmt(t['train_tflop_per_example'])} | {fmt(t['stage_flops_per_example_tflop'])} | "
                     f"{fmt(t['mfu'])} | {fmt(t['peak_mem_GB'])} | {fmt(t['compile_s'])} |")
    for p in s.get("profile", []):
        lines += ["", f"## Profile, batch {p['batch']}: device time by stage and kind (seconds)", "",
                  f"One call: wall {fmt(p.get('wall_s'))} s, device ops {fmt(p['device_busy_s'])} s "
                  f"({p['events']} events, {p['line']} line).", "",
                  "| stage | total | " + " | ".join(KINDS) + " |", "|---|---|" + "---|" * len(KINDS)]
        for stage, total in p["by_stage"].items():
            kinds = p["by_stage_kind"].get(stage, {})
            lines.append(f"| {stage} | {fmt(total)} | " + " | ".join(fmt(kinds.get(k)) for k in KINDS) + " |")
        k = p.get("kernels_summary")
        if k:
            lines += ["", f"Kernel streams: {fmt(k['device_busy_s'])} s in {k['events']} kernels; by kind: "
                      + ", ".join(f"{n} {fmt(v)}" for n, v in k["by_kind"].items()) + "."]
    if s["cpu_tiny"]:
        c = s["cpu_tiny"]
        lines += ["", "## CPU tiny cascade (same network both sides, interleaved)", "",
                  f"batch {c.get('batch')}: diffusers {fmt(c['diffusers']['mean_images_per_s'])} images/s, ours "
                  f"{fmt(c['ours']['mean_images_per_s'])} images/s, ratio of means {fmt(c.get('ratio_of_means'))}, "
                  f"median per-round ratio {fmt(c.get('median_round_ratio'))} ({c.get('reps')} rounds)."]
    lines += ["", "## Parts", "", "| part | status | rc | seconds | limit |", "|---|---|---|---|---|"]
    for p in s["parts"]:
        lines.append(f"| {p.get('part')} | {p.get('status')} | {p.get('rc', '')} | {p.get('seconds', '')} | "
                     f"{p.get('limit_s', p.get('reason', ''))} |")
    if s["errors"]:
        lines += ["", "## Errors", ""]
        for e in s["errors"]:
            lines.append(f"- {e['file']}: {e.get('what')}: {e.get('error')}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m bench.report OUTDIR")
    directory = argv[0]
    s = summarize(directory)
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(s, f, indent=1, default=str)
    text = markdown(s)
    with open(os.path.join(directory, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
