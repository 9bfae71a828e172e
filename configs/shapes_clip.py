"""CLIP on the embedded captioned-shapes dataset: the first stage of the shapes recipe.

    python train.py --config=configs/shapes_clip.py --workdir=W/clip \
        --config.tokenizer=W/tokenizer --config.model.vocab_size=N --config.model.eos_token_id=N-1

(``python -m unclip_jax.recipe`` writes the tokenizer, fills these in and runs every stage.)

Variants: ``default`` (the recipe's size: a 3-layer, 64-wide ViT on 32 px images with 4 px
patches and a 3-layer text tower, joint width 64) and ``tiny`` (2 layers, width 32: tests).
Images are 32 px (the decoder's size), so the prior and decoder encode exactly what CLIP saw.
Evaluation: zero-shot colour and shape accuracy on one-object held-out images.
The shipped CLIP is this config's 2000 steps plus a fine-tuning leg with 60% of the images
in colours outside the vocabulary (``data.unnamed_colors=0.6``, ``train.init_from``, lr 5e-4):
README, "The captioned-shapes recipe".
"""

import ml_collections

_VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "default"
    if arg not in _VARIANTS:
        raise ValueError(f"unknown configs/shapes_clip.py variant {arg!r}; known: {', '.join(_VARIANTS)}")
    from unclip_jax.data import default_data_config
    from unclip_jax.train.stage import base_config
    tiny = arg == "tiny"
    c = base_config()
    c.stage = "clip"

    m = c.model   # unclip_jax.stages.clip.model_config_from: a named size plus overrides
    m.variant = "tiny"
    m.attention = "xla"
    width = 32 if tiny else 64                # text width = projection_dim (prior/decoder read both)
    m.text_width = m.vision_width = m.projection_dim = width
    m.text_layers = m.vision_layers = 2 if tiny else 3
    m.text_heads = m.vision_heads = 4
    m.text_mlp_dim = m.vision_mlp_dim = 2 * width if tiny else 4 * width
    m.patch_size = 4          # 8x8 patches: a small shape (6 px across) spans several
    m.vocab_size = 0          # 0: the variant's; the recipe sets len(vocab.json)
    m.eos_token_id = 0        # 0: the variant's; the recipe sets the <|endoftext|> id
    m.image_size = 32
    m.logit_scale_init = ml_collections.config_dict.placeholder(float)
    m.logit_bias_init = ml_collections.config_dict.placeholder(float)

    c.loss = ml_collections.ConfigDict(dict(kind="clip", max_logit_scale=100.0))
    c.tokenizer = ""          # the shapes tokenizer directory

    c.data = default_data_config("shapes")
    c.data.image_size = 32
    c.data.num_examples = 200_000
    # Each item is an image and its shape twin (one object's shape changed), side by side
    # in the batch: without such negatives CLIP matches captions by colour, size and place
    # and stays near chance on shape (measured: 43% held-out after 1000 steps).
    c.data.shape_twins = True

    c.eval = ml_collections.ConfigDict(dict(split="heldout", num_examples=32 if tiny else 300))

    t = c.train
    t.batch_size = 8 if tiny else 64   # items: twice as many images
    t.steps = 4 if tiny else 2000
    t.log_every = 2 if tiny else 50
    t.ckpt_every = 0 if tiny else 1000
    t.eval_every = 0 if tiny else 1000

    o = c.optim
    o.lr = 1e-3
    o.warmup = 1 if tiny else 100
    o.b2 = 0.98
    o.eps = 1e-6
    o.weight_decay = 0.1
    o.clip_norm = 1.0
    o.ema_decay = 0.0 if tiny else 0.99
    return c
