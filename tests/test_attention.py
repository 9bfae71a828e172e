import numpy as np
import jax
import jax.numpy as jnp

from jaxpr_counts import primitive_counts
from unclip_jax.models.attention import dot_product_attention, mask_to_bias


def _reference(q, k, v, bias):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_masked_attention_matches_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    k, v = k[:, :4], v[:, :4]
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    bias = np.asarray(mask_to_bias(jnp.asarray(mask)))
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=jnp.asarray(bias))
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, bias), atol=1e-5)
    # A masked key must not influence the output.
    v2 = v.copy(); v2[1, 3] += 100.0
    out2 = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v2), bias=jnp.asarray(bias))
    np.testing.assert_allclose(np.asarray(out2)[1], np.asarray(out)[1], atol=1e-5)


def test_auto_falls_back_to_xla_on_cpu():
    x = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    out = dot_product_attention(x, x, x, implementation="auto")
    assert out.shape == x.shape and out.dtype == jnp.bfloat16


def test_padding_odd_lengths_to_even_changes_nothing():
    # cuDNN differentiates biased attention only for even lengths; the padded problem must
    # give the same outputs and gradients (checked here through the XLA path).
    from unclip_jax.models.attention import _pad_lengths_to_even

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    bias = jnp.broadcast_to(mask_to_bias(mask), (2, 1, 5, 5))

    def plain(q, k, v, causal):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal)

    def padded(q, k, v, causal):
        qp, kp, vp, bp = _pad_lengths_to_even(q, k, v, bias)
        assert qp.shape[1] % 2 == 0 and kp.shape[1] % 2 == 0 and bp.shape[2:] == (6, 6)
        return jax.nn.dot_product_attention(qp, kp, vp, bias=bp, is_causal=causal)[:, :5]

    for causal in (False, True):
        np.testing.assert_allclose(padded(q, k, v, causal), plain(q, k, v, causal), atol=1e-6)
        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a, causal)))
        g_plain = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
        g_padded = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g_padded, g_plain):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_even_length_padding_only_in_the_backward_pass():
    # Sampling runs the unpadded attention; jax.grad runs the padded one (cuDNN's backward
    # needs even lengths). Checked through the XLA path: same values and gradients, and the
    # pad shows up only where a VJP is traced.
    from unclip_jax.models.attention import _even_lengths_for_backward

    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    bias = jnp.broadcast_to(mask_to_bias(mask), (2, 1, 5, 5))
    for causal in (False, True):
        attend = lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal)
        wrapped = _even_lengths_for_backward(attend)
        np.testing.assert_array_equal(wrapped(q, k, v, bias), attend(q, k, v, bias))
        loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, bias)))
        g_plain = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
        g_wrapped = jax.grad(loss(wrapped), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g_wrapped, g_plain):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert "pad" not in primitive_counts(jax.make_jaxpr(wrapped)(q, k, v, bias).jaxpr)
        assert "pad" in primitive_counts(jax.make_jaxpr(jax.grad(loss(wrapped)))(q, k, v).jaxpr)
        # as the prior trains it: inside a remat'd block with the 'dots' policy
        remat = jax.checkpoint(wrapped, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        for a, b in zip(jax.grad(loss(remat), argnums=(0, 1, 2))(q, k, v), g_plain):
            np.testing.assert_allclose(a, b, atol=1e-5)
