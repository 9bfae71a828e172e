"""Learning test: an MLP ε-model trained with `diffusion_loss` on a 2-D Gaussian mixture, sampled
with `ddpm_sample` and `ddim_sample`, reproduces the mixture's weights, means and covariances.

Samples are assigned to the most likely true component. Tolerances (stated once, used for
every sampler): mixture weight ±0.06, mean ±0.1 per coordinate, covariance relative
Frobenius error ≤ 0.3. Measured for the correct samplers (4000 samples): weights ≤ 0.03,
means ≤ 0.065, covariances ≤ 0.17. Deliberately broken samplers must fail the same
tolerances: noise with 1.5× the right σ (covariances ≈ 0.8 off) and a respaced chain that
steps with the unit-step posterior t → t − 1 instead of t → t_prev (everything off).
Training: 3000 Adam steps of batch 256 in one jitted scan (~6–12 s on 2 busy cores).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.diffusion.losses import diffusion_loss
from unclip_jax.diffusion.samplers import ddim_sample, ddpm_sample, ddpm_step
from unclip_jax.diffusion.schedule import Schedule, respace


def _cov(sx, sy, rho):
    return np.array([[sx * sx, rho * sx * sy], [rho * sx * sy, sy * sy]])


WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[-1.5, -0.6], [1.3, -0.8], [0.0, 1.4]])
COVS = np.stack([_cov(0.35, 0.25, 0.0), _cov(0.3, 0.3, 0.6), _cov(0.45, 0.2, -0.4)])
TOL_WEIGHT, TOL_MEAN, TOL_COV = 0.06, 0.1, 0.3
CLIP = 3.5  # x̂_0 clipping: without it ε̂ errors are amplified by 1/√ᾱ_999 ≈ 2e4 at the first step
NUM_SAMPLES = 4000


def sample_mixture(key, n):
    k_comp, k_z = jax.random.split(key)
    comp = jax.random.categorical(k_comp, jnp.log(jnp.asarray(WEIGHTS, jnp.float32)), shape=(n,))
    chol = jnp.asarray(np.linalg.cholesky(COVS), jnp.float32)
    z = jax.random.normal(k_z, (n, 2))
    return jnp.asarray(MEANS, jnp.float32)[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)


class Denoiser(nn.Module):
    """ε̂(x_t, t): an MLP on [x_t, sin/cos features of t]."""

    width: int = 96

    @nn.compact
    def __call__(self, x, t):
        freqs = jnp.exp(jnp.linspace(0.0, np.log(200.0), 16))
        angles = t[:, None].astype(jnp.float32) / 1000.0 * freqs
        h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], -1)
        for _ in range(3):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(2)(h)


def mixture_report(samples):
    """Per true component: (weight error, max |mean error|, relative Frobenius covariance error)."""
    x = np.asarray(samples, np.float64)
    assert np.all(np.isfinite(x))
    log_lik = np.stack([
        np.log(WEIGHTS[k]) - 0.5 * np.einsum("ni,ij,nj->n", x - MEANS[k], np.linalg.inv(COVS[k]), x - MEANS[k])
        - 0.5 * np.log(np.linalg.det(COVS[k])) for k in range(3)], 1)
    assign = log_lik.argmax(1)
    report = []
    for k in range(3):
        xs = x[assign == k]
        if len(xs) < 10:
            report.append((1.0, np.inf, np.inf))
            continue
        report.append((abs(len(xs) / len(x) - WEIGHTS[k]), np.abs(xs.mean(0) - MEANS[k]).max(),
                       np.linalg.norm(np.cov(xs.T) - COVS[k]) / np.linalg.norm(COVS[k])))
    return report


def within_tolerance(report):
    return all(w <= TOL_WEIGHT and m <= TOL_MEAN and c <= TOL_COV for w, m, c in report)


@pytest.fixture(scope="module")
def trained():
    schedule = Schedule.create("cosine")
    model = Denoiser()
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))
    steps = 3000
    opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps, 0.05))

    @jax.jit
    def train(params, key):
        def step(carry, i):
            p, s = carry
            k_data, k_loss = jax.random.split(jax.random.fold_in(key, i))
            x0 = sample_mixture(k_data, 256)
            def loss_fn(p):
                return diffusion_loss(lambda x, t: model.apply(p, x, t), schedule, x0, k_loss)[0].mean()

            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
        return params, losses

    params, losses = train(params, jax.random.key(1))
    assert float(losses[-300:].mean()) < 0.8 * float(losses[:100].mean())
    return schedule, (lambda x, t: model.apply(params, x, t))


def test_truth_passes_its_own_tolerances():
    samples = jax.jit(sample_mixture, static_argnums=1)(jax.random.key(3), NUM_SAMPLES)
    assert within_tolerance(mixture_report(samples))


def test_ddpm_and_ddim_reproduce_the_mixture(trained):
    schedule, model_fn = trained
    ts = respace(50)
    x_T = jax.random.normal(jax.random.key(5), (NUM_SAMPLES, 2))
    ddpm = jax.jit(lambda x, k: ddpm_sample(model_fn, x, ts, schedule, k, prediction_type="epsilon",
                                            variance_type="fixed_small", clip_range=CLIP))(x_T, jax.random.key(9))
    ddim = jax.jit(lambda x: ddim_sample(model_fn, x, ts, schedule, prediction_type="epsilon", clip_range=CLIP))(x_T)
    for name, samples in (("ddpm", ddpm), ("ddim", ddim)):
        report = mixture_report(samples)
        print(name, np.round(report, 3).tolist())
        assert within_tolerance(report), f"{name}: (weight, mean, cov) errors per component {report}"


def test_broken_samplers_fail_the_same_tolerances(trained):
    """The tolerances have teeth: plausible sampler bugs are caught."""
    schedule, model_fn = trained
    ts = respace(50)
    x_T = jax.random.normal(jax.random.key(5), (NUM_SAMPLES, 2))
    key = jax.random.key(9)

    # Wrong variance: σ 1.5× too large.
    noise = 1.5 * jax.random.normal(key, (len(ts), NUM_SAMPLES, 2))
    loud = jax.jit(lambda x: ddpm_sample(model_fn, x, ts, schedule, noise=noise, prediction_type="epsilon",
                                         variance_type="fixed_small", clip_range=CLIP))(x_T)
    report = mixture_report(loud)
    print("1.5x sigma", np.round(report, 3).tolist())
    assert not within_tolerance(report), report
    assert max(c for _, _, c in report) > 2 * TOL_COV

    # Off-by-one prev timestep: each respaced step uses the posterior of t → t − 1.
    def unit_prev_chain(x):
        def body(x, inputs):
            i, t = inputs
            out = model_fn(x, jnp.full((x.shape[0],), t))
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
            return ddpm_step(schedule, out, t, t - 1, x, z, prediction_type="epsilon", variance_type="fixed_small",
                             clip_range=CLIP), None
        return jax.lax.scan(body, x, (jnp.arange(len(ts)), jnp.asarray(ts)))[0]

    report = mixture_report(jax.jit(unit_prev_chain)(x_T))
    print("unit-step prev", np.round(report, 3).tolist())
    assert not within_tolerance(report), report
