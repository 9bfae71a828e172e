"""Exports trained stages as one pipeline directory (``unclip_jax.pipeline.load_pipeline``).

    python -m unclip_jax.export --clip=W/clip --prior=W/prior --decoder=W/decoder \
        [--upsampler=W/upsampler ...] --tokenizer=W/tokenizer --out=W/pipeline

Each ``--<stage>`` is a training ``--workdir`` of ``train.py``: its ``config.json`` (the
stage config the run was started with) and ``checkpoints/`` (the EMA parameters of the
latest step are read, or the raw ones when the run kept no EMA). ``--upsampler`` may be
repeated: cascade order. Sampling defaults of the pipeline come from the stage configs'
``sample`` sections (prior steps, guidance, best-of-n; decoder steps and guidance;
upsampler steps).

``--base=PIPELINE`` starts from an exported pipeline instead and replaces only the stages
given (``--upsampler`` replaces the whole list), e.g. a decoder retrained against the
base's CLIP; each replaced stage's sampling defaults replace the base's:

    python -m unclip_jax.export --base=unclip_jax/assets/shapes_pipeline --decoder=W/decoder --out=W/pipeline
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

STAGE_NAMES = ("clip", "prior", "decoder", "upsampler")


class ExportError(ValueError):
    """A work directory that is not a finished run of the expected stage."""


def read_stage(workdir: str, stage: str) -> tuple[dict, Any]:
    """(stage config dict, EMA-or-raw params) of the training run in ``workdir``."""
    from unclip_jax.train.checkpoint import load_params_from_train_checkpoint
    config_path = os.path.join(workdir, "config.json")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.exists(config_path) or not os.path.isdir(ckpt_dir):
        raise ExportError(f"{workdir!r} is not a training work directory (needs config.json and "
                          f"checkpoints/, written by `python train.py --workdir=...`)")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("stage") != stage:
        raise ExportError(f"{workdir!r} holds a {config.get('stage')!r} run, expected {stage!r}")
    try:
        params = load_params_from_train_checkpoint(ckpt_dir)
    except FileNotFoundError as e:
        raise ExportError(f"{workdir!r} has no checkpoint yet: {e}") from e
    return config, params


def with_l2_norm(prior_config: dict) -> dict:
    """An 'l2' prior's config with ``prior.l2_norm`` (the norm its samples get): runs
    trained before that value was recorded lack it, and would give the decoder unit
    vectors; it is measured here from the run's data and CLIP, as training now does."""
    from unclip_jax.stages.prior import lacks_l2_norm, mean_image_embed_norm
    if not lacks_l2_norm(prior_config):
        return prior_config
    import ml_collections
    norm = mean_image_embed_norm(ml_collections.ConfigDict(prior_config))
    print(f"[export] the 'l2' prior's run records no prior.l2_norm; measured {norm:.4g} "
          "(mean norm of its training images' CLIP embeddings)", file=sys.stderr, flush=True)
    return {**prior_config, "prior": {**prior_config["prior"], "l2_norm": norm}}


def clip_config_of(stage_config: dict):
    """The ``CLIPConfig`` of a 'clip' stage config dict."""
    from unclip_jax.stages.clip import model_config_from
    return model_config_from(stage_config["model"])


def sampling_defaults(prior: dict | None, decoder: dict | None, upsamplers: Sequence[dict],
                      base: dict | None = None) -> dict:
    """Pipeline sampling defaults from the stages' ``sample`` sections, over ``base`` (default:
    ``DEFAULT_SETTINGS``)."""
    from unclip_jax.pipeline import DEFAULT_SETTINGS
    out = dict(DEFAULT_SETTINGS if base is None else base)
    if prior and "sample" in prior:
        s = prior["sample"]
        out.update(prior_steps=int(s["steps"]), prior_guidance=float(s["guidance_scale"]),
                   best_of_n=int(s["best_of_n"]))
        if s.get("clip_range") is not None:
            out["prior_clip_range"] = float(s["clip_range"])
    if decoder and "sample" in decoder:
        out.update(decoder_steps=int(decoder["sample"]["steps"]),
                   decoder_guidance=float(decoder["sample"]["guidance_scale"]),
                   decoder_best_of_n=int(decoder["sample"].get("best_of_n", 1)))
    if upsamplers and "sample" in upsamplers[0]:
        out["upsampler_steps"] = int(upsamplers[0]["sample"]["steps"])
    return out


def pipeline_relative_clip(stage_config: dict) -> dict:
    """``stage_config`` with its ``clip`` section naming the pipeline's own CLIP and tokenizer
    (relative to the pipeline directory) instead of the training machine's paths, which
    mean nothing once the pipeline is copied elsewhere. Nothing reads them when sampling:
    they record which CLIP the stage was trained against."""
    if "clip" not in stage_config:
        return stage_config
    return {**stage_config, "clip": {**stage_config["clip"], "path": "clip", "tokenizer": "tokenizer"}}


def build_pipeline(clip: str | None, prior: str | None, decoder: str | None, upsamplers: Sequence[str],
                   tokenizer: str | None, *, base: str | None = None):
    """An ``UnCLIPPipeline`` from training work directories, or from the pipeline directory
    ``base`` with the given stages replaced (see module doc)."""
    from unclip_jax.pipeline import UnCLIPPipeline, Upsampler, load_pipeline
    from unclip_jax.tokenizer import load_tokenizer
    if base is None and (not clip or not tokenizer):
        raise ExportError("a new pipeline needs --clip and --tokenizer (or start from --base)")
    kept = load_pipeline(base) if base is not None else None
    has_prior = bool(prior) or (kept is not None and kept.prior_params is not None)
    has_decoder = bool(decoder) or (kept is not None and kept.decoder_params is not None)
    if (upsamplers or (kept is not None and kept.upsamplers)) and not has_decoder:
        raise ExportError("upsamplers need a decoder")
    if has_decoder and not has_prior:
        raise ExportError("a decoder needs a prior (text → image embedding)")
    if kept is None:
        clip_cfg, clip_params = read_stage(clip, "clip")
        pipe = UnCLIPPipeline(load_tokenizer(tokenizer), clip_config_of(clip_cfg), clip_params)
    else:
        changes = {"upsamplers": []} if upsamplers else {}
        if tokenizer:
            changes["tokenizer"] = load_tokenizer(tokenizer)
        if clip:
            clip_cfg, changes["clip_params"] = read_stage(clip, "clip")
            changes["clip_config"] = clip_config_of(clip_cfg)
        # a new instance: its jitted encoders are built for its own CLIP config
        pipe = dataclasses.replace(kept, **changes) if changes else kept
    prior_cfg = decoder_cfg = None
    if prior:
        prior_cfg, pipe.prior_params = read_stage(prior, "prior")
        prior_cfg = with_l2_norm(prior_cfg)
        from unclip_jax.stages.prior import stats_from_config
        pipe.prior_config = pipeline_relative_clip(prior_cfg)
        pipe.prior_stats = stats_from_config(prior_cfg)
    if decoder:
        decoder_cfg, pipe.decoder_params = read_stage(decoder, "decoder")
        pipe.decoder_config = pipeline_relative_clip(decoder_cfg)
    up_cfgs = []
    for path in upsamplers:
        cfg, params = read_stage(path, "upsampler")
        up_cfgs.append(cfg)
        pipe.upsamplers.append(Upsampler(cfg, params, None))
    pipe.defaults = sampling_defaults(prior_cfg, decoder_cfg, up_cfgs, base=pipe.defaults if base else None)
    from unclip_jax.pipeline import _check_fits
    _check_fits(pipe)
    return pipe


def export(out: str, clip: str | None, prior: str | None, decoder: str | None, upsamplers: Sequence[str],
           tokenizer: str | None, *, storage_dtype: str | None = None, base: str | None = None) -> str:
    """Writes the pipeline directory ``out``; returns it. ``storage_dtype`` ('float16' |
    'float32'): flat safetensors parameters in that dtype instead of orbax checkpoints.
    ``base``: a pipeline directory whose stages the given ones replace (module doc)."""
    from unclip_jax.pipeline import save_pipeline
    if base is not None and os.path.abspath(base) == os.path.abspath(out):
        raise ExportError("--out must differ from --base (the base is read while the output is written)")
    pipe = build_pipeline(clip, prior, decoder, upsamplers, tokenizer, base=base)
    if tokenizer is None:
        with open(os.path.join(base, "pipeline.json")) as f:
            tokenizer = os.path.join(base, json.load(f)["components"]["tokenizer"])
    save_pipeline(out, pipe, tokenizer, storage_dtype=storage_dtype)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unclip_jax.export", description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="pipeline directory to start from: the stages given replace its own")
    parser.add_argument("--clip", help="work directory of the clip stage (required without --base)")
    parser.add_argument("--prior", help="work directory of the prior stage")
    parser.add_argument("--decoder", help="work directory of the decoder stage")
    parser.add_argument("--upsampler", action="append", default=[],
                        help="work directory of an upsampler stage (repeat, in cascade order)")
    parser.add_argument("--tokenizer", help="CLIP tokenizer directory (required without --base)")
    parser.add_argument("--out", required=True, help="output pipeline directory")
    parser.add_argument("--storage_dtype", choices=("float16", "float32"),
                        help="store parameters as flat safetensors in this dtype (default: orbax, float32)")
    args = parser.parse_args(argv)
    from unclip_jax.convert.common import ConversionError
    from unclip_jax.pipeline import PipelineError
    try:
        export(args.out, args.clip, args.prior, args.decoder, args.upsampler, args.tokenizer,
               storage_dtype=args.storage_dtype, base=args.base)
    except (ExportError, PipelineError, ConversionError, OSError, ValueError) as e:  # bad paths or stages
        sys.exit(f"error: {e}")
    print(f"wrote pipeline to {args.out}")


if __name__ == "__main__":
    main()
