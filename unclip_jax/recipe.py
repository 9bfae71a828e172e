"""The embedded default: train the whole unCLIP stack on captioned shapes, export, score.

    python -m unclip_jax.recipe --workdir=DIR [--tiny] [--num_prompts=200]
    python -m unclip_jax.recipe --score=PIPELINE [--num_prompts=200] [--out=FILE]   # scores only

Steps (each stage's training is resumable: rerun the same command after an interruption
and finished stages are skipped, an unfinished one continues from its last checkpoint):

1. ``DIR/tokenizer``: a word-level CLIP vocabulary of the dataset's words
   (:func:`shapes_vocabulary`, ``unclip_jax.tokenizer.write_word_level_vocab``);
2. CLIP (``configs/shapes_clip.py``) → ``DIR/clip``, exported for the next stages as
   ``DIR/clip_model`` (our pretrained CLIP format);
3. the prior (``configs/shapes_prior.py``), 4. the decoder (``configs/shapes_decoder.py``),
   both encoding images and captions with that CLIP on the fly;
5. the 32→64 upsampler (``configs/shapes_upsampler.py``);
6. ``DIR/pipeline``: the exported pipeline (``unclip_jax.export``) with float16
   safetensors parameters: the form the package ships (``unclip_jax/assets``), and
   the one the evaluation scores;
7. evaluation: CLIP zero-shot colour/shape accuracy on held-out images, the prior's
   cos(sampled, true z_i) on held-out captions against the unrelated-caption baseline, and
   the pixel oracle's scores of pipeline samples for ``num_prompts`` prompts (half from the
   'test' split, half from the 'heldout' split whose every caption names a held-out
   colour-shape pair);
8. ``DIR/report.json``: those scores, each stage's training time and steps, the sampling
   time, the machine, the targets of the recipe and whether each is met.

``--tiny`` uses each config's ``tiny`` variant (a few steps of tiny models: a smoke test);
``--steps=clip:N,prior:N,...`` overrides stages' ``train.steps``.

``--finetune`` then runs :data:`FINETUNE_LEGS`, the fine-tuning legs that made the shipped
model from the recipe's (README, "How the shipped model was trained"): each leg trains one
stage from the current pipeline's weights (``train.init_from``) into ``DIR/<leg>`` and
exports ``DIR/legs/<leg>`` (the current pipeline with that stage replaced); the last is
also written with float16 parameters as ``DIR/pipeline_finetuned``, which step 7 then
evaluates (CLIP and prior: their last legs). Legs resume like stages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from typing import Any, Sequence

STAGES = ("clip", "prior", "decoder", "upsampler")

# Issue 8's targets: oracle accuracies of pipeline samples, CLIP zero-shot on held-out images.
TARGETS = {"color": 0.90, "shape": 0.75, "size": 0.75, "position": 0.75,
           "clip_zero_shot_color": 0.90, "clip_zero_shot_shape": 0.90}

# The fine-tuning legs that made the shipped model from the recipe's, in the order they ran
# (sessions 12-15): (name, stage, steps, config overrides). Each starts from the current
# pipeline's weights with fresh optimizer moments, a new cosine and unseen images (another
# dataset_seed); prior and decoder legs encode with the current pipeline's CLIP, so the last
# two move those stages onto the fine-tuned CLIP. The noise-augmented upsampler of session
# 11 is the recipe's own config now.
FINETUNE_LEGS = (
    ("decoder_ft", "decoder", 2000, ("optim.lr=3e-4", "optim.warmup=50", "data.dataset_seed=1",
                                     "train.seed=1", "train.ckpt_every=250")),
    # 80% two-object images (the dataset's mix: 40%): more of the gradient for attribute binding
    ("decoder_ft2", "decoder", 3500, ("optim.lr=3e-4", "optim.warmup=50", "data.dataset_seed=2",
                                      "train.seed=2", "train.ckpt_every=250", "data.two_object_fraction=0.8")),
    # 60% of images in colours outside the vocabulary: CLIP has to read shape apart from colour
    ("clip_unnamed", "clip", 2000, ("optim.lr=5e-4", "data.dataset_seed=1", "data.unnamed_colors=0.6",
                                    "train.eval_every=500")),
    ("prior_ft", "prior", 1000, ("optim.lr=5e-4", "optim.warmup=50", "data.dataset_seed=1", "train.seed=1")),
    ("decoder_ft3", "decoder", 2400, ("optim.lr=3e-4", "optim.warmup=50", "data.dataset_seed=3",
                                      "train.seed=3", "train.ckpt_every=200", "data.two_object_fraction=0.8")),
    # only two-object images: colour errors are binding errors in two-object pictures
    ("decoder_ft4", "decoder", 1200, ("optim.lr=3e-4", "optim.warmup=50", "data.dataset_seed=5",
                                      "train.seed=5", "train.ckpt_every=200", "data.two_object_fraction=1.0")),
)
# schedule settings sized for thousands of steps; --tiny legs keep the tiny configs' own
_FULL_SIZE_ONLY = ("optim.warmup", "train.ckpt_every", "train.eval_every")
TINY_LEG_STEPS = 2

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# ----------------------------------------------------------------------------- vocabulary

def shapes_vocabulary() -> list[str]:
    """Every word of every caption template of ``unclip_jax.data.shapes`` and of the prompt
    synonyms its parser understands, in a fixed order."""
    from unclip_jax.data import shapes
    words: list[str] = []
    objects = [{"color": c, "shape": s, "size": z, "position": p}
               for c in shapes.COLORS for s in shapes.SHAPES for z in shapes.SIZES for p in shapes.POSITIONS]
    texts = []
    for template in range(6):
        texts += [shapes.caption_for([o], None, template) for o in objects]
    for template in range(3):
        for relation in shapes.RELATIONS:
            for wording in range(2):
                texts.append(shapes.caption_for(objects[:2], relation, template, wording))
    for table in shapes._SYNONYMS.values():
        texts += list(table)
    texts += ["an", "and", "with", "on top of", "over", "under", "underneath", "beneath"]
    for text in texts:
        for w in re.findall(r"[a-z]+", text.lower()):
            if w not in words:
                words.append(w)
    return words


def read_tokenizer(tok_dir: str) -> tuple[str, int, int]:
    """(dir, vocabulary size, <|endoftext|> id) of a word-level tokenizer directory."""
    from unclip_jax.tokenizer import EOS_TOKEN
    with open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    return tok_dir, len(vocab), int(vocab[EOS_TOKEN])


def write_tokenizer(out_dir: str) -> tuple[str, int, int]:
    """Writes the shapes tokenizer; returns (dir, vocabulary size, <|endoftext|> id)."""
    from unclip_jax.tokenizer import write_word_level_vocab
    if not os.path.exists(os.path.join(out_dir, "vocab.json")):
        write_word_level_vocab(shapes_vocabulary(), out_dir)
    return read_tokenizer(out_dir)


# ----------------------------------------------------------------------------- configs

def parse_steps(text: str | None) -> dict[str, int]:
    """``"clip:800,decoder:2000"`` → ``{'clip': 800, 'decoder': 2000}`` (train.steps overrides)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition(":")
        if name not in STAGES or not value.isdigit() or int(value) <= 0:
            raise ValueError(f"--steps wants STAGE:N items with STAGE in {STAGES} and N > 0, got {item!r}")
        out[name] = int(value)
    return out


def stage_configs(workdir: str, tiny: bool, tokenizer: tuple[str, int, int],
                  steps: dict[str, int] | None = None) -> dict[str, Any]:
    """The four stage configs, wired together (tokenizer, vocabulary, CLIP checkpoint)."""
    from unclip_jax.config import load_config
    variant = "tiny" if tiny else "default"
    configs = {s: load_config(os.path.join(_CONFIGS, f"shapes_{s}.py:{variant}")) for s in STAGES}
    for stage, config in configs.items():
        _wire(config, stage, tokenizer, os.path.join(workdir, "clip_model"))
    for stage, n in (steps or {}).items():
        configs[stage].train.steps = n
    return configs


def _wire(config, stage: str, tokenizer: tuple[str, int, int], clip_path: str) -> None:
    """Points a stage config at the tokenizer (CLIP: and sizes its vocabulary) and, for the
    prior and decoder, at the CLIP they encode with."""
    tok_dir, vocab_size, eos = tokenizer
    if stage == "clip":
        config.tokenizer = os.path.abspath(tok_dir)
        config.model.vocab_size, config.model.eos_token_id = vocab_size, eos
    elif stage in ("prior", "decoder"):
        config.clip.path = os.path.abspath(clip_path)
        config.clip.tokenizer = os.path.abspath(tok_dir)


# ----------------------------------------------------------------------------- training

def _finished(workdir: str, steps: int) -> bool:
    from unclip_jax.train.checkpoint import Checkpointer
    ckpt = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt):
        return False
    checkpointer = Checkpointer(ckpt)
    try:
        latest = checkpointer.latest_step()
    finally:
        checkpointer.close()
    return latest is not None and latest >= steps


def train_stage(name: str, config, workdir: str, timings: dict, timings_path: str) -> None:
    """Trains one stage (resuming), adding this run's wall time to ``timings[name]``."""
    from unclip_jax.train.loop import train
    stage_dir = os.path.join(workdir, name)
    steps = int(config.train.steps)
    if _finished(stage_dir, steps):
        print(f"[recipe] {name}: already trained ({steps} steps)", file=sys.stderr, flush=True)
        return
    print(f"[recipe] training {name} for {steps} steps in {stage_dir}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = train(config, stage_dir)
    entry = timings.setdefault(name, {"train_s": 0.0, "steps": 0})
    entry["train_s"] += time.perf_counter() - start
    entry["steps"] = int(result.step)
    entry["batch_size"] = int(config.train.batch_size)
    with open(timings_path, "w") as f:
        json.dump(timings, f, indent=2)
    if result.preempted:
        raise SystemExit(143)


def export_clip_model(workdir: str, config) -> str:
    """``DIR/clip_model``: the CLIP stage's (EMA) parameters in our pretrained CLIP format,
    what the prior and decoder stages encode with."""
    from unclip_jax.convert.common import save_pretrained
    from unclip_jax.export import clip_config_of, read_stage
    out = os.path.join(workdir, "clip_model")
    stage_config, params = read_stage(os.path.join(workdir, "clip"), "clip")
    save_pretrained(out, params, clip_config_of(stage_config).to_dict())
    return out


def leg_config(stage: str, overrides: Sequence[str], steps: int, pipeline_dir: str, tiny: bool):
    """The stage config of one fine-tuning leg: the recipe's config with ``overrides``,
    ``steps`` steps from ``pipeline_dir``'s weights of that stage, wired to that pipeline's
    tokenizer (and CLIP, for the prior and decoder)."""
    from unclip_jax.config import load_config
    if tiny:
        overrides = [o for o in overrides if o.partition("=")[0] not in _FULL_SIZE_ONLY]
    config = load_config(os.path.join(_CONFIGS, f"shapes_{stage}.py:{'tiny' if tiny else 'default'}"),
                         list(overrides))
    with open(os.path.join(pipeline_dir, "pipeline.json")) as f:
        components = json.load(f)["components"]
    _wire(config, stage, read_tokenizer(os.path.join(pipeline_dir, components["tokenizer"])),
          os.path.join(pipeline_dir, components["clip"]))
    config.train.steps = TINY_LEG_STEPS if tiny else steps
    config.train.init_from = os.path.abspath(os.path.join(pipeline_dir, stage))
    return config


def run_finetune_legs(workdir: str, tiny: bool, timings: dict, timings_path: str) -> dict[str, Any]:
    """Runs :data:`FINETUNE_LEGS` from ``DIR/pipeline`` (module doc); returns
    ``{'pipeline': float16 pipeline dir, 'configs': {stage: its last leg's config},
    'stage_dirs': {stage: its last leg's workdir}}``."""
    from unclip_jax.export import export
    current = os.path.join(workdir, "pipeline")
    configs, stage_dirs = {}, {}
    for name, stage, steps, overrides in FINETUNE_LEGS:
        config = leg_config(stage, overrides, steps, current, tiny)
        train_stage(name, config, workdir, timings, timings_path)
        out = os.path.join(workdir, "legs", name)
        if not os.path.exists(os.path.join(out, "pipeline.json")):
            replaced = {**dict.fromkeys(("clip", "prior", "decoder")), stage: os.path.join(workdir, name)}
            export(out, **replaced, upsamplers=[], tokenizer=None, base=current)
        configs[stage], stage_dirs[stage], current = config, os.path.join(workdir, name), out
    final = os.path.join(workdir, "pipeline_finetuned")
    if not os.path.exists(os.path.join(final, "pipeline.json")):
        export(final, None, None, None, [], None, base=current, storage_dtype="float16")
    print(f"[recipe] exported the fine-tuned pipeline to {final}", file=sys.stderr, flush=True)
    return {"pipeline": final, "configs": configs, "stage_dirs": stage_dirs}


# ----------------------------------------------------------------------------- evaluation

def evaluation_prompts(num: int, seed: int = 1234) -> list[str]:
    """``num`` captions: the first half from the 'test' split, the rest from 'heldout'
    (every one names a held-out colour-shape pair). Prompts the generator never saw."""
    from unclip_jax.data import shapes
    n_test = num // 2
    prompts = [shapes.generate_example(seed, "test", i, 16)["caption"] for i in range(n_test)]
    prompts += [shapes.generate_example(seed, "heldout", i, 16)["caption"] for i in range(num - n_test)]
    return prompts


def evaluate_clip(stage_dir: str, config) -> dict[str, float]:
    """Zero-shot colour and shape accuracy of the CLIP trained in ``stage_dir``."""
    from unclip_jax.stages.clip import evaluate_shapes_zero_shot
    from unclip_jax.export import read_stage
    _, params = read_stage(stage_dir, "clip")
    return evaluate_shapes_zero_shot(params, config, splits=("heldout", "test"))


def evaluate_prior(stage_dir: str, config) -> dict[str, float]:
    """The prior trained in ``stage_dir`` on held-out captions (train.py's evaluation)."""
    from unclip_jax.export import read_stage
    from unclip_jax.stages.prior import evaluate_stage
    _, params = read_stage(stage_dir, "prior")
    config = config.copy_and_resolve_references()
    config.eval.split = "heldout"
    return {k: float(v) for k, v in evaluate_stage(params, config).items()}


def sample_images(pipe, prompts: Sequence[str], seed: int = 0, chunk: int = 50, **overrides):
    """uint8 images (N, H, W, 3), one per prompt, from ``chunk``-prompt calls of the loaded
    pipeline with sampling ``overrides``; returns (images, wall seconds)."""
    import numpy as np
    from tqdm.auto import tqdm
    start = time.perf_counter()
    images = []
    for i in tqdm(range(0, len(prompts), chunk), desc="sampling", unit="batch"):
        # noise is drawn per example index within a call: another seed per chunk keeps
        # the chunks' noise apart
        images.append(pipe.text_to_image(list(prompts[i:i + chunk]), seed=seed + i, **overrides)["images"])
    return np.concatenate(images), time.perf_counter() - start


def sample_and_score(pipeline_dir: str, prompts: Sequence[str], seed: int = 0, chunk: int = 50,
                     samples_png: str | None = None, pipe=None) -> tuple[dict, float]:
    """Samples one image per prompt with the exported pipeline (``pipe`` if already
    loaded) and scores them with the oracle; returns (scores, wall seconds)."""
    import numpy as np
    from unclip_jax.data import oracle
    from unclip_jax.pipeline import load_pipeline
    pipe = pipe if pipe is not None else load_pipeline(pipeline_dir)
    images, seconds = sample_images(pipe, prompts, seed=seed, chunk=chunk)
    if samples_png:
        from PIL import Image
        from unclip_jax.image_output import make_grid
        Image.fromarray(np.asarray(make_grid(images[:64]))).save(samples_png)
    return oracle.score(images, list(prompts)), seconds


def score_true_embeddings(pipe, num: int = 64, seed: int = 0, data_seed: int = 1234, *,
                          resize_to: int | None = None, **overrides) -> dict:
    """Decoder + upsamplers alone: decodes the CLIP image embeddings of ``num`` 'test'-split
    images (with their captions) and scores the outputs against those images' objects.
    Set beside the prompt scores, this separates the prior's share of the errors from
    the decoder's. ``resize_to`` resizes the outputs bilinearly (square) before scoring;
    ``overrides`` are sampling settings (e.g. ``decoder_steps``)."""
    import numpy as np
    from unclip_jax.data import oracle, shapes
    size = pipe.clip_config.vision.image_size
    batch = shapes.make_batch("test", 0, num, image_size=size, seed=data_seed)
    z_i = pipe.encode_image(list(batch["image"]))
    images = pipe.images_from_embeddings(z_i, seed=seed, prompts=list(batch["caption"]), **overrides)
    if resize_to is not None:
        from PIL import Image
        images = np.stack([np.asarray(Image.fromarray(im).resize((resize_to, resize_to), Image.BILINEAR))
                           for im in images])
    return oracle.score(np.asarray(images), batch["objects"])


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def score_pipeline(pipeline_dir: str, num_prompts: int = 200, seed: int = 0, num_true: int = 64,
                   samples_png: str | None = None) -> dict:
    """The sample scores of the recipe's report for an exported pipeline (no training, no
    stage workdirs): ``oracle`` for ``num_prompts`` evaluation prompts, ``oracle_true_embeddings``
    (decoder + upsamplers from ``num_true`` test images' z_i), ``num_prompts``, ``sampling_s``,
    ``sampling_settings`` and ``machine``. ``samples_png``: a grid of the first 64 samples."""
    import jax
    from unclip_jax.pipeline import load_pipeline
    if num_prompts < 2:
        raise ValueError(f"num_prompts must be >= 2 (test and held-out prompts), got {num_prompts}")
    prompts = evaluation_prompts(num_prompts)
    pipe = load_pipeline(pipeline_dir)
    oracle_scores, sample_s = sample_and_score(pipeline_dir, prompts, seed=seed, pipe=pipe, samples_png=samples_png)
    return {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "jax_backend": jax.default_backend(), "devices": jax.device_count()},
        "oracle": oracle_scores,
        "num_prompts": len(prompts),
        # decoder + upsampler from true CLIP image embeddings of test images (no prior)
        "oracle_true_embeddings": score_true_embeddings(pipe, num=num_true, seed=seed),
        "sampling_s": sample_s,
        "sampling_settings": _read_json(os.path.join(pipeline_dir, "pipeline.json"))["defaults"],
    }


def _met(report: dict) -> dict[str, bool]:
    s, c = report["oracle"], report["clip"]
    out = {a: bool(s[a] >= TARGETS[a]) for a in ("color", "shape", "size", "position")}
    out["clip_zero_shot_color"] = bool(c["zero_shot_color_heldout"] >= TARGETS["clip_zero_shot_color"])
    out["clip_zero_shot_shape"] = bool(c["zero_shot_shape_heldout"] >= TARGETS["clip_zero_shot_shape"])
    p = report["prior"]
    out["prior_above_baseline"] = bool(p["cos_pred_image"] > p["cos_pred_unrelated_image"] + 0.05)
    return out


# ----------------------------------------------------------------------------- main

def run(workdir: str, tiny: bool = False, num_prompts: int = 200, seed: int = 0,
        steps: dict[str, int] | None = None, finetune: bool = False) -> dict:
    """The whole recipe (module doc); returns the report (also written to DIR/report.json)."""
    from unclip_jax.export import export
    os.makedirs(workdir, exist_ok=True)
    if num_prompts < 2:
        raise ValueError(f"num_prompts must be >= 2 (test and held-out prompts), got {num_prompts}")
    tokenizer = write_tokenizer(os.path.join(workdir, "tokenizer"))
    configs = stage_configs(workdir, tiny, tokenizer, steps)
    timings_path = os.path.join(workdir, "timings.json")
    timings = {}
    if os.path.exists(timings_path):  # an earlier, interrupted run of the recipe
        with open(timings_path) as f:
            timings = json.load(f)

    train_stage("clip", configs["clip"], workdir, timings, timings_path)
    export_clip_model(workdir, configs["clip"])
    for name in ("prior", "decoder", "upsampler"):
        train_stage(name, configs[name], workdir, timings, timings_path)

    pipeline_dir = os.path.join(workdir, "pipeline")
    export(pipeline_dir, os.path.join(workdir, "clip"), os.path.join(workdir, "prior"),
           os.path.join(workdir, "decoder"), [os.path.join(workdir, "upsampler")], tokenizer[0],
           storage_dtype="float16")
    print(f"[recipe] exported the pipeline to {pipeline_dir}", file=sys.stderr, flush=True)
    stage_dirs = {name: os.path.join(workdir, name) for name in STAGES}
    trained = list(STAGES)
    if finetune:
        legs = run_finetune_legs(workdir, tiny, timings, timings_path)
        pipeline_dir = legs["pipeline"]
        configs.update(legs["configs"])
        stage_dirs.update(legs["stage_dirs"])
        trained += [leg[0] for leg in FINETUNE_LEGS]

    print(f"[recipe] evaluating {pipeline_dir}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    clip_scores = evaluate_clip(stage_dirs["clip"], configs["clip"])
    prior_scores = evaluate_prior(stage_dirs["prior"], configs["prior"])
    scores = score_pipeline(pipeline_dir, num_prompts, seed=seed, num_true=8 if tiny else 64,
                            samples_png=os.path.join(workdir, "samples.png"))
    report = {
        "tiny": bool(tiny),
        "finetune": bool(finetune),
        "pipeline": pipeline_dir,
        "machine": scores.pop("machine"),
        "training": {name: timings.get(name, {}) for name in trained},
        "total_training_s": float(sum(timings.get(name, {}).get("train_s", 0.0) for name in trained)),
        "clip": clip_scores,
        "prior": prior_scores,
        **scores,
        "evaluation_s": time.perf_counter() - start,
        "targets": TARGETS,
    }
    report["targets_met"] = _met(report)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unclip_jax.recipe", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="directory for every stage, the pipeline and report")
    parser.add_argument("--score", metavar="PIPELINE",
                        help="only score this exported pipeline (oracle on --num_prompts prompts and on test "
                             "images' true z_i); prints the JSON, or writes it to --out")
    parser.add_argument("--out", help="with --score: JSON file to write")
    parser.add_argument("--num_true", type=int, default=64, help="with --score: test images decoded from their z_i")
    parser.add_argument("--tiny", action="store_true", help="tiny models, a few steps (smoke test)")
    parser.add_argument("--num_prompts", type=int, default=200, help="prompts sampled and scored")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--steps", default="", help="train.steps overrides, e.g. clip:800,decoder:2000")
    parser.add_argument("--finetune", action="store_true",
                        help="then run the fine-tuning legs that made the shipped model (FINETUNE_LEGS)")
    args = parser.parse_args(argv)
    from unclip_jax import xla_cpu  # noqa: PLC0415
    xla_cpu.prefer_eigen_convolutions()  # before JAX starts; XLA:CPU only
    if args.score:
        out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else ""
        if args.out and (os.path.isdir(args.out) or not os.path.isdir(out_dir)):
            parser.error(f"--out {args.out!r}: not a file in an existing directory")  # before minutes of sampling
        if not os.path.isfile(os.path.join(args.score, "pipeline.json")):
            parser.error(f"--score {args.score!r} is not an exported pipeline (no pipeline.json)")
        scores = score_pipeline(args.score, args.num_prompts, seed=args.seed, num_true=args.num_true)
        text = json.dumps(scores, indent=2, default=float)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return
    if not args.workdir:
        parser.error("--workdir is required (or --score=PIPELINE)")
    try:
        steps = parse_steps(args.steps)
    except ValueError as e:
        parser.error(str(e))
    report = run(args.workdir, tiny=args.tiny, num_prompts=args.num_prompts, seed=args.seed, steps=steps,
                 finetune=args.finetune)
    o = report["oracle"]
    print(f"[recipe] training {report['total_training_s']:.0f} s; oracle colour {o['color']:.3f} shape "
          f"{o['shape']:.3f} size {o['size']:.3f} position {o['position']:.3f}; report: "
          f"{os.path.join(args.workdir, 'report.json')}")


if __name__ == "__main__":
    main()
