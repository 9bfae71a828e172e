"""CLIP (Radford et al. 2021) in Flax linen: a causal text Transformer and a ViT image tower.

Numerically this is transformers' PyTorch ``CLIPModel`` (equivalently OpenAI's and
OpenCLIP's CLIP): the parity tests compare the two through our converter.

Text tower, ``input_ids`` (B, L) with L <= context_length (77):
  x = token_embedding[ids] + positional_embedding[:L]
  x = blocks(x)  (pre-LN: x += attn(LN1 x) with a causal mask; x += mlp(LN2 x))
  h = ln_final(x)                        -> per-token hidden states (B, L, W)
  z_t = h[b, eot_b] @ W_text             -> text embedding (B, P)
  ``eot_b`` is the end-of-text position: ``pool="argmax"`` takes the largest token id
  (OpenAI/Karlo, and transformers when ``eos_token_id == 2`` in a legacy config);
  ``pool="eos"`` takes the first occurrence of ``eos_token_id`` (transformers otherwise).

Image tower, ``pixels`` (B, S, S, 3), S = image_size, normalised with the OpenAI CLIP
mean/std (see ``unclip_jax.clip_preprocess``):
  patches = conv_pxp(pixels)             -> (B, (S/p)², W)
  x = [class_embedding; patches] + positional_embedding, then ln_pre
  x = blocks(x)  (pre-LN, no mask)
  z_i = ln_post(x[:, 0]) @ W_image       -> image embedding (B, P)

Embeddings are returned un-normalised (as Karlo and diffusers consume them); the
contrastive loss normalises them. Outputs are float32 whatever the compute ``dtype``;
parameters are float32; LayerNorms compute in float32.

Attention masks: with ``attention_mask`` given, padded keys are masked (as transformers
with a mask); without it the text tower is causal only (OpenAI CLIP, Karlo, and
diffusers' ``UnCLIPPipeline`` which calls its text encoder without a mask). Both give the
same hidden states at every real (unpadded) position, because the padding follows the
end-of-text token and the mask is causal; only the hidden states at padded positions
differ, and every consumer (prior, decoder) masks those.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.attention import IMPLEMENTATIONS, dot_product_attention

ACTIVATIONS = ("quick_gelu", "gelu")
POOLING = ("argmax", "eos")


def activation(name: str):
    """``quick_gelu``: x·σ(1.702x) (OpenAI CLIP); ``gelu``: the exact erf GELU (OpenCLIP, HF "gelu")."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


# --------------------------------------------------------------------------- configs

def _check_fields(cls, values: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Causal text Transformer. ``mlp_dim`` is the feed-forward hidden width (4·width in OpenAI CLIP)."""
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pool: str = "argmax"
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown text activation {self.act!r}; expected one of {ACTIVATIONS}")
        if self.pool not in POOLING:
            raise ValueError(f"unknown text pooling {self.pool!r}; expected one of {POOLING}")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """ViT image tower on square ``image_size`` inputs cut into ``patch_size`` patches."""
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown vision activation {self.act!r}; expected one of {ACTIVATIONS}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIP model: one or both towers, a shared embedding width P and run-time options.

    Attributes:
      text, vision: the towers; either may be None (a text-only encoder such as diffusers'
        Karlo ``text_encoder``, or an image-only one).
      projection_dim: P, the joint embedding width.
      logit_scale_init: initial log temperature, log(1/0.07) as in CLIP. Only a two-tower
        model has the ``logit_scale`` parameter.
      logit_bias_init: None for CLIP; a float (SigLIP: -10) adds a learned ``logit_bias``.
      dtype: compute dtype ("float32", "bfloat16"); parameters stay float32.
      remat: rematerialise each Transformer block in the backward pass.
      attention: ``dot_product_attention`` implementation ("xla", "cudnn", "splash", "auto").
    """
    text: CLIPTextConfig | None = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig | None = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None
    dtype: str = "float32"
    remat: bool = False
    attention: str = "xla"

    def __post_init__(self):
        if self.text is None and self.vision is None:
            raise ValueError("a CLIPConfig needs at least one tower (text or vision)")
        jnp.dtype(self.dtype)  # fails early on a bad dtype name
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}; got {self.attention!r}")

    def to_dict(self) -> dict:
        """A JSON-able dict (our pretrained ``config.json``); ``model: "clip"`` marks the kind."""
        d = dataclasses.asdict(self)
        d["model"] = "clip"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        """Inverse of :meth:`to_dict`; unknown keys fail with their names."""
        d = dict(d)
        kind = d.pop("model", "clip")
        if kind != "clip":
            raise ValueError(f"config is for model {kind!r}, not 'clip'")
        text, vision = d.pop("text", None), d.pop("vision", None)
        _check_fields(cls, d)
        if text is not None:
            _check_fields(CLIPTextConfig, text)
            text = CLIPTextConfig(**text)
        if vision is not None:
            _check_fields(CLIPVisionConfig, vision)
            vision = CLIPVisionConfig(**vision)
        return cls(text=text, vision=vision, **d)

    def replace(self, **changes) -> "CLIPConfig":
        return dataclasses.replace(self, **changes)


def _openai(embed, image, patch, v_width, v_layers, v_heads, t_width, t_layers, t_heads,
            act="quick_gelu") -> CLIPConfig:
    return CLIPConfig(
        text=CLIPTextConfig(width=t_width, layers=t_layers, heads=t_heads, mlp_dim=4 * t_width, act=act),
        vision=CLIPVisionConfig(image_size=image, patch_size=patch, width=v_width, layers=v_layers,
                                heads=v_heads, mlp_dim=4 * v_width, act=act),
        projection_dim=embed)


# Sizes from the OpenAI CLIP paper (Table 19/20) and OpenCLIP's ViT-H-14 config.
_VARIANTS = {
    "ViT-B/32": lambda: _openai(512, 224, 32, 768, 12, 12, 512, 12, 8),
    "ViT-B/16": lambda: _openai(512, 224, 16, 768, 12, 12, 512, 12, 8),
    "ViT-L/14": lambda: _openai(768, 224, 14, 1024, 24, 16, 768, 12, 12),
    "ViT-L/14-336": lambda: _openai(768, 336, 14, 1024, 24, 16, 768, 12, 12),
    "ViT-H/14": lambda: _openai(1024, 224, 14, 1280, 32, 16, 1024, 24, 16, act="gelu"),
    "tiny": lambda: CLIPConfig(
        text=CLIPTextConfig(width=32, layers=2, heads=4, mlp_dim=64),
        vision=CLIPVisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64),
        projection_dim=32),
}
VARIANTS = tuple(_VARIANTS)


def clip_variant(name: str, **overrides) -> CLIPConfig:
    """A named CLIP size: 'ViT-B/32', 'ViT-B/16', 'ViT-L/14', 'ViT-L/14-336', 'ViT-H/14', 'tiny'.

    ``overrides`` replace top-level fields (``dtype="bfloat16", remat=True``); change a
    tower with ``dataclasses.replace(cfg.text, vocab_size=...)``. ViT-H/14 uses the exact
    GELU (OpenCLIP LAION weights), the OpenAI sizes QuickGELU.
    """
    lookup = {k.lower(): k for k in _VARIANTS}
    key = lookup.get(name.lower())
    if key is None:
        raise ValueError(f"unknown CLIP variant {name!r}; known: {', '.join(VARIANTS)}")
    return _VARIANTS[key]().replace(**overrides)


# --------------------------------------------------------------------------- modules

def _layer_norm(x: jax.Array, eps: float, name: str, dtype) -> jax.Array:
    """LayerNorm computed in float32 (two-pass variance, as torch), returned in ``dtype``."""
    y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                     use_fast_variance=False, name=name)(x.astype(jnp.float32))
    return y.astype(dtype)


class ResidualBlock(nn.Module):
    """Pre-LN Transformer block: x += attn(LN1 x); x += fc2(act(fc1(LN2 x))).

    Attention uses separate biased q/k/v/out projections and scale 1/√head_dim.
    ``key_mask`` is a (B, L) bool mask of the keys to attend (True) or None (all).
    """
    heads: int
    mlp_dim: int
    act: str
    eps: float
    causal: bool = False
    dtype: Any = jnp.float32
    attention: str = "xla"
    init_scale: float = 1.0  # OpenAI init: output projections scaled by (2·layers)^-1/2

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        b, length, width = x.shape
        head_dim = width // self.heads
        attn_std = width ** -0.5
        proj_std = attn_std * self.init_scale
        fc_std = (2 * width) ** -0.5

        def dense(n, name, std):
            return nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                            kernel_init=nn.initializers.normal(std))

        h = _layer_norm(x, self.eps, "ln_1", self.dtype)
        split = lambda y: y.reshape(b, length, self.heads, head_dim)
        q = split(dense(width, "q", attn_std)(h))
        k = split(dense(width, "k", attn_std)(h))
        v = split(dense(width, "v", attn_std)(h))
        o = dot_product_attention(q, k, v, key_mask=key_mask, is_causal=self.causal,
                                  implementation=self.attention)
        x = x + dense(width, "out", proj_std)(o.reshape(b, length, width))

        h = _layer_norm(x, self.eps, "ln_2", self.dtype)
        h = activation(self.act)(dense(self.mlp_dim, "fc1", fc_std)(h))
        return x + dense(width, "fc2", proj_std)(h)


def _blocks(x: jax.Array, key_mask, *, config: CLIPConfig, tower, causal: bool) -> jax.Array:
    dtype = jnp.dtype(config.dtype)
    block_cls = nn.remat(ResidualBlock) if config.remat else ResidualBlock
    for i in range(tower.layers):
        x = block_cls(heads=tower.heads, mlp_dim=tower.mlp_dim, act=tower.act, eps=tower.layer_norm_eps,
                      causal=causal, dtype=dtype, attention=config.attention,
                      init_scale=(2 * tower.layers) ** -0.5, name=f"block_{i}")(x, key_mask)
    return x


def pool_eot(hidden: jax.Array, input_ids: jax.Array, text: CLIPTextConfig) -> jax.Array:
    """Hidden state at the end-of-text position of each row: (B, L, W), (B, L) -> (B, W)."""
    if text.pool == "argmax":
        index = jnp.argmax(input_ids, axis=-1)
    else:  # first occurrence; a row without eos pools position 0, as transformers does
        index = jnp.argmax((input_ids == text.eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class CLIPTextModel(nn.Module):
    """The text tower: (input_ids (B, L) int, attention_mask (B, L) bool or None)
    -> (text_embeds (B, P), last_hidden_state (B, L, W)), both float32.

    Parameters: ``token_embedding``, ``positional_embedding`` (context, W), ``block_{i}``,
    ``ln_final``, ``projection`` (W -> P, no bias).
    """
    config: CLIPConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        cfg, text = self.config, self.config.text
        if text is None:
            raise ValueError("this CLIPConfig has no text tower")
        dtype = jnp.dtype(cfg.dtype)
        if input_ids.ndim != 2 or input_ids.shape[1] > text.context_length:
            raise ValueError(f"input_ids must be (B, L) with L <= {text.context_length}; got {input_ids.shape}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {attention_mask.shape} must match input_ids {input_ids.shape}")
        length = input_ids.shape[1]

        x = nn.Embed(text.vocab_size, text.width, dtype=dtype, param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(0.02), name="token_embedding")(input_ids)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                         (text.context_length, text.width), jnp.float32)
        x = x + pos[:length].astype(dtype)

        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        x = _blocks(x, key_mask, config=cfg, tower=text, causal=True)
        hidden = _layer_norm(x, text.layer_norm_eps, "ln_final", dtype)

        pooled = pool_eot(hidden, input_ids, text)
        embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(text.width ** -0.5), name="projection")(pooled)
        return embeds.astype(jnp.float32), hidden.astype(jnp.float32)


class CLIPVisionModel(nn.Module):
    """The image tower: pixels (B, S, S, 3), CLIP-normalised -> image_embeds (B, P) float32.

    Parameters: ``patch_embed`` (conv p×p stride p, no bias), ``class_embedding`` (W,),
    ``positional_embedding`` (1 + N, W), ``ln_pre``, ``block_{i}``, ``ln_post``,
    ``projection`` (W -> P, no bias).
    """
    config: CLIPConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg, vis = self.config, self.config.vision
        if vis is None:
            raise ValueError("this CLIPConfig has no vision tower")
        dtype = jnp.dtype(cfg.dtype)
        s = vis.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels must be (B, {s}, {s}, 3) NHWC, CLIP-normalised; got {pixels.shape}")
        b = pixels.shape[0]
        scale = vis.width ** -0.5

        x = nn.Conv(vis.width, (vis.patch_size, vis.patch_size), strides=vis.patch_size,
                    padding="VALID", use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    name="patch_embed")(pixels.astype(dtype))
        x = x.reshape(b, -1, vis.width)  # row-major over the patch grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(scale), (vis.width,), jnp.float32)
        pos = self.param("positional_embedding", nn.initializers.normal(scale),
                         (vis.num_patches + 1, vis.width), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, vis.width)), x], axis=1)
        x = x + pos.astype(dtype)
        x = _layer_norm(x, vis.layer_norm_eps, "ln_pre", dtype)

        x = _blocks(x, None, config=cfg, tower=vis, causal=False)
        pooled = _layer_norm(x[:, 0], vis.layer_norm_eps, "ln_post", dtype)
        embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(scale), name="projection")(pooled)
        return embeds.astype(jnp.float32)


class CLIPModel(nn.Module):
    """Both towers (or the one the config has) and the learned temperature.

    Parameters: ``text`` (:class:`CLIPTextModel`), ``vision`` (:class:`CLIPVisionModel`),
    and, for a two-tower model, the scalar ``logit_scale`` (log temperature; the loss uses
    exp of it) and, if ``logit_bias_init`` is set, the scalar ``logit_bias``.

    Use ``model.apply({'params': p}, ids, mask, method="encode_text")`` or
    ``method="encode_image"``; ``__call__`` runs whichever inputs are given.
    """
    config: CLIPConfig

    def setup(self):
        cfg = self.config
        if cfg.text is not None:
            self.text = CLIPTextModel(cfg)
        if cfg.vision is not None:
            self.vision = CLIPVisionModel(cfg)
        if cfg.text is not None and cfg.vision is not None:
            self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init),
                                          (), jnp.float32)
            if cfg.logit_bias_init is not None:
                self.logit_bias = self.param("logit_bias", nn.initializers.constant(cfg.logit_bias_init),
                                             (), jnp.float32)

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
        """(B, L) ids, (B, L) bool mask or None -> (text_embeds (B, P), last_hidden_state (B, L, W))."""
        if self.config.text is None:
            raise ValueError("this CLIP model has no text tower")
        return self.text(input_ids, attention_mask)

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """(B, S, S, 3) CLIP-normalised pixels -> image_embeds (B, P)."""
        if self.config.vision is None:
            raise ValueError("this CLIP model has no vision tower")
        return self.vision(pixels)

    def __call__(self, input_ids: jax.Array | None = None, pixels: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """Returns a dict with ``text_embeds``/``last_hidden_state`` (if ids are given),
        ``image_embeds`` (if pixels are given), and ``logit_scale`` (+ ``logit_bias``) for a
        two-tower model."""
        out = {}
        if input_ids is not None:
            out["text_embeds"], out["last_hidden_state"] = self.encode_text(input_ids, attention_mask)
        if pixels is not None:
            out["image_embeds"] = self.encode_image(pixels)
        if self.config.text is not None and self.config.vision is not None:
            out["logit_scale"] = self.logit_scale
            if self.config.logit_bias_init is not None:
                out["logit_bias"] = self.logit_bias
        return out


def dummy_inputs(config: CLIPConfig, batch: int = 1) -> dict[str, jax.Array]:
    """Zero inputs of the right shapes for ``init``/``eval_shape`` (only the towers that exist)."""
    inputs = {}
    if config.text is not None:
        inputs["input_ids"] = jnp.zeros((batch, config.text.context_length), jnp.int32)
        inputs["attention_mask"] = jnp.ones((batch, config.text.context_length), bool)
    if config.vision is not None:
        s = config.vision.image_size
        inputs["pixels"] = jnp.zeros((batch, s, s, 3), jnp.float32)
    return inputs


def init_clip_params(config: CLIPConfig, key: jax.Array) -> dict:
    """Random parameters (OpenAI CLIP initialisation) for every tower the config has."""
    # Jitted: one compile is much faster than running the initialisers op by op.
    return jax.jit(lambda k: CLIPModel(config).init(k, **dummy_inputs(config))["params"])(key)


def clip_param_shapes(config: CLIPConfig) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` (no memory, no compute)."""
    return jax.eval_shape(lambda k: init_clip_params(config, k), jax.random.key(0))
