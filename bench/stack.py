"""Our side of the benchmark: the unCLIP stack (configs + parameters) of ``bench/arch.py``.

Two ways to get parameters:

- :func:`random_stack` (Karlo size on an accelerator): the architecture dicts of
  ``bench.arch`` mapped to our configs by our converters' config functions, parameters
  made from shapes alone (``jax.eval_shape``, then filled on the host: see
  :func:`random_like`), so that nothing is compiled just to initialise;
- :func:`stack_from_pipeline` (CPU tiny comparison): the weights of a diffusers
  UnCLIPPipeline saved with ``save_pretrained``, read by OUR converters
  (``unclip_jax.convert.{clip,prior,unet}``): both sides then run the same network.

A stack is ``(configs, params)``:
  configs = {'clip': CLIPConfig, 'prior': prior model config dict, 'decoder': decoder
             config ({'unet', 'text_proj', 'sample_size'}), 'super_res': upsampler config
             ({'unet', 'sample_size', 'low_res_size'})}
  params  = {'clip', 'prior', 'prior_stats', 'decoder', 'sr_first', 'sr_last'}
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bench.arch import arch

STAGES = ("clip", "prior", "decoder", "sr_first", "sr_last")


def our_configs(size: str, *, dtype: str = "bfloat16", attention: str = "xla", remat: bool = False) -> dict:
    """Our configs for ``bench.arch.arch(size)``, compute ``dtype`` and attention implementation."""
    from unclip_jax.convert.clip import config_from_hf
    from unclip_jax.convert.prior import model_config_from_diffusers
    from unclip_jax.convert.unet import text_proj_config_from_diffusers, unet_config_from_diffusers
    a = arch(size)
    return with_options({
        "clip": config_from_hf(a["text_encoder"]),
        "prior": model_config_from_diffusers(a["prior"]),
        "decoder": {"unet": unet_config_from_diffusers(a["decoder"]),
                    "text_proj": text_proj_config_from_diffusers(a["text_proj"]),
                    "sample_size": a["decoder"]["sample_size"]},
        "super_res": {"unet": unet_config_from_diffusers(a["super_res"]),
                      "sample_size": a["super_res"]["sample_size"],
                      "low_res_size": a["decoder"]["sample_size"]},
    }, dtype=dtype, attention=attention, remat=remat)


def with_options(configs: Mapping[str, Any], *, dtype: str, attention: str, remat: bool = False) -> dict:
    """Configs with the run-time options (compute dtype, attention implementation, remat) set."""
    unet_opts = dict(dtype=dtype, attention_impl=attention, remat=remat)
    return {
        "clip": dataclasses.replace(configs["clip"], dtype=dtype, attention=attention, remat=remat),
        "prior": {**configs["prior"], "dtype": dtype, "attention_impl": attention, "remat": remat},
        "decoder": {**configs["decoder"], "unet": {**configs["decoder"]["unet"], **unet_opts},
                    "text_proj": {**configs["decoder"]["text_proj"], "dtype": dtype}},
        "super_res": {**configs["super_res"], "unet": {**configs["super_res"]["unet"], **unet_opts}},
    }


def with_fast_norm(configs: Mapping[str, Any]) -> dict:
    """The UNets with one-pass GroupNorm statistics (``UNet.norm_fast_variance``): an A/B option."""
    out = dict(configs)
    for name in ("decoder", "super_res"):
        out[name] = {**configs[name], "unet": {**configs[name]["unet"], "norm_fast_variance": True}}
    return out


def param_shapes(configs: Mapping[str, Any]) -> dict:
    """Every parameter of the stack as ``jax.ShapeDtypeStruct`` (tracing only, nothing allocated)."""
    from unclip_jax.convert.prior import expected_param_shapes
    from unclip_jax.convert.unet import expected_text_proj_params, expected_unet_params
    from unclip_jax.models.clip import clip_param_shapes
    sr = expected_unet_params(configs["super_res"]["unet"])
    return {
        "clip": clip_param_shapes(configs["clip"]),
        "prior": expected_param_shapes(configs["prior"]),
        "decoder": {"unet": expected_unet_params(configs["decoder"]["unet"]),
                    "text_proj": expected_text_proj_params(configs["decoder"]["text_proj"])},
        "sr_first": sr,
        "sr_last": sr,
    }


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _leaf_init(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, float]:
    """(kind, std) of a random leaf: norm scales 1; biases and other 1-D leaves 0; embeddings
    (token, positional, learned null/final tokens) N(0, 0.02²); weights N(0, 1/fan_in) with
    fan_in = all but the last axis (Dense (in, out), Conv HWIO)."""
    name = path[-1]
    if name == "scale":
        return "ones", 0.0
    if "embedding" in name:
        return "normal", 0.02
    if name == "bias" or len(shape) < 2:
        return "zeros", 0.0
    return "normal", 1.0 / math.sqrt(max(1, int(np.prod(shape[:-1]))))


def random_like(shapes, seed: int = 0, dtype="float32"):
    """Random parameters for a tree of shapes (scales from :func:`_leaf_init`), made on the
    host and put on the device leaf by leaf.

    Speed only needs plausible magnitudes, not independent draws: each weight leaf is a
    window (at a random offset) of one pool of 2^22 standard normals per std, repeated
    to the leaf's size. No device program is compiled (a jitted RNG program with one
    output per leaf takes minutes to compile at this size), and the device holds nothing
    but the parameters (the init leaves no transient in the peak-memory figure).
    """
    import ml_dtypes  # noqa: F401  (numpy bfloat16)
    np_dtype = np.dtype(jnp.dtype(dtype).name if jnp.dtype(dtype) != jnp.bfloat16 else ml_dtypes.bfloat16)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(1 << 22, dtype=np.float32)
    pools: dict[float, np.ndarray] = {}
    out = {}
    for path, leaf in sorted(traverse_util.flatten_dict(shapes).items()):
        shape = tuple(leaf.shape)
        n = int(np.prod(shape))
        kind, std = _leaf_init(path, shape)
        if kind == "ones":
            value = np.ones(shape, np_dtype)
        elif kind == "zeros":
            value = np.zeros(shape, np_dtype)
        else:
            if std not in pools:
                pools[std] = (base * std).astype(np_dtype)
            pool = pools[std]
            offset = int(rng.integers(len(pool)))
            value = np.resize(pool[offset:], n).reshape(shape)
        out[path] = jax.device_put(value)
    return traverse_util.unflatten_dict(out)


def random_stack(size: str, *, dtype: str = "bfloat16", attention: str = "xla", param_dtype: str = "float32",
                 seed: int = 0) -> tuple[dict, dict]:
    """(configs, random params) of ``bench.arch.arch(size)``. ``param_dtype`` 'bfloat16' stores
    the weights in bf16 (inference: half the memory and weight traffic)."""
    configs = our_configs(size, dtype=dtype, attention=attention)
    shapes = param_shapes(configs)
    params = {name: random_like(shapes[name], seed * 100 + i, param_dtype) for i, name in enumerate(STAGES)}
    d = configs["prior"]["embed_dim"]
    params["prior_stats"] = {"clip_mean": jnp.zeros((d,), jnp.float32), "clip_std": jnp.ones((d,), jnp.float32)}
    return configs, params


def stack_from_pipeline(pipe_dir: str, *, dtype: str = "float32", attention: str = "xla") -> tuple[dict, dict]:
    """(configs, params) converted with our converters from a saved diffusers UnCLIPPipeline."""
    from unclip_jax.convert.clip import load_hf
    from unclip_jax.convert.common import read_json
    from unclip_jax.convert.prior import convert_prior
    from unclip_jax.convert.unet import convert_decoder, convert_super_res
    sub = lambda name: os.path.join(pipe_dir, name)
    clip_config, clip_params = load_hf(sub("text_encoder"))
    prior_params, stats, prior_config = convert_prior(sub("prior"))
    decoder_params, decoder_config = convert_decoder(sub("decoder"), sub("text_proj"))
    first_params, first_config = convert_super_res(sub("super_res_first"))
    last_params, last_config = convert_super_res(sub("super_res_last"))
    if first_config != last_config:
        raise ValueError("super_res_first and super_res_last have different architectures")
    configs = {"clip": clip_config, "prior": prior_config, "decoder": decoder_config,
               "super_res": {**first_config, "low_res_size": read_json(sub("decoder"))["sample_size"]}}
    params = {"clip": clip_params, "prior": prior_params, "prior_stats": stats, "decoder": decoder_params,
              "sr_first": first_params, "sr_last": last_params}
    return with_options(configs, dtype=dtype, attention=attention), jax.device_put(params)
