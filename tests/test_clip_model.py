"""Our CLIP modules on their own: variants, config round trip, dtype, remat, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models.clip import (VARIANTS, CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModel,
                                    clip_param_shapes, clip_variant, init_clip_params)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# ViT-B/16 and ViT-L/14 differ from these only in the patch or image size (positional table).
@pytest.mark.parametrize("name,millions", [("ViT-B/32", 151.3), ("ViT-L/14-336", 427.9), ("ViT-H/14", 986.1)])
def test_variant_sizes_match_published_parameter_counts(name, millions):
    # Published totals (OpenCLIP's model profile table: 151.28, 427.94, 986.11) in millions.
    assert _count(clip_param_shapes(clip_variant(name))) / 1e6 == pytest.approx(millions, abs=0.1)


def test_variant_names_and_config_round_trip():
    assert set(VARIANTS) == {"ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14-336", "ViT-H/14", "tiny"}
    cfg = clip_variant("vit-l/14", dtype="bfloat16", remat=True)
    assert cfg.vision.patch_size == 14 and cfg.dtype == "bfloat16" and cfg.remat
    assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    text_only = cfg.replace(vision=None)
    assert CLIPConfig.from_dict(json.loads(json.dumps(text_only.to_dict()))) == text_only
    with pytest.raises(ValueError, match="known"):
        clip_variant("ViT-Q/7")
    with pytest.raises(ValueError, match="widht"):
        CLIPConfig.from_dict({**cfg.to_dict(), "text": {**cfg.to_dict()["text"], "widht": 3}})
    with pytest.raises(ValueError, match="divisible"):
        cfg.replace(text=cfg.text.__class__(width=30, heads=4))


def _inputs(cfg, b=2):
    rng = np.random.default_rng(0)
    ids = np.zeros((b, cfg.text.context_length), np.int32)
    mask = np.zeros_like(ids, bool)
    for row, n in enumerate(range(3, 3 + b)):
        ids[row, :n] = [49406, *rng.integers(1, 49000, n - 2), 49407]
        mask[row, :n] = True
    s = cfg.vision.image_size
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(rng.standard_normal((b, s, s, 3)), jnp.float32)


@pytest.fixture(scope="module")
def tiny():
    cfg = clip_variant("tiny")
    return cfg, init_clip_params(cfg, jax.random.key(0))


def test_bfloat16_and_remat_track_float32(tiny):
    cfg, params = tiny
    ids, mask, pixels = _inputs(cfg)

    def forward(model):
        return jax.jit(lambda p: model.apply({"params": p}, ids, pixels, mask))(params)

    def text_grads(c):  # one tower keeps the compile short; remat wraps every block alike
        def loss(p):
            embeds, hidden = CLIPTextModel(c).apply({"params": p}, ids, mask)
            return jnp.sum(embeds ** 2) + jnp.sum(hidden[:, :4])
        return jax.jit(jax.grad(loss))(params["text"])

    ref = forward(CLIPModel(cfg))
    g_ref, g_remat = text_grads(cfg), text_grads(cfg.replace(remat=True))
    for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_remat)):
        # rtol too: remat recomputes the forward inside the backward, and XLA may round it
        # differently (gradients up to ~130 here; 3e-6 relative on JAX 0.7.1)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(g_ref["block_0"]["q"]["kernel"])).max() > 0

    bf16 = forward(CLIPModel(cfg.replace(dtype="bfloat16")))
    for key in ("text_embeds", "image_embeds"):
        assert bf16[key].dtype == jnp.float32
        cos = np.sum(np.asarray(bf16[key]) * np.asarray(ref[key]), -1) / (
            np.linalg.norm(bf16[key], axis=-1) * np.linalg.norm(ref[key], axis=-1))
        assert (cos > 0.99).all(), (key, cos)


def test_towers_share_parameters_with_clip_model(tiny):
    cfg, params = tiny
    assert set(params) == {"text", "vision", "logit_scale"}
    assert float(params["logit_scale"]) == pytest.approx(np.log(1 / 0.07), rel=1e-6)
    ids, mask, pixels = _inputs(cfg)
    text = jax.jit(lambda p, i, m: CLIPTextModel(cfg).apply({"params": p}, i, m))
    t, h = text(params["text"], ids, mask)
    t2, h2 = jax.jit(lambda p: CLIPModel(cfg).apply({"params": p}, ids, mask, method="encode_text"))(params)
    np.testing.assert_allclose(t, t2, atol=1e-6)
    assert h.shape == (2, 77, 32) and t.shape == (2, 32)
    i = jax.jit(lambda p: CLIPVisionModel(cfg).apply({"params": p}, pixels))(params["vision"])
    i2 = jax.jit(lambda p: CLIPModel(cfg).apply({"params": p}, pixels, method="encode_image"))(params)
    np.testing.assert_allclose(i, i2, atol=1e-6)
    # The text embedding is read at the end-of-text token: tokens after it change nothing.
    t3, _ = text(params["text"], ids.at[0, 5:].set(7), mask)
    np.testing.assert_allclose(t3[0], t[0], atol=1e-6)


def test_siglip_bias_parameter_and_input_errors(tiny):
    cfg, params = tiny
    shapes = clip_param_shapes(cfg.replace(logit_bias_init=-10.0))
    assert shapes["logit_bias"].shape == ()
    ids, mask, pixels = _inputs(cfg)
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        CLIPModel(cfg).apply({"params": params}, pixels[:, :16], method="encode_image")
    with pytest.raises(ValueError, match="L <= 77"):
        CLIPModel(cfg).apply({"params": params}, jnp.zeros((1, 78), jnp.int32), method="encode_text")
    text_only = cfg.replace(vision=None)
    assert set(clip_param_shapes(text_only)) == {"text"}
    with pytest.raises(ValueError, match="no vision tower"):
        CLIPModel(text_only).apply({"params": {"text": params["text"]}}, pixels, method="encode_image")


def test_flat_float16_storage_round_trips_and_replaces_orbax(tmp_path):
    """``save_pretrained(storage_dtype='float16')`` (the shipped format): ``load_clip`` reads
    it back as float32 within float16 rounding, and each export replaces the other format
    (a stale file would otherwise win on load)."""
    import os
    from unclip_jax.convert.clip import load_clip
    from unclip_jax.convert.common import PARAMS_SAFETENSORS, load_pretrained, save_pretrained
    config = clip_variant("tiny")
    params = init_clip_params(config, jax.random.key(0))
    out = str(tmp_path / "clip")
    save_pretrained(out, params, config.to_dict(), storage_dtype="float16")
    loaded_config, loaded = load_clip(out)
    assert loaded_config == config and not os.path.exists(os.path.join(out, "params"))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        assert b.dtype == np.float32 and b.shape == np.shape(a)  # 0-d leaves (logit_scale) stay 0-d
        np.testing.assert_allclose(b, np.asarray(a), rtol=1e-3, atol=1e-7)
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, params)
    save_pretrained(out, doubled, config.to_dict())          # orbax, float32: replaces the flat file
    assert not os.path.exists(os.path.join(out, PARAMS_SAFETENSORS))
    again, _ = load_pretrained(out)
    for a, b in zip(jax.tree_util.tree_leaves(doubled), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    save_pretrained(out, params, config.to_dict(), storage_dtype="float16")
    assert not os.path.exists(os.path.join(out, "params"))
    with pytest.raises(ValueError, match="storage_dtype"):
        save_pretrained(out, params, config.to_dict(), storage_dtype="bfloat16")
