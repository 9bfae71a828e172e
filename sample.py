"""Samples images from a pipeline checkpoint: text-to-image, variations or interpolations.

    python sample.py --checkpoint=DIR --prompt="a small green triangle at the top" \
        [--prompt="..." | --prompts_file=F] [--num_images=4] [--seed=0] [--out=samples]
    python sample.py --checkpoint=DIR --variations_of=photo.png --num_images=4
    python sample.py --checkpoint=DIR --interpolate="a red circle,a blue square" --num_images=8
    python sample.py --checkpoint=DIR --prompt="..." --dtype=bfloat16 --attention=splash   # on a TPU

Writes one PNG per image, ``grid.png`` and ``manifest.json`` (prompt, seed, file and the
settings of every image) to ``--out``. Settings come from ``--config`` (configs/sample.py)
and the shorthand flags below. All inputs are checked before anything is compiled.
"""

import os
import sys

from absl import app, flags, logging

from unclip_jax import config as config_lib, xla_cpu
from unclip_jax.compute_options import ATTENTION_IMPLEMENTATIONS, COMPUTE_DTYPES

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_lib.define_config_flag()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Pipeline directory (python -m unclip_jax.convert karlo, "
                                  "or python -m unclip_jax.export). Default: the shipped shapes model, if any.")
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Images per prompt (frames for --interpolate).")
_SEED = flags.DEFINE_integer("seed", None, "Random seed; the same seed gives the same images on any device count.")
_OUT = flags.DEFINE_string("out", "samples", "Output directory.")
_VARIATIONS = flags.DEFINE_string("variations_of", None, "An image file: sample variations of it.")
_CACHE = flags.DEFINE_string("compilation_cache", None,
                             "Persistent XLA compilation cache directory, so later runs skip compiling "
                             "(default $UNCLIP_JAX_CACHE or ~/.cache/unclip_jax/xla; '' turns it off).")
_INTERPOLATE = flags.DEFINE_string("interpolate", None, "'A,B': two prompts or two image files to interpolate.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(COMPUTE_DTYPES),
                           "Compute dtype of every network (default: as the checkpoint was saved); "
                           "bfloat16 on TPUs and GPUs.")
_ATTENTION = flags.DEFINE_enum("attention", None, list(ATTENTION_IMPLEMENTATIONS),
                               "Attention implementation (default: as saved): 'cudnn' flash attention on "
                               "NVIDIA GPUs, 'splash' on TPUs, 'auto' = cudnn where it applies, else xla.")
_SHORTHANDS = {
    name: kind(name, None, help_)
    for name, kind, help_ in (
        ("prior_steps", flags.DEFINE_integer, "Prior sampling steps."),
        ("decoder_steps", flags.DEFINE_integer, "Decoder sampling steps."),
        ("upsampler_steps", flags.DEFINE_integer, "Steps of each upsampler."),
        ("prior_guidance", flags.DEFINE_float, "Prior classifier-free guidance scale."),
        ("decoder_guidance", flags.DEFINE_float, "Decoder classifier-free guidance scale."),
        ("best_of_n", flags.DEFINE_integer, "Prior candidates per prompt (keep the best z_i·z_t)."),
        ("decoder_best_of_n", flags.DEFINE_integer,
         "Images decoded per prompt; keep the one closest to the prompt in CLIP (needs CLIP's image tower)."),
    )
}


def _settings():
    """(settings dict, names of the sampling settings the user chose). Without --config
    the checkpoint's own sampling defaults (its pipeline.json) stand, except for the
    shorthand flags given: a small model trained with guidance 3 is not sampled with
    Karlo's 8."""
    cfg = _CONFIG.value
    chosen = set()
    if cfg is None:
        cfg = config_lib.load_config(os.path.join(_HERE, "configs", "sample.py"))
    cfg = cfg.to_dict()
    if _CONFIG.value is not None:
        chosen.update(cfg)
    for name, flag in _SHORTHANDS.items():
        if flag.value is not None:
            cfg[name] = flag.value
            chosen.add(name)
    if _SEED.value is not None:
        cfg["seed"] = _SEED.value
    if _NUM_IMAGES.value is not None:
        cfg["num_images"] = _NUM_IMAGES.value
    return cfg, chosen


def _read_prompts() -> list[str]:
    prompts = list(_PROMPTS.value)
    if _PROMPTS_FILE.value:
        if not os.path.exists(_PROMPTS_FILE.value):
            raise app.UsageError(f"--prompts_file {_PROMPTS_FILE.value!r} does not exist")
        with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def _read_image(path: str):
    import numpy as np
    from unclip_jax.data.images import decode_image
    if not os.path.exists(path):
        raise app.UsageError(f"image {path!r} does not exist")
    try:
        return np.asarray(decode_image(path).convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input for the user
        raise app.UsageError(f"cannot read image {path!r}: {e}") from e


def _default_checkpoint():
    from unclip_jax import assets
    path = assets.default_checkpoint()
    if path is None:
        raise app.UsageError("--checkpoint is required (this install ships no default model)")
    return path


def _looks_like_image(item: str) -> bool:
    from PIL import Image
    return os.path.exists(item) or os.path.splitext(item)[1].lower() in Image.registered_extensions()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    xla_cpu.prefer_eigen_convolutions()  # before JAX starts; XLA:CPU only
    cfg, chosen = _settings()
    if cfg["num_images"] < 1:
        raise app.UsageError(f"--num_images must be >= 1, got {cfg['num_images']}")
    if int(cfg["batch_size"]) < 1:
        raise app.UsageError(f"batch_size (images per device in one cascade call) must be >= 1, got {cfg['batch_size']}")
    if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
        raise app.UsageError(f"--out {_OUT.value!r} exists and is not a directory")
    modes = [m for m in (bool(_VARIATIONS.value), bool(_INTERPOLATE.value)) if m]
    if len(modes) > 1:
        raise app.UsageError("use at most one of --variations_of and --interpolate")
    prompts = _read_prompts()
    if not modes and not prompts:
        raise app.UsageError("no prompt: pass --prompt=... (repeatable) or --prompts_file=F")
    if modes and prompts:
        raise app.UsageError("--prompt/--prompts_file do not go with --variations_of or --interpolate "
                             "(interpolate between two prompts with --interpolate='A,B')")
    images_in = None
    if _VARIATIONS.value:
        images_in = [_read_image(_VARIATIONS.value)]
    interp = None
    if _INTERPOLATE.value:
        parts = [p.strip() for p in _INTERPOLATE.value.split(",")]
        if len(parts) != 2 or not all(parts):
            raise app.UsageError("--interpolate wants two items separated by a comma: 'A,B'")
        if _NUM_IMAGES.value is not None and _NUM_IMAGES.value < 2:
            raise app.UsageError(f"--interpolate needs --num_images >= 2 frames, got {_NUM_IMAGES.value}")
        is_file = [_looks_like_image(p) for p in parts]
        if any(is_file) and not all(is_file):
            raise app.UsageError("--interpolate: give two prompts or two image files, not one of each")
        interp = ("images", [_read_image(p) for p in parts]) if all(is_file) else ("prompts", parts)

    from unclip_jax import compilation_cache, parallel, pipeline  # noqa: PLC0415 - after flag checks
    parallel.init_distributed()
    import jax  # noqa: PLC0415
    if _CACHE.value != "":
        try:
            compilation_cache.enable(_CACHE.value)
        except OSError as e:  # e.g. a read-only home: sampling works without the cache
            print(f"notice: no persistent compilation cache ({e}); every run compiles anew",
                  file=sys.stderr)
    checkpoint = _CHECKPOINT.value or _default_checkpoint()
    try:
        pipe = pipeline.load_pipeline(checkpoint, dtype=_DTYPE.value, attention=_ATTENTION.value)
        settings = pipe.settings(**{k: cfg[k] for k in pipeline.DEFAULT_SETTINGS if k in chosen})
    except pipeline.PipelineError as e:
        raise app.UsageError(str(e)) from e
    if pipe.decoder_params is None:
        raise app.UsageError(f"{checkpoint} has no decoder: it cannot make images")
    try:
        images, records = _sample(pipe, checkpoint, prompts, images_in, interp, cfg, settings,
                                  max_batch=int(cfg["batch_size"]) * jax.device_count())
    except pipeline.PipelineError as e:  # an input or setting the pipeline refuses
        raise app.UsageError(str(e)) from e
    if jax.process_index() == 0:
        from unclip_jax.image_output import save_images  # noqa: PLC0415
        compute = {k: v for k, v in (("dtype", _DTYPE.value), ("attention", _ATTENTION.value)) if v is not None}
        save_images(_OUT.value, images, records, {**settings, **compute, "checkpoint": os.path.abspath(checkpoint)})
        print(f"wrote {len(images)} images, grid.png and manifest.json to {_OUT.value}", file=sys.stderr)


def _sample(pipe, checkpoint, prompts, images_in, interp, cfg, settings, max_batch):
    """(uint8 images (N, H, W, 3), one manifest record per image) for the chosen mode."""
    seed, n = int(cfg["seed"]), int(cfg["num_images"])
    records = []
    if interp is None and images_in is None:
        expanded = [p for p in prompts for _ in range(n)]
        result = pipe.text_to_image(expanded, seed, progress=True, max_batch=max_batch, **settings)
        images = result["images"]
        records = [{"prompt": p, "seed": seed, "index": i} for i, p in enumerate(expanded)]
        _report(result["timings"])
        if not pipe.upsamplers:
            print(f"notice: {checkpoint} has no upsamplers; images stay at the decoder's resolution "
                  f"({images.shape[1]}x{images.shape[2]})", file=sys.stderr)
    elif images_in is not None:
        images = pipe.variations(images_in, seed, num_per_image=n, **settings)
        records = [{"variation_of": _VARIATIONS.value, "seed": seed, "index": i} for i in range(n)]
    else:
        kind, (a, b) = interp
        if n < 2:  # the default of one image per prompt (an explicit --num_images < 2 was refused)
            n = 8
        if kind == "prompts":
            z = pipe.prior(pipe.encode_text([a, b]), seed, **settings)
            images = pipe.interpolate(z[0], z[1], n, seed, **settings)
        else:
            z = pipe.encode_image([a, b])
            images = pipe.interpolate(z[0], z[1], n, seed, **settings)
        import numpy as np  # noqa: PLC0415
        records = [{"interpolate": _INTERPOLATE.value, "theta": float(t), "seed": seed}
                   for t in np.linspace(0, 1, n)]
    return images, records


def _report(timings):
    for stage, t in timings.items():
        print(f"{stage:>10}: {t['wall_s']:.2f} s (of which compile {t['compile_s']:.2f} s)", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.app_flags_parser)
