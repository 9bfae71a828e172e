"""The diffusion prior stage [P §2.2]: P(z_i | y) as an x0-predicting diffusion over CLIP embeddings.

Pieces (all pure JAX unless stated):

- **Embedding space** (``config.prior.embed_norm``). The network works on x = norm(z_i):
    'stats': x = (z − clip_mean)/clip_std   (Karlo/diffusers; statistics stored with the weights)
    'scale': x = z · embed_scale            (the paper's fixed 17.2)
    'l2':    x = z/‖z‖ · √D                 (lucidrains; the norm of z_i is not modelled:
                                             un-normalising gives x/‖x‖ · ``prior.l2_norm``, the
                                             mean ‖z_i‖ of the training images, so the decoder
                                             gets embeddings of the norm it was trained on)
  The statistics are a separate ``stats = {"clip_mean": (D,), "clip_std": (D,)}`` dict,
  never part of the trainable ``params`` (the optimizer cannot touch them). The text
  conditioning (z_t and the per-token encodings) is fed raw in every mode, as Karlo.
- **Objective** (:func:`prior_loss`): t ~ U{0..T−1} on a cosine schedule (T = 1000),
  x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, loss = ‖f_θ(x_t, t, y) − x_0‖² (mean over D, then batch).
  With probability ``cond_drop_prob`` (0.1) an example's text conditioning (z_t, the
  encodings and their mask) is replaced by the null conditioning, so the model learns
  the unconditional prior used by classifier-free guidance. **Null conditioning choice**
  (``config.prior.null_text``): 'batch' takes it from the batch keys ``null_text_embed``
  (1|B, D), ``null_text_hidden`` (1|B, L, D), ``null_text_mask`` (1|B, L) — the CLIP encoding
  of the empty prompt "", which is what Karlo/diffusers feed the uncond branch at sampling
  time, so a model trained this way is sampled exactly like Karlo (``preprocess`` adds these
  keys for synthetic data and, given ``config.clip.path``, for any data by encoding ""
  with that CLIP); 'zero' uses z_t = 0, encodings = 0 and a mask with no
  real token (nothing to attend to); 'auto' (default) is 'batch' when the batch has the
  keys and 'zero' otherwise (the decoder stage's rule). Sampling must use the same null.
- **Sampling** (:func:`sample_prior`): respaced ancestral DDPM (fixed_small_log variance,
  x̂_0 clipped to ±clip_range: 5 as diffusers, 10 as Karlo) or DDIM, classifier-free
  guidance on x̂_0 (u + s·(c − u), one model call on the doubled batch in diffusers' order
  [uncond; cond]), then un-normalisation and the paper's best-of-n: n candidates per
  prompt (folded into the batch), keep the one with the largest z_i·z_t. One ``lax.scan``.
- **Evaluation** (:func:`evaluate_prior`): cosine of the sampled z_i with the true z_i, with
  the caption's z_t, and with the true z_i of unrelated captions (the batch rolled by one:
  the baseline a useless prior would reach).
- **Trainer stage** ``'prior'`` (:class:`PriorStage`), see ``unclip_jax.train.stage``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import (Schedule, classifier_free_guidance, ddim_sample, ddpm_sample,
                                  diffusion_loss, respace)
from unclip_jax.models.prior import init_prior_params, prior_from_config

EMBED_NORMS = ("stats", "scale", "l2")
NULL_TEXT_MODES = ("auto", "batch", "zero")
SAMPLERS = ("ddpm", "ddim")
PREDICTION_TYPE = "sample"            # x0-prediction [P §2.2]
VARIANCE_TYPE = "fixed_small_log"     # Karlo sigma_small / diffusers prior scheduler
BATCH_KEYS = ("image_embed", "text_embed", "text_hidden", "text_mask")
NULL_KEYS = ("null_text_embed", "null_text_hidden", "null_text_mask")

# Defaults of the prior section, used when a bare model config is given (e.g. the config
# returned by ``convert_prior``): Karlo/diffusers behaviour.
PRIOR_DEFAULTS = dict(embed_norm="stats", embed_scale=17.2, stats_path="", l2_norm=None, cond_drop_prob=0.1,
                      null_text="auto", schedule="cosine", num_timesteps=1000)


# ----------------------------------------------------------------------------- config

def split_config(config) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(model config, prior settings) from a stage config (with ``.model`` and ``.prior``)
    or from a bare model config (prior settings then default to Karlo's)."""
    if "model" in config:
        model = dict(config["model"])
        prior = {**PRIOR_DEFAULTS, **dict(config.get("prior", {}))}
    else:
        model, prior = dict(config), dict(PRIOR_DEFAULTS)
    if prior["embed_norm"] not in EMBED_NORMS:
        raise ValueError(f"config.prior.embed_norm must be one of {EMBED_NORMS}, got {prior['embed_norm']!r}")
    if prior["null_text"] not in NULL_TEXT_MODES:
        raise ValueError(f"config.prior.null_text must be one of {NULL_TEXT_MODES}, got {prior['null_text']!r}")
    if not 0.0 <= float(prior["cond_drop_prob"]) <= 1.0:
        raise ValueError(f"config.prior.cond_drop_prob must be in [0, 1], got {prior['cond_drop_prob']}")
    if prior["l2_norm"] is not None and not float(prior["l2_norm"]) > 0.0:
        raise ValueError(f"config.prior.l2_norm must be positive (or None), got {prior['l2_norm']}")
    return model, prior


def lacks_l2_norm(config) -> bool:
    """Whether a prior config normalises embeddings to unit length ('l2') and records no
    ``prior.l2_norm``: its samples would be unit vectors, not embeddings at the norm the
    decoder was trained on."""
    _, prior = split_config(config)
    return prior["embed_norm"] == "l2" and prior["l2_norm"] is None


def build_model(config, **overrides):
    """The ``PriorTransformer`` of a stage config or bare model config."""
    model, _ = split_config(config)
    return prior_from_config(model, **overrides)


def get_schedule(name: str = "cosine", num_timesteps: int = 1000) -> Schedule:
    """The training/sampling schedule (built afresh: its arrays must not outlive a trace)."""
    return Schedule.create(name, int(num_timesteps))


# ----------------------------------------------------------------------------- embedding space

def normalize_embed(z: jax.Array, stats: Mapping[str, Any] | None, embed_norm: str = "stats",
                    embed_scale: float = 17.2) -> jax.Array:
    """CLIP image embedding z (…, D) -> the prior's space x (…, D) (module doc)."""
    z = jnp.asarray(z, jnp.float32)
    if embed_norm == "stats":
        _check_stats(stats)
        return (z - jnp.asarray(stats["clip_mean"])) / jnp.asarray(stats["clip_std"])
    if embed_norm == "scale":
        return z * embed_scale
    if embed_norm == "l2":
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True) * math.sqrt(z.shape[-1])
    raise ValueError(f"embed_norm must be one of {EMBED_NORMS}, got {embed_norm!r}")


def denormalize_embed(x: jax.Array, stats: Mapping[str, Any] | None, embed_norm: str = "stats",
                      embed_scale: float = 17.2, l2_norm: float | None = None) -> jax.Array:
    """The prior's space x (…, D) -> CLIP image embedding (the inverse of :func:`normalize_embed`;
    for 'l2' the vector x/‖x‖ · ``l2_norm``: the unit vector when ``l2_norm`` is None)."""
    x = jnp.asarray(x, jnp.float32)
    if embed_norm == "stats":
        _check_stats(stats)
        return x * jnp.asarray(stats["clip_std"]) + jnp.asarray(stats["clip_mean"])
    if embed_norm == "scale":
        return x / embed_scale
    if embed_norm == "l2":
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True) * (1.0 if l2_norm is None else float(l2_norm))
    raise ValueError(f"embed_norm must be one of {EMBED_NORMS}, got {embed_norm!r}")


def _check_stats(stats) -> None:
    if stats is None or "clip_mean" not in stats or "clip_std" not in stats:
        raise ValueError("embed_norm='stats' needs stats = {'clip_mean': (D,), 'clip_std': (D,)} "
                         "(from convert_prior, load_stats or compute_embedding_stats)")


def compute_embedding_stats(image_embeds: np.ndarray | Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-dimension mean and std of CLIP image embeddings (N, D), or of an iterable of
    (n, D) chunks (accumulated in float64, one pass). Returns float32 ``(D,)`` arrays."""
    chunks = [image_embeds] if isinstance(image_embeds, np.ndarray) else image_embeds
    count, total, total_sq = 0, 0.0, 0.0
    for chunk in chunks:
        chunk = np.asarray(chunk, np.float64).reshape(-1, np.shape(chunk)[-1])
        count += chunk.shape[0]
        total = total + chunk.sum(0)
        total_sq = total_sq + (chunk ** 2).sum(0)
    if count < 2:
        raise ValueError("compute_embedding_stats needs at least 2 embeddings")
    mean = total / count
    var = np.maximum(total_sq / count - mean ** 2, 0.0) * count / (count - 1)
    return {"clip_mean": mean.astype(np.float32), "clip_std": np.sqrt(var).astype(np.float32)}


def save_stats(path: str, stats: Mapping[str, Any]) -> None:
    """Writes stats as an ``.npz`` with arrays ``clip_mean`` and ``clip_std``."""
    np.savez(path, clip_mean=np.asarray(stats["clip_mean"], np.float32),
             clip_std=np.asarray(stats["clip_std"], np.float32))


@functools.lru_cache(maxsize=8)
def _load_stats_cached(path: str) -> tuple[np.ndarray, np.ndarray]:
    if os.path.isdir(path):  # our pretrained prior (save_prior) directory
        from unclip_jax.convert.prior import load_prior
        _, stats, _ = load_prior(path)
        mean, std = stats["clip_mean"], stats["clip_std"]
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            mean, std = f["clip_mean"], f["clip_std"]
    elif path.endswith((".th", ".pt", ".pth")):  # Karlo's ViT-L-14_stats.th: (mean, std)
        import torch
        obj = torch.load(path, map_location="cpu", weights_only=True)
        mean, std = (obj["clip_mean"], obj["clip_std"]) if isinstance(obj, Mapping) else obj
        mean, std = mean.float().numpy(), std.float().numpy()
    else:
        raise ValueError(f"cannot read embedding stats from {path!r}: expected an .npz "
                         "(save_stats), a converted prior directory, or Karlo's *_stats.th")
    mean, std = (np.asarray(a, np.float32).reshape(-1) for a in (mean, std))
    mean.setflags(write=False)
    std.setflags(write=False)
    return mean, std


def load_stats(path: str) -> dict[str, np.ndarray]:
    """Reads embedding stats (.npz, a converted prior directory, or Karlo's stats .th)."""
    if not path or not os.path.exists(path):
        raise ValueError(f"embedding stats file {path!r} does not exist (config.prior.stats_path)")
    mean, std = _load_stats_cached(os.path.abspath(path))
    return {"clip_mean": mean, "clip_std": std}


def stats_from_config(config) -> dict[str, np.ndarray] | None:
    """The stats a stage config points to (``prior.stats_path``), or None when the
    embedding space needs none ('scale', 'l2')."""
    _, prior = split_config(config)
    if prior["embed_norm"] != "stats":
        return None
    if not prior["stats_path"]:
        raise ValueError("config.prior.embed_norm='stats' needs config.prior.stats_path: an .npz "
                         "written by save_stats (compute_embedding_stats over the training image "
                         "embeddings), a converted prior directory, or Karlo's ViT-L-14_stats.th")
    return load_stats(prior["stats_path"])


# ----------------------------------------------------------------------------- conditioning

def zero_null_text(batch: int, num_tokens: int, dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The 'zero' null conditioning: z_t = 0, encodings = 0, no real token."""
    return (jnp.zeros((batch, dim), jnp.float32), jnp.zeros((batch, num_tokens, dim), jnp.float32),
            jnp.zeros((batch, num_tokens), bool))


def broadcast_null(null_embed, null_hidden, null_mask, batch: int):
    """Broadcasts a null conditioning given as (D,)/(1, D)/(B, D), (L, D)/(1, L, D)/(B, L, D),
    (L,)/(1, L)/(B, L) to the batch."""
    null_embed = jnp.asarray(null_embed, jnp.float32)
    null_hidden = jnp.asarray(null_hidden, jnp.float32)
    null_mask = jnp.asarray(null_mask).astype(bool)
    d, (length, _) = null_embed.shape[-1], null_hidden.shape[-2:]
    return (jnp.broadcast_to(null_embed.reshape(-1, d), (batch, d)),
            jnp.broadcast_to(null_hidden.reshape(-1, length, d), (batch, length, d)),
            jnp.broadcast_to(null_mask.reshape(-1, length), (batch, length)))


def null_from_batch(batch: Mapping[str, Any], null_text: str, b: int, length: int, d: int):
    """The null conditioning of a batch under a ``null_text`` mode (module doc), broadcast to B."""
    missing = [k for k in NULL_KEYS if k not in batch]
    if null_text == "zero" or (null_text == "auto" and missing):
        return zero_null_text(b, length, d)
    if missing:
        raise ValueError(f"config.prior.null_text='batch' needs batch keys {missing} (the CLIP "
                         "encoding of the empty prompt); set null_text='zero' to train without them")
    return broadcast_null(batch["null_text_embed"], batch["null_text_hidden"], batch["null_text_mask"], b)


# ----------------------------------------------------------------------------- objective

def prior_loss(params, stats, batch: Mapping[str, Any], key: jax.Array, config, *,
               train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean x0-MSE of the prior on a batch (module doc); ``(loss, metrics)``.

    Args:
      params: the network's parameters; stats: embedding stats (or None for 'scale'/'l2').
      batch: ``image_embed`` (B, D), ``text_embed`` (B, D), ``text_hidden`` (B, L, D),
        ``text_mask`` (B, L) bool, and the ``null_text_*`` keys for null_text 'batch'/'auto'.
      key: PRNG key (timesteps, noise, conditioning drop, dropout).
      config: stage config (``.model``, ``.prior``).
      train: drop conditioning and enable dropout; False evaluates the plain conditional loss.
    """
    model_cfg, prior = split_config(config)
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"prior batch lacks {missing}; it needs {list(BATCH_KEYS)}")
    model = prior_from_config(model_cfg)
    x0 = normalize_embed(batch["image_embed"], stats, prior["embed_norm"], prior["embed_scale"])
    text_embed = jnp.asarray(batch["text_embed"], jnp.float32)
    text_hidden = jnp.asarray(batch["text_hidden"], jnp.float32)
    text_mask = jnp.asarray(batch["text_mask"]).astype(bool)
    b, length, d = text_hidden.shape
    k_drop, k_diff, k_dropout = jax.random.split(key, 3)

    p_drop = float(prior["cond_drop_prob"]) if train else 0.0
    if p_drop > 0:
        null_embed, null_hidden, null_mask = null_from_batch(batch, prior["null_text"], b, length, d)
        drop = jax.random.bernoulli(k_drop, p_drop, (b,))
        text_embed = jnp.where(drop[:, None], null_embed, text_embed)
        text_hidden = jnp.where(drop[:, None, None], null_hidden, text_hidden)
        text_mask = jnp.where(drop[:, None], null_mask, text_mask)
    else:
        drop = jnp.zeros((b,), bool)

    rngs = {"dropout": k_dropout} if train else None

    def model_fn(x_t, t):
        return model.apply({"params": params}, x_t, t, text_embed, text_hidden, text_mask,
                           train=train, rngs=rngs)

    schedule = get_schedule(prior["schedule"], prior["num_timesteps"])
    per_example, aux = diffusion_loss(model_fn, schedule, x0, k_diff, prediction_type=PREDICTION_TYPE,
                                      variance_type=VARIANCE_TYPE)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "mse": jnp.mean(aux["mse"]),
                  "cond_dropped": jnp.mean(drop.astype(jnp.float32))}


def flops_per_example(config) -> float:
    """Training FLOPs per example ≈ 3 × forward (matmuls and attention scores/values)."""
    model = build_model(config)
    w, d, n, seq = model.width, model.embed_dim, model.num_text_tokens, model.seq_len
    t_hidden = model.time_embed_dim or w
    per_block = 2 * seq * (4 * w * w + 2 * model.mlp_ratio * w * w) + 2 * 2 * seq * seq * w
    embed = 2 * (n * d * w + 2 * d * w + w * t_hidden + t_hidden * w) + 2 * w * d
    return float(3 * (model.num_layers * per_block + embed))


# ----------------------------------------------------------------------------- sampling

def select_best_of_n(candidates: jax.Array, text_embed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The paper's trick: per prompt, the candidate z_i with the largest z_i·z_t.

    candidates (B, n, D), text_embed (B, D) -> (best (B, D), index (B,), scores (B, n)).
    """
    scores = jnp.einsum("bnd,bd->bn", candidates, text_embed.astype(candidates.dtype))
    index = jnp.argmax(scores, axis=1)
    best = jnp.take_along_axis(candidates, index[:, None, None], axis=1)[:, 0]
    return best, index, scores


def sample_prior(params, stats, config, text_embed, text_hidden, text_mask, null_text_embed,
                 null_text_hidden, null_text_mask, key, *, steps: int = 25, guidance_scale: float = 4.0,
                 clip_range: float | None = 5.0, best_of_n: int = 2, sampler: str = "ddpm",
                 eta: float = 0.0, init_latents=None, noise=None, return_candidates: bool = False):
    """Samples CLIP image embeddings z_i ~ P(z_i | y) (module doc).

    Args:
      params, stats: network parameters and embedding stats (None unless embed_norm='stats').
      config: a stage config (``.model``/``.prior``) or a bare model config (Karlo defaults).
      text_embed (B, D), text_hidden (B, L, D), text_mask (B, L): the prompts' CLIP encodings.
      null_text_*: the uncond branch's conditioning (the "" prompt's encoding, or
        :func:`zero_null_text`), each with or without the batch axis (broadcast).
      key: PRNG key for the initial latents and the per-step noise (either may be given
        explicitly instead; pass ``key=None`` when both are).
      steps: respaced steps (diffusers' linspace rounding; 25 in Karlo).
      guidance_scale: s in u + s·(c − u) on x̂_0; 1.0 runs the conditional model alone.
      clip_range: clip x̂_0 to ±clip_range in the normalised space (5 diffusers, 10 Karlo;
        None: no clipping).
      best_of_n: candidates per prompt (n = 1 reproduces diffusers/Karlo).
      sampler: 'ddpm' (ancestral, fixed_small_log) or 'ddim' (with ``eta``).
      init_latents: x_T, (B, n, D), or (B, D) when n = 1.
      noise: per-step noise, (steps, B, n, D), or (steps, B, D) when n = 1 (step i uses
        noise[i]; the last step adds none).
      return_candidates: also return (candidates (B, n, D), scores (B, n), index (B,)).
    Returns:
      z_i (B, D) float32, un-normalised (raw CLIP image-embedding space).
    """
    model_cfg, prior = split_config(config)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    n = int(best_of_n)
    if n < 1 or int(steps) < 1:
        raise ValueError(f"best_of_n and steps must be >= 1, got {best_of_n}, {steps}")
    model = prior_from_config(model_cfg)
    text_embed = jnp.asarray(text_embed, jnp.float32)
    b, d = text_embed.shape
    length = model.num_text_tokens
    if tuple(np.shape(text_hidden)) != (b, length, d) or tuple(np.shape(text_mask)) != (b, length):
        raise ValueError(f"text_hidden {np.shape(text_hidden)} / text_mask {np.shape(text_mask)} must be "
                         f"({b}, {length}, {d}) / ({b}, {length})")
    null = broadcast_null(null_text_embed, null_text_hidden, null_text_mask, b)

    def fold(x):  # (B, ...) -> (B·n, ...), candidate j of prompt b at row b·n + j
        return jnp.repeat(jnp.asarray(x), n, axis=0)

    cond = (fold(text_embed), fold(jnp.asarray(text_hidden, jnp.float32)), fold(jnp.asarray(text_mask).astype(bool)))
    uncond = tuple(fold(x) for x in null)
    timesteps = respace(int(steps), prior["num_timesteps"])
    schedule = get_schedule(prior["schedule"], prior["num_timesteps"])

    if key is not None:
        key_init, key_steps = jax.random.split(key)
    else:
        key_init = key_steps = None
    if init_latents is None:
        if key_init is None:
            raise ValueError("sample_prior needs a key or init_latents")
        x_T = jax.random.normal(key_init, (b * n, d), jnp.float32)
    else:
        x_T = _fold_candidates(init_latents, (b, n, d), "init_latents")
    if noise is not None:
        noise = _fold_candidates(noise, (len(timesteps), b, n, d), "noise")

    guided = float(guidance_scale) != 1.0 if isinstance(guidance_scale, (int, float)) else True
    if guided:
        embed, hidden, mask = (jnp.concatenate([u, c], axis=0) for u, c in zip(uncond, cond))
    else:
        embed, hidden, mask = cond

    def model_fn(x_t, t):
        return model.apply({"params": params}, x_t, t, embed, hidden, mask)

    fn = classifier_free_guidance(model_fn, guidance_scale) if guided else model_fn
    if sampler == "ddpm":
        x0 = ddpm_sample(fn, x_T, timesteps, schedule, key_steps, prediction_type=PREDICTION_TYPE,
                         variance_type=VARIANCE_TYPE, clip_range=clip_range, noise=noise)
    else:
        x0 = ddim_sample(fn, x_T, timesteps, schedule, key_steps, eta=eta, prediction_type=PREDICTION_TYPE,
                         clip_range=clip_range, noise=noise)
    z = denormalize_embed(x0, stats, prior["embed_norm"], prior["embed_scale"], prior["l2_norm"]).reshape(b, n, d)
    best, index, scores = select_best_of_n(z, text_embed)
    return (best, (z, scores, index)) if return_candidates else best


def _fold_candidates(x, shape: tuple[int, ...], what: str) -> jax.Array:
    """``shape`` = (…, B, n, D): x of that shape, or (…, B, D) when n = 1 -> (…, B·n, D)."""
    x = jnp.asarray(x, jnp.float32)
    *head, b, n, d = shape
    if x.shape == tuple(shape):
        return x.reshape(tuple(head) + (b * n, d))
    if n == 1 and x.shape == tuple(head) + (b, d):
        return x
    want = tuple(head) + ((b, n, d) if n > 1 else (b, d))
    raise ValueError(f"{what} must have shape {want}, got {tuple(x.shape)}")


def make_prior_sampler(config, **kwargs):
    """``jax.jit``-ed :func:`sample_prior` with ``config`` and the keyword options fixed:
    ``f(params, stats, text_embed, text_hidden, text_mask, null_embed, null_hidden, null_mask,
    key, init_latents=None, noise=None) -> z_i (B, D)``."""
    def run(params, stats, text_embed, text_hidden, text_mask, null_embed, null_hidden, null_mask,
            key, init_latents=None, noise=None):
        return sample_prior(params, stats, config, text_embed, text_hidden, text_mask, null_embed,
                            null_hidden, null_mask, key, init_latents=init_latents, noise=noise, **kwargs)
    return jax.jit(run)


# ----------------------------------------------------------------------------- evaluation

def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return jnp.sum(a * b, axis=-1)


def embedding_metrics(pred: jax.Array, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Per-example cosines (B,) of predicted z_i with the true z_i, the caption's z_t, and the
    true z_i of an unrelated caption (the batch rolled by one); plus the true pair's cosine."""
    image = jnp.asarray(batch["image_embed"], jnp.float32)
    text = jnp.asarray(batch["text_embed"], jnp.float32)
    return {
        "cos_pred_image": _cosine(pred, image),
        "cos_pred_text": _cosine(pred, text),
        "cos_pred_unrelated_image": _cosine(pred, jnp.roll(image, 1, axis=0)),
        "cos_image_text": _cosine(image, text),
    }


def _config_key(config) -> str:
    """A hashable key of what the sampler/loss depend on (model + prior settings)."""
    model, prior = split_config(config)
    return json.dumps({"model": model, "prior": prior}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _eval_fns_cached(config_key: str, options_key: str):
    cfg = json.loads(config_key)
    options = json.loads(options_key)
    sample = make_prior_sampler(cfg, **options)
    loss_fn = jax.jit(lambda p, s, bt, k: prior_loss(p, s, bt, k, cfg, train=False)[0])
    return sample, loss_fn


def _eval_fns(config_key: str, options: Mapping[str, Any]):
    """Jitted (sampler, eval loss) for a config and sampler options, compiled once per run."""
    return _eval_fns_cached(config_key, json.dumps(dict(options), sort_keys=True))


def evaluate_prior(params, stats, config, batches: Iterable[Mapping[str, Any]], key: jax.Array, *,
                   steps: int = 25, guidance_scale: float = 4.0, clip_range: float | None = 5.0,
                   best_of_n: int = 2, sampler: str = "ddpm", eta: float = 0.0,
                   max_batches: int | None = None) -> dict[str, float]:
    """Held-out quality of the prior: samples z_i for each caption and averages
    :func:`embedding_metrics` over all examples (batches need >= 2 examples for the
    unrelated baseline). ``eval_loss`` is the conditional x0-MSE at random t.

    The null conditioning follows ``config.prior.null_text`` (:func:`null_from_batch`).
    """
    _, prior = split_config(config)
    sample, loss_fn = _eval_fns(_config_key(config), dict(
        steps=steps, guidance_scale=guidance_scale, clip_range=clip_range, best_of_n=best_of_n,
        sampler=sampler, eta=eta))
    sums: dict[str, float] = {}
    count, loss_sum, n_batches = 0, 0.0, 0
    for i, batch in enumerate(itertools.islice(batches, max_batches)):
        b = int(np.shape(batch["text_embed"])[0])
        if b < 2:
            raise ValueError("evaluate_prior needs batches of at least 2 examples")
        k_sample, k_loss = jax.random.split(jax.random.fold_in(key, i))
        length, d = np.shape(batch["text_hidden"])[1:]
        null = null_from_batch(batch, prior["null_text"], b, length, d)
        batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
        pred = sample(params, stats, batch["text_embed"], batch["text_hidden"], batch["text_mask"], *null,
                      k_sample)
        for name, value in embedding_metrics(pred, batch).items():
            sums[name] = sums.get(name, 0.0) + float(jnp.sum(value))
        loss_sum += float(loss_fn(params, stats, batch, k_loss))
        count += b
        n_batches += 1
    if not count:
        raise ValueError("evaluate_prior got no batches")
    out = {name: total / count for name, total in sums.items()}
    out["eval_loss"] = loss_sum / n_batches
    return out


# ----------------------------------------------------------------------------- data

class SyntheticPriorSource:
    """Random-access synthetic CLIP triples with a learnable text → image relation.

    ``num_concepts`` fixed "captions" c, each with a text embedding t_c (D,), per-token
    encodings (3 to 12 real tokens, zero-padded to ``num_tokens``) and an image direction
    A·t_c for a fixed random rotation-like A; example i of a split draws a concept and an
    image embedding z_i = A·t_c + 0.3·noise (so P(z_i | y) is a Gaussian per caption).
    Deterministic in (seed, split, index); 'train' and 'test' share the concepts and
    differ in the draws. Also offers the null ("") conditioning (:meth:`null_text`).
    """

    SPLITS = {"train": 0, "test": 1, "eval": 1, "val": 1, "validation": 1, "heldout": 1}

    def __init__(self, split: str = "train", num_examples: int = 4096, *, dim: int = 32,
                 num_tokens: int = 77, num_concepts: int = 64, seed: int = 0):
        if split not in self.SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; choose one of {sorted(self.SPLITS)}")
        self.split, self.num_examples, self.seed = split, int(num_examples), int(seed)
        self.stats = {"skipped_corrupt": 0}
        self.dim, self.num_tokens = int(dim), int(num_tokens)
        rng = np.random.default_rng([seed, 12345])
        self.text_embed = rng.standard_normal((num_concepts, dim)).astype(np.float32)
        lengths = rng.integers(3, 13, num_concepts)
        self.text_mask = np.arange(num_tokens)[None, :] < lengths[:, None]
        hidden = rng.standard_normal((num_concepts, num_tokens, dim)).astype(np.float32)
        self.text_hidden = hidden * self.text_mask[..., None]
        a = rng.standard_normal((dim, dim)) / np.sqrt(dim)
        self.image_mean = (self.text_embed @ a.T).astype(np.float32)
        self._null = (rng.standard_normal(dim).astype(np.float32),
                      rng.standard_normal((num_tokens, dim)).astype(np.float32) * (np.arange(num_tokens) < 2)[:, None],
                      np.arange(num_tokens) < 2)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([self.seed, self.SPLITS[self.split], index])
        c = int(rng.integers(len(self.text_embed)))
        z = self.image_mean[c] + 0.3 * rng.standard_normal(self.dim).astype(np.float32)
        return {"image_embed": z.astype(np.float32), "text_embed": self.text_embed[c],
                "text_hidden": self.text_hidden[c], "text_mask": self.text_mask[c]}

    def null_text(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The null conditioning (D,), (L, D), (L,)."""
        return self._null


@functools.lru_cache(maxsize=2)
def _clip_encoder(path: str, tokenizer_dir: str):
    """(CLIP config, params, tokenizer, jitted text encoder, jitted image encoder), cached."""
    from unclip_jax.convert.clip import load_clip
    from unclip_jax.models.clip import CLIPModel
    from unclip_jax.tokenizer import load_tokenizer
    cfg, params = load_clip(path)
    model = CLIPModel(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    # Karlo and diffusers run the text tower without a mask (causal only); the padded
    # positions differ from a masked run, but the prior masks them.
    encode_text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, None, method="encode_text"))
    encode_image = jax.jit(lambda p, px: model.apply({"params": p}, px, method="encode_image"))
    return cfg, params, tokenizer, encode_text, encode_image


def encode_with_clip(images: np.ndarray | None, captions, clip_config) -> dict[str, np.ndarray]:
    """CLIP encodings for the prior, on the host: ``image_embed`` (from uint8 (B, H, W, 3)
    images, if given), ``text_embed``, ``text_hidden``, ``text_mask``. ``clip_config``:
    ``path`` (our or a transformers CLIP dir), ``tokenizer`` (dir)."""
    if not clip_config.get("path") or not clip_config.get("tokenizer"):
        raise ValueError("encoding on the fly needs config.clip.path (a CLIP checkpoint) and "
                         "config.clip.tokenizer (its tokenizer directory)")
    from unclip_jax.clip_preprocess import preprocess_images
    cfg, params, tokenizer, encode_text, encode_image = _clip_encoder(
        os.path.abspath(clip_config["path"]), os.path.abspath(clip_config["tokenizer"]))
    tokens = tokenizer([str(c) for c in captions])
    text_embed, text_hidden = encode_text(params, tokens.input_ids)
    out = {"text_embed": np.asarray(text_embed), "text_hidden": np.asarray(text_hidden),
           "text_mask": np.asarray(tokens.attention_mask, bool)}
    if images is not None:
        pixels = preprocess_images(list(np.asarray(images)), size=cfg.vision.image_size)
        out["image_embed"] = np.asarray(encode_image(params, pixels))
    return out


def clip_null_text(clip_config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CLIP encoding of the empty prompt "" (Karlo's null text): (1, D), (1, L, D), (1, L)."""
    return _clip_null_cached(os.path.abspath(clip_config["path"]), os.path.abspath(clip_config["tokenizer"]))


@functools.lru_cache(maxsize=2)
def _clip_null_cached(path: str, tokenizer: str):
    enc = encode_with_clip(None, [""], {"path": path, "tokenizer": tokenizer})
    return enc["text_embed"], enc["text_hidden"], enc["text_mask"]


def _stack_examples(examples) -> dict[str, Any]:
    """A list of example dicts, or a dict of stacked arrays/lists -> dict of batch arrays."""
    if isinstance(examples, Mapping):
        return dict(examples)
    examples = list(examples)
    return {k: (np.stack([np.asarray(e[k]) for e in examples]) if not isinstance(examples[0][k], str)
                else [e[k] for e in examples]) for k in examples[0]}


def _with_null(batch: dict, null, b: int) -> dict:
    embed, hidden, mask = (np.asarray(x) for x in null)
    batch["null_text_embed"] = np.broadcast_to(embed.reshape(1, -1), (b, embed.shape[-1])).astype(np.float32)
    batch["null_text_hidden"] = np.broadcast_to(hidden.reshape((1,) + hidden.shape[-2:]),
                                                (b,) + hidden.shape[-2:]).astype(np.float32)
    batch["null_text_mask"] = np.broadcast_to(mask.reshape(1, -1), (b, mask.shape[-1])).astype(bool)
    return batch


def make_prior_source(config, split: str = "train", process_index: int = 0, process_count: int = 1):
    """The examples of ``config.data`` for ``split``: kind 'synthetic' (:class:`SyntheticPriorSource`),
    or any kind of ``unclip_jax.data.make_source`` ('embeddings': precomputed CLIP embeddings;
    'shapes'/'tar'/'folder': images + captions, encoded with CLIP in :func:`preprocess_prior_batch`).
    Random-access sources hold all examples; ``unclip_jax.data.batches`` takes this process's share."""
    data, model = config.data, config.model
    if data.kind == "synthetic":
        n = int(data.num_examples if split == "train" else data.num_eval_examples)
        source = SyntheticPriorSource(split, n, dim=int(model.embed_dim), num_tokens=int(model.num_text_tokens),
                                      seed=int(data.dataset_seed))
        source.process_index, source.process_count = int(process_index), int(process_count)
        source.shuffle = bool(data.shuffle)
        return source
    from unclip_jax.data import make_source
    return make_source(data, split=split, process_index=process_index, process_count=process_count)


@functools.lru_cache(maxsize=4)
def _synthetic_null(seed: int, dim: int, num_tokens: int):
    return SyntheticPriorSource("train", 1, dim=dim, num_tokens=num_tokens, seed=seed).null_text()


def preprocess_prior_batch(examples, config) -> dict[str, np.ndarray]:
    """Raw examples -> the prior batch (``BATCH_KEYS`` plus the null text keys unless
    null_text='zero'). Shapes examples (image + caption) are encoded with CLIP here."""
    _, prior = split_config(config)
    batch = _stack_examples(examples)
    if "image_embed" not in batch:  # raw images and captions
        if "image" not in batch or "caption" not in batch:
            raise ValueError(f"prior examples need either {list(BATCH_KEYS)} or image + caption; "
                             f"got keys {sorted(batch)}")
        batch = encode_with_clip(batch["image"], batch["caption"], config.clip)
    out = {"image_embed": np.asarray(batch["image_embed"], np.float32),
           "text_embed": np.asarray(batch["text_embed"], np.float32),
           "text_hidden": np.asarray(batch["text_hidden"], np.float32),
           "text_mask": np.asarray(batch["text_mask"]).astype(bool)}
    d, length = int(config.model.embed_dim), int(config.model.num_text_tokens)
    b = out["image_embed"].shape[0]
    if out["image_embed"].shape[1:] != (d,) or out["text_hidden"].shape[1:] != (length, d):
        raise ValueError(f"embeddings {out['image_embed'].shape[1:]} / text encodings "
                         f"{out['text_hidden'].shape[1:]} do not fit config.model (embed_dim {d}, "
                         f"num_text_tokens {length})")
    if prior["null_text"] != "zero":
        if all(k in batch for k in NULL_KEYS):
            null = tuple(np.asarray(batch[k])[:1] for k in NULL_KEYS)
        elif config.data.kind == "synthetic":
            null = _synthetic_null(int(config.data.dataset_seed), d, length)
        elif config.clip.path:
            null = clip_null_text(config.clip)
        else:
            null = None
        if null is not None:
            out = _with_null(out, null, b)
        elif prior["null_text"] == "batch":
            raise ValueError("config.prior.null_text='batch' but the data has no null ('') encoding")
    return out


def mean_image_embed_norm(config, num: int = 512, chunk: int = 256) -> float:
    """Mean ‖z_i‖ over the CLIP image embeddings of the first ``num`` training examples
    of ``config.data`` (encoded as the trainer encodes them): the norm an 'l2' prior's
    samples get (``prior.l2_norm``), the scale the decoder sees in training."""
    from unclip_jax.data import first_examples
    examples = first_examples(make_prior_source(config, "train"), num)
    if not examples:
        raise ValueError("mean_image_embed_norm: the training data has no examples")
    norms = [np.linalg.norm(preprocess_prior_batch(examples[i:i + chunk], config)["image_embed"], axis=-1)
             for i in range(0, len(examples), chunk)]
    return float(np.mean(np.concatenate(norms)))


# ----------------------------------------------------------------------------- trainer stage

def _register():
    from unclip_jax.train.stage import Stage, register_stage

    class PriorStage(Stage):
        """The 'prior' stage for ``unclip_jax.train`` (see the module doc)."""

        def prepare_config(self, config, saved=None):
            # 'l2' priors give out embeddings of the training images' mean norm (module
            # doc); measured when a run starts, then stored with its checkpoints and
            # config.json; a resumed run takes the checkpoint's value.
            if lacks_l2_norm(config):
                with config.unlocked():
                    config.prior.l2_norm = (((saved or {}).get("prior") or {}).get("l2_norm")
                                            or mean_image_embed_norm(config))

        def init_params(self, key, config):
            return init_prior_params(build_model(config), key)

        def loss_fn(self, params, batch, key, config, *, train):
            return prior_loss(params, stats_from_config(config), batch, key, config, train=train)

        def param_partition_rules(self, config):
            from jax.sharding import PartitionSpec as P
            return [(r"attn/to_[qkv]/kernel$", P(None, "tensor")), (r"attn/to_[qkv]/bias$", P("tensor")),
                    (r"attn/to_out/kernel$", P("tensor", None)),
                    (r"fc1/kernel$", P(None, "tensor")), (r"fc1/bias$", P("tensor")),
                    (r"fc2/kernel$", P("tensor", None))]

        def make_source(self, config, split, process_index, process_count):
            return make_prior_source(config, split, process_index, process_count)

        def preprocess(self, examples, config):
            return preprocess_prior_batch(examples, config)

        def flops_per_example(self, config):
            return flops_per_example(config)

        def evaluate(self, params, config):
            return evaluate_stage(params, config)

    register_stage("prior", PriorStage)
    return PriorStage


def evaluate_stage(params, config) -> dict[str, float]:
    """The trainer's periodic evaluation: :func:`evaluate_prior` on ``config.eval`` batches of
    the ``config.eval.split`` split, sampled with the ``config.sample`` settings."""
    ev, smp = config.eval, config.sample
    from unclip_jax.data import batches as make_batches
    source = make_prior_source(config, ev.split)
    raw = make_batches(source, int(ev.batch_size), seed=int(ev.seed), shuffle=False, num_epochs=1) \
        if hasattr(source, "__getitem__") else make_batches(source, int(ev.batch_size), seed=int(ev.seed))
    batches = (preprocess_prior_batch(examples, config) for examples in raw)
    return evaluate_prior(params, stats_from_config(config), config, batches, jax.random.key(int(ev.seed)),
                          steps=int(smp.steps), guidance_scale=float(smp.guidance_scale),
                          clip_range=None if smp.clip_range is None else float(smp.clip_range),
                          best_of_n=int(smp.best_of_n), sampler=smp.sampler, eta=float(smp.eta),
                          max_batches=int(ev.num_batches))


try:  # registering needs the trainer package; the functions above do not
    PriorStage = _register()
except ImportError:  # pragma: no cover - a partial install without unclip_jax.train
    PriorStage = None
