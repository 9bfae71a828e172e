import functools
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
    # cuDNN attention runs odd lengths padded to even ones (its backward pass needs them);
    # the padded problem must give the same outputs and gradients, also inside a remat'd
    # block with the prior's 'dots' policy (checked here through the XLA path).
    from unclip_jax.models.attention import _attend_at_even_lengths, _pad_lengths_to_even

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    bias = jnp.broadcast_to(mask_to_bias(mask), (2, 1, 5, 5))
    qp, kp, vp, bp = _pad_lengths_to_even(q, k, v, bias)
    assert qp.shape[1] == kp.shape[1] == vp.shape[1] == 6 and bp.shape[2:] == (6, 6)

    for causal in (False, True):
        attend = functools.partial(jax.nn.dot_product_attention, is_causal=causal)
        plain = lambda q, k, v: attend(q, k, v, bias=bias)
        padded = lambda q, k, v: _attend_at_even_lengths(attend, q, k, v, bias)
        assert "pad" in primitive_counts(jax.make_jaxpr(padded)(q, k, v).jaxpr)
        np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), atol=1e-6)
        loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
        g_plain = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
        remat = jax.checkpoint(padded, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        for f in (padded, remat):
            for a, b in zip(jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v), g_plain):
                np.testing.assert_allclose(a, b, atol=1e-5)


def test_long_attention_on_cpu_runs_in_query_blocks_with_the_same_result():
    # On CPU the XLA path attends 64 queries at a time (cache-friendly); 200 queries pad the
    # last block. Outputs and gradients equal one call over all queries.
    from unclip_jax.models.attention import CPU_QUERY_CHUNK
    assert jax.default_backend() == "cpu" and 200 % CPU_QUERY_CHUNK
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 200, 3, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 230, 3, 8)), jnp.float32) for _ in range(2))
    mask = jnp.arange(230)[None, :] < jnp.asarray([230, 17])[:, None]
    ours = lambda q, k, v: dot_product_attention(q, k, v, key_mask=mask)
    whole = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=mask_to_bias(mask))
    assert "scan" in primitive_counts(jax.make_jaxpr(ours)(q, k, v).jaxpr)
    np.testing.assert_allclose(ours(q, k, v), whole(q, k, v), atol=1e-6)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    for a, b in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(whole), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)
