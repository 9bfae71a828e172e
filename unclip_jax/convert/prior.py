"""Import diffusers ``PriorTransformer`` weights (the Karlo ``prior/`` folder) into our prior.

``convert_prior(src_dir) -> (params, stats, config)``:

- ``src_dir`` holds diffusers' ``config.json`` and ``diffusion_pytorch_model.safetensors``
  (the layout of the ``kakaobrain/karlo-v1-alpha`` download and of
  ``PriorTransformer.save_pretrained``);
- ``params`` is the parameter tree of :class:`unclip_jax.models.prior.PriorTransformer`;
- ``stats`` = ``{"clip_mean": (D,), "clip_std": (D,)}``, the embedding statistics diffusers
  stores as model parameters; we keep them out of the trainable tree;
- ``config`` is our model config (a plain dict of ``PriorTransformer`` fields).

Our pretrained prior format (:func:`save_prior` / :func:`load_prior`) is the common
``save_pretrained`` directory whose tree is ``{"params": ..., "stats": ...}``.

CLI: ``python -m unclip_jax.convert.prior --src=DIR --out=DIR``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

import jax
import numpy as np

from unclip_jax.convert.common import (ConversionError, apply_table, assemble, identity, linear,
                                       load_pretrained, load_state_dict, read_json,
                                       save_pretrained)

# diffusers PriorTransformer options this architecture implements, with the only
# supported value (None = "same as the default derived value").
_FIXED_OPTIONS = {
    "additional_embeddings": 4,
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
}


def model_config_from_diffusers(cfg: Mapping[str, Any]) -> dict:
    """diffusers ``PriorTransformer`` config.json -> our model config dict.

    Raises:
      ConversionError: for options our network does not implement (e.g. Kandinsky's
        ``norm_in_type="layer"``), naming each one.
    """
    if cfg.get("_class_name", "PriorTransformer") != "PriorTransformer":
        raise ConversionError(f"expected a diffusers PriorTransformer config, got {cfg.get('_class_name')!r}")
    defaults = {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20,
                "embedding_dim": 768, "num_embeddings": 77, "dropout": 0.0}
    c = {**defaults, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    bad = [f"{k}={c[k]!r} (supported: {v!r})" for k, v in _FIXED_OPTIONS.items()
           if k in c and c[k] != v]
    d = c["embedding_dim"]
    for key in ("embedding_proj_dim", "clip_embed_dim"):
        if c.get(key) not in (None, d):
            bad.append(f"{key}={c[key]!r} (supported: None or embedding_dim {d})")
    if bad:
        raise ConversionError("unsupported PriorTransformer option(s): " + "; ".join(bad))
    width = c["num_attention_heads"] * c["attention_head_dim"]
    time_dim = c.get("time_embed_dim")
    return {
        "num_heads": int(c["num_attention_heads"]),
        "head_dim": int(c["attention_head_dim"]),
        "num_layers": int(c["num_layers"]),
        "embed_dim": int(d),
        "num_text_tokens": int(c["num_embeddings"]),
        "time_embed_dim": None if time_dim in (None, width) else int(time_dim),
        "dropout": float(c["dropout"]),
    }


def diffusers_prior_table(num_layers: int) -> dict:
    """{diffusers tensor name: (our param path, transform)} for the network weights."""
    table = {}

    def dense(src: str, *dst: str):
        table[f"{src}.weight"] = (tuple(dst) + ("kernel",), linear)
        table[f"{src}.bias"] = (tuple(dst) + ("bias",), identity)

    def norm(src: str, *dst: str):
        table[f"{src}.weight"] = (tuple(dst) + ("scale",), identity)
        table[f"{src}.bias"] = (tuple(dst) + ("bias",), identity)

    dense("time_embedding.linear_1", "time_linear_1")
    dense("time_embedding.linear_2", "time_linear_2")
    dense("proj_in", "x_proj")
    dense("embedding_proj", "text_embed_proj")
    dense("encoder_hidden_states_proj", "text_hidden_proj")
    table["positional_embedding"] = (("positional_embedding",), identity)
    table["prd_embedding"] = (("final_embedding",), identity)
    for i in range(num_layers):
        src, dst = f"transformer_blocks.{i}", f"block_{i}"
        norm(f"{src}.norm1", dst, "norm1")
        for proj in ("to_q", "to_k", "to_v"):
            dense(f"{src}.attn1.{proj}", dst, "attn", proj)
        dense(f"{src}.attn1.to_out.0", dst, "attn", "to_out")
        norm(f"{src}.norm3", dst, "norm2")
        dense(f"{src}.ff.net.0.proj", dst, "fc1")
        dense(f"{src}.ff.net.2", dst, "fc2")
    norm("norm_out", "norm_out")
    dense("proj_to_clip_embeddings", "proj_out")
    return table


def expected_param_shapes(config: Mapping[str, Any]) -> dict:
    """Our model's parameter tree as ``jax.ShapeDtypeStruct`` (nothing is allocated)."""
    from unclip_jax.models.prior import init_prior_params, prior_from_config
    model = prior_from_config(config)
    return jax.eval_shape(lambda k: init_prior_params(model, k), jax.random.key(0))


def convert_prior_state_dict(state: dict, config: Mapping[str, Any]) -> tuple[dict, dict]:
    """diffusers PriorTransformer state dict -> (our params, stats). Empties ``state``."""
    stats = {}
    for name in ("clip_mean", "clip_std"):
        if name not in state:
            raise ConversionError(f"checkpoint lacks {name!r}: not a diffusers PriorTransformer "
                                  "(Karlo stores the CLIP statistics in the prior weights)")
        stats[name] = np.asarray(state.pop(name), np.float32).reshape(-1)
    converted, unused = apply_table(state, diffusers_prior_table(config["num_layers"]))
    state.clear()  # the full-size checkpoint is 4 GB; do not keep two copies
    params = assemble(converted, expected_param_shapes(config), unused,
                      model_name="PriorTransformer")
    d = config["embed_dim"]
    if stats["clip_mean"].shape != (d,) or stats["clip_std"].shape != (d,):
        raise ConversionError(f"clip_mean/clip_std must have {d} entries, got "
                              f"{stats['clip_mean'].shape}/{stats['clip_std'].shape}")
    return params, stats


def convert_prior(src_dir: str) -> tuple[dict, dict, dict]:
    """Reads a diffusers ``prior/`` folder: (params, stats, our model config)."""
    config = model_config_from_diffusers(read_json(src_dir))
    params, stats = convert_prior_state_dict(load_state_dict(src_dir), config)
    return params, stats, config


def save_prior(out_dir: str, params: Any, stats: Mapping[str, Any], config: Mapping[str, Any], *,
               storage_dtype: str | None = None) -> None:
    """Writes our pretrained prior: config.json + the tree ``{"params", "stats"}``
    (``storage_dtype``: see :func:`~unclip_jax.convert.common.save_pretrained`)."""
    save_pretrained(out_dir, {"params": params, "stats": dict(stats)}, config, storage_dtype=storage_dtype)


def load_prior(path: str) -> tuple[Any, dict, dict]:
    """Reads a directory written by :func:`save_prior`: (params, stats, model config)."""
    tree, config = load_pretrained(path)
    if isinstance(tree, Mapping) and "params" in tree and "stats" not in tree:
        tree = {**tree, "stats": {}}  # a flat safetensors file keeps no empty subtree
    if not isinstance(tree, Mapping) or set(tree) != {"params", "stats"}:
        raise ConversionError(f"{path!r} is not a prior written by save_prior "
                              "(expected a {'params', 'stats'} tree)")
    return tree["params"], dict(tree["stats"]), config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unclip_jax.convert.prior",
        description="Convert a diffusers PriorTransformer folder (Karlo prior/) to unclip_jax.")
    parser.add_argument("--src", required=True, help="folder with config.json + diffusion_pytorch_model.safetensors")
    parser.add_argument("--out", required=True, help="output folder (our pretrained format)")
    args = parser.parse_args(argv)
    try:
        params, stats, config = convert_prior(args.src)
    except (ConversionError, OSError) as e:  # a missing folder or file, or weights that do not fit
        sys.exit(f"error: {e}")
    save_prior(args.out, params, stats, config)
    n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.out}: {n:,} parameters, config {config}", file=sys.stderr)


if __name__ == "__main__":
    main()
