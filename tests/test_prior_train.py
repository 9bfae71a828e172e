"""The prior's objective, embedding spaces, stats, config, trainer stage and evaluator."""


import jax
import numpy as np
import optax
import pytest

from unclip_jax.config import ConfigError, load_config
from unclip_jax.stages import prior as sp


def tiny_config(*overrides):
    return load_config("configs/prior.py:tiny", list(overrides))


def jit_loss(config, train=True):
    return jax.jit(lambda p, b, k: sp.prior_loss(p, None, b, k, config, train=train))


def batch_of(source, start, n, config):
    return sp.preprocess_prior_batch([source[start + i] for i in range(n)], config)


def test_configs_load_and_are_locked():
    for variant in ("tiny", "shapes", "karlo"):
        c = load_config(f"configs/prior.py:{variant}")
        assert c.stage == "prior" and c.model.num_text_tokens == 77
        sp.build_model(c)  # every model option is a real PriorTransformer field
    karlo = load_config("configs/prior.py:karlo")
    assert (karlo.model.num_heads, karlo.model.head_dim, karlo.model.num_layers, karlo.model.embed_dim) == \
        (32, 64, 20, 768)
    assert karlo.prior.embed_norm == "stats" and karlo.prior.cond_drop_prob == 0.1
    with pytest.raises(ConfigError):
        load_config("configs/prior.py:tiny", ["prior.no_such_key=1"])
    with pytest.raises(ValueError, match="embed_norm"):
        sp.split_config(tiny_config("prior.embed_norm=pca"))


@pytest.mark.parametrize("mode", sp.EMBED_NORMS)
def test_embedding_spaces_round_trip(mode):
    rng = np.random.default_rng(0)
    z = (3.0 * rng.standard_normal((64, 16)) + 1.0).astype(np.float32)
    stats = sp.compute_embedding_stats(z)
    x = np.asarray(sp.normalize_embed(z, stats, mode))
    back = np.asarray(sp.denormalize_embed(x, stats, mode))
    if mode == "stats":
        np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(x.std(0, ddof=1), 1, atol=1e-4)
        np.testing.assert_allclose(back, z, rtol=1e-5, atol=1e-5)
    elif mode == "scale":
        np.testing.assert_allclose(x, z * 17.2, rtol=1e-6)
        np.testing.assert_allclose(back, z, rtol=1e-6)
    else:
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 4.0, rtol=1e-5)  # √16
        np.testing.assert_allclose(back, z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
        # with l2_norm: the directions, at the norm the decoder was trained on
        scaled = np.asarray(sp.denormalize_embed(x, stats, mode, l2_norm=7.5))
        np.testing.assert_allclose(scaled, 7.5 * back, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="embed_norm"):
        sp.normalize_embed(z, stats, "pca")


def test_l2_norm_must_be_positive():
    with pytest.raises(ValueError, match="l2_norm"):
        sp.split_config(tiny_config("prior.l2_norm=0.0"))


def test_stats_files(tmp_path):
    import torch
    stats = {"clip_mean": np.arange(4, dtype=np.float32), "clip_std": np.arange(1, 5, dtype=np.float32)}
    sp.save_stats(str(tmp_path / "s.npz"), stats)
    torch.save((torch.arange(4.0), torch.arange(1.0, 5.0)), str(tmp_path / "ViT-L-14_stats.th"))
    from unclip_jax.convert.prior import save_prior
    save_prior(str(tmp_path / "prior"), {"w": np.zeros(2, np.float32)}, stats, {"embed_dim": 4})
    for path in ("s.npz", "ViT-L-14_stats.th", "prior"):
        got = sp.load_stats(str(tmp_path / path))
        np.testing.assert_array_equal(got["clip_mean"], stats["clip_mean"])
        np.testing.assert_array_equal(got["clip_std"], stats["clip_std"])
    with pytest.raises(ValueError, match="stats_path"):
        sp.stats_from_config(tiny_config("prior.embed_norm=stats"))
    assert sp.stats_from_config(tiny_config()) is None  # 'l2' needs none


def test_conditioning_drop_uses_the_null_text():
    config = tiny_config("prior.cond_drop_prob=1.0")
    source = sp.make_prior_source(config, "train")
    batch = batch_of(source, 0, 8, config)
    assert batch["null_text_mask"].shape == (8, 77) and batch["null_text_mask"][0, :2].all()
    params = sp.PriorStage().init_params(jax.random.key(0), config)
    key = jax.random.key(3)
    dropped, metrics = jit_loss(config)(params, batch, key)
    as_null = dict(batch, text_embed=batch["null_text_embed"], text_hidden=batch["null_text_hidden"],
                   text_mask=batch["null_text_mask"])
    never = jit_loss(tiny_config("prior.cond_drop_prob=0.0"))
    want, _ = never(params, as_null, key)
    kept, _ = never(params, batch, key)
    assert float(metrics["cond_dropped"]) == 1.0
    np.testing.assert_allclose(float(dropped), float(want), rtol=1e-6)
    assert abs(float(kept) - float(want)) > 1e-4
    # 'zero' null: all-False mask, zero vectors.
    zero = tiny_config("prior.cond_drop_prob=1.0", "prior.null_text=zero")
    zero_loss, _ = jit_loss(zero)(params, batch, key)
    as_zero = dict(batch, text_embed=0 * batch["text_embed"], text_hidden=0 * batch["text_hidden"],
                   text_mask=np.zeros_like(batch["text_mask"]))
    np.testing.assert_allclose(float(zero_loss), float(never(params, as_zero, key)[0]), rtol=1e-6)


def test_loss_decreases_and_evaluator_sees_it(tmp_path):
    """A few dozen AdamW steps on synthetic embeddings ('stats' space from the data)."""
    config = tiny_config("prior.embed_norm=stats", f"prior.stats_path={tmp_path / 'stats.npz'}",
                         "eval.batch_size=16", "eval.num_batches=2", "sample.steps=8")
    source = sp.make_prior_source(config, "train")
    sp.save_stats(config.prior.stats_path,
                  sp.compute_embedding_stats(np.stack([source[i]["image_embed"] for i in range(512)])))
    stage = sp.PriorStage()
    params = stage.init_params(jax.random.key(0), config)
    tx = optax.adamw(3e-3, b2=0.96, eps=1e-6, weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, key):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: stage.loss_fn(p, batch, key, config, train=True), has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    held_out = batch_of(sp.make_prior_source(config, "test"), 0, 64, config)
    eval_loss = jax.jit(lambda p: stage.loss_fn(p, held_out, jax.random.key(99), config, train=False)[0])
    before = float(eval_loss(params))
    metrics_before = stage.evaluate(params, config)
    losses = []
    for i in range(40):
        params, opt, loss = step(params, opt, batch_of(source, 32 * i, 32, config), jax.random.key(i))
        losses.append(float(loss))
    after = float(eval_loss(params))
    assert np.all(np.isfinite(losses))
    assert after < 0.6 * before, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    metrics = stage.evaluate(params, config)
    assert set(metrics) >= {"cos_pred_image", "cos_pred_text", "cos_pred_unrelated_image", "eval_loss"}
    # After training the sampled embedding is closer to its own image than to others'.
    assert metrics["cos_pred_image"] > metrics["cos_pred_unrelated_image"] + 0.1
    assert metrics["cos_pred_image"] > metrics_before["cos_pred_image"]
    assert metrics["eval_loss"] < metrics_before["eval_loss"]


def test_stage_registration_and_accounting():
    from unclip_jax.train.stage import get_stage
    stage = get_stage("prior")
    config = tiny_config()
    shapes = jax.eval_shape(lambda k: stage.init_params(k, config), jax.random.key(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n_params > 0 and stage.flops_per_example(config) > 2 * 3 * 81 * n_params * 0.5
    karlo = load_config("configs/prior.py:karlo")
    # ≈1.0B parameters → ≈3 · 2 · 81 · 1.0e9 training FLOPs per example.
    assert 4.5e11 < stage.flops_per_example(karlo) < 5.5e11
    source = stage.make_source(config, "train", 1, 3)
    assert (source.process_index, source.process_count, len(source)) == (1, 3, 4096)
    from unclip_jax.data import batches
    first = stage.preprocess(next(batches(source, 4, seed=0)), config)
    assert first["text_hidden"].shape == (4, 77, 32) and first["null_text_embed"].shape == (4, 32)
    rules = stage.param_partition_rules(config)
    assert any("to_" in pattern for pattern, _ in rules)


def test_shapes_encoded_with_clip_on_the_fly(tmp_path):
    """The shapes source + a (random, tiny) CLIP checkpoint: batches of encodings."""
    from unclip_jax.convert.common import save_pretrained
    from unclip_jax.data import shapes
    from unclip_jax.models.clip import clip_variant, init_clip_params
    from unclip_jax.tokenizer import write_word_level_vocab
    words = sorted({w for c in [shapes.generate_example(0, "train", i, 32)["caption"] for i in range(50)]
                    for w in c.lower().replace(",", " ").split()} | set("abcdefghijklmnopqrstuvwxyz"))
    tok_dir = write_word_level_vocab(words, str(tmp_path / "tok"))
    clip_cfg = clip_variant("tiny")
    clip_params = jax.jit(lambda k: init_clip_params(clip_cfg, k))(jax.random.key(0))
    save_pretrained(str(tmp_path / "clip"), clip_params, clip_cfg.to_dict())
    config = load_config("configs/prior.py:shapes", [f"clip.path={tmp_path / 'clip'}", f"clip.tokenizer={tok_dir}",
                                                     "data.image_size=32", "data.num_examples=16",
                                                     "model.num_layers=1"])
    source = sp.make_prior_source(config, "train")
    batch = sp.preprocess_prior_batch([source[i] for i in range(4)], config)
    assert batch["image_embed"].shape == (4, 32) and batch["text_hidden"].shape == (4, 77, 32)
    assert batch["null_text_mask"][0].sum() == 2  # "" = start + end tokens
    assert np.all(batch["text_mask"].sum(1) > 2)
    params = sp.PriorStage().init_params(jax.random.key(0), config)
    loss, _ = jit_loss(config)(params, batch, jax.random.key(0))
    assert np.isfinite(float(loss))
    # The 'l2' prior's output norm is measured from the training images before training.
    assert config.prior.embed_norm == "l2" and config.prior.l2_norm is None
    sp.PriorStage().prepare_config(config)
    every = sp.preprocess_prior_batch([source[i] for i in range(16)], config)["image_embed"]
    assert config.prior.l2_norm == pytest.approx(float(np.linalg.norm(every, axis=1).mean()), rel=1e-5)
    # A resumed run takes the value stored with its checkpoint instead of measuring again.
    resumed = load_config("configs/prior.py:shapes", [f"clip.path={tmp_path / 'clip'}", f"clip.tokenizer={tok_dir}",
                                                      "data.image_size=32", "data.num_examples=0"])
    sp.PriorStage().prepare_config(resumed, {"prior": {"l2_norm": 3.25}})
    assert resumed.prior.l2_norm == 3.25


def test_precomputed_embeddings_source(tmp_path):
    """clip-retrieval layout (unclip_jax.data.embeddings) -> prior batches; without a CLIP
    checkpoint there is no "" encoding, so 'auto' trains with the zero null and 'batch' fails."""
    from unclip_jax.data import batches
    from unclip_jax.data.embeddings import write_embeddings
    synthetic = sp.make_prior_source(tiny_config(), "train")
    rows = [synthetic[i] for i in range(12)]
    write_embeddings(str(tmp_path / "emb"), {k: np.stack([r[k] for r in rows]) for k in sp.BATCH_KEYS},
                     shard_size=5, dtype=np.float16)
    config = tiny_config("data.kind=embeddings", f"data.path={tmp_path / 'emb'}")
    stage = sp.PriorStage()
    source = stage.make_source(config, "train", 0, 1)
    assert len(source) == 12
    batch = stage.preprocess(next(batches(source, 6, seed=0)), config)
    assert batch["image_embed"].dtype == np.float32 and batch["text_hidden"].shape == (6, 77, 32)
    assert not any(k in batch for k in sp.NULL_KEYS)
    with pytest.raises(ValueError, match="null"):
        stage.preprocess(next(batches(source, 6, seed=0)), tiny_config(
            "data.kind=embeddings", f"data.path={tmp_path / 'emb'}", "prior.null_text=batch"))
