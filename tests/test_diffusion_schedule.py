"""Schedules, respacing and the Gaussian-diffusion identities (unclip_jax.diffusion.schedule/gaussian)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.schedule import Schedule, make_betas, respace


# ---------------------------------------------------------------- schedules vs diffusers


def test_cosine_tables_equal_diffusers_bit_for_bit():
    from diffusers import DDPMScheduler, UnCLIPScheduler

    ours = Schedule.create("cosine")
    for ref in (UnCLIPScheduler(), DDPMScheduler(beta_schedule="squaredcos_cap_v2")):
        np.testing.assert_array_equal(np.asarray(ours.betas), ref.betas.numpy())
        np.testing.assert_array_equal(np.asarray(ours.alphas), ref.alphas.numpy())
        np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
    assert Schedule.create("squaredcos_cap_v2").alphas_cumprod.dtype == jnp.float32


def test_linear_tables_match_diffusers():
    from diffusers import DDPMScheduler

    ours, ref = Schedule.create("linear"), DDPMScheduler(beta_schedule="linear")
    # improved-diffusion builds the linspace in float64, diffusers in float32: ulp-level differences.
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=2e-7)


def test_make_betas_formulas():
    T = 50
    cos = make_betas("cosine", T)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos.dtype == np.float64 and cos.shape == (T,)
    assert cos[0] == pytest.approx(1 - f(1 / T) / f(0), rel=1e-12)
    assert cos[-1] == 0.999  # capped
    lin = make_betas("linear", 100)
    assert lin[0] == pytest.approx(1e-3) and lin[-1] == pytest.approx(0.2)  # scale = 1000/T = 10
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic")


def test_posterior_tables_are_float64_accurate():
    s = Schedule.create("cosine")
    b = make_betas("cosine")
    ac = np.cumprod(1 - b)
    acp = np.append(1.0, ac[:-1])
    var = b * (1 - acp) / (1 - ac)
    np.testing.assert_allclose(np.asarray(s.posterior_variance), var, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.posterior_log_variance_clipped)[0], np.log(var[1]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.posterior_mean_coef1), b * np.sqrt(acp) / (1 - ac), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.posterior_mean_coef2), (1 - acp) * np.sqrt(1 - b) / (1 - ac),
                               rtol=1e-6, atol=1e-12)
    assert float(s.posterior_mean_coef1[0]) == pytest.approx(1.0, abs=1e-7)


def test_schedule_is_a_pytree_with_float32_tables_inside_jit():
    s = Schedule.create("cosine", 100)
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 9 and all(leaf.dtype == jnp.float32 and leaf.shape == (100,) for leaf in leaves)

    @jax.jit
    def f(sched, x0, t, noise):
        assert sched.alphas_cumprod.dtype == jnp.float32 and sched.num_timesteps == 100
        return g.q_sample(sched, x0, t, noise)

    x0 = jnp.ones((2, 3, 3, 4))
    noise = jnp.zeros_like(x0)
    out = f(s, x0, jnp.array([0, 99]), noise)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out[:, 0, 0, 0], np.sqrt(np.asarray(s.alphas_cumprod)[[0, 99]]), rtol=1e-6)


# ---------------------------------------------------------------- respacing


def test_respace_linspace_matches_unclip_scheduler_and_paper_values():
    from diffusers import UnCLIPScheduler

    assert respace(7).tolist() == [999, 832, 666, 500, 333, 166, 0]
    r25 = respace("25")
    assert r25[:3].tolist() == [999, 957, 916] and r25[-3:].tolist() == [83, 42, 0] and len(r25) == 25
    ref = UnCLIPScheduler()
    for n in (7, 25, 50):
        ref.set_timesteps(n)
        assert respace(n).tolist() == ref.timesteps.tolist()
        assert respace(str(n)).dtype == np.int32
    assert respace(1).tolist() == [999]


def test_respace_ddim_matches_ddim_scheduler():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(timestep_spacing="leading", steps_offset=0)
    for n in (10, 50):
        ref.set_timesteps(n)
        assert respace(f"ddim{n}").tolist() == ref.timesteps.tolist()
    with pytest.raises(ValueError, match="integer stride"):
        respace("ddim999")


def test_respace_sections_and_fast27():
    # Hand-derived: sections of 200 steps; 10 → stride 199/9, 3 → stride 99.5, 2 → both ends.
    first = [0, 22, 44, 66, 88, 111, 133, 155, 177, 199]
    expected = set(first) | {200 + s for s in first} | {400, 500, 599} | {600, 799} | {800, 997}
    r = respace("fast27")
    assert len(r) == 27 and r.tolist() == sorted(expected, reverse=True)
    assert respace("10,10,3,2,2").tolist() == sorted((expected - {997}) | {999}, reverse=True)
    r = respace("10,15,20", 300)  # improved-diffusion's docstring example
    assert len(r) == 45 and r.min() == 0 and r.max() == 299
    assert np.sum(r < 100) == 10 and np.sum((r >= 100) & (r < 200)) == 15
    # Karlo's accumulating single section differs from diffusers' linspace for some n.
    assert respace("21,").tolist() != respace(21).tolist()


def test_respace_explicit_list_and_errors():
    assert respace([0, 500, 999, 500]).tolist() == [999, 500, 0]
    with pytest.raises(ValueError):
        respace([1000])
    with pytest.raises(ValueError):
        respace(0)
    with pytest.raises(ValueError):
        respace("bogus")
    with pytest.raises(ValueError):
        respace("600,600", 1000)  # more steps than a section holds


# ---------------------------------------------------------------- identities


@pytest.fixture(scope="module")
def sched():
    return Schedule.create("cosine")


def test_v_prediction_round_trips(sched):
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 5, 5, 3)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((4, 5, 5, 3)), jnp.float32)
    for t in (jnp.array([0, 10, 500, 999]), jnp.int32(300)):
        x_t = g.q_sample(sched, x0, t, eps)
        v = g.v_from_x0_eps(sched, x0, t, eps)
        np.testing.assert_allclose(g.x0_from_v(sched, x_t, t, v), x0, atol=2e-6)
        np.testing.assert_allclose(g.eps_from_v(sched, x_t, t, v), eps, atol=2e-6)
        for pt, pred in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
            x0_hat, eps_hat = g.predict_x0_eps(sched, pred, x_t, t, pt)
            np.testing.assert_allclose(x0_hat, x0, atol=2e-3)  # ε → x0 amplifies by 1/√ᾱ at t = 999
            np.testing.assert_allclose(eps_hat, eps, atol=2e-3)
    # v is the velocity of x_t along the circle (√ᾱ, √(1−ᾱ)): x_t² + v² norms are conserved.
    t = jnp.array([100, 200, 700, 900])
    x_t, v = g.q_sample(sched, x0, t, eps), g.v_from_x0_eps(sched, x0, t, eps)
    np.testing.assert_allclose(x_t ** 2 + v ** 2, x0 ** 2 + eps ** 2, rtol=1e-5, atol=1e-5)


def test_q_posterior_against_numpy_and_bayes(sched):
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 4)).astype(np.float32)
    x_t = rng.standard_normal((3, 4)).astype(np.float32)
    ac = np.asarray(sched.alphas_cumprod, np.float64)
    t, tp = np.array([999, 400, 42]), np.array([957, 100, 0])
    ab_t, ab_p = ac[t][:, None], ac[tp][:, None]
    beta = 1 - ab_t / ab_p
    # Bayes: q(x_p|x_0) = N(√ᾱ_p x0, 1−ᾱ_p), q(x_t|x_p) = N(√(ᾱ_t/ᾱ_p) x_p, β).
    prec = 1 / (1 - ab_p) + (ab_t / ab_p) / beta
    bayes_mean = (np.sqrt(ab_p) * x0 / (1 - ab_p) + np.sqrt(ab_t / ab_p) * x_t / beta) / prec
    mean, var, _ = g.q_posterior_mean_variance(sched, x0, x_t, t, tp, beta_rule="ddpm")
    np.testing.assert_allclose(mean, bayes_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var)[:, 0], 1 / prec[:, 0], rtol=1e-5)
    # UnCLIPScheduler's α = 1 − β loses float32 precision where α ≈ 2e-6 (999 → 957).
    mean, var, _ = g.q_posterior_mean_variance(sched, x0, x_t, t, tp)
    np.testing.assert_allclose(mean, bayes_mean, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(mean[1:], bayes_mean[1:], rtol=1e-5, atol=1e-6)
    # Final step to the clean data: μ̃ = x̂_0, β̃ = 0.
    mean0, var0, logvar0 = g.q_posterior_mean_variance(sched, x0, x_t, jnp.zeros(3, jnp.int32), -jnp.ones(3, jnp.int32))
    np.testing.assert_allclose(mean0, x0, rtol=2e-3)  # float32 1 − ᾱ_0 (as diffusers)
    assert np.all(np.asarray(var0) == 0) and np.all(np.asarray(logvar0) == np.float32(np.log(1e-20)))
    # Unit steps: the table path (t_prev=None) and the float32 path agree away from t = 0.
    t = jnp.array([50, 300, 999])
    a = g.q_posterior_mean_variance(sched, x0, x_t, t)
    b = g.q_posterior_mean_variance(sched, x0, x_t, t, t - 1)
    for u, w in zip(a[:2], b[:2]):
        np.testing.assert_allclose(u, w, rtol=1e-3, atol=1e-5)


def test_variances(sched):
    t, tp = jnp.array([999, 500, 1]), jnp.array([957, 458, 0])
    small, log_small = g.p_variance(sched, t, tp, "fixed_small")
    large, _ = g.p_variance(sched, t, tp, "fixed_large")
    assert np.all(np.asarray(small) < np.asarray(large))
    v = jnp.stack([jnp.full((2,), -1.0), jnp.full((2,), 1.0), jnp.zeros(2)])
    var, log_var = g.p_variance(sched, t, tp, "learned_range", v)
    np.testing.assert_allclose(var[0], small[0], rtol=1e-5)  # v = −1 → β̃
    np.testing.assert_allclose(var[1], large[1], rtol=1e-5)  # v = +1 → β
    np.testing.assert_allclose(log_var[2], 0.5 * (log_small[2] + np.log(large[2])), rtol=1e-5)
    np.testing.assert_allclose(g.p_std(sched, t, tp, "fixed_small_log"), np.sqrt(small), rtol=1e-6)
    # clip_t0: the final step borrows β̃ of 1 → 0 instead of 0.
    c = g.posterior_variance(sched, jnp.array([0]), jnp.array([-1]), clip_t0=True)
    np.testing.assert_allclose(c, g.posterior_variance(sched, jnp.array([1]), jnp.array([0])), rtol=1e-6)
    with pytest.raises(ValueError, match="variance_type"):
        g.p_variance(sched, t, tp, "learned")
    with pytest.raises(ValueError, match="2\\*C"):
        g.split_model_output(jnp.zeros((1, 3)), 3, "learned_range")
