"""Karlo v1.0-alpha (a diffusers UnCLIPPipeline directory) → our pipeline directory.

The source is what ``hf download kakaobrain/karlo-v1-alpha --local-dir DIR``
gives (or ``UnCLIPPipeline.save_pretrained``): ``text_encoder/``, ``tokenizer/``,
``prior/``, ``text_proj/``, ``decoder/``, ``super_res_first/``, ``super_res_last/``
(each ``config.json`` + safetensors; the schedulers' folders are not needed: their
settings are Karlo's, which our stages default to). Each part goes through the importer
of its model family; nothing needs torch unless a part is stored as ``.bin``.
"""

from __future__ import annotations

import os

from unclip_jax.convert.clip import load_hf
from unclip_jax.convert.common import ConversionError
from unclip_jax.convert.prior import convert_prior
from unclip_jax.convert.unet import convert_decoder, convert_super_res

PARTS = ("text_encoder", "tokenizer", "prior", "text_proj", "decoder")


def convert_karlo(src: str, out: str, *, log=print):
    """Converts the diffusers Karlo directory ``src`` into the pipeline directory ``out``.

    Returns the loaded :class:`~unclip_jax.pipeline.UnCLIPPipeline`. Fails before writing
    anything when a required part is missing.
    """
    from unclip_jax.pipeline import Upsampler, UnCLIPPipeline, save_pipeline
    from unclip_jax.tokenizer import load_tokenizer
    missing = [p for p in PARTS if not os.path.isdir(os.path.join(src, p))]
    if missing:
        raise ConversionError(f"{src!r} lacks {missing}; expected a diffusers UnCLIPPipeline directory "
                              f"with {', '.join(PARTS)} (+ super_res_first/, super_res_last/)")
    log("text encoder ...")
    clip_config, clip_params = load_hf(os.path.join(src, "text_encoder"))
    log("prior ...")
    prior_params, prior_stats, prior_config = convert_prior(os.path.join(src, "prior"))
    log("decoder + text_proj ...")
    decoder_params, decoder_config = convert_decoder(os.path.join(src, "decoder"), os.path.join(src, "text_proj"))
    upsamplers = []
    first_dir, last_dir = os.path.join(src, "super_res_first"), os.path.join(src, "super_res_last")
    if os.path.isdir(first_dir):
        log("super-res (first steps) ...")
        sr_first, sr_config = convert_super_res(first_dir)
        sr_last = None
        if os.path.isdir(last_dir):
            log("super-res (last step) ...")
            sr_last, last_config = convert_super_res(last_dir)
            if last_config["unet"] != sr_config["unet"]:
                raise ConversionError("super_res_first and super_res_last have different architectures")
        # diffusers upsamples the decoder output to the super-res sample size.
        sr_config["low_res_size"] = int(decoder_config["sample_size"])
        upsamplers.append(Upsampler(sr_config, sr_first, sr_last))
    pipe = UnCLIPPipeline(load_tokenizer(os.path.join(src, "tokenizer")), clip_config, clip_params,
                          prior_config, prior_params, prior_stats, decoder_config, decoder_params, upsamplers)
    log(f"writing {out} ...")
    save_pipeline(out, pipe, os.path.join(src, "tokenizer"))
    return pipe
