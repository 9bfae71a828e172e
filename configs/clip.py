"""Training your own CLIP (contrastive image-text pre-training).

Variants (``--config=configs/clip.py:VARIANT``):

- ``tiny``: the tiny test model, CPU smoke runs;
- ``shapes``: the tiny model on the embedded captioned-shapes dataset (its own word-level
  tokenizer sets ``model.vocab_size``);
- ``B/32``, ``B/16``, ``L/14``, ``H/14``: OpenAI / OpenCLIP sizes (CLIP's recipe: AdamW
  β2 0.98, ε 1e-6, weight decay 0.2, cosine schedule with warm-up, batch 32768).

The model section names a ``clip_variant`` plus overrides (``unclip_jax.stages.clip.
model_config_from``). ``loss.kind`` is ``clip`` (symmetric InfoNCE) or ``siglip`` (sigmoid;
set ``model.logit_bias_init=-10`` and ``model.logit_scale_init=2.302585``).

To use pretrained OpenAI/OpenCLIP weights instead, import them with
``python -m unclip_jax.convert.clip --src=DIR --out=DIR``.
"""

import ml_collections

_SIZES = {"tiny": "tiny", "shapes": "tiny", "B/32": "ViT-B/32", "B/16": "ViT-B/16",
          "L/14": "ViT-L/14", "H/14": "ViT-H/14"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in _SIZES:
        raise ValueError(f"unknown configs/clip.py variant {arg!r}; known: {', '.join(_SIZES)}")
    small = arg in ("tiny", "shapes")
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.variant = _SIZES[arg]
    c.model.dtype = "float32" if small else "bfloat16"
    c.model.remat = not small
    c.model.attention = "xla" if small else "auto"
    c.model.vocab_size = 0          # 0: the variant's (49408); the shapes recipe sets its own
    c.model.eos_token_id = 0        # 0: the variant's
    c.model.image_size = 0          # 0: the variant's
    c.model.logit_scale_init = ml_collections.config_dict.placeholder(float)
    c.model.logit_bias_init = ml_collections.config_dict.placeholder(float)

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "clip"
    c.loss.max_logit_scale = 100.0

    c.tokenizer = ""                # a CLIP tokenizer directory (see unclip_jax.tokenizer)
    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes" if small else "tar_shards"
    c.data.path = ""

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3 if small else 5e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 10 if small else 2000
    c.optim.grad_clip = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32 if small else 32768
    c.train.steps = 200 if small else 100_000
    c.train.seed = 0
    c.train.log_every = 10 if small else 100
    c.train.eval_every = 100 if small else 5000
    c.train.checkpoint_every = 100 if small else 5000

    c.eval = ml_collections.ConfigDict()
    c.eval.templates = ("a photo of a {}.",) if not small else ("{}",)
    c.eval.recall_ks = (1, 5)
    return c
