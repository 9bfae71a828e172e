"""The diffusion prior of the shapes recipe: P(z_i | caption) over the shapes CLIP's embeddings.

    python train.py --config=configs/shapes_prior.py --workdir=W/prior \
        --config.clip.path=W/clip_model --config.clip.tokenizer=W/tokenizer

``configs/prior.py:shapes`` resized to the shapes CLIP (``configs/shapes_clip.py``: joint and
text width 64; 32 for ``tiny``): captions and 32 px images are encoded with that CLIP on the
fly, the null ("") text is its encoding of the empty prompt, embeddings are modelled on the
sphere (``prior.embed_norm='l2'``) and sampled at the training images' mean ‖z_i‖
(``prior.l2_norm``, measured when training starts: the scale the decoder trains on).
Variants: ``default`` (the recipe) and ``tiny`` (tests).
Evaluation: cos(sampled z_i, true z_i) on held-out captions against the unrelated-caption
baseline (``stages/prior.py:evaluate_prior``).
"""

import os

import ml_collections

from unclip_jax.config import load_config

_VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "default"
    if arg not in _VARIANTS:
        raise ValueError(f"unknown configs/shapes_prior.py variant {arg!r}; known: {', '.join(_VARIANTS)}")
    tiny = arg == "tiny"
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "prior.py:shapes"))

    m = c.model
    m.embed_dim = 32 if tiny else 64        # = the shapes CLIP's projection_dim
    m.num_heads = 2 if tiny else 4
    m.head_dim = 16 if tiny else 32
    m.num_layers = 1 if tiny else 4

    c.prior.embed_norm = "l2"
    c.sample.steps = 10 if tiny else 25
    c.sample.guidance_scale = 2.0
    c.sample.best_of_n = 2

    c.eval.split = "heldout"
    c.eval.batch_size = 8 if tiny else 100
    c.eval.num_batches = 1 if tiny else 3

    c.data.image_size = 32
    c.data.num_examples = 200_000
    c.data.num_eval_examples = 1000

    t = c.train
    t.batch_size = 8 if tiny else 128
    t.steps = 4 if tiny else 1500
    t.log_every = 2 if tiny else 50
    t.ckpt_every = 0 if tiny else 500
    t.eval_every = 0 if tiny else 500

    o = c.optim
    o.lr = 1e-3
    o.warmup = 1 if tiny else 100
    o.ema_decay = 0.0 if tiny else 0.995
    return c
