"""Training losses: MSE targets, min-SNR weights, and improved DDPM's hybrid loss (L_simple + λ·L_vlb)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.losses import (diffusion_loss, discretized_gaussian_log_likelihood, min_snr_weight,
                                         normal_kl, vlb_terms_bpd)
from unclip_jax.diffusion.schedule import Schedule, make_betas


@pytest.fixture(scope="module")
def sched():
    return Schedule.create("cosine")


def quantized_images(rng, shape):
    """8-bit images mapped to [−1, 1] (on the bin centres the discretised likelihood expects)."""
    return (rng.integers(0, 256, shape) / 127.5 - 1.0).astype(np.float32)


# ---------------------------------------------------------------- a numpy reference of improved-diffusion


def _np_cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def numpy_hybrid_loss(x0, t, noise, eps_pred, v):
    """improved-diffusion's RESCALED_MSE loss for ε-prediction + learned range, in float64."""
    b = make_betas("cosine", 1000)
    ac = np.cumprod(1 - b)
    acp = np.append(1.0, ac[:-1])
    post_var = b * (1 - acp) / (1 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    c1, c2 = b * np.sqrt(acp) / (1 - ac), (1 - acp) * np.sqrt(1 - b) / (1 - ac)
    e = lambda a: a[t][:, None, None, None]  # noqa: E731

    x_t = np.sqrt(e(ac)) * x0 + np.sqrt(1 - e(ac)) * noise
    mse = ((noise - eps_pred) ** 2).mean(axis=(1, 2, 3))
    true_mean = e(c1) * x0 + e(c2) * x_t
    true_logvar = e(post_logvar)
    x0_hat = (x_t - np.sqrt(1 - e(ac)) * eps_pred) / np.sqrt(e(ac))
    model_mean = e(c1) * x0_hat + e(c2) * x_t
    frac = (v + 1) / 2
    model_logvar = frac * np.log(e(b)) + (1 - frac) * e(post_logvar)
    kl = 0.5 * (-1 + model_logvar - true_logvar + np.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * np.exp(-model_logvar))
    kl = kl.mean(axis=(1, 2, 3)) / np.log(2)
    inv_std = np.exp(-0.5 * model_logvar)
    cdf_plus = _np_cdf(inv_std * (x0 - model_mean + 1 / 255))
    cdf_min = _np_cdf(inv_std * (x0 - model_mean - 1 / 255))
    logp = np.where(x0 < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                             np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
    nll = -logp.mean(axis=(1, 2, 3)) / np.log(2)
    vb = np.where(t == 0, nll, kl)
    return mse + vb, mse, vb


def test_hybrid_loss_matches_numpy_reference(sched):
    rng = np.random.default_rng(0)
    shape = (5, 4, 4, 3)
    x0 = quantized_images(rng, shape)
    t = np.array([0, 0, 1, 500, 999])
    noise = rng.standard_normal(shape).astype(np.float32)
    eps_pred = (noise + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    eps_pred[0] = noise[0] + 0.002 * rng.standard_normal(shape[1:])  # a good t = 0 prediction: small NLL
    v = np.tanh(rng.standard_normal(shape)).astype(np.float32)
    out = np.concatenate([eps_pred, v], -1)
    loss, aux = jax.jit(lambda x0, t, n: diffusion_loss(lambda x, tt: jnp.asarray(out), sched, x0, None,
                                                        variance_type="learned_range", t=t, noise=n))(x0, t, noise)
    ref_loss, ref_mse, ref_vb = numpy_hybrid_loss(x0.astype(np.float64), t, noise.astype(np.float64),
                                                  eps_pred.astype(np.float64), v.astype(np.float64))
    assert loss.shape == (5,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(aux["mse"], ref_mse, rtol=1e-5)
    np.testing.assert_allclose(aux["vb"], ref_vb, rtol=2e-4)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-4)
    assert np.all(np.isfinite(ref_vb)) and np.all(ref_vb > 1e-5)  # non-trivial values in both branches
    # vlb_weight scales the VLB term only; fixed variances give the plain MSE.
    half, _ = diffusion_loss(lambda x, tt: jnp.asarray(out), sched, x0, None, variance_type="learned_range",
                             vlb_weight=0.5, t=t, noise=noise)
    np.testing.assert_allclose(half, ref_mse + 0.5 * ref_vb, rtol=2e-4)
    plain, aux = diffusion_loss(lambda x, tt: jnp.asarray(eps_pred), sched, x0, None, variance_type="fixed_small",
                                t=t, noise=noise)
    np.testing.assert_allclose(plain, ref_mse, rtol=1e-5)
    assert np.all(np.asarray(aux["vb"]) == 0)


def test_vlb_term_trains_only_the_variance(sched):
    """The VLB term sees stop_gradient(ε̂): its gradient reaches v's parameters, never the mean's."""
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(quantized_images(rng, (4, 4, 4, 3)))
    t = jnp.array([0, 3, 400, 900])
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)

    def model(params, x, tt):
        return jnp.concatenate([params["a"] * x, jnp.tanh(params["b"] * x)], -1)

    params = {"a": jnp.float32(0.7), "b": jnp.float32(0.3)}

    def parts(p):
        loss, aux = diffusion_loss(lambda x, tt: model(p, x, tt), sched, x0, None, variance_type="learned_range",
                                   t=t, noise=noise)
        return jnp.stack([loss.mean(), aux["mse"].mean(), aux["vb"].mean()])

    jac = jax.jit(jax.jacrev(parts))(params)  # d(loss, mse, vb)/d(a, b)
    g_loss, g_mse, g_vb = ({k: jac[k][i] for k in jac} for i in range(3))
    assert float(g_vb["a"]) == 0.0 and abs(float(g_vb["b"])) > 1e-4
    assert float(g_mse["b"]) == 0.0 and abs(float(g_mse["a"])) > 1e-4
    np.testing.assert_allclose(g_loss["a"], g_mse["a"], rtol=1e-6)
    np.testing.assert_allclose(g_loss["b"], g_vb["b"], rtol=1e-6)

    # Teeth: without the stop-gradient the VLB would pull on the mean too.
    def raw_vb(p):
        x_t = g.q_sample(sched, x0, t, noise)
        out = model(p, x_t, t)
        return vlb_terms_bpd(sched, out[..., :3], out[..., 3:], x0, x_t, t, prediction_type="epsilon").mean()

    assert abs(float(jax.jit(jax.grad(raw_vb))(params)["a"])) > 1e-4


@pytest.mark.parametrize("pt", ["epsilon", "sample", "v_prediction"])
def test_mse_targets_and_min_snr(pt, sched):
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    t = jnp.array([5, 300, 800])
    target = {"epsilon": noise, "sample": x0, "v_prediction": g.v_from_x0_eps(sched, x0, t, noise)}[pt]
    exact, aux = diffusion_loss(lambda x, tt: target, sched, x0, None, prediction_type=pt, t=t, noise=noise)
    np.testing.assert_allclose(exact, 0.0, atol=1e-12)
    zero, aux = diffusion_loss(lambda x, tt: jnp.zeros_like(x), sched, x0, None, prediction_type=pt, t=t,
                               noise=noise, min_snr_gamma=5.0)
    ab = np.asarray(sched.alphas_cumprod)[np.asarray(t)].astype(np.float64)
    snr = ab / (1 - ab)
    weight = {"epsilon": np.minimum(snr, 5) / snr, "sample": np.minimum(snr, 5),
              "v_prediction": np.minimum(snr, 5) / (snr + 1)}[pt]
    np.testing.assert_allclose(aux["weight"], weight, rtol=1e-5)
    np.testing.assert_allclose(aux["mse"], np.mean(np.asarray(target) ** 2, axis=1), rtol=1e-5)
    np.testing.assert_allclose(zero, weight * np.asarray(aux["mse"]), rtol=1e-5)
    np.testing.assert_allclose(min_snr_weight(sched, t, 5.0, pt), weight, rtol=1e-5)


def test_loss_samples_t_and_noise_from_key(sched):
    x0 = jnp.zeros((64, 2))
    loss, aux = jax.jit(lambda k: diffusion_loss(lambda x, t: jnp.zeros_like(x), sched, x0, k))(jax.random.key(0))
    t = np.asarray(aux["t"])
    assert t.min() >= 0 and t.max() < 1000 and len(set(t.tolist())) > 50
    np.testing.assert_allclose(float(loss.mean()), 1.0, atol=0.2)  # E[ε²] = 1
    with pytest.raises(ValueError, match="PRNG key"):
        diffusion_loss(lambda x, t: x, sched, x0, None)
    with pytest.raises(ValueError, match="2\\*C"):
        diffusion_loss(lambda x, t: x, sched, x0, jax.random.key(0), variance_type="learned_range")


def test_normal_kl_and_discretized_likelihood():
    # KL between 1-D Gaussians: log(σ2/σ1) + (σ1² + (μ1−μ2)²)/(2σ2²) − ½.
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    expected = 0.5 * math.log(2.0 / 0.5) + (0.5 + 0.25) / 4.0 - 0.5
    assert float(normal_kl(m1, lv1, m2, lv2)) == pytest.approx(expected, rel=1e-6)
    assert float(normal_kl(m1, lv1, m1, lv1)) == pytest.approx(0.0, abs=1e-7)
    # The 256 bin probabilities of any Gaussian sum to one (edge bins extend to ±∞).
    centres = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    for mean, log_scale in ((0.1, math.log(0.05)), (-0.9, math.log(0.3)), (0.0, math.log(0.001))):
        logp = discretized_gaussian_log_likelihood(centres, means=mean, log_scales=log_scale)
        assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=2e-3)
    # A sharp Gaussian on a bin centre puts (almost) all mass in that bin.
    logp = discretized_gaussian_log_likelihood(centres[100], means=centres[100], log_scales=math.log(1e-4))
    assert float(logp) == pytest.approx(0.0, abs=1e-6)
