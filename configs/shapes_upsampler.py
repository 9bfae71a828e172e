"""The upsampler of the shapes recipe: 32 → 64 px super-resolution.

    python train.py --config=configs/shapes_upsampler.py --workdir=W/upsampler

``configs/upsampler.py:tiny`` as a 32→64 step: an attention-free UNet (32/64 channels),
trained on random 32 px crops of 64 px captioned-shapes images with the blurred 32 px
image as conditioning, predicting v instead of Karlo's ε (below), sampled with 7 ancestral
steps. It needs no CLIP. Variants: ``default`` (the recipe) and ``tiny`` (tests).
"""

import os

import ml_collections

from unclip_jax.config import load_config

_VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "default"
    if arg not in _VARIANTS:
        raise ValueError(f"unknown configs/shapes_upsampler.py variant {arg!r}; known: {', '.join(_VARIANTS)}")
    tiny = arg == "tiny"
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "upsampler.py:tiny"))
    m = c.model
    m.image_size, m.low_res_size = 64, 32
    m.unet.base_channels = 32
    m.unet.channel_mult = (1,) if tiny else (1, 2)
    m.unet.num_res_blocks = 1
    m.unet.time_embed_dim = 4 * m.unet.base_channels
    c.augment.crop_fraction = 0.5
    # Noise augmentation (Ho et al. 2021, cascaded diffusion): training on low-res inputs noised
    # to a random level ≤ 250 and sampling with the input noised to level 100 teaches the model
    # to repair the decoder's 32 px artefacts instead of copying them. On true image embeddings
    # at 50 decoder steps, aug_level 0/50/100/150 scored shape 73.1/75.3/77.4/74.2 %
    # (`python -m bench.shapes_decoder_probe`, docs/shapes_recipe_history.md).
    m.unet.aug_level_embedding = not tiny
    c.augment.noise_aug_max_level = 0 if tiny else 250
    c.sample.aug_level = 0 if tiny else 100
    # v-prediction (Salimans & Ho 2022): x̂_0 = √ᾱ·x_t − √(1−ᾱ)·v̂ is well conditioned at the first
    # sampling steps, where an ε-model's x̂_0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ multiplies its error by
    # up to 2e4 (√ᾱ_999 ≈ 5e-5) and the clipped result is a saturated colour. Same 500 steps,
    # on the dataset's own 32 px renders: colour kept 100 % (v) vs 95.2 % (ε), measured with
    # `python -m bench.shapes_upsampler_probe` (docs/shapes_recipe_history.md).
    c.diffusion.prediction_type = "v_prediction"
    c.sample.steps = 3 if tiny else 7
    c.sample.num = 4

    c.data.image_size = 64
    c.data.num_examples = 200_000

    t = c.train
    t.batch_size = 8 if tiny else 16
    t.steps = 4 if tiny else 500
    t.log_every = 2 if tiny else 50
    t.ckpt_every = 0 if tiny else 500
    t.sample_every = 0

    o = c.optim
    o.lr = 1e-3
    o.warmup = 1 if tiny else 100
    o.ema_decay = 0.0 if tiny else 0.995
    return c
