"""Import pretrained CLIP weights into our format (``unclip_jax.models.clip``).

Sources:

- **Hugging Face transformers** directories (``config.json`` + ``model.safetensors``,
  or ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``), as
  ``hf download openai/clip-vit-large-patch14 --local-dir DIR`` writes them:
  ``CLIPModel`` (both towers), ``CLIPTextModelWithProjection`` (text tower only, e.g.
  diffusers' Karlo ``text_encoder/``) and ``CLIPVisionModelWithProjection`` (image tower
  only, e.g. the Karlo image-variation ``image_encoder/``). Parity with transformers'
  PyTorch models is tested (random weights, tiny configs).
- **OpenCLIP** checkpoints (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``,
  with ``open_clip_config.json`` beside them when available). The name table is tested
  by renaming a transformers CLIP state dict into OpenCLIP's naming and checking that the
  imported model reproduces transformers' outputs. Parity against the ``open_clip``
  package itself is **untested** (it needs torchvision, which does not import beside the
  torch used here). Only the standard CLIP architecture is supported (no timm/HF towers,
  LayerScale, attentional pooling).

Both produce our pretrained format (``common.save_pretrained``: orbax params + our
``CLIPConfig.to_dict()`` JSON), which :func:`load_clip` reads back.

Command line::

    python -m unclip_jax.convert.clip --src=DIR --out=DIR [--format=hf|openclip] [--act=gelu]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Any, Mapping

import numpy as np

from unclip_jax.convert.common import (PARAMS_SAFETENSORS, ConversionError, StateDict, apply_table,
                                       assemble, conv2d, identity, linear, load_pretrained,
                                       load_state_dict, read_json, save_pretrained)
from unclip_jax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, clip_param_shapes

# transformers' defaults (CLIPTextConfig / CLIPVisionConfig / CLIPConfig), for keys that a
# config.json written with ``use_diff`` leaves out. A test checks them against transformers.
HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                        num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                          num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5)
HF_CLIP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)

_DOWNLOAD_HINT = ("a transformers CLIP directory holds config.json and model.safetensors, e.g. "
                  "`hf download openai/clip-vit-large-patch14 --local-dir DIR` "
                  "(for Karlo's text encoder: the `text_encoder/` folder of kakaobrain/karlo-v1-alpha)")


# --------------------------------------------------------------------------- transformers

def _hf_act(name: str) -> str:
    if name not in ("quick_gelu", "gelu"):
        raise ConversionError(f"unsupported CLIP activation {name!r} (supported: quick_gelu, gelu)")
    return name


def _hf_text(tc: Mapping[str, Any]) -> CLIPTextConfig:
    c = {**HF_TEXT_DEFAULTS, **tc}
    # transformers pools at argmax(input_ids) for legacy configs (eos_token_id == 2), else at
    # the first occurrence of eos_token_id.
    legacy = c["eos_token_id"] == 2
    return CLIPTextConfig(vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"],
                          width=c["hidden_size"], layers=c["num_hidden_layers"],
                          heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
                          act=_hf_act(c["hidden_act"]), layer_norm_eps=c["layer_norm_eps"],
                          pool="argmax" if legacy else "eos",
                          eos_token_id=49407 if legacy else int(c["eos_token_id"]))


def _hf_vision(vc: Mapping[str, Any]) -> CLIPVisionConfig:
    c = {**HF_VISION_DEFAULTS, **vc}
    if c["num_channels"] != 3:
        raise ConversionError(f"only RGB CLIP vision towers are supported; num_channels={c['num_channels']}")
    return CLIPVisionConfig(image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
                            layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                            mlp_dim=c["intermediate_size"], act=_hf_act(c["hidden_act"]),
                            layer_norm_eps=c["layer_norm_eps"])


def config_from_hf(hf: Mapping[str, Any]) -> CLIPConfig:
    """transformers ``config.json`` (clip / clip_text_model / clip_vision_model) -> CLIPConfig."""
    kind = hf.get("model_type")
    if kind == "clip":
        c = {**HF_CLIP_DEFAULTS, **hf}
        return CLIPConfig(text=_hf_text(hf.get("text_config") or {}),
                          vision=_hf_vision(hf.get("vision_config") or {}),
                          projection_dim=c["projection_dim"], logit_scale_init=c["logit_scale_init_value"])
    if kind == "clip_text_model":
        return CLIPConfig(text=_hf_text(hf), vision=None,
                          projection_dim=hf.get("projection_dim", HF_TEXT_DEFAULTS["projection_dim"]))
    if kind == "clip_vision_model":
        return CLIPConfig(text=None, vision=_hf_vision(hf),
                          projection_dim=hf.get("projection_dim", HF_VISION_DEFAULTS["projection_dim"]))
    raise ConversionError(f"config.json has model_type {kind!r}; expected 'clip', 'clip_text_model' "
                          f"or 'clip_vision_model' ({_DOWNLOAD_HINT})")


def _scalar(w: np.ndarray) -> np.ndarray:
    """A one-element tensor (shape () or (1,), both occur in the wild) -> shape ()."""
    w = np.asarray(w)
    return w.reshape(()) if w.size == 1 else w


def _ln(table, src: str, ours: tuple) -> None:
    table[f"{src}.weight"] = (ours + ("scale",), identity)
    table[f"{src}.bias"] = (ours + ("bias",), identity)


def _dense(table, src: str, ours: tuple, weight_fn=linear) -> None:
    table[f"{src}.weight"] = (ours + ("kernel",), weight_fn)
    table[f"{src}.bias"] = (ours + ("bias",), identity)


def _hf_blocks(table, src: str, ours: tuple, layers: int) -> None:
    for i in range(layers):
        s, o = f"{src}.encoder.layers.{i}", ours + (f"block_{i}",)
        for name, theirs in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                             ("out", "self_attn.out_proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            _dense(table, f"{s}.{theirs}", o + (name,))
        _ln(table, f"{s}.layer_norm1", o + ("ln_1",))
        _ln(table, f"{s}.layer_norm2", o + ("ln_2",))


def hf_name_table(config: CLIPConfig) -> dict:
    """{transformers tensor name: (our param path, layout transform)} for the towers in ``config``."""
    table: dict = {}
    if config.text is not None:
        t = ("text",)
        table["text_model.embeddings.token_embedding.weight"] = (t + ("token_embedding", "embedding"), identity)
        table["text_model.embeddings.position_embedding.weight"] = (t + ("positional_embedding",), identity)
        _hf_blocks(table, "text_model", t, config.text.layers)
        _ln(table, "text_model.final_layer_norm", t + ("ln_final",))
        table["text_projection.weight"] = (t + ("projection", "kernel"), linear)
    if config.vision is not None:
        v = ("vision",)
        table["vision_model.embeddings.class_embedding"] = (v + ("class_embedding",), identity)
        table["vision_model.embeddings.patch_embedding.weight"] = (v + ("patch_embed", "kernel"), conv2d)
        table["vision_model.embeddings.position_embedding.weight"] = (v + ("positional_embedding",), identity)
        _ln(table, "vision_model.pre_layrnorm", v + ("ln_pre",))
        _hf_blocks(table, "vision_model", v, config.vision.layers)
        _ln(table, "vision_model.post_layernorm", v + ("ln_post",))
        table["visual_projection.weight"] = (v + ("projection", "kernel"), linear)
    if config.text is not None and config.vision is not None:
        table["logit_scale"] = (("logit_scale",), _scalar)
    return table


def _drop_buffers(state: StateDict, pattern: str) -> StateDict:
    return {k: v for k, v in state.items() if not re.search(pattern, k)}


def params_from_hf_state(state: StateDict, config: CLIPConfig) -> dict:
    """transformers CLIP state dict -> our parameter tree (checked against ``config``)."""
    state = _drop_buffers(state, r"(^|\.)position_ids$")
    converted, unused = apply_table(state, hf_name_table(config))
    return assemble(converted, clip_param_shapes(config), unused, model_name="CLIPModel")


def load_hf(src: str) -> tuple[CLIPConfig, dict]:
    """Reads a transformers CLIP directory: (our config, params as numpy float32)."""
    if not os.path.isdir(src):
        raise ConversionError(f"{src!r} is not a directory; {_DOWNLOAD_HINT}")
    if not os.path.exists(os.path.join(src, "config.json")):
        sub = os.path.join(src, "text_encoder")
        hint = (f"; this looks like a diffusers pipeline, pass {sub!r}" if os.path.isdir(sub) else "")
        raise ConversionError(f"{src!r} has no config.json{hint}; {_DOWNLOAD_HINT}")
    config = config_from_hf(read_json(src))
    return config, params_from_hf_state(load_state_dict(src), config)


# --------------------------------------------------------------------------- OpenCLIP

_OPENCLIP_IGNORED = r"(^|\.)(attn_mask|position_ids)$|^(input_resolution|context_length|vocab_size)$"
_UNSUPPORTED_OPENCLIP = ("timm_model_name", "hf_model_name", "ls_init_value", "attentional_pool",
                         "no_ln_pre", "final_ln_after_pool", "no_causal_mask", "proj_bias", "embed_cls",
                         "attn_pooler_queries", "input_patchnorm")


def _split_in_proj(state: StateDict) -> StateDict:
    """Splits fused ``attn.in_proj_{weight,bias}`` ([q; k; v] rows) into q/k/v tensors."""
    out = {}
    for key, value in state.items():
        m = re.match(r"(.*)\.attn\.in_proj_(weight|bias)$", key)
        if m is None:
            out[key] = value
            continue
        if value.shape[0] % 3:
            raise ConversionError(f"{key} has {value.shape[0]} rows, not a multiple of 3")
        for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0)):
            out[f"{m.group(1)}.attn.{name}_proj.{m.group(2)}"] = part
    return out


def _openclip_blocks(table, src: str, ours: tuple, layers: int) -> None:
    for i in range(layers):
        s, o = f"{src}.resblocks.{i}", ours + (f"block_{i}",)
        for name, theirs in (("q", "attn.q_proj"), ("k", "attn.k_proj"), ("v", "attn.v_proj"),
                             ("out", "attn.out_proj"), ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
            _dense(table, f"{s}.{theirs}", o + (name,))
        _ln(table, f"{s}.ln_1", o + ("ln_1",))
        _ln(table, f"{s}.ln_2", o + ("ln_2",))


def openclip_name_table(config: CLIPConfig, state_keys=()) -> dict:
    """{OpenCLIP tensor name (after q/k/v split): (our path, transform)}.

    ``text_projection`` and ``visual.proj`` are (width, P) matrices used as ``x @ W``: already
    in Flax's (in, out) layout. A ``text_projection.weight`` (nn.Linear) is transposed.
    """
    table: dict = {}
    if config.text is not None:
        t = ("text",)
        table["token_embedding.weight"] = (t + ("token_embedding", "embedding"), identity)
        table["positional_embedding"] = (t + ("positional_embedding",), identity)
        _openclip_blocks(table, "transformer", t, config.text.layers)
        _ln(table, "ln_final", t + ("ln_final",))
        if "text_projection.weight" in state_keys:
            table["text_projection.weight"] = (t + ("projection", "kernel"), linear)
        else:
            table["text_projection"] = (t + ("projection", "kernel"), identity)
    if config.vision is not None:
        v = ("vision",)
        table["visual.conv1.weight"] = (v + ("patch_embed", "kernel"), conv2d)
        table["visual.class_embedding"] = (v + ("class_embedding",), identity)
        table["visual.positional_embedding"] = (v + ("positional_embedding",), identity)
        _ln(table, "visual.ln_pre", v + ("ln_pre",))
        _openclip_blocks(table, "visual.transformer", v, config.vision.layers)
        _ln(table, "visual.ln_post", v + ("ln_post",))
        table["visual.proj"] = (v + ("projection", "kernel"), identity)
    if config.text is not None and config.vision is not None:
        table["logit_scale"] = (("logit_scale",), _scalar)
        if config.logit_bias_init is not None:
            table["logit_bias"] = (("logit_bias",), _scalar)
    return table


def _count_blocks(state: StateDict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"\.resblocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def config_from_openclip(state: StateDict, model_cfg: Mapping[str, Any] | None = None,
                         act: str | None = None) -> CLIPConfig:
    """Our config for an OpenCLIP state dict (after :func:`_split_in_proj`).

    Sizes come from the tensor shapes. Head counts and the activation cannot: they come
    from ``model_cfg`` (the ``model_cfg`` of ``open_clip_config.json``: text ``heads``,
    vision ``head_width``, ``quick_gelu``) or, without it, heads = width / 64 (OpenCLIP's
    default head width) and ``act`` must be given.
    """
    model_cfg = dict(model_cfg or {})
    text_cfg, vision_cfg = dict(model_cfg.get("text_cfg") or {}), dict(model_cfg.get("vision_cfg") or {})
    for section, cfg in (("text_cfg", text_cfg), ("vision_cfg", vision_cfg)):
        bad = [k for k in _UNSUPPORTED_OPENCLIP if cfg.get(k)]
        if bad:
            raise ConversionError(f"OpenCLIP {section} uses options this importer does not support: {bad}")
    if text_cfg.get("pool_type", "argmax") != "argmax" or vision_cfg.get("pool_type", "tok") != "tok":
        raise ConversionError("only OpenCLIP's standard pooling (text 'argmax', vision 'tok') is supported")
    if act is None:
        if not model_cfg:
            raise ConversionError(
                "the activation of an OpenCLIP checkpoint is not stored in its weights: pass "
                "act='gelu' (LAION OpenCLIP models) or act='quick_gelu' (OpenAI weights, '-quickgelu' "
                "models), or put its open_clip_config.json beside the weights")
        act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"

    text = vision = None
    proj_dim = None
    if "token_embedding.weight" in state:
        vocab, width = state["token_embedding.weight"].shape
        layers = _count_blocks(state, "transformer")
        mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 4 * width
        text = CLIPTextConfig(vocab_size=vocab, context_length=state["positional_embedding"].shape[0],
                              width=width, layers=layers, heads=int(text_cfg.get("heads", width // 64)),
                              mlp_dim=mlp, act=act, pool="argmax")
        proj = state.get("text_projection", state.get("text_projection.weight"))
        if proj is not None:
            proj_dim = proj.shape[1] if "text_projection" in state else proj.shape[0]
    if "visual.conv1.weight" in state:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
        layers = _count_blocks(state, "visual.transformer")
        mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 4 * width
        vision = CLIPVisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                                  heads=width // int(vision_cfg.get("head_width", 64)), mlp_dim=mlp, act=act)
        if "visual.proj" in state:
            proj_dim = state["visual.proj"].shape[1]
    if text is None and vision is None:
        raise ConversionError("no OpenCLIP text (token_embedding.weight) or vision (visual.conv1.weight) "
                              "tensors found; is this an OpenCLIP checkpoint?")
    proj_dim = int(model_cfg.get("embed_dim", proj_dim or 512))
    bias = float(state["logit_bias"]) if "logit_bias" in state else None
    return CLIPConfig(text=text, vision=vision, projection_dim=proj_dim, logit_bias_init=bias)


def params_from_openclip_state(state: StateDict, config: CLIPConfig) -> dict:
    """OpenCLIP state dict -> our parameter tree (checked against ``config``)."""
    state = _split_in_proj(_drop_buffers(state, _OPENCLIP_IGNORED))
    converted, unused = apply_table(state, openclip_name_table(config, tuple(state)))
    return assemble(converted, clip_param_shapes(config), unused, model_name="CLIPModel (OpenCLIP)")


def load_openclip(src: str, act: str | None = None, config: CLIPConfig | None = None
                  ) -> tuple[CLIPConfig, dict]:
    """Reads an OpenCLIP checkpoint (file or directory): (our config, params).

    ``open_clip_config.json`` beside the weights supplies heads and activation; without it
    give ``act`` (or a full ``config``).
    """
    state = load_state_dict(src)
    if not any(k.startswith(("token_embedding.", "visual.")) for k in state):
        sample = ", ".join(sorted(state)[:5])
        raise ConversionError(f"{src!r} does not look like an OpenCLIP checkpoint (first tensors: {sample}); "
                              "for a transformers directory use format='hf'")
    if config is None:
        folder = src if os.path.isdir(src) else os.path.dirname(src)
        cfg_path = os.path.join(folder, "open_clip_config.json")
        model_cfg = read_json(cfg_path).get("model_cfg") if os.path.exists(cfg_path) else None
        config = config_from_openclip(_split_in_proj(_drop_buffers(state, _OPENCLIP_IGNORED)), model_cfg, act)
    return config, params_from_openclip_state(state, config)


# --------------------------------------------------------------------------- our format

def detect_format(src: str) -> str:
    """'hf' for a transformers directory, 'openclip' for an OpenCLIP checkpoint."""
    if not os.path.exists(src):
        raise ConversionError(f"{src!r} does not exist; {_DOWNLOAD_HINT}")
    if os.path.isdir(src):
        if os.path.exists(os.path.join(src, "open_clip_config.json")) or any(
                os.path.exists(os.path.join(src, f)) for f in ("open_clip_model.safetensors",
                                                               "open_clip_pytorch_model.bin")):
            return "openclip"
        if os.path.exists(os.path.join(src, "config.json")):
            return "hf"
    if os.path.isfile(src):
        return "openclip"
    raise ConversionError(f"cannot tell the format of {src!r}; pass --format=hf or --format=openclip "
                          f"({_DOWNLOAD_HINT})")


def convert(src: str, out: str, format: str | None = None, act: str | None = None) -> CLIPConfig:
    """Imports ``src`` and writes our pretrained format to ``out``; returns the config."""
    format = format or detect_format(src)
    if format == "hf":
        if act is not None:
            raise ConversionError("act is read from the transformers config.json; do not pass it")
        config, params = load_hf(src)
    elif format == "openclip":
        config, params = load_openclip(src, act=act)
    else:
        raise ConversionError(f"unknown format {format!r}; expected 'hf' or 'openclip'")
    save_pretrained(out, params, config.to_dict())
    return config


def load_clip(path: str, target: Any = None) -> tuple[CLIPConfig, dict]:
    """Loads CLIP for use: our pretrained directory, or (converted on the fly) a transformers one.

    Returns ``(config, params)``; build the model with ``CLIPModel(config)`` and call it
    with ``{'params': params}``. ``target`` (see ``common.load_pretrained``) restores onto
    a device layout.
    """
    if os.path.isdir(os.path.join(path, "params")) or os.path.isfile(os.path.join(path, PARAMS_SAFETENSORS)):
        params, cfg = load_pretrained(path, target)
        return CLIPConfig.from_dict(cfg), params
    if os.path.exists(os.path.join(path, "config.json")):
        return load_hf(path)
    raise ConversionError(f"{path!r} is neither our pretrained CLIP (config.json + params/ or "
                          f"{PARAMS_SAFETENSORS}) nor a "
                          f"transformers CLIP directory; {_DOWNLOAD_HINT}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unclip_jax.convert.clip", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="transformers CLIP directory or OpenCLIP checkpoint")
    parser.add_argument("--out", required=True, help="output directory (our pretrained format)")
    parser.add_argument("--format", choices=("hf", "openclip"), default=None,
                        help="source format (default: detected)")
    parser.add_argument("--act", choices=("gelu", "quick_gelu"), default=None,
                        help="OpenCLIP without open_clip_config.json: the activation")
    args = parser.parse_args(argv)
    try:
        config = convert(args.src, args.out, args.format, args.act)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    towers = [n for n in ("text", "vision") if getattr(config, n) is not None]
    print(f"wrote CLIP ({' + '.join(towers)}, projection {config.projection_dim}) to {args.out}")


if __name__ == "__main__":
    main()
