"""The unCLIP decoder stage (paper §2.1): training objective, guided sampler, trainer hook.

Model: :class:`~unclip_jax.models.text_proj.TextProj` + :class:`~unclip_jax.models.unet.UNet`,
parameters ``{'text_proj': …, 'unet': …}`` (what :func:`unclip_jax.convert.unet.convert_decoder`
returns for Karlo). The UNet predicts [ε, v] (6 channels) with a learned-range variance and
is trained with the hybrid loss (L_simple + L_vlb, improved DDPM) of
:func:`unclip_jax.diffusion.diffusion_loss`.

Classifier-free guidance training: per example, independently, the CLIP image embedding
is replaced by the learned null embedding with probability ``guidance.p_drop_image``
(0.1) and the caption is dropped with probability ``guidance.p_drop_text`` (0.5). A
dropped caption becomes the *null text conditioning*: the encodings of the empty prompt ""
when the batch carries them (``null_text_embed`` (1|B, D), ``null_text_hidden``
(1|B, L, D), ``null_text_mask`` (1|B, L)) — what diffusers/Karlo use as the negative
prompt at sampling — and otherwise a zero text embedding with zero per-token encodings
and an all-False mask (the decoder then attends only to the 4 CLIP tokens and the image).
Sampling must use the same null text conditioning as training: pass the "" encodings to
:func:`sample_decoder` as ``null_text_*`` if training used them, or leave them None.

Batch (from :func:`preprocess`): ``image`` (B, S, S, 3) in [−1, 1];
``image_embed``, ``text_embed`` (B, D); ``text_hidden`` (B, L, D); ``text_mask`` (B, L) bool.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import diffusion
from unclip_jax.models.text_proj import TextProj
from unclip_jax.models.unet import UNet, unet_from_config

# Karlo's decoder diffusion, used when a config (e.g. an imported checkpoint's) has none.
KARLO_DIFFUSION = dict(schedule="cosine", num_timesteps=1000, prediction_type="epsilon",
                       variance_type="learned_range", vlb_weight=1.0, clip_range=1.0)


def _plain(x):
    """ConfigDict / mapping → plain dict (recursively), for hashing and module building."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def decoder_spec(config) -> dict:
    """Normalises a decoder config into ``{'unet', 'text_proj', 'image_size', 'diffusion'}``.

    Accepts the stage config (``configs/decoder.py``: ``model.unet``, ``model.text_proj``,
    ``model.image_size``, ``model.dtype``/``remat``/``attention_impl``, ``diffusion``) or the
    config of an imported checkpoint (``{'unet', 'text_proj', 'sample_size'}``, diffusion
    defaults to Karlo's).
    """
    cfg = _plain(config)
    if "model" in cfg:
        model = cfg["model"]
        unet = dict(model["unet"])
        for key in ("dtype", "remat", "remat_policy", "attention_impl"):
            if key in model:
                unet[key] = model[key]
        proj = dict(model["text_proj"], dtype=model.get("dtype", "float32"))
        size = model["image_size"]
        diff = {**KARLO_DIFFUSION, **cfg.get("diffusion", {})}
    else:
        unet, proj = dict(cfg["unet"]), dict(cfg["text_proj"])
        size = cfg.get("sample_size") or cfg.get("image_size")
        diff = {**KARLO_DIFFUSION, **cfg.get("diffusion", {})}
    return {"unet": unet, "text_proj": proj, "image_size": int(size), "diffusion": diff}


def build_models(spec: Mapping[str, Any]) -> tuple[TextProj, UNet]:
    """(TextProj, UNet) of a :func:`decoder_spec`; checks that their widths fit."""
    proj = TextProj(**spec["text_proj"])
    unet = unet_from_config(spec["unet"])
    if not unet.added_embedding or unet.context_dim is None:
        raise ValueError("the decoder UNet needs added_embedding=True and a context_dim")
    if proj.time_embed_dim != unet.embed_dim or proj.cross_attention_dim != unet.context_dim:
        raise ValueError(f"text_proj (time_embed_dim {proj.time_embed_dim}, cross_attention_dim "
                         f"{proj.cross_attention_dim}) does not fit the UNet (time embedding {unet.embed_dim}, "
                         f"context_dim {unet.context_dim})")
    return proj, unet


def init_params(key: jax.Array, config) -> dict:
    """Random parameters ``{'text_proj', 'unet'}`` (float32); pure in ``key``."""
    return _init_from_spec(key, decoder_spec(config))


def _init_from_spec(key: jax.Array, spec: Mapping[str, Any]) -> dict:
    proj, unet = build_models(spec)
    d, s = proj.clip_embeddings_dim, spec["image_size"]
    tokens = 1 + proj.clip_extra_context_tokens
    k1, k2 = jax.random.split(key)
    zeros = jnp.zeros((1, d))
    proj_params = proj.init(k1, zeros, zeros, jnp.zeros((1, 1, d)), jnp.ones((1, 1), bool))["params"]
    unet_params = unet.init(k2, jnp.zeros((1, s, s, unet.in_channels)), jnp.zeros((1,)),
                            added_emb=jnp.zeros((1, unet.embed_dim)),
                            context=jnp.zeros((1, tokens, unet.context_dim)),
                            context_mask=jnp.ones((1, tokens), bool))["params"]
    return {"text_proj": proj_params, "unet": unet_params}


# ---------------------------------------------------------------- conditioning dropout

def drop_masks(key: jax.Array, batch: int, p_drop_image: float, p_drop_text: float
               ) -> tuple[jax.Array, jax.Array]:
    """Independent Bernoulli masks (B,) bool: (drop the image embedding, drop the caption)."""
    k_image, k_text = jax.random.split(key)
    return (jax.random.bernoulli(k_image, p_drop_image, (batch,)),
            jax.random.bernoulli(k_text, p_drop_text, (batch,)))


def null_text(batch: int, text_len: int, dim: int, null_text_embed=None, null_text_hidden=None,
              null_text_mask=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The null text conditioning (see module doc), broadcast to batch ``batch``:
    (embed (B, D), hidden (B, L, D), mask (B, L) bool)."""
    given = [v is not None for v in (null_text_embed, null_text_hidden, null_text_mask)]
    if any(given) and not all(given):
        raise ValueError("pass all three of null_text_embed, null_text_hidden, null_text_mask, or none")
    if not any(given):
        return (jnp.zeros((batch, dim)), jnp.zeros((batch, text_len, dim)),
                jnp.zeros((batch, text_len), bool))
    embed = jnp.broadcast_to(jnp.asarray(null_text_embed, jnp.float32).reshape(-1, dim), (batch, dim))
    hidden = jnp.asarray(null_text_hidden, jnp.float32)
    hidden = jnp.broadcast_to(hidden.reshape((-1,) + hidden.shape[-2:]), (batch,) + hidden.shape[-2:])
    mask = jnp.asarray(null_text_mask).astype(bool)
    mask = jnp.broadcast_to(mask.reshape(-1, mask.shape[-1]), (batch, mask.shape[-1]))
    if hidden.shape[1] != text_len or mask.shape[1] != text_len:
        raise ValueError(f"null text has {hidden.shape[1]} tokens, the captions {text_len}")
    return embed, hidden, mask


def apply_text_dropout(drop_text: jax.Array, text_embed, text_hidden, text_mask, null):
    """Rows where ``drop_text`` is True take the null text conditioning ``null``."""
    n_embed, n_hidden, n_mask = null
    return (jnp.where(drop_text[:, None], n_embed, text_embed),
            jnp.where(drop_text[:, None, None], n_hidden, text_hidden),
            jnp.where(drop_text[:, None], n_mask, text_mask.astype(bool)))


def _null_from_batch(batch: Mapping[str, Any], size: int, text_len: int, dim: int):
    return null_text(size, text_len, dim, batch.get("null_text_embed"), batch.get("null_text_hidden"),
                     batch.get("null_text_mask"))


# ---------------------------------------------------------------- loss

def loss_fn(params, batch: Mapping[str, Any], key: jax.Array, config, *, train: bool):
    """Hybrid diffusion loss of the decoder with conditioning dropout (module doc).

    Returns (mean loss, metrics {'mse', 'vb', 'drop_image', 'drop_text'}).
    """
    spec = decoder_spec(config)
    proj, unet = build_models(spec)
    diff = spec["diffusion"]
    guidance = _plain(config).get("guidance", {})
    image = jnp.asarray(batch["image"], jnp.float32)
    b = image.shape[0]
    text_hidden = jnp.asarray(batch["text_hidden"], jnp.float32)
    k_drop, k_loss, k_dropout = jax.random.split(key, 3)
    if train:
        drop_image, drop_text = drop_masks(k_drop, b, guidance.get("p_drop_image", 0.1),
                                           guidance.get("p_drop_text", 0.5))
    else:
        drop_image = drop_text = jnp.zeros((b,), bool)
    null = _null_from_batch(batch, b, text_hidden.shape[1], text_hidden.shape[2])
    text_embed, text_hidden, text_mask = apply_text_dropout(
        drop_text, jnp.asarray(batch["text_embed"], jnp.float32), text_hidden, batch["text_mask"], null)
    context, context_mask, added = proj.apply({"params": params["text_proj"]}, jnp.asarray(batch["image_embed"]),
                                              text_embed, text_hidden, text_mask, drop_image=drop_image)

    def model_fn(x_t, t):
        return unet.apply({"params": params["unet"]}, x_t, t, added_emb=added, context=context,
                          context_mask=context_mask, train=train, rngs={"dropout": k_dropout})

    schedule = diffusion.Schedule.create(diff["schedule"], diff["num_timesteps"])
    loss, aux = diffusion.diffusion_loss(model_fn, schedule, image, k_loss,
                                         prediction_type=diff["prediction_type"],
                                         variance_type=diff["variance_type"], vlb_weight=diff["vlb_weight"],
                                         min_snr_gamma=diff.get("min_snr_gamma"))
    metrics = {"mse": aux["mse"].mean(), "vb": aux["vb"].mean(),
               "drop_image": drop_image.mean(), "drop_text": drop_text.mean()}
    return loss.mean(), metrics


# ---------------------------------------------------------------- sampling

@functools.lru_cache(maxsize=16)
def _sampler(spec_json: str, steps: int, guided: bool, has_init: bool, has_noise: bool):
    spec = json.loads(spec_json)
    proj, unet = build_models(spec)
    diff = spec["diffusion"]
    size = spec["image_size"]
    timesteps = diffusion.respace(steps, diff["num_timesteps"])
    # Concrete arrays even when first called inside an outer jit: this cache outlives that
    # trace, and tracers kept in it would leak into the next one.
    with jax.ensure_compile_time_eval():
        schedule = diffusion.Schedule.create(diff["schedule"], diff["num_timesteps"])

    @jax.jit
    def run(params, image_embed, text_embed, text_hidden, text_mask, null, key, scale, init_latents, noise):
        b = image_embed.shape[0]
        k_init, k_steps = jax.random.split(key)
        if guided:   # diffusers' order [uncond; cond]; uncond = null image + null text
            image_embed = jnp.concatenate([image_embed, image_embed])
            drop_image = jnp.arange(2 * b) < b
            text_embed = jnp.concatenate([null[0], text_embed])
            text_hidden = jnp.concatenate([null[1], text_hidden])
            text_mask = jnp.concatenate([null[2], text_mask])
        else:
            drop_image = None
        context, context_mask, added = proj.apply({"params": params["text_proj"]}, image_embed, text_embed,
                                                  text_hidden, text_mask, drop_image=drop_image)

        def model_fn(x, t):
            return unet.apply({"params": params["unet"]}, x, t, added_emb=added, context=context,
                              context_mask=context_mask)

        if guided:
            model_fn = diffusion.classifier_free_guidance(model_fn, scale, guided_channels=unet.in_channels)
        x_T = init_latents if has_init else jax.random.normal(k_init, (b, size, size, unet.in_channels))
        x0 = diffusion.ddpm_sample(model_fn, x_T, timesteps, schedule, None if has_noise else k_steps,
                                   prediction_type=diff["prediction_type"], variance_type=diff["variance_type"],
                                   clip_range=diff.get("clip_range", 1.0), noise=noise if has_noise else None)
        return jnp.clip(x0, -1.0, 1.0)

    return run


def sample_decoder(params, config, image_embed, text_embed, text_hidden, text_mask, key, *, steps: int = 25,
                   guidance_scale: float = 8.0, null_text_embed=None, null_text_hidden=None, null_text_mask=None,
                   init_latents=None, noise=None) -> jax.Array:
    """Guided ancestral sampling of the decoder, as diffusers' UnCLIPPipeline decoder loop.

    One jitted function (compiled once per config, ``steps`` and argument structure) whose
    step loop is a ``lax.scan``: text_proj on [null image + null text; conditioning], then at
    each respaced timestep (``respace(steps)``: 999 … 0) the UNet on [x; x], guidance
    ε = ε_u + s·(ε_c − ε_u) on the first 3 channels with the variance v from the
    conditional half, and an UnCLIPScheduler step (learned range, x̂_0 clipped to ±1).
    The result is clipped to [−1, 1]. ``guidance_scale == 1`` runs the conditional model only.

    Args:
      params: ``{'text_proj', 'unet'}``.
      config: stage config or an imported checkpoint's config (see :func:`decoder_spec`).
      image_embed, text_embed: (B, D) CLIP embeddings; text_hidden (B, L, D); text_mask (B, L).
      key: PRNG key (initial latents and per-step noise).
      null_text_*: the null text conditioning (embed (D,)|(1|B, D), hidden (1|B, L, D),
        mask (1|B, L)); None = the default null (module doc).
      init_latents: (B, S, S, 3) x_T instead of drawing it.
      noise: (steps, B, S, S, 3) per-step noise instead of drawing it.
    Returns:
      (B, S, S, 3) images in [−1, 1].
    """
    spec = decoder_spec(config)
    image_embed = jnp.asarray(image_embed, jnp.float32)
    text_hidden = jnp.asarray(text_hidden, jnp.float32)
    b, text_len, dim = text_hidden.shape
    if image_embed.shape[0] != b:
        raise ValueError(f"image_embed batch {image_embed.shape[0]} != text batch {b}")
    size, channels = spec["image_size"], spec["unet"].get("in_channels", 3)
    if init_latents is not None and tuple(init_latents.shape) != (b, size, size, channels):
        raise ValueError(f"init_latents must be {(b, size, size, channels)}, got {tuple(init_latents.shape)}")
    guided = guidance_scale is not None and float(guidance_scale) != 1.0
    null = null_text(b, text_len, dim, null_text_embed, null_text_hidden, null_text_mask)
    run = _sampler(json.dumps(spec, sort_keys=True), int(steps), guided, init_latents is not None,
                   noise is not None)
    return run(params, image_embed, jnp.asarray(text_embed, jnp.float32), text_hidden,
               jnp.asarray(text_mask).astype(bool), null, key, jnp.float32(guidance_scale or 1.0),
               None if init_latents is None else jnp.asarray(init_latents, jnp.float32),
               None if noise is None else jnp.asarray(noise, jnp.float32))


# ---------------------------------------------------------------- accounting

@functools.lru_cache(maxsize=8)
def _forward_flops(spec_json: str, text_len: int) -> float:
    spec = json.loads(spec_json)
    proj, unet = build_models(spec)
    s, d = spec["image_size"], proj.clip_embeddings_dim
    params = jax.eval_shape(lambda k: _init_from_spec(k, spec), jax.random.key(0))

    def forward(p, x, image_embed, text_embed, text_hidden, text_mask):
        context, mask, added = proj.apply({"params": p["text_proj"]}, image_embed, text_embed, text_hidden,
                                          text_mask)
        return unet.apply({"params": p["unet"]}, x, jnp.zeros((1,)), added_emb=added, context=context,
                          context_mask=mask)

    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((1, s, s, unet.in_channels), f32), jax.ShapeDtypeStruct((1, d), f32),
            jax.ShapeDtypeStruct((1, d), f32), jax.ShapeDtypeStruct((1, text_len, d), f32),
            jax.ShapeDtypeStruct((1, text_len), jnp.bool_))
    return matmul_flops(forward, params, *args)


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in (value if isinstance(value, (list, tuple)) else (value,)):
            if hasattr(v, "jaxpr") and hasattr(v, "consts"):      # ClosedJaxpr
                yield v.jaxpr
            elif hasattr(v, "eqns"):                               # Jaxpr
                yield v


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lhs_contract])
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec          # (out, in, *spatial) axes
            per_output = np.prod([rhs[d] for d in spec[1:]])          # in/groups × kernel window
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_output
        else:
            scale = eqn.params.get("length", 1) if name == "scan" else 1
            total += scale * sum(_jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
    return total


def matmul_flops(fn, *args) -> float:
    """FLOPs of the matrix products and convolutions of ``fn(*args)`` (2 per multiply-add),
    counted on its jaxpr: the same on every backend (XLA's GPU cost analysis does not see
    cuDNN convolutions). ``args`` may be ``jax.ShapeDtypeStruct``."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def flops_per_example(config) -> float:
    """Training FLOPs per example ≈ 3 × the forward's matmul/conv FLOPs at batch 1."""
    text_len = int(_plain(config).get("clip", {}).get("text_len", 77) or 77)
    return 3.0 * _forward_flops(json.dumps(decoder_spec(config), sort_keys=True), text_len)


# ---------------------------------------------------------------- data

def attribute_embeddings(attributes: np.ndarray, dim: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic CLIP-like conditioning from captioned-shapes attributes (no CLIP needed).

    Each object's (colour, shape, size, position) indices become tokens of a fixed random
    table; z_i and z_t are fixed random projections of the multi-hot attribute vector.
    attributes: int (B, O, 4) with −1 padding (``ShapesSource`` examples' ``attributes``).
    Returns image_embed, text_embed (B, dim), text_hidden (B, 4·O, dim), text_mask (B, 4·O).
    """
    from unclip_jax.data import shapes
    attributes = np.asarray(attributes).reshape(len(attributes), -1, len(shapes.ATTRIBUTES))
    sizes = [len(shapes.VOCAB[a]) for a in shapes.ATTRIBUTES]
    offsets = np.cumsum([0] + sizes[:-1])
    vocab = int(sum(sizes))
    rng = np.random.default_rng([int(seed), 4242])
    w_image = rng.standard_normal((vocab, dim)) / np.sqrt(vocab)
    w_text = rng.standard_normal((vocab, dim)) / np.sqrt(vocab)
    table = rng.standard_normal((vocab, dim))
    mask = attributes >= 0
    ids = np.where(mask, attributes + offsets, 0)
    multi_hot = np.zeros((len(attributes), vocab))
    for b, row in enumerate(ids):
        np.add.at(multi_hot[b], row[mask[b]], 1.0)
    b = len(attributes)
    return {"image_embed": (multi_hot @ w_image).astype(np.float32),
            "text_embed": (multi_hot @ w_text).astype(np.float32),
            "text_hidden": (table[ids] * mask[..., None]).reshape(b, -1, dim).astype(np.float32),
            "text_mask": mask.reshape(b, -1)}


def _stack(examples) -> dict[str, Any]:
    if isinstance(examples, Mapping):
        return dict(examples)
    examples = list(examples)
    return {k: ([e[k] for e in examples] if isinstance(examples[0][k], str)
                else np.stack([np.asarray(e[k]) for e in examples])) for k in examples[0]}


def images_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) → float32 in [−1, 1] (floats pass through)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


def preprocess(examples, config) -> dict[str, np.ndarray]:
    """Raw examples → the decoder batch (module doc), on the host.

    ``config.clip.kind``: 'precomputed' (examples carry the four CLIP arrays), 'model'
    (images + captions encoded with the CLIP at ``clip.path``/``clip.tokenizer``; the ""
    encoding is added as the null text) or 'attributes' (:func:`attribute_embeddings`).
    """
    cfg = _plain(config)
    batch = _stack(examples)
    if "image" not in batch:
        raise ValueError(f"decoder examples need an 'image'; got keys {sorted(batch)}")
    image = images_to_float(batch["image"])
    size = int(cfg["model"]["image_size"])
    if image.shape[1:] != (size, size, 3):
        raise ValueError(f"images {image.shape[1:]} but model.image_size is {size}; set data.image_size")
    clip = cfg.get("clip", {})
    kind = clip.get("kind", "precomputed")
    null = None
    if kind == "precomputed":
        missing = [k for k in ("image_embed", "text_embed", "text_hidden", "text_mask") if k not in batch]
        if missing:
            raise ValueError(f"clip.kind='precomputed' but the examples lack {missing}")
        cond = batch
        if all(k in batch for k in ("null_text_embed", "null_text_hidden", "null_text_mask")):
            null = tuple(np.asarray(batch[k])[:1] for k in ("null_text_embed", "null_text_hidden", "null_text_mask"))
    elif kind == "model":
        from unclip_jax.stages.prior import clip_null_text, encode_with_clip
        if "caption" not in batch:
            raise ValueError("clip.kind='model' needs examples with a 'caption'")
        cond = encode_with_clip(np.asarray(batch["image"]), batch["caption"], clip)
        null = clip_null_text(clip)
    elif kind == "attributes":
        if "attributes" not in batch:
            raise ValueError("clip.kind='attributes' needs captioned-shapes examples ('attributes')")
        cond = attribute_embeddings(batch["attributes"], int(cfg["model"]["text_proj"]["clip_embeddings_dim"]),
                                    seed=int(cfg.get("data", {}).get("dataset_seed", 0)))
    else:
        raise ValueError(f"clip.kind must be 'precomputed', 'model' or 'attributes', got {kind!r}")
    out = {"image": image,
           "image_embed": np.asarray(cond["image_embed"], np.float32),
           "text_embed": np.asarray(cond["text_embed"], np.float32),
           "text_hidden": np.asarray(cond["text_hidden"], np.float32),
           "text_mask": np.asarray(cond["text_mask"]).astype(bool)}
    d = int(cfg["model"]["text_proj"]["clip_embeddings_dim"])
    if out["image_embed"].shape[1:] != (d,) or out["text_hidden"].shape[2:] != (d,):
        raise ValueError(f"CLIP embeddings of width {out['image_embed'].shape[1:]} / {out['text_hidden'].shape[2:]} "
                         f"do not fit model.text_proj.clip_embeddings_dim={d}")
    mode = cfg.get("guidance", {}).get("null_text", "auto")
    if mode == "batch" and null is None:
        raise ValueError("guidance.null_text='batch' but the data has no null ('') text encoding")
    if null is not None and mode != "zero":
        b, length = out["text_mask"].shape
        embed, hidden, mask = (np.asarray(x) for x in null)
        out["null_text_embed"] = np.broadcast_to(embed.reshape(1, d), (b, d)).astype(np.float32)
        out["null_text_hidden"] = np.broadcast_to(hidden.reshape(1, length, d), (b, length, d)).astype(np.float32)
        out["null_text_mask"] = np.broadcast_to(mask.reshape(1, length), (b, length)).astype(bool)
    return out


def make_source(config, split: str = "train", process_index: int = 0, process_count: int = 1):
    """The examples of ``config.data`` (``unclip_jax.data.make_source``) for ``split``."""
    from unclip_jax.data import make_source as data_source
    return data_source(config.data, split=split, process_index=process_index, process_count=process_count,
                       seed=int(config.train.seed))


def sample_grid(params, config, key) -> np.ndarray:
    """``config.sample.num`` decoder samples (uint8 (N, S, S, 3)) for the captions of the first
    examples of ``config.sample.split``, with ``config.sample`` steps and guidance."""
    s = config.sample
    from unclip_jax.data import first_examples
    batch = preprocess(first_examples(make_source(config, s.split), int(s.num)), config)
    null = [batch.get(k) for k in ("null_text_embed", "null_text_hidden", "null_text_mask")]
    images = sample_decoder(params, config, batch["image_embed"], batch["text_embed"], batch["text_hidden"],
                            batch["text_mask"], key, steps=int(s.steps), guidance_scale=float(s.guidance_scale),
                            null_text_embed=null[0], null_text_hidden=null[1], null_text_mask=null[2])
    return np.asarray(jnp.round((images + 1.0) * 127.5).clip(0, 255).astype(jnp.uint8))


# ---------------------------------------------------------------- trainer stage

def _register():
    from unclip_jax.train.stage import FunctionStage, register_stage
    stage = FunctionStage(init_params=init_params, loss_fn=loss_fn, make_source=make_source,
                          preprocess=preprocess, flops_per_example=flops_per_example,
                          sample_grid=sample_grid)
    register_stage("decoder", stage)
    return stage


try:  # registering needs the trainer package; the functions above do not
    DECODER_STAGE = _register()
except ImportError:  # pragma: no cover - a partial install without unclip_jax.train
    DECODER_STAGE = None
