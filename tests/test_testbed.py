"""The Gaussian-mixture testbed against independent oracles: Monte Carlo, autograd, an ODE solver, exact draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import guidekit
from guidekit.bridge.testbed import MixtureDenoiser, MixturePipeline
from guidekit.evaluation import frechet_distance, gaussian_statistics
from guidekit.testbed import GaussianCFGOracle, GaussianMixture
from guidekit.testbed.mixture import UNCONDITIONAL


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(3, 2, 2, generator=torch.Generator().manual_seed(0))


def test_single_gaussian_denoiser_is_the_linear_posterior_mean() -> None:
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    g = GaussianMixture(torch.tensor([[1.0, -2.0]]), cov[None], torch.ones(1), torch.zeros(1, dtype=torch.long))
    x = torch.randn(7, 2, dtype=torch.float64)
    sigma = 0.8
    gain = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(2, dtype=torch.float64))
    expected = g.means + (gain @ (x - g.means).T).T
    torch.testing.assert_close(g.denoise(x, sigma, 0), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.denoise(x, math.inf, 0), g.means.expand(7, 2), rtol=0, atol=0)


@pytest.mark.parametrize("classes", [1, None])
def test_denoiser_equals_a_monte_carlo_posterior_mean(mixture: GaussianMixture, classes: int | None) -> None:
    """E[x0 | x] estimated by self-normalised importance weighting of exact data draws."""
    gen = torch.Generator().manual_seed(3)
    sigma = 0.7
    x0 = mixture.sample(400_000, classes, generator=gen)
    queries = mixture.sample(4, classes, generator=gen) + sigma * torch.randn(4, 2, generator=gen, dtype=torch.float64)
    for q in queries:
        logw = -((x0 - q) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        estimate = (w[:, None] * x0).sum(0)
        stderr = torch.sqrt((w[:, None] ** 2 * (x0 - estimate) ** 2).sum(0))
        exact = mixture.denoise(q[None], sigma, None if classes is None else torch.tensor([classes]))[0]
        assert torch.all((exact - estimate).abs() < 5 * stderr + 1e-3), (exact, estimate, stderr)


def test_score_is_the_gradient_of_the_log_density(mixture: GaussianMixture) -> None:
    """Tweedie: (D - x) / sigma^2 equals autograd's gradient of log p_sigma."""
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    for classes in (torch.tensor([0, 1, 2, 0, 1]), None):
        (grad,) = torch.autograd.grad(mixture.log_prob(x, 0.9, classes).sum(), x)
        torch.testing.assert_close(mixture.score(x.detach(), 0.9, classes), grad, rtol=1e-10, atol=1e-10)


def test_exact_draws_have_the_exact_moments(mixture: GaussianMixture) -> None:
    draws = mixture.sample(200_000, 2, generator=torch.Generator().manual_seed(5))
    mean, cov = mixture.moments(2)
    torch.testing.assert_close(draws.mean(0), mean, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(draws.T), cov, rtol=0, atol=0.03)


def test_unconditional_components_define_p_x_on_their_own() -> None:
    g = GaussianMixture.isotropic([[1.0], [0.0]], [0.5, 1.0], [0, UNCONDITIONAL])
    x = torch.tensor([[0.3]], dtype=torch.float64)
    torch.testing.assert_close(g.denoise(x, 2.0), torch.tensor([[0.3 / 5]], dtype=torch.float64))
    torch.testing.assert_close(g.denoise(x, 2.0, 0), torch.tensor([[1 + 0.25 / 4.25 * (0.3 - 1)]],
                                                                   dtype=torch.float64))


def test_bad_mixture_and_class_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="weights="):
        GaussianMixture.isotropic([[0.0]], [1.0], [0], weights=[-1.0])
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture(torch.zeros(1, 1), -torch.ones(1, 1, 1), torch.ones(1), torch.zeros(1, dtype=torch.long))
    g = GaussianMixture.isotropic([[0.0]], [1.0], [0])
    with pytest.raises(ValueError, match="classes="):
        g.denoise(torch.zeros(1, 1), 1.0, torch.tensor([3]))


# --- closed forms for CFG on 1-D Gaussians -------------------------------------------------------------------------

def test_oracle_reproduces_the_worked_example() -> None:
    """REFERENCE's example, mc=1, sc=0.5, mu=0, su=1, w=3 (the ODE mean 1.4953 is at S = 80; 1.5 in the limit)."""
    o = GaussianCFGOracle(1.0, 0.5, 0.0, 1.0, 3.0)
    assert o.target() == pytest.approx((1.2, 0.1))
    assert o.ode(80.0) == pytest.approx((1.4953, 0.015625), abs=1e-4)
    assert o.ode() == pytest.approx((1.5, 0.015625), abs=1e-9)
    assert o.sde() == pytest.approx((1.3125, 0.0666), abs=1e-4)
    assert GaussianCFGOracle(1.0, 0.5, 0.0, 1.0, 1.0).sde() == pytest.approx((1.0, 0.25), abs=1e-9)


@pytest.mark.parametrize("params", [(1.0, 0.5, 0.0, 1.0, 3.0), (-0.5, 0.3, 0.4, 1.5, 2.0)])
def test_oracle_integrals_equal_an_ode_solver_on_the_moment_equations(params: tuple[float, ...]) -> None:
    """The mean/variance ODEs of the linear CFG dynamics, integrated by scipy from sigma = S to 0."""
    mc, sc, mu, su, w = params
    o = GaussianCFGOracle(*params)
    S, S0 = 14.6, 15.0

    def k(s: float) -> float:
        return w / (sc**2 + s**2) + (1 - w) / (su**2 + s**2)

    def j(s: float) -> float:
        return w * mc / (sc**2 + s**2) + (1 - w) * mu / (su**2 + s**2)

    # score = j - k x; ODE dx/ds = -s score; reverse SDE dx = -2 s score ds + sqrt(2 s) dW (s decreasing).
    def ode(s: float, y: np.ndarray) -> list[float]:
        return [-s * (j(s) - k(s) * y[0]), 2 * s * k(s) * y[1]]

    def sde(s: float, y: np.ndarray) -> list[float]:
        return [-2 * s * (j(s) - k(s) * y[0]), 4 * s * k(s) * y[1] - 2 * s]

    for oracle, rhs in ((o.ode, ode), (o.sde, sde)):
        sol = solve_ivp(rhs, (S, 0.0), [0.0, S0**2], rtol=1e-11, atol=1e-13, method="DOP853")
        assert oracle(S, S0) == pytest.approx(tuple(sol.y[:, -1]), rel=1e-7, abs=1e-10)
    # One trajectory from x = 2 at S down to sigma = 0.03: the affine map of the ODE.
    a, b = o.ode_map(S, 0.03)
    sol = solve_ivp(lambda s, y: [-s * (j(s) - k(s) * y[0])], (S, 0.03), [2.0], rtol=1e-11, atol=1e-13,
                    method="DOP853")
    assert a * 2.0 + b == pytest.approx(sol.y[0, -1], rel=1e-8)


# --- the diffusers pipeline ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(mixture: GaussianMixture) -> MixturePipeline:
    p = MixturePipeline.from_mixture(mixture)
    p.set_progress_bar_config(disable=True)
    return p


def test_unguided_ddim_at_500_steps_matches_the_mixture(pipe: MixturePipeline, mixture: GaussianMixture) -> None:
    """Frechet distance on 20k samples: no larger than between two exact draws, plus 1e-3.

    Sampling starts from the exact noisy marginal at the first timestep (``noisy_latents``); from N(0, 1) the VP
    schedule's prior mismatch alone gives a distance of about 0.04 on this mixture.
    """
    gen = torch.Generator().manual_seed(1)
    n = 20_000
    latents = pipe.noisy_latents([1] * n, 999, generator=gen)
    samples = pipe([1] * n, num_inference_steps=500, generator=gen, latents=latents).samples
    a, b = mixture.sample(n, 1, generator=gen), mixture.sample(n, 1, generator=gen)
    fd_samples = frechet_distance(*gaussian_statistics(samples), *gaussian_statistics(a))
    fd_exact = frechet_distance(*gaussian_statistics(b), *gaussian_statistics(a))
    assert fd_samples <= fd_exact + 1e-3, (fd_samples, fd_exact)


def test_guided_testbed_equals_its_native_cfg(pipe: MixturePipeline) -> None:
    labels = [0, 1, 2, 3]  # 3 = null class: unconditional samples
    native = pipe(labels, num_inference_steps=6, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    pipe.set_guidance(guidekit.CFG(3.0))
    try:
        guided = pipe(labels, num_inference_steps=6, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        assert pipe.guidance_stats.uncond_rows == 24
    finally:
        pipe.set_guidance(None)
    assert torch.equal(native.samples, guided.samples)


def test_flow_model_velocity_is_eps_minus_x0(mixture: GaussianMixture) -> None:
    model = MixtureDenoiser.from_mixture(mixture, parameterization="flow")
    x0 = mixture.sample(6, 0, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = 0.4
    x_t = (1 - t) * x0 + t * eps
    v = model(x_t, torch.tensor(t * 1000), class_labels=torch.zeros(6, dtype=torch.long)).sample
    d = mixture.denoise(x_t / (1 - t), t / (1 - t), 0)
    torch.testing.assert_close(v, (x_t - (1 - t) * d) / t - d, rtol=1e-12, atol=1e-12)


def test_vp_model_maps_integer_timesteps_to_the_training_table(mixture: GaussianMixture) -> None:
    model = MixtureDenoiser.from_mixture(mixture)
    abar = float(MixturePipeline.from_mixture(mixture).scheduler.alphas_cumprod[417])
    assert model.level(417.0).alpha == pytest.approx(math.sqrt(abar), rel=1e-12)


def test_pipeline_rejects_bad_arguments(pipe: MixturePipeline) -> None:
    with pytest.raises(ValueError, match="class_labels="):
        pipe([7], num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        pipe([0], num_inference_steps=0)
    with pytest.raises(ValueError, match="parameterization="):
        MixtureDenoiser([[0.0]], [[[1.0]]], [1.0], [0], parameterization="x0")
