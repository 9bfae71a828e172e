"""The decoder stage: CFG conditioning dropout, the null conditioning, the loss, the trainer hook."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from unclip_jax.config import load_config
from unclip_jax.stages import decoder as dec


def test_drop_rates_measured_over_many_draws():
    """Image embedding dropped 10%, caption 50%, independently (paper §2.1)."""
    n = 200_000
    drop_image, drop_text = dec.drop_masks(jax.random.key(0), n, 0.1, 0.5)
    drop_image, drop_text = np.asarray(drop_image), np.asarray(drop_text)
    for rate, p in ((drop_image.mean(), 0.1), (drop_text.mean(), 0.5), ((drop_image & drop_text).mean(), 0.05)):
        assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n), (rate, p)
    # other rates are honoured too, and different keys give different masks
    a, _ = dec.drop_masks(jax.random.key(1), n, 0.05, 0.0)
    assert abs(float(a.mean()) - 0.05) < 4 * np.sqrt(0.05 * 0.95 / n)
    assert not np.array_equal(np.asarray(a[:100]), drop_image[:100])


def test_text_dropout_uses_the_null_text():
    rng = np.random.default_rng(0)
    b, length, d = 4, 5, 3
    embed, hidden = rng.standard_normal((b, d)), rng.standard_normal((b, length, d))
    mask = np.ones((b, length), bool)
    drop = jnp.array([True, False, True, False])
    # the default null: zeros and an all-False mask
    e, h, m = dec.apply_text_dropout(drop, embed, hidden, mask, dec.null_text(b, length, d))
    assert np.all(np.asarray(e)[[0, 2]] == 0) and np.all(np.asarray(h)[[0, 2]] == 0)
    assert not np.asarray(m)[[0, 2]].any() and np.asarray(m)[[1, 3]].all()
    np.testing.assert_array_equal(np.asarray(e)[[1, 3]], embed[[1, 3]].astype(np.float32))
    # given "" encodings (1, …) broadcast over the batch
    n_e, n_h = rng.standard_normal((1, d)), rng.standard_normal((1, length, d))
    n_m = np.array([[True, True, False, False, False]])
    e, h, m = dec.apply_text_dropout(drop, embed, hidden, mask, dec.null_text(b, length, d, n_e, n_h, n_m))
    np.testing.assert_allclose(np.asarray(h)[2], n_h[0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m)[0], n_m[0])
    with pytest.raises(ValueError):
        dec.null_text(b, length, d, n_e, None, None)


def random_params(init, seed=0):
    """Random parameters of the tree ``init(key)`` would make, without compiling ``init``
    (an XLA compile of a UNet's init costs tens of seconds on a small CPU)."""
    shapes = jax.eval_shape(init, jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.1 * noise
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return noise * (0.1 if len(leaf.shape) == 1 else 1.0 / np.sqrt(fan_in))
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    config = load_config("configs/decoder.py:tiny")
    source = dec.make_source(config, "train")
    batch = dec.preprocess([source[i] for i in range(4)], config)
    params = random_params(lambda k: dec.init_params(k, config))
    return config, batch, params


def test_preprocess_attributes_batch(tiny):
    config, batch, _ = tiny
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image_embed"].shape == (4, 32) and batch["text_hidden"].shape == (4, 8, 32)
    assert batch["text_mask"].dtype == bool and batch["text_mask"][:, :4].all()
    assert "null_text_embed" not in batch          # attributes: the zero null conditioning


def test_registered_stage_loss_and_gradients(tiny):
    """The trainer's view (get_stage('decoder')): a finite hybrid loss and finite gradients;
    with every image embedding dropped the learned null embedding gets gradient."""
    from unclip_jax.train.stage import get_stage
    _, batch, params = tiny
    stage = get_stage("decoder")
    assert stage is dec.DECODER_STAGE
    cfg = load_config("configs/decoder.py:tiny", ["guidance.p_drop_image=1.0"])
    fn = jax.jit(jax.value_and_grad(lambda p: stage.loss_fn(p, batch, jax.random.key(3), cfg, train=True),
                                    has_aux=True))
    (loss, metrics), g = fn(params)
    assert np.isfinite(float(loss)) and float(metrics["vb"]) > 0 and float(metrics["mse"]) > 0
    assert float(metrics["drop_image"]) == 1.0
    assert float(jnp.abs(g["text_proj"]["learned_classifier_free_guidance_embeddings"]).max()) > 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    shapes = jax.eval_shape(lambda k: stage.init_params(k, cfg), jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert stage.flops_per_example(cfg) > 1e9
    with pytest.raises(ValueError, match="clip.kind"):
        dec.preprocess([dec.make_source(cfg, "train")[0]], load_config("configs/decoder.py:tiny",
                                                                       ["clip.kind=precomputed"]))


def test_min_snr_gamma_reaches_the_loss(tiny):
    """diffusion.min_snr_gamma weights the MSE term: a huge γ weighs every timestep 1 (the
    plain loss), a tiny one almost removes the MSE term; the unweighted MSE metric stays."""
    _, batch, params = tiny
    key = jax.random.key(5)

    def loss(*overrides):
        cfg = load_config("configs/decoder.py:tiny", list(overrides))
        return dec.loss_fn(params, batch, key, cfg, train=True)

    (plain, m_plain), (huge, _), (small, m_small) = (
        loss(), loss("diffusion.min_snr_gamma=1e9"), loss("diffusion.min_snr_gamma=1e-6"))
    np.testing.assert_allclose(float(huge), float(plain), rtol=1e-6)
    assert float(small) < float(plain) - 0.5 * float(m_plain["mse"])
    np.testing.assert_allclose(float(m_small["mse"]), float(m_plain["mse"]), rtol=1e-6)
