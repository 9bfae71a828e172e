"""CLIP as a stage: the contrastive objectives and the zero-shot / retrieval evaluators.

Losses take the embeddings of one (global) batch. Under ``jax.jit`` with the batch sharded
by a ``NamedSharding`` over a mesh with ``AxisType.Auto`` axes (as ``unclip_jax.parallel``
builds it) the similarity matrix is the global B×B one: XLA gathers the other side's
embeddings, so every image is contrasted with every caption of the whole batch, on any
number of devices (a test checks 8 fake devices against one). Do not wrap them in
``shard_map`` per device: that would give the local-batch loss. (With ``AxisType.Explicit``
axes JAX refuses the batch-sharded ``zi @ zt.T``; reshard one side first.)

Evaluators are pure functions of encode functions (``encode_text(ids, mask) -> (B, P)``,
``encode_image(pixels) -> (B, P)``, e.g. from :func:`make_encoders`), so they work for
any model or checkpoint.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.clip import CLIPConfig, CLIPModel, clip_variant

EncodeText = Callable[[np.ndarray, np.ndarray], jax.Array]
EncodeImage = Callable[[np.ndarray], jax.Array]

DEFAULT_MAX_LOGIT_SCALE = 100.0  # CLIP clips the temperature at 100 (log scale 4.6052)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / ||x||, computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def _scale(logit_scale: jax.Array, max_logit_scale: float | None) -> jax.Array:
    s = jnp.asarray(logit_scale, jnp.float32)
    if max_logit_scale is not None:
        s = jnp.minimum(s, math.log(max_logit_scale))  # no gradient past the cap, as CLIP's clamp
    return jnp.exp(s)


def similarity_logits(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                      max_logit_scale: float | None = DEFAULT_MAX_LOGIT_SCALE) -> jax.Array:
    """exp(s) · ẑ_i ẑ_tᵀ: (B_i, P), (B_t, P) -> (B_i, B_t) float32, rows = images."""
    zi, zt = l2_normalize(image_embeds), l2_normalize(text_embeds)
    return _scale(logit_scale, max_logit_scale) * (zi @ zt.T)


def clip_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
              max_logit_scale: float | None = DEFAULT_MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE with a learned temperature (CLIP): pair b of the batch is the positive.

    L = ½ [CE(logits, diag) over captions + CE(logitsᵀ, diag) over images], logits =
    exp(s)·cos(z_i, z_t) over the whole batch. Returns (loss, metrics) with the two
    directions' losses and top-1 accuracies and the temperature exp(s).
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image {image_embeds.shape} and text {text_embeds.shape} embeddings must pair up")
    logits = similarity_logits(image_embeds, text_embeds, logit_scale, max_logit_scale)
    diag = jnp.diagonal(logits)
    loss_i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
    loss_t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
    labels = jnp.arange(logits.shape[0])
    metrics = {
        "loss_image_to_text": loss_i2t, "loss_text_to_image": loss_t2i,
        "acc_image_to_text": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "acc_text_to_image": jnp.mean(jnp.argmax(logits, axis=0) == labels),
        "temperature": _scale(logit_scale, max_logit_scale),
    }
    loss = 0.5 * (loss_i2t + loss_t2i)
    metrics["loss"] = loss
    return loss, metrics


def siglip_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                logit_bias: jax.Array, max_logit_scale: float | None = None) -> tuple[jax.Array, dict]:
    """Sigmoid loss (SigLIP, Zhai et al. 2023): every pair is a binary problem.

    L = −(1/B) Σ_{i,j} log σ(y_ij (exp(s)·cos(z_i, z_t,j) + b)), y = +1 on the diagonal, −1
    elsewhere. SigLIP initialises s = log 10 and b = −10 (``logit_bias_init=-10``).
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image {image_embeds.shape} and text {text_embeds.shape} embeddings must pair up")
    logits = similarity_logits(image_embeds, text_embeds, logit_scale, max_logit_scale)
    logits = logits + jnp.asarray(logit_bias, jnp.float32)
    n = logits.shape[0]
    signs = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n
    labels = jnp.arange(n)
    return loss, {"loss": loss, "acc_image_to_text": jnp.mean(jnp.argmax(logits, axis=1) == labels),
                  "temperature": _scale(logit_scale, max_logit_scale), "bias": jnp.asarray(logit_bias)}


def contrastive_loss(outputs: Mapping[str, jax.Array], kind: str = "clip",
                     max_logit_scale: float | None = DEFAULT_MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """Loss from ``CLIPModel.__call__``'s output dict; ``kind`` is "clip" or "siglip"."""
    if kind == "clip":
        return clip_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"],
                         max_logit_scale)
    if kind == "siglip":
        if "logit_bias" not in outputs:
            raise ValueError("the siglip loss needs a model with a logit_bias (set logit_bias_init)")
        return siglip_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"],
                           outputs["logit_bias"], max_logit_scale)
    raise ValueError(f"unknown contrastive loss {kind!r}; expected 'clip' or 'siglip'")


# ----------------------------------------------------------------------------- models from configs

def model_config_from(model_cfg: Mapping) -> CLIPConfig:
    """``configs/clip.py``'s ``model`` section -> CLIPConfig (variant + overrides)."""
    import dataclasses
    cfg = clip_variant(model_cfg["variant"], dtype=model_cfg.get("dtype", "float32"),
                       remat=bool(model_cfg.get("remat", False)), attention=model_cfg.get("attention", "xla"))
    if model_cfg.get("logit_bias_init") is not None:
        cfg = cfg.replace(logit_bias_init=float(model_cfg["logit_bias_init"]))
    if model_cfg.get("logit_scale_init") is not None:
        cfg = cfg.replace(logit_scale_init=float(model_cfg["logit_scale_init"]))
    text_changes = {k: model_cfg[k] for k in ("vocab_size", "eos_token_id") if model_cfg.get(k)}
    if text_changes:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, **text_changes))
    if model_cfg.get("image_size"):
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=int(model_cfg["image_size"])))
    return cfg


def make_encoders(model: CLIPModel, params) -> tuple[EncodeText, EncodeImage]:
    """Jitted ``encode_text(ids, mask) -> (B, P)`` and ``encode_image(pixels) -> (B, P)``."""
    text = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, method="encode_text")[0])
    image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    return (lambda ids, mask: text(params, ids, mask)), (lambda pixels: image(params, pixels))


# ----------------------------------------------------------------------------- evaluators

def _batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """Runs ``fn`` over equal-size batches (the last one padded by repetition: one compile)."""
    n = len(arrays[0])
    outs = []
    for start in range(0, n, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        real = len(chunk[0])
        if real < batch_size and n > batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - real, axis=0)]) for c in chunk]
        outs.append(np.asarray(fn(*chunk))[:real])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def encode_prompts(encode_text: EncodeText, tokenize: Callable, prompts: Sequence[str],
                   batch_size: int = 256) -> np.ndarray:
    """Un-normalised text embeddings (N, P) of ``prompts``, in batches."""
    tokens = tokenize(list(prompts))
    return _batched(encode_text, [tokens.input_ids, tokens.attention_mask], batch_size)


def zero_shot_classifier(encode_text: EncodeText, tokenize: Callable, classnames: Sequence[str],
                         templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Class weights (C, P): per class, the normalised mean of its normalised template embeddings.

    ``templates`` are format strings with one ``{}`` for the class name, e.g.
    ``"a photo of a {}."`` (CLIP's prompt ensembling).
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name: {bad}")
    prompts = [t.format(c) for c in classnames for t in templates]
    z = np.asarray(l2_normalize(encode_prompts(encode_text, tokenize, prompts, batch_size)))
    z = z.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return np.asarray(l2_normalize(z))


def topk_accuracy(image_embeds: np.ndarray, labels: np.ndarray, classifier: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of images whose label is among the k best-scoring classes, for each k."""
    scores = np.asarray(l2_normalize(jnp.asarray(image_embeds))) @ classifier.T
    order = np.argsort(-scores, axis=1, kind="stable")
    labels = np.asarray(labels)
    return {f"top{k}": float(np.mean((order[:, :k] == labels[:, None]).any(axis=1)))
            for k in ks if k <= classifier.shape[0]}


def evaluate_zero_shot(encode_image: EncodeImage, encode_text: EncodeText, tokenize: Callable,
                       batches: Iterable[tuple[np.ndarray, np.ndarray]], classnames: Sequence[str],
                       templates: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Zero-shot top-k accuracy over ``batches`` of (pixels (B, S, S, 3), labels (B,))."""
    classifier = zero_shot_classifier(encode_text, tokenize, classnames, templates)
    embeds, labels = [], []
    for pixels, y in batches:
        embeds.append(np.asarray(encode_image(pixels)))
        labels.append(np.asarray(y))
    return topk_accuracy(np.concatenate(embeds), np.concatenate(labels), classifier, ks)


def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image↔text retrieval recall@k by cosine similarity.

    Args:
      image_embeds: (N_i, P); text_embeds: (N_t, P).
      text_to_image: (N_t,) index of the image each caption describes (an image may have
        several captions, as in COCO's five).
    Returns:
      ``image_to_text_R@k`` (an image counts if any of its captions is in its top k) and
      ``text_to_image_R@k`` (a caption counts if its image is in its top k).
    """
    text_to_image = np.asarray(text_to_image)
    if len(text_to_image) != len(text_embeds):
        raise ValueError(f"text_to_image has {len(text_to_image)} entries for {len(text_embeds)} captions")
    sims = np.asarray(l2_normalize(jnp.asarray(image_embeds))) @ np.asarray(l2_normalize(jnp.asarray(text_embeds))).T
    i2t = np.argsort(-sims, axis=1, kind="stable")       # (N_i, N_t) captions by rank
    t2i = np.argsort(-sims.T, axis=1, kind="stable")     # (N_t, N_i) images by rank
    hit_i2t = text_to_image[i2t] == np.arange(len(image_embeds))[:, None]
    hit_t2i = t2i == text_to_image[:, None]
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float(np.mean(hit_i2t[:, :k].any(axis=1)))
        out[f"text_to_image_R@{k}"] = float(np.mean(hit_t2i[:, :k].any(axis=1)))
    return out


def evaluate_retrieval(encode_image: EncodeImage, encode_text: EncodeText, tokenize: Callable,
                       pixels: np.ndarray, captions: Sequence[str], text_to_image: np.ndarray,
                       ks: Sequence[int] = (1, 5), batch_size: int = 256) -> dict[str, float]:
    """Recall@k (see :func:`retrieval_recall`) of images (N_i, S, S, 3) and their captions."""
    image_embeds = _batched(encode_image, [np.asarray(pixels)], batch_size)
    text_embeds = encode_prompts(encode_text, tokenize, captions, batch_size)
    return retrieval_recall(image_embeds, text_embeds, text_to_image, ks)
