import numpy as np
import jax.numpy as jnp

from unclip_jax.latent_math import slerp, text_diff


def test_slerp_endpoints_and_whole_vector_angle():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4, 16)).astype(np.float32)
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-5)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-5)
    # Unit vectors stay on the sphere and the angle is split evenly (whole-vector arccos).
    ua, ub = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    mid = np.asarray(slerp(ua, ub, 0.5))
    np.testing.assert_allclose(np.linalg.norm(mid, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.sum(mid * ua, -1), np.sum(mid * ub, -1), atol=1e-5)
    # An element-wise arccos would not give this: check against the closed form for one pair.
    omega = np.arccos(np.sum(ua[0] * ub[0]))
    expected = (np.sin(0.3 * omega) * ua[0] + np.sin(0.7 * omega) * ub[0]) / np.sin(omega)
    np.testing.assert_allclose(np.asarray(slerp(ua[0], ub[0], 0.7)), expected, atol=1e-5)


def test_slerp_parallel_falls_back_to_linear():
    a = jnp.ones((3,))
    np.testing.assert_allclose(slerp(a, 2 * a, 0.5), 1.5 * np.ones(3), atol=1e-5)


def test_text_diff_keeps_norm_and_moves_towards_text():
    rng = np.random.default_rng(1)
    zi, zt, zt0 = rng.standard_normal((3, 2, 8)).astype(np.float32)
    out0 = np.asarray(text_diff(zi, zt, zt0, 0.0))
    np.testing.assert_allclose(out0, zi, atol=1e-5)
    out = np.asarray(text_diff(zi, zt, zt0, 0.4))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(zi, axis=-1), rtol=1e-4)
    d = (zt - zt0) / np.linalg.norm(zt - zt0, axis=-1, keepdims=True)
    assert np.all(np.sum(out * d, -1) > np.sum(zi * d, -1))
