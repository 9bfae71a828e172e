"""Parity of our prior network with diffusers' PriorTransformer through our importer.

Every reference parameter is randomised before saving (diffusers initialises
positional_embedding, prd_embedding, clip_mean and clip_std to zeros, which would hide
mistakes in their conversion). The Karlo-size test is marked ``karlo`` and must run
under ``flock /tmp/bigmem.lock``.
"""

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import diffusers

from unclip_jax.convert.common import ConversionError  # noqa: E402
from unclip_jax.convert.prior import convert_prior, load_prior, main, save_prior  # noqa: E402
from jaxpr_counts import primitive_counts  # noqa: E402
from unclip_jax.models.prior import init_prior_params, prior_from_config  # noqa: E402

TINY = dict(num_attention_heads=2, attention_head_dim=12, num_layers=1, embedding_dim=32,
            num_embeddings=77, additional_embeddings=4)
KARLO = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
             num_embeddings=77, additional_embeddings=4, dropout=0.0)


def randomise_(model, seed=0):
    """Gives every parameter of ``model`` a random, non-trivial value (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith("clip_"):  # Linear weights
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith("norm1.weight") or name.endswith("norm3.weight") or name == "norm_out.weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name == "clip_std":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:  # biases, positional/prd embeddings, clip_mean
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def make_reference(tmp_path, cfg, seed=0):
    model = randomise_(diffusers.PriorTransformer(**cfg), seed).eval()
    src = os.path.join(tmp_path, "prior")
    model.save_pretrained(src)
    return model, src


def make_inputs(batch, d, n=77, seed=1, pad_from=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, d)).astype(np.float32)
    text_embed = rng.standard_normal((batch, d)).astype(np.float32)
    hidden = rng.standard_normal((batch, n, d)).astype(np.float32)
    mask = np.ones((batch, n), bool)
    if pad_from is not None:
        for i, start in enumerate(pad_from):
            mask[i, start:] = False
    t = rng.integers(0, 1000, (batch,)).astype(np.int64)
    return x, t, text_embed, hidden, mask


def torch_forward(model, x, t, text_embed, hidden, mask):
    with torch.no_grad():
        return model(torch.from_numpy(x), timestep=torch.from_numpy(t),
                     proj_embedding=torch.from_numpy(text_embed),
                     encoder_hidden_states=torch.from_numpy(hidden),
                     attention_mask=torch.from_numpy(mask)).predicted_image_embedding.numpy()


def ours_forward(params, config, x, t, text_embed, hidden, mask):
    model = prior_from_config(config)
    return np.asarray(jax.jit(model.apply)({"params": params}, x, t, text_embed, hidden, mask))


def max_rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_tiny_parity_with_and_without_padding(tmp_path):
    ref, src = make_reference(str(tmp_path), TINY)
    params, stats, config = convert_prior(src)
    assert config["num_heads"] == 2 and config["head_dim"] == 12 and config["embed_dim"] == 32
    np.testing.assert_array_equal(stats["clip_mean"], ref.clip_mean.detach().numpy()[0])
    np.testing.assert_array_equal(stats["clip_std"], ref.clip_std.detach().numpy()[0])
    for pad_from in (None, [5, 20, 77]):
        inputs = make_inputs(3, 32, pad_from=pad_from)
        want = torch_forward(ref, *inputs)
        got = ours_forward(params, config, *inputs)
        assert got.shape == (3, 32)
        assert max_rel(got, want) <= 1e-4, (pad_from, max_rel(got, want))
    # The padding actually changes the output (so the masked test above has teeth).
    a = torch_forward(ref, *make_inputs(1, 32))
    b = torch_forward(ref, *make_inputs(1, 32, pad_from=[5]))
    assert max_rel(a, b) > 1e-2


def test_padding_is_masked_and_x_t_matters():
    """The prediction depends on x_t, and not on the values at padded text positions.
    (The causal mask itself is checked numerically by the parity tests.)"""
    config = dict(num_heads=2, head_dim=8, num_layers=2, embed_dim=16, num_text_tokens=5)
    model = prior_from_config(config)
    params = init_prior_params(model, jax.random.key(0))
    x, t, e, h, m = make_inputs(2, 16, n=5)
    apply = jax.jit(model.apply)
    out1 = apply({"params": params}, x, t, e, h, m)
    out2 = apply({"params": params}, x + 1.0, t, e, h, m)
    assert float(jnp.max(jnp.abs(out1 - out2))) > 1e-3
    # Text padding: padded tokens' values cannot leak into the prediction.
    m2 = m.copy()
    m2[:, 3:] = False
    h2 = h.copy()
    h2[:, 3:] += 5.0
    a = apply({"params": params}, x, t, e, h, m2)
    b = apply({"params": params}, x, t, e, h2, m2)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bf16_remat_dropout_options():
    config = dict(num_heads=2, head_dim=8, num_layers=1, embed_dim=16, num_text_tokens=5, dropout=0.1)
    params = init_prior_params(prior_from_config(config), jax.random.key(0))
    inputs = make_inputs(2, 16, n=5)
    ref = jax.jit(prior_from_config(config).apply)({"params": params}, *inputs)
    fast = prior_from_config(config, dtype="bfloat16", remat=True)
    train_apply = jax.jit(lambda p, key: fast.apply({"params": p}, *inputs, train=True,
                                                   rngs={"dropout": key}))
    out = jax.jit(fast.apply)({"params": params}, *inputs)
    assert out.dtype == jnp.float32
    assert max_rel(np.asarray(out), np.asarray(ref)) < 5e-2

    g = jax.jit(jax.grad(lambda p, key: jnp.mean(train_apply(p, key) ** 2)))(params, jax.random.key(1))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(g))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))
    y1 = train_apply(params, jax.random.key(1))
    y2 = train_apply(params, jax.random.key(2))
    assert float(jnp.max(jnp.abs(y1 - y2))) > 0  # dropout is active in training


def test_remat_policies_change_recompute_not_gradients():
    config = dict(num_heads=2, head_dim=8, num_layers=2, embed_dim=16, num_text_tokens=5)
    params = init_prior_params(prior_from_config(config), jax.random.key(0))
    inputs = make_inputs(2, 16, n=5)
    dots, grads = {}, {}
    for name, options in {"none": {}, "full": dict(remat=True),
                          "dots": dict(remat=True, remat_policy="dots")}.items():
        model = prior_from_config(config, **options)
        loss = lambda p: jnp.mean(model.apply({"params": p}, *inputs) ** 2)
        dots[name] = primitive_counts(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)["dot_general"]
        grads[name] = jax.jit(jax.grad(loss))(params)
    # Full remat recomputes every matmul of the forward pass; 'dots' only attention's two
    # batched products per layer (its Dense outputs are kept).
    assert dots["none"] < dots["dots"] < dots["full"]
    assert dots["dots"] - dots["none"] == 2 * config["num_layers"]
    # Recomputing changes XLA's fusions, so float32 rounding: on an AVX2-only CPU a gradient
    # entry of 2e-3 moved by one ulp of the ~1 entries it is summed from (1.2e-7).
    for name in ("full", "dots"):
        for a, b in zip(jax.tree_util.tree_leaves(grads[name]), jax.tree_util.tree_leaves(grads["none"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="remat_policy"):
        init_prior_params(prior_from_config(config, remat=True, remat_policy="everything"), jax.random.key(0))


def test_save_load_roundtrip_and_cli(tmp_path):
    ref, src = make_reference(str(tmp_path), TINY)
    out = str(tmp_path / "ours")
    main([f"--src={src}", f"--out={out}"])
    params, stats, config = load_prior(out)
    p2, s2, c2 = convert_prior(src)
    assert config == c2
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_array_equal(np.asarray(stats["clip_std"]), s2["clip_std"])
    save_prior(str(tmp_path / "again"), p2, s2, c2)
    assert load_prior(str(tmp_path / "again"))[2] == c2


def test_converter_reports_mismatches(tmp_path):
    model = diffusers.PriorTransformer(**{**TINY, "norm_in_type": "layer"})
    model.save_pretrained(str(tmp_path / "kandinsky_like"))
    with pytest.raises(ConversionError, match="norm_in_type"):
        convert_prior(str(tmp_path / "kandinsky_like"))
    # A checkpoint whose config lies about the depth: every problem is listed.
    ref, src = make_reference(str(tmp_path), {**TINY, "num_layers": 2})
    import json
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_layers"] = 1
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConversionError, match="unused checkpoint tensors"):
        convert_prior(src)
    # The command line: a message, not a traceback.
    with pytest.raises(SystemExit, match=r"(?s)error: .*unused checkpoint tensors"):
        main([f"--src={src}", f"--out={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match="error: "):
        main([f"--src={tmp_path / 'nowhere'}", f"--out={tmp_path / 'out'}"])


@pytest.mark.karlo
def test_karlo_size_parity(tmp_path):
    """Full Karlo prior (1B parameters), batch 1, with and without text padding."""
    ref, src = make_reference(str(tmp_path), KARLO)
    cases = [make_inputs(1, 768, seed=3), make_inputs(1, 768, seed=4, pad_from=[9])]
    wants = [torch_forward(ref, *inputs) for inputs in cases]
    del ref
    gc.collect()
    params, stats, config = convert_prior(src)
    assert stats["clip_mean"].shape == (768,)
    model = prior_from_config(config)
    apply = jax.jit(model.apply)
    try:
        for inputs, want in zip(cases, wants):
            got = np.asarray(apply({"params": params}, *inputs))
            print(f"karlo-size max relative difference: {max_rel(got, want):.2e}")
            assert max_rel(got, want) <= 1e-4, max_rel(got, want)
    finally:
        del params, apply
        gc.collect()
