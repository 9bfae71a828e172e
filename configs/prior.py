"""The diffusion prior P(z_i | y) (paper §2.2; Karlo's prior).

Variants (``--config=configs/prior.py:VARIANT``):

- ``tiny``: 2 heads × 12, width 24, 1 layer, CLIP dim 32, on synthetic embeddings (no files
  needed): a CPU smoke run, ``python train.py --config=configs/prior.py:tiny --workdir=/tmp/p``.
- ``shapes``: a small prior on the captioned-shapes dataset, CLIP encodings computed on
  the fly from a CLIP checkpoint (set ``clip.path`` and ``clip.tokenizer``; the tiny
  CLIP of ``configs/clip.py:shapes`` has embedding dim 32 = ``model.embed_dim``).
- ``karlo``: the Karlo size (32 heads × 64 = 2048 wide, 20 layers, CLIP ViT-L/14 dim 768,
  ≈1.0B parameters) on precomputed embeddings (``data.kind=embeddings``: ``data.path``,
  ``data.eval_path``; set ``clip.path``/``clip.tokenizer`` so the null "" text is encoded), with
  the paper's Table 3 optimiser (AdamW lr 1.1e-4, β2 0.96, ε 1e-6, weight decay 6e-2, batch
  4096, 600k steps, EMA 0.9999). To fine-tune the released Karlo prior, convert it with
  ``python -m unclip_jax.convert.prior --src=karlo/prior --out=DIR`` and set
  ``prior.stats_path=DIR`` (its clip_mean/clip_std).

Sections: ``model`` (network, ``unclip_jax.models.prior.PriorTransformer`` fields),
``prior`` (embedding space, conditioning drop, schedule), ``sample`` (sampler defaults,
used by evaluation), ``eval``, ``data``, ``clip``, and the trainer's ``train``/``optim``/``mesh``.
"""

import ml_collections

_VARIANTS = ("tiny", "shapes", "karlo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in _VARIANTS:
        raise ValueError(f"unknown configs/prior.py variant {arg!r}; known: {', '.join(_VARIANTS)}")
    from unclip_jax.data import default_data_config
    from unclip_jax.train.stage import base_config
    small = arg != "karlo"
    c = base_config()
    c.stage = "prior"

    m = c.model
    m.num_heads = {"tiny": 2, "shapes": 4, "karlo": 32}[arg]
    m.head_dim = {"tiny": 12, "shapes": 32, "karlo": 64}[arg]
    m.num_layers = {"tiny": 1, "shapes": 4, "karlo": 20}[arg]
    m.embed_dim = {"tiny": 32, "shapes": 32, "karlo": 768}[arg]  # CLIP's embedding (= text width)
    m.num_text_tokens = 77
    m.time_embed_dim = ml_collections.config_dict.placeholder(int)  # None: the model width
    m.mlp_ratio = 4
    m.dropout = 0.0
    m.norm_eps = 1e-5
    m.dtype = "float32" if small else "bfloat16"
    m.remat = not small
    m.remat_policy = "full"   # 'dots' keeps the Dense outputs: less recompute, more memory
    m.attention_impl = "xla" if small else "auto"

    p = c.prior = ml_collections.ConfigDict()
    p.embed_norm = "l2" if small else "stats"   # 'stats' | 'scale' | 'l2'
    p.embed_scale = 17.2                        # for 'scale' (the paper)
    p.stats_path = ""                           # for 'stats': .npz, converted prior dir, or Karlo stats .th
    # for 'l2': the norm of sampled embeddings (the training images' mean ‖z_i‖, which the
    # decoder is trained on); None: measured when training starts (stages/prior.py)
    p.l2_norm = ml_collections.config_dict.placeholder(float)
    p.cond_drop_prob = 0.1
    p.null_text = "auto"                        # 'auto' | 'batch' | 'zero' (stages/prior.py)
    p.schedule = "cosine"
    p.num_timesteps = 1000

    s = c.sample = ml_collections.ConfigDict()
    s.steps = 25
    s.guidance_scale = 4.0
    s.clip_range = 5.0          # diffusers; Karlo uses 10
    s.best_of_n = 2             # the paper; 1 = diffusers/Karlo
    s.sampler = "ddpm"          # 'ddpm' | 'ddim'
    s.eta = 0.0

    e = c.eval = ml_collections.ConfigDict()
    e.split = "test"
    e.batch_size = 16 if small else 256
    e.num_batches = 2 if small else 8
    e.seed = 0

    # The data section of unclip_jax.data (default_data_config), plus kind 'synthetic'
    # (random CLIP-like triples, stages/prior.py) for smoke runs.
    d = c.data = default_data_config({"tiny": "shapes", "shapes": "shapes", "karlo": "embeddings"}[arg])
    if arg == "tiny":
        d.kind = "synthetic"
        d.num_examples = 4096
        d.num_eval_examples = 256

    cl = c.clip = ml_collections.ConfigDict()
    cl.path = ""                # our CLIP directory (or a transformers one): on-the-fly encoding, null ""
    cl.tokenizer = ""           # CLIP tokenizer directory

    t = c.train
    t.batch_size = {"tiny": 32, "shapes": 256, "karlo": 4096}[arg]
    t.steps = {"tiny": 200, "shapes": 20_000, "karlo": 600_000}[arg]
    t.log_every = 10 if small else 100
    t.ckpt_every = 100 if small else 5000
    t.eval_every = 100 if small else 10_000

    o = c.optim
    o.lr = 1e-3 if small else 1.1e-4
    o.warmup = 10 if small else 10_000
    o.b1 = 0.9
    o.b2 = 0.96
    o.eps = 1e-6
    o.weight_decay = 6e-2
    o.clip_norm = 1.0
    o.ema_decay = 0.999 if small else 0.9999
    return c
