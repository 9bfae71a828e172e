"""Anchor: diffusers UnCLIPPipeline at Karlo v1.0-alpha sizes, random weights.

Times the whole text->256px cascade (prior 25, decoder 25, super-res 7 steps,
guidance 4/8) the way a PyTorch user would run it. Random weights: speed only.

    python -m bench.anchor_diffusers_unclip --dtype fp16 --batches 1,8,32 [--compile] [--out F.jsonl]
    python -m bench.anchor_diffusers_unclip --tiny --dtype fp32 --batches 1      # CPU smoke run

Derived from the lead's harness (shared/bench/anchor_diffusers_unclip.py) with three changes:
the architecture comes from ``bench/arch.py`` (shared with our side); the decoder has no
``addition_embed_type="text"`` (Karlo's decoder has none: diffusers' Karlo conversion
script; it added a TextTimeEmbedding, ~0.2% of the decoder's FLOPs); the peak memory is
reset before each batch size, and the warm-up (torch.compile's compile) is timed apart.
Prints one JSON line per result (and appends it to ``--out``). Imports no JAX.
"""
import argparse
import json
import os
import tempfile
import time

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel

from bench.arch import PROMPT, SAMPLING, arch, write_char_vocab


def tiny_tokenizer(d):
    """A character-level CLIP vocabulary (no download); the same files serve our tokenizer."""
    vocab_path, merges_path = write_char_vocab(d)
    return CLIPTokenizer(vocab_path, merges_path, pad_token="!", model_max_length=77)


def _public(d):
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "model_type"}


def build(size, dtype, device, tokenizer_dir=None):
    """UnCLIPPipeline of ``bench.arch.arch(size)`` with random weights, on ``device`` in ``dtype``."""
    a = arch(size)
    prior = PriorTransformer(**a["prior"])
    text_proj = UnCLIPTextProjModel(**a["text_proj"])
    decoder = UNet2DConditionModel(**_public(a["decoder"]))
    sr = lambda: UNet2DModel(**_public(a["super_res"]))
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_public(a["text_encoder"])))
    sch = lambda **kw: UnCLIPScheduler(clip_sample=True, num_train_timesteps=1000, **kw)
    tok = tiny_tokenizer(tokenizer_dir or tempfile.mkdtemp())
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder, tokenizer=tok,
        super_res_first=sr(), super_res_last=sr(),
        prior_scheduler=sch(variance_type="fixed_small_log", prediction_type="sample",
                            clip_sample_range=SAMPLING["prior_clip_range"]),
        decoder_scheduler=sch(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=sch(variance_type="fixed_small_log", prediction_type="epsilon"))
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe, prompts, generator):
    """The whole cascade at the pipeline defaults (= bench.arch.SAMPLING); float images (B, H, W, 3)."""
    return pipe(prompts, generator=generator, output_type="np",
                prior_num_inference_steps=SAMPLING["prior_steps"],
                decoder_num_inference_steps=SAMPLING["decoder_steps"],
                super_res_num_inference_steps=SAMPLING["super_res_steps"],
                prior_guidance_scale=SAMPLING["prior_guidance"],
                decoder_guidance_scale=SAMPLING["decoder_guidance"]).images


def param_counts(pipe):
    n = lambda m: sum(p.numel() for p in m.parameters())
    return {k: n(getattr(pipe, k)) for k in
            ["prior", "decoder", "text_proj", "super_res_first", "super_res_last", "text_encoder"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default="", help="append the JSON lines to this file too")
    a = ap.parse_args()

    def emit(record):
        line = json.dumps(record)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    setting = f"diffusers {'torch.compile' if a.compile else 'eager'} {a.dtype}"
    t0 = time.time()
    with torch.device(device):
        pipe = build("tiny" if a.tiny else "karlo", dtype, device)
    if a.compile:
        for k in ["decoder", "super_res_first", "super_res_last", "prior"]:
            m = getattr(pipe, k)
            m.forward = torch.compile(m.forward)
    emit({"kind": "setup", "side": "diffusers", "setting": setting,
          "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
          "transformers": __import__("transformers").__version__,
          "build_s": round(time.time() - t0, 1), "params": param_counts(pipe)})
    for b in [int(x) for x in a.batches.split(",")]:
        prompts = [PROMPT] * b
        g = torch.Generator(device=device).manual_seed(0)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        run_pipe(pipe, prompts, g)  # warm-up (and torch.compile's compile)
        if device == "cuda":
            torch.cuda.synchronize()
        warmup = time.perf_counter() - t
        times = []
        for _ in range(a.reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = run_pipe(pipe, prompts, g)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        best = min(times)
        emit({"kind": "sampling", "side": "diffusers", "setting": setting, "batch": b,
              "shape": list(out.shape), "sec_per_batch": round(best, 3), "images_per_s": round(b / best, 3),
              "all_s": [round(x, 3) for x in times], "warmup_s": round(warmup, 2),
              "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None})


if __name__ == "__main__":
    main()
