"""Importer for the Karlo decoder and upsamplers saved by diffusers.

Reads diffusers model directories (``config.json`` + ``diffusion_pytorch_model.safetensors``,
as ``save_pretrained`` writes them and as the ``kakaobrain/karlo-v1-alpha`` download holds
them) into our parameters and our config:

- :func:`convert_decoder` — ``decoder/`` (``UNet2DConditionModel``) + ``text_proj/``
  (``UnCLIPTextProjModel``) → ``{'unet': …, 'text_proj': …}``;
- :func:`convert_super_res` — ``super_res_first/`` or ``super_res_last/`` (``UNet2DModel``).

Our config is derived from the diffusers ``config.json``; settings our UNet does not
implement raise :class:`ConversionError` naming the key, before any weight is read.
The name table maps our parameter path to the diffusers tensor name one to one
(``down_blocks_1/attentions_0/to_out_0/kernel`` ↔ ``down_blocks.1.attentions.0.to_out.0.weight``).

Command line::

    python -m unclip_jax.convert.unet decoder --unet karlo/decoder --text-proj karlo/text_proj --out out/decoder
    python -m unclip_jax.convert.unet super-res --src karlo/super_res_first --out out/super_res_first
    python -m unclip_jax.convert.unet karlo --src karlo --out out      # all three of a pipeline folder
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, Mapping

import numpy as np

from unclip_jax.convert.common import (ConversionError, apply_table, assemble, conv2d, identity, linear,
                                       load_state_dict, read_json, save_pretrained)

_DOWN_TYPES = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
_UP_TYPES = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}

# Keys that must hold these values (diffusers' defaults): other values change the network.
_COND_FIXED = {
    "center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "addition_embed_type": None,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "num_class_embeds": None,
    "class_embeddings_concat": False, "cross_attention_norm": None, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "mid_block_scale_factor": 1, "attention_type": "default",
    "num_attention_heads": None,
}
# Keys without effect on the supported block types.
_COND_IGNORED = {
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
    "downsample_padding", "use_linear_projection", "upcast_attention", "transformer_layers_per_block",
    "reverse_transformer_layers_per_block", "addition_time_embed_dim", "addition_embed_type_num_heads",
    "projection_class_embeddings_input_dim",
}
_COND_MAPPED = {
    "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "up_block_types",
    "mid_block_type", "block_out_channels", "layers_per_block", "dropout", "act_fn", "norm_num_groups",
    "norm_eps", "cross_attention_dim", "attention_head_dim", "class_embed_type",
    "resnet_time_scale_shift", "time_embedding_dim", "mid_block_only_cross_attention",
}
_PLAIN_FIXED = {
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_scale_factor": 1,
    "add_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "mid_block_type": "UNetMidBlock2D",
}
_PLAIN_IGNORED = {
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
    "downsample_padding", "downsample_type", "upsample_type", "attention_head_dim",
    "attn_norm_num_groups", "num_train_timesteps",
}
_PLAIN_MAPPED = {
    "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "up_block_types",
    "block_out_channels", "layers_per_block", "dropout", "act_fn", "norm_num_groups", "norm_eps",
    "resnet_time_scale_shift", "time_embedding_dim",
}
_TEXT_PROJ_KEYS = {"clip_extra_context_tokens", "clip_embeddings_dim", "time_embed_dim", "cross_attention_dim"}

# Diffusers' own defaults for keys an older config.json may omit.
_COND_DEFAULTS = {"flip_sin_to_cos": True, "freq_shift": 0, "dropout": 0.0, "act_fn": "silu",
                  "norm_num_groups": 32, "norm_eps": 1e-5, "attention_head_dim": 8, "class_embed_type": None,
                  "resnet_time_scale_shift": "default", "time_embedding_dim": None,
                  "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": 2,
                  "cross_attention_dim": 1280, "in_channels": 4, "out_channels": 4}
_PLAIN_DEFAULTS = {"flip_sin_to_cos": True, "freq_shift": 0, "dropout": 0.0, "act_fn": "silu",
                   "norm_num_groups": 32, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
                   "time_embedding_dim": None, "layers_per_block": 2, "in_channels": 3, "out_channels": 3,
                   "add_attention": True, "mid_block_type": "UNetMidBlock2D"}


def _fail(kind: str, problems: list[str]) -> None:
    if problems:
        raise ConversionError(f"unsupported diffusers {kind} config:\n  " + "\n  ".join(problems))


def _uniform(name: str, value, count: int, problems: list[str]):
    """An int, or a list/tuple whose entries are all equal (per-block values we do not vary)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count or len(set(value)) != 1:
            problems.append(f"{name}={value!r}: only one value for all blocks is supported")
            return value[0] if value else None
        return value[0]
    return value


def _strip(block_type: str) -> str:
    return block_type[7:] if block_type.startswith("UNetRes") else block_type


def _check_keys(cfg: Mapping[str, Any], fixed: Mapping[str, Any], ignored: set, mapped: set,
                problems: list[str]) -> None:
    for key, value in cfg.items():
        if key in ignored or key in mapped:
            continue
        if key in fixed:
            want = fixed[key]
            same = (value == want) or (want is None and value is None)
            if key == "mid_block_scale_factor" or key == "resnet_out_scale_factor":
                same = float(value) == float(want)
            if not same:
                problems.append(f"{key}={value!r} (supported: {want!r})")
        elif not key.startswith("_"):
            problems.append(f"{key}={value!r} (unknown setting)")


def _common_unet(cfg: Mapping[str, Any], levels_attention: list[bool], problems: list[str]) -> dict:
    channels = list(cfg["block_out_channels"])
    levels = len(channels)
    base = channels[0]
    if any(c % base for c in channels):
        problems.append(f"block_out_channels={channels}: every level must be a multiple of the first")
    if cfg["act_fn"] not in ("silu", "swish"):
        problems.append(f"act_fn={cfg['act_fn']!r} (supported: 'silu')")
    if cfg["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        problems.append(f"resnet_time_scale_shift={cfg['resnet_time_scale_shift']!r} "
                        "(supported: 'default', 'scale_shift')")
    if cfg["norm_num_groups"] is None:
        problems.append("norm_num_groups=None (supported: an int)")
    layers = _uniform("layers_per_block", cfg["layers_per_block"], levels, problems)
    return {
        "in_channels": int(cfg["in_channels"]), "out_channels": int(cfg["out_channels"]),
        "base_channels": int(base), "channel_mult": [int(c // base) for c in channels],
        "num_res_blocks": int(layers),
        "attention_levels": [i for i, a in enumerate(levels_attention) if a],
        "scale_shift_norm": cfg["resnet_time_scale_shift"] == "scale_shift",
        "resblock_updown": True, "dropout": float(cfg["dropout"]),
        "num_groups": int(cfg["norm_num_groups"] or 0), "norm_eps": float(cfg["norm_eps"]),
        "time_embed_dim": cfg["time_embedding_dim"], "flip_sin_to_cos": bool(cfg["flip_sin_to_cos"]),
        "freq_shift": float(cfg["freq_shift"]), "aug_level_embedding": False,
    }


def _block_attention(cfg: Mapping[str, Any], problems: list[str]) -> list[bool]:
    down = [_strip(t) for t in cfg["down_block_types"]]
    up = [_strip(t) for t in cfg["up_block_types"]]
    levels = len(cfg["block_out_channels"])
    if len(down) != levels or len(up) != levels:
        problems.append(f"{len(down)} down / {len(up)} up block types for {levels} levels")
        return [False] * levels
    bad = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
    if bad:
        problems.append(f"block types {bad} (supported: {sorted(_DOWN_TYPES) + sorted(_UP_TYPES)})")
        return [False] * levels
    attention = [_DOWN_TYPES[t] for t in down]
    mirrored = [_UP_TYPES[t] for t in reversed(up)]
    if attention != mirrored:
        problems.append(f"up_block_types {up} do not mirror down_block_types {down}")
    return attention


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> dict:
    """Our UNet config (see :class:`unclip_jax.models.unet.UNet`) from a diffusers
    ``UNet2DConditionModel`` or ``UNet2DModel`` ``config.json`` dict.

    Raises:
      ConversionError: listing every setting our UNet does not implement.
    """
    kind = cfg.get("_class_name") or ("UNet2DConditionModel" if "cross_attention_dim" in cfg else "UNet2DModel")
    problems: list[str] = []
    if kind == "UNet2DConditionModel":
        cfg = {**_COND_DEFAULTS, **cfg}
        _check_keys(cfg, _COND_FIXED, _COND_IGNORED, _COND_MAPPED, problems)
        attention = _block_attention(cfg, problems)
        out = _common_unet(cfg, attention, problems)
        mid = cfg["mid_block_type"]
        if mid != "UNetMidBlock2DSimpleCrossAttn":
            problems.append(f"mid_block_type={mid!r} (supported: 'UNetMidBlock2DSimpleCrossAttn')")
        levels = len(cfg["block_out_channels"])
        head = _uniform("attention_head_dim", cfg["attention_head_dim"], levels, problems)
        context = _uniform("cross_attention_dim", cfg["cross_attention_dim"], levels, problems)
        if cfg.get("mid_block_only_cross_attention") not in (None, False):
            problems.append(f"mid_block_only_cross_attention={cfg['mid_block_only_cross_attention']!r} "
                            "(supported: None, False)")
        if cfg["class_embed_type"] not in (None, "identity"):
            problems.append(f"class_embed_type={cfg['class_embed_type']!r} (supported: 'identity', None)")
        out.update(mid_attention=True, head_channels=int(head), context_dim=int(context),
                   added_embedding=cfg["class_embed_type"] == "identity")
        for c in (out["base_channels"] * m for m in out["channel_mult"]):
            if head and c % head:
                problems.append(f"attention_head_dim={head} does not divide {c} channels")
    elif kind == "UNet2DModel":
        cfg = {**_PLAIN_DEFAULTS, **cfg}
        _check_keys(cfg, _PLAIN_FIXED, _PLAIN_IGNORED, _PLAIN_MAPPED, problems)
        attention = _block_attention(cfg, problems)
        if any(attention):
            problems.append("attention blocks in a UNet2DModel (only Resnet{Down,Up}sampleBlock2D supported)")
        out = _common_unet(cfg, attention, problems)
        out.update(mid_attention=False, head_channels=64, context_dim=None, added_embedding=False)
    else:
        problems.append(f"_class_name={kind!r} (supported: 'UNet2DConditionModel', 'UNet2DModel')")
        out = {}
    _fail(kind, problems)
    return out


def text_proj_config_from_diffusers(cfg: Mapping[str, Any]) -> dict:
    """Our :class:`~unclip_jax.models.text_proj.TextProj` config from ``UnCLIPTextProjModel``'s."""
    problems = [f"{k}={v!r} (unknown setting)" for k, v in cfg.items()
                if not k.startswith("_") and k not in _TEXT_PROJ_KEYS]
    missing = [k for k in ("time_embed_dim", "cross_attention_dim") if k not in cfg]
    problems += [f"{k} missing" for k in missing]
    _fail("UnCLIPTextProjModel", problems)
    return {"clip_embeddings_dim": int(cfg.get("clip_embeddings_dim", 768)),
            "time_embed_dim": int(cfg["time_embed_dim"]),
            "cross_attention_dim": int(cfg["cross_attention_dim"]),
            "clip_extra_context_tokens": int(cfg.get("clip_extra_context_tokens", 4))}


_INDEXED = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$")


def torch_name(path: tuple[str, ...]) -> str:
    """Our parameter path → the diffusers tensor name (``resnets_0`` → ``resnets.0``,
    ``kernel``/``scale`` → ``weight``)."""
    parts = []
    for part in path[:-1]:
        m = _INDEXED.match(part)
        parts.append(f"{m[1]}.{m[2]}" if m else part)
    parts.append({"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1]))
    return ".".join(parts)


def _transform(path: tuple[str, ...], shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    if path[-1] == "kernel":
        return conv2d if len(shape) == 4 else linear
    return identity


def name_table(expected: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """{diffusers name: (our path, layout transform)} for every parameter of ``expected``."""
    from flax import traverse_util
    return {torch_name(path): (path, _transform(path, tuple(leaf.shape)))
            for path, leaf in traverse_util.flatten_dict(expected).items()}


def expected_unet_params(config: Mapping[str, Any]):
    """Parameter shapes (``jax.ShapeDtypeStruct`` tree) of the UNet ``config``; nothing is allocated."""
    import jax
    import jax.numpy as jnp
    from unclip_jax.models.unet import unet_from_config
    model = unet_from_config(config)
    size = 2 ** (len(model.channel_mult) - 1)
    x = jnp.zeros((1, size, size, model.in_channels))
    kwargs = {}
    if model.added_embedding:
        kwargs["added_emb"] = jnp.zeros((1, model.embed_dim))
    if model.context_dim is not None:
        kwargs["context"] = jnp.zeros((1, 1, model.context_dim))
        kwargs["context_mask"] = jnp.ones((1, 1), bool)
    if model.aug_level_embedding:
        kwargs["aug_level"] = jnp.zeros((1,))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)), **kwargs))["params"]


def expected_text_proj_params(config: Mapping[str, Any]):
    import jax
    import jax.numpy as jnp
    from unclip_jax.models.text_proj import TextProj
    model = TextProj(**config)
    d = model.clip_embeddings_dim
    args = (jnp.zeros((1, d)), jnp.zeros((1, d)), jnp.zeros((1, 1, d)), jnp.ones((1, 1), bool))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]


def convert_state_dict(state: Mapping[str, np.ndarray], expected, model_name: str) -> dict:
    """Maps a diffusers state dict onto ``expected`` (see :func:`name_table`); checks all names/shapes."""
    converted, unused = apply_table(dict(state), name_table(expected))
    return assemble(converted, expected, unused, model_name=model_name)


def convert_super_res(src_dir: str) -> tuple[dict, dict]:
    """Imports a diffusers ``UNet2DModel`` directory (Karlo ``super_res_first``/``super_res_last``).

    Returns:
      (params, config): params is our UNet parameter tree (numpy float32); config is
      ``{'unet': <UNet config>, 'sample_size': int}``.
    """
    cfg = read_json(src_dir)
    unet_cfg = unet_config_from_diffusers(cfg)
    params = convert_state_dict(load_state_dict(src_dir), expected_unet_params(unet_cfg),
                                f"UNet (super-res) from {src_dir}")
    return params, {"unet": unet_cfg, "sample_size": cfg.get("sample_size")}


def convert_decoder(unet_dir: str, text_proj_dir: str) -> tuple[dict, dict]:
    """Imports the Karlo decoder: a diffusers ``UNet2DConditionModel`` directory plus the
    ``UnCLIPTextProjModel`` directory.

    Returns:
      (params, config): ``{'unet': …, 'text_proj': …}`` numpy float32 trees and
      ``{'unet': <UNet config>, 'text_proj': <TextProj config>, 'sample_size': int}``.
    Raises:
      ConversionError: unsupported settings, mismatched widths between the two, or
        missing / unexpected / mis-shaped tensors (all listed).
    """
    unet_json, proj_json = read_json(unet_dir), read_json(text_proj_dir)
    unet_cfg = unet_config_from_diffusers(unet_json)
    proj_cfg = text_proj_config_from_diffusers(proj_json)
    if not unet_cfg["added_embedding"] or unet_cfg["context_dim"] is None:
        raise ConversionError("the decoder UNet needs class_embed_type='identity' and a cross_attention_dim")
    embed_dim = unet_cfg["time_embed_dim"] or 4 * unet_cfg["base_channels"]
    problems = []
    if proj_cfg["time_embed_dim"] != embed_dim:
        problems.append(f"text_proj time_embed_dim {proj_cfg['time_embed_dim']} != UNet time embedding {embed_dim}")
    if proj_cfg["cross_attention_dim"] != unet_cfg["context_dim"]:
        problems.append(f"text_proj cross_attention_dim {proj_cfg['cross_attention_dim']} != "
                        f"UNet cross_attention_dim {unet_cfg['context_dim']}")
    if problems:
        raise ConversionError("decoder and text_proj do not fit together:\n  " + "\n  ".join(problems))
    unet = convert_state_dict(load_state_dict(unet_dir), expected_unet_params(unet_cfg),
                              f"decoder UNet from {unet_dir}")
    proj = convert_state_dict(load_state_dict(text_proj_dir), expected_text_proj_params(proj_cfg),
                              f"text_proj from {text_proj_dir}")
    config = {"unet": unet_cfg, "text_proj": proj_cfg, "sample_size": unet_json.get("sample_size")}
    return {"unet": unet, "text_proj": proj}, config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unclip_jax.convert.unet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("decoder", help="decoder UNet + text_proj → our pretrained directory")
    p.add_argument("--unet", required=True, help="diffusers decoder/ directory")
    p.add_argument("--text-proj", required=True, help="diffusers text_proj/ directory")
    p.add_argument("--out", required=True)
    p = sub.add_parser("super-res", help="a super-res UNet2DModel → our pretrained directory")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("karlo", help="a saved UnCLIPPipeline folder → OUT/{decoder,super_res_first,super_res_last}")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "decoder":
            save_pretrained(args.out, *convert_decoder(args.unet, args.text_proj))
        elif args.command == "super-res":
            save_pretrained(args.out, *convert_super_res(args.src))
        else:
            save_pretrained(os.path.join(args.out, "decoder"),
                            *convert_decoder(os.path.join(args.src, "decoder"), os.path.join(args.src, "text_proj")))
            for name in ("super_res_first", "super_res_last"):
                save_pretrained(os.path.join(args.out, name), *convert_super_res(os.path.join(args.src, name)))
    except (ConversionError, OSError) as e:  # a missing folder or file, or weights that do not fit
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
