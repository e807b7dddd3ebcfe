"""The demo's Gaussian-mixture testbed tab (guidekit.app.testbed_view) against independent oracles: the closed forms
of Bradley & Nakkiran (section 4, Theorem 1), densities recomputed with scipy, and for autoguidance a pipeline whose
denoiser is the lerp of the two exact denoisers, written here, and the affine closed form of its ODE on Gaussians."""

from __future__ import annotations

import math
import re
import threading

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from scipy import integrate, special, stats

from guidekit.app import testbed_view
from guidekit.app.testbed_view import AUTOGUIDANCE, METHODS, PRESETS, plot_testbed, run_testbed, table
from guidekit.bridge.testbed import MixtureDenoiser, MixtureDenoiserOutput, MixturePipeline
from guidekit.testbed import GaussianCFGOracle, GaussianMixture

GAUSSIANS = (1.0, 0.5, 0.0, 1.0)  # REFERENCE's example: p(x | c) = N(1, 0.5^2), p(x) = N(0, 1)
# The "mixture" preset, written out: means, stds, labels, weights.
MIXTURE = ((-1.5, 1.2, 1.0, -4.0), (0.4, 0.4, 0.8, 0.6), (0, 0, 1, 1), (1.0, 1.0, 1.5, 0.5))


@pytest.fixture(scope="module")
def small() -> dict[str, object]:
    """Cheap runs of both presets (the densities do not depend on steps or samples)."""
    return {preset: run_testbed(preset, weight=3.0, steps=10, num_samples=2000, seed=0) for preset in PRESETS}


@pytest.mark.parametrize("weight", [1.0, 3.0, 12.5, 20.0])
def test_gaussian_powered_target_is_the_closed_form(weight: float) -> None:
    r = run_testbed("gaussian", weight=weight, steps=1, num_samples=100)
    mean, var = GaussianCFGOracle(*GAUSSIANS, weight).target()
    np.testing.assert_allclose(r.target, stats.norm.pdf(r.grid, mean, math.sqrt(var)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.conditional, stats.norm.pdf(r.grid, 1.0, 0.5), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.unconditional, stats.norm.pdf(r.grid, 0.0, 1.0), rtol=0, atol=1e-12)
    assert (r.target_mean, r.target_var) == pytest.approx((mean, var), abs=1e-6)
    if weight == 3.0:
        assert (mean, var) == pytest.approx((1.2, 0.1))  # REFERENCE's figures


def test_ddim_ends_at_the_ode_closed_form() -> None:
    """CFG-DDIM is deterministic and affine in the initial noise z here (every denoiser is affine), and the ODE's
    closed form is its end point for z ~ N(0, 1): x = m + sqrt(v) z. So the samples' moments must be
    m + sqrt(v) mean(z) and v var(z), with no sampling error, whatever the number of samples.

    Tolerances: at 1000 steps SD's schedule leaves a discretisation error of -0.15% on the mean and -2.3% on the
    variance (O(1/steps); -31% at 50 steps); 0.5% and 3.5% hold that and fail for anything else.
    """
    r = run_testbed("gaussian", weight=3.0, steps=1000, num_samples=100, seed=3)
    oracle = GaussianCFGOracle(*GAUSSIANS, 3.0)
    mean, var = oracle.ode(r.start_sigma, r.start_std)
    assert r.start_sigma == pytest.approx(14.6146, abs=1e-3) and r.start_std == pytest.approx(math.hypot(1, 14.6146),
                                                                                              abs=1e-3)
    ddim = r.methods["CFG + DDIM"]
    assert ddim.closed_form == pytest.approx((mean, var), rel=1e-12)
    z = r.latents
    assert ddim.mean == pytest.approx(mean + math.sqrt(var) * z.mean(), rel=0.005)
    assert ddim.var == pytest.approx(var * z.var(ddof=1), rel=0.035)
    assert ddim.model_calls == 1000 and ddim.evaluations_per_sample == 2000
    # Autoguidance + DDIM (weak stds x2) is as close to its own ODE: per latent, and in W1 to the exact ODE.
    ag = r.methods[AUTOGUIDANCE]
    exact = _autoguided_gaussian_end(z, r.start_sigma, r.start_std, 3.0, 2.0)
    assert ag.mean == pytest.approx(exact.mean(), rel=0.005) and ag.var == pytest.approx(exact.var(ddof=1), rel=0.035)
    assert ag.w1_to_ode < 0.002 and ag.model_calls == 2000 and ag.evaluations_per_sample == 2000


def test_ddpm_and_pcg_end_at_the_sde_closed_form() -> None:
    """CFG-DDPM (fixed_large variance) at w and PCG(gamma = 2w - 1, one corrector step) both end at the reverse SDE's
    closed form (Theorem 1), and far from the ODE's, which CFG-DDIM approaches.

    At 200 steps the discretisation errors are about +1.5% (DDPM) and -1% (PCG) on the variance and under 0.6% on the
    mean; 40000 samples add 0.7% (one std) on the variance and 0.1% on the mean. Tolerances: 6% and 1.5%. The
    ODE's variance is 76% below the SDE's, the target's 50% above.
    """
    w = 3.0
    r = run_testbed("gaussian", weight=w, steps=200, num_samples=40000, seed=1)
    oracle = GaussianCFGOracle(*GAUSSIANS, w)
    sde, ode = oracle.sde(r.start_sigma, r.start_std), oracle.ode(r.start_sigma, r.start_std)
    for name in ("CFG + DDPM", "PCG"):
        m = r.methods[name]
        assert m.closed_form == pytest.approx(sde, rel=1e-12)
        assert m.mean == pytest.approx(sde[0], rel=0.015), name
        assert m.var == pytest.approx(sde[1], rel=0.06), name
        assert m.var > 2 * ode[1] and m.var < 0.8 * oracle.target()[1]
    ddim = r.methods["CFG + DDIM"]
    assert ddim.var < 0.3 * sde[1]
    # Network work per trajectory: PCG's predictor is conditional-only, its corrector a batched CFG call;
    # autoguidance calls the model and the weak model once each per step.
    assert [r.methods[n].model_calls for n in METHODS] == [200, 200, 200 + 199, 2 * 200]
    assert [r.methods[n].evaluations_per_sample for n in METHODS] == [400, 400, 200 + 2 * 199, 2 * 200]
    # W1 ranks them: DDIM, furthest from the target; DDPM and PCG alike.
    assert ddim.w1 > 2 * max(r.methods["CFG + DDPM"].w1, r.methods["PCG"].w1)
    assert r.w1_floor < 0.01


def test_pcg_without_corrector_steps_is_conditional_ddim() -> None:
    r = run_testbed("gaussian", weight=4.0, corrector_steps=0, steps=20, num_samples=200)
    cond_ddim = run_testbed("gaussian", weight=1.0, steps=20, num_samples=200).methods["CFG + DDIM"]
    pcg = r.methods["PCG"]
    np.testing.assert_allclose(pcg.samples, cond_ddim.samples, rtol=0, atol=1e-6)  # DDIM's float32 alphas_cumprod
    assert pcg.closed_form == pytest.approx(GaussianCFGOracle(*GAUSSIANS, 1.0).ode(r.start_sigma, r.start_std))
    assert pcg.model_calls == 20 and pcg.evaluations_per_sample == 20 and cond_ddim.evaluations_per_sample == 20
    assert run_testbed("gaussian", corrector_steps=2, steps=5, num_samples=100).methods["PCG"].closed_form is None


def _log_density(x: np.ndarray | float, members: list[tuple[float, float, float, int]]) -> np.ndarray:
    """log of the mixture of ``(mean, std, weight, label)`` components at ``x``, with scipy."""
    x = np.atleast_1d(np.asarray(x, dtype=float))
    logw = np.log([pi for _, _, pi, _ in members]) - np.log(sum(pi for _, _, pi, _ in members))
    terms = [lw + stats.norm.logpdf(x, m, s) for lw, (m, s, _, _) in zip(logw, members, strict=True)]
    return special.logsumexp(terms, axis=0)


def _scipy_densities(weight: float, grid: np.ndarray, weak_factor: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Conditional density and the powered target of the "mixture" preset, recomputed with scipy (quadrature):
    ``p(x | c)^w p(x)^(1 - w)``, or with ``weak_factor`` autoguidance's ``p(x | c)^w q(x | c)^(1 - w)``, ``q`` the
    mixture with every std times ``weak_factor``."""
    means, stds, labels, weights = MIXTURE
    comps = list(zip(means, stds, weights, labels, strict=True))
    in_class = [c for c in comps if c[3] == 0]
    guide = comps if weak_factor is None else [(m, weak_factor * s, pi, k) for m, s, pi, k in in_class]

    def powered(x: np.ndarray | float) -> np.ndarray:
        return np.exp(weight * _log_density(x, in_class) + (1 - weight) * _log_density(x, guide))

    lo = min(m - 12 * s for m, s, _, _ in comps)
    hi = max(m + 12 * s for m, s, _, _ in comps)
    z, _ = integrate.quad(lambda x: powered(x)[0], lo, hi, points=list(means), limit=400, epsabs=1e-13)
    return np.exp(_log_density(grid, in_class)), powered(grid) / z


@pytest.mark.parametrize("weight", [1.0, 3.0, 8.0])
def test_mixture_target_is_normalised_bimodal_and_moves_mass(weight: float) -> None:
    r = run_testbed("mixture", weight=weight, steps=1, num_samples=100)
    cond, target = _scipy_densities(weight, r.grid)
    np.testing.assert_allclose(r.conditional, cond, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r.target, target, rtol=0, atol=1e-6)
    assert np.trapezoid(r.target, r.grid) == pytest.approx(1.0, abs=1e-9)
    peaks = np.flatnonzero((r.target[1:-1] > r.target[:-2]) & (r.target[1:-1] > r.target[2:]))
    assert len(peaks) == 2  # bimodal at every weight
    left_target = np.trapezoid(np.where(r.grid < 0, r.target, 0.0), r.grid)
    left_cond = np.trapezoid(np.where(r.grid < 0, cond, 0.0), r.grid)
    if weight == 1.0:
        np.testing.assert_allclose(r.target, r.conditional, rtol=0, atol=1e-8)
    else:  # the right mode is shared with the other class: guidance moves its mass to the left mode
        assert np.abs(r.target - r.conditional).max() > 0.2
        assert left_target > left_cond + 0.15


def _contraction(start_sigma: float, w: float, f: float) -> float:
    """``h(0) / h(S)`` of the autoguided probability-flow ODE on the "gaussian" preset.

    ``p(x | c) = N(1, sc^2)``, ``q(x | c) = N(1, f^2 sc^2)``, ``sc = 0.5``: ``x - D_w = s^2 k(s) (x - 1)`` with
    ``k(s) = w / (sc^2 + s^2) + (1 - w) / (f^2 sc^2 + s^2) = d log h / ds / s``, ``h(s) = (sc^2 + s^2)^(w/2)
    (f^2 sc^2 + s^2)^((1-w)/2)``, so ``dx/ds = (x - D_w) / s`` keeps ``(x - 1) / h(s)`` constant: from ``x_S`` at
    ``S``, ``x(0) = 1 + h(0) / h(S) (x_S - 1)``.
    """
    sc2 = 0.25

    def log_h(s: float) -> float:
        return w / 2 * math.log(sc2 + s * s) + (1 - w) / 2 * math.log(f * f * sc2 + s * s)

    return math.exp(log_h(0.0) - log_h(start_sigma))


def _autoguided_gaussian_end(z: np.ndarray, start_sigma: float, start_std: float, w: float, f: float) -> np.ndarray:
    """Per latent ``z`` (``x_S = z start_std``), the end point ``1 + h(0) / h(S) (x_S - 1)`` (:func:`_contraction`)."""
    return 1.0 + _contraction(start_sigma, w, f) * (z * start_std - 1.0)


def _lerp_pipeline(weak_factor: float, weight: float) -> MixturePipeline:
    """A DDIM pipeline on the "mixture" preset whose denoiser answers ``D_weak + w (D - D_weak)`` of the two exact
    denoisers, written here (no guidekit guidance code; the weak mixture: every std times ``weak_factor``)."""
    means, stds, labels, weights = MIXTURE

    def exact(factor: float) -> MixtureDenoiser:
        return MixtureDenoiser.from_mixture(GaussianMixture.isotropic(
            [[m] for m in means], [factor * s for s in stds], list(labels), torch.tensor(weights, dtype=torch.float64)))

    main, weak, lerp = exact(1.0), exact(weak_factor), exact(1.0)

    def forward(sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                return_dict: bool = True) -> MixtureDenoiserOutput | tuple[torch.Tensor]:
        d1 = main(sample, timestep, class_labels, return_dict=False)[0]
        d0 = weak(sample, timestep, class_labels, return_dict=False)[0]
        out = d0 + weight * (d1 - d0)
        return MixtureDenoiserOutput(sample=out) if return_dict else (out,)

    lerp.forward = forward
    pipe = MixturePipeline(lerp, DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _w1_between(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(np.sort(a) - np.sort(b))))


@pytest.fixture(scope="module")
def autoguided() -> tuple[object, object]:
    """Autoguidance at w = 3 with weak stds x2 on "mixture", and the conditional sampler (w = 1), same latents."""
    def run(weight: float) -> object:
        return run_testbed("mixture", weight=weight, steps=10, num_samples=300, seed=2, weak_factor=2.0)

    return run(3.0), run(1.0)


def test_autoguidance_is_the_pipeline_on_the_lerp_of_the_exact_denoisers(autoguided: tuple) -> None:
    r, _ = autoguided
    ag = r.methods[AUTOGUIDANCE]
    latents = torch.from_numpy(r.latents)[:, None]
    expected = _lerp_pipeline(2.0, 3.0)([0] * len(latents), num_inference_steps=10, latents=latents).samples
    np.testing.assert_allclose(ag.samples, expected[:, 0].numpy(), rtol=0, atol=1e-12)
    assert ag.model_calls == 20 and ag.evaluations_per_sample == 20  # the model and the weak model, once a step
    # Its curve: p(x|c)^w q(x|c)^(1-w) recomputed with scipy; W1 to it and to the exact ODE, recomputed here.
    cond, target = _scipy_densities(3.0, r.grid, weak_factor=2.0)
    np.testing.assert_allclose(r.autoguidance_target, target, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.conditional, cond, rtol=0, atol=1e-10)
    assert np.trapezoid(r.autoguidance_target, r.grid) == pytest.approx(1.0, abs=1e-9)
    assert ag.w1_to_ode == pytest.approx(_w1_between(ag.samples, r.autoguidance_ode), rel=1e-12)
    assert ag.w1 == pytest.approx(testbed_view._w1(ag.samples, r.grid, testbed_view._cdf(target, r.grid)), abs=1e-6)
    assert all(r.methods[n].w1_to_ode is None for n in METHODS if n != AUTOGUIDANCE)


def test_exact_autoguidance_ode_equals_scipy_integration_on_the_mixture() -> None:
    """The tab's exact ODE (Runge-Kutta, 64 steps, guidekit's mixture denoisers) against scipy's DOP853 at
    rtol 1e-10 on a denoiser written here in numpy, per latent. Scipy stops at sigma 1e-6, which leaves 1e-12."""
    w, f = 3.0, 2.0
    r = run_testbed("mixture", weight=w, steps=2, num_samples=100, seed=7, weak_factor=f)
    means, stds, labels, weights = MIXTURE
    members = [(m, s, pi) for m, s, pi, k in zip(means, stds, weights, labels, strict=True) if k == 0]

    def denoise(x: np.ndarray, sigma: float, factor: float) -> np.ndarray:
        var = np.array([(factor * s) ** 2 for _, s, _ in members])[:, None]
        m = np.array([mu for mu, _, _ in members])[:, None]
        logits = np.log([pi for _, _, pi in members])[:, None] + stats.norm.logpdf(x, m, np.sqrt(var + sigma**2))
        resp = special.softmax(logits, axis=0)
        return (resp * (m + var / (var + sigma**2) * (x - m))).sum(0)

    def slope(sigma: float, x: np.ndarray) -> np.ndarray:
        d_weak = denoise(x, sigma, f)
        return (x - (d_weak + w * (denoise(x, sigma, 1.0) - d_weak))) / sigma

    sol = integrate.solve_ivp(slope, (r.start_sigma, 1e-6), r.latents * r.start_std, method="DOP853", rtol=1e-10,
                              atol=1e-10)
    assert sol.success
    err = np.abs(r.autoguidance_ode - sol.y[:, -1])
    assert err.mean() < 2e-5 and err.max() < 2e-3
    assert np.abs(sol.y[:, -1] - r.latents * r.start_std).min() > 0.01  # the flow moved every sample


@pytest.mark.parametrize(("w", "f"), [(3.0, 2.0), (12.0, 3.5)])
def test_autoguidance_on_gaussians_is_its_closed_form(w: float, f: float) -> None:
    r = run_testbed("gaussian", weight=w, steps=5, num_samples=200, seed=1, weak_factor=f)
    ag = r.methods[AUTOGUIDANCE]
    exact = _autoguided_gaussian_end(r.latents, r.start_sigma, r.start_std, w, f)
    np.testing.assert_allclose(r.autoguidance_ode, exact, rtol=0, atol=2e-5)
    ratio = _contraction(r.start_sigma, w, f)  # end point N(1 - ratio, (ratio S0)^2) for x_S ~ N(0, S0^2)
    assert ag.closed_form == pytest.approx((1.0 - ratio, (ratio * r.start_std) ** 2), rel=1e-9, abs=1e-15)
    # The powered target N(1, sc^2 f^2 / (w f^2 + 1 - w)) and the weak model N(1, f^2 sc^2).
    var = 0.25 * f * f / (w * f * f + 1 - w)
    np.testing.assert_allclose(r.autoguidance_target, stats.norm.pdf(r.grid, 1.0, math.sqrt(var)), rtol=0, atol=1e-6)
    assert (r.autoguidance_target_mean, r.autoguidance_target_var) == pytest.approx((1.0, var), abs=1e-6)
    np.testing.assert_allclose(r.weak_conditional, stats.norm.pdf(r.grid, 1.0, 0.5 * f), rtol=0, atol=1e-12)
    assert ag.closed_form[1] < 0.2 * var  # the exact end point is not the powered target
    assert r.autoguidance_ode_w1 > 5 * r.autoguidance_w1_floor


def test_weak_factor_one_is_the_conditional_sampler(autoguided: tuple) -> None:
    """f = 1: D_weak = D, so D_weak + w (D - D_weak) = D, whatever w: the conditional DDIM sampler, the conditional
    density as target and the conditional ODE (on "gaussian" in closed form: the CFG oracle at w = 1)."""
    _, cond = autoguided
    r = run_testbed("mixture", weight=3.0, steps=10, num_samples=300, seed=2, weak_factor=1.0)
    np.testing.assert_allclose(r.methods[AUTOGUIDANCE].samples, cond.methods["CFG + DDIM"].samples, rtol=0,
                               atol=1e-12)
    np.testing.assert_array_equal(r.weak_conditional, r.conditional)
    np.testing.assert_allclose(r.autoguidance_target, r.conditional, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r.autoguidance_ode, cond.autoguidance_ode, rtol=0, atol=1e-10)  # cond: w = 1
    g = run_testbed("gaussian", weight=5.0, steps=5, num_samples=100, seed=3, weak_factor=1.0)
    assert g.methods[AUTOGUIDANCE].closed_form == pytest.approx(
        GaussianCFGOracle(*GAUSSIANS, 1.0).ode(g.start_sigma, g.start_std), rel=1e-9)
    np.testing.assert_allclose(g.autoguidance_ode, _autoguided_gaussian_end(g.latents, g.start_sigma, g.start_std,
                                                                            5.0, 1.0), rtol=0, atol=2e-5)


def test_autoguidance_moves_the_samples_and_the_pipeline_converges_to_the_exact_ode(autoguided: tuple) -> None:
    r, cond = autoguided
    ag, cond_ddim = r.methods[AUTOGUIDANCE], cond.methods["CFG + DDIM"]
    # The exact ODE and the samples are far from the conditional ones (cond.autoguidance_ode: the conditional ODE).
    assert _w1_between(r.autoguidance_ode, cond.autoguidance_ode) > 0.2
    assert _w1_between(ag.samples, cond_ddim.samples) > 0.2
    assert ag.w1_to_ode < 0.5 * _w1_between(cond_ddim.samples, r.autoguidance_ode)
    assert np.abs(r.autoguidance_target - r.conditional).max() > 0.2
    # DDIM's O(1/steps) error: ten times the steps, under a fifth of the W1 to the exact ODE.
    fine = run_testbed("mixture", weight=3.0, corrector_steps=0, steps=100, num_samples=300, seed=2, weak_factor=2.0)
    assert np.array_equal(fine.autoguidance_ode, r.autoguidance_ode)  # the reference does not depend on steps
    assert fine.methods[AUTOGUIDANCE].w1_to_ode < 0.2 * ag.w1_to_ode


def test_table_has_a_row_per_method_and_for_the_targets_and_the_exact_ode(small: dict) -> None:
    r = small["gaussian"]
    rows = table(r)
    assert [row[0].split(" (")[0] for row in rows] == [*METHODS, "target p(x|c)^3 p(x)^-2",
                                                       "autoguidance target p(x|c)^3 q(x|c)^-2",
                                                       "exact autoguidance ODE"]
    assert all(len(row) == len(testbed_view.TABLE_HEADERS) for row in rows)
    ag = r.methods[AUTOGUIDANCE]
    assert rows[3][-1] == round(ag.w1_to_ode, 4) and rows[3][3] == round(ag.w1, 4)
    assert [row[-1] for row in rows[:3]] == [None] * 3
    assert rows[5][1:4] == [1.0, 0.1, round(r.autoguidance_w1_floor, 4)]  # N(1, 0.1) at w = 3, f = 2
    assert rows[6][3] == round(r.autoguidance_ode_w1, 4)


def test_mixture_preset_has_no_closed_forms(small: dict) -> None:
    r = small["mixture"]
    assert all(r.methods[n].closed_form is None and r.methods[n].closed_form_density is None for n in METHODS)
    assert all(small["gaussian"].methods[n].closed_form is not None for n in METHODS)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"preset": "ring"}, "preset='ring' is not accepted; expected one of gaussian, mixture"),
    ({"weight": 0.5}, "weight=0.5 is not accepted; expected a finite number in [1.0, 20.0]"),
    ({"weight": 20.5}, "weight=20.5"),
    ({"weight": math.nan}, "weight=nan"),
    ({"steps": 0}, "steps=0 is not accepted; expected an integer in [1, 1000]"),
    ({"steps": 1001}, "steps=1001"),
    ({"steps": 2.0}, "steps=2.0"),
    ({"steps": True}, "steps=True"),
    ({"num_samples": 99}, "num_samples=99 is not accepted; expected an integer in [100, 200000]"),
    ({"num_samples": 200001}, "num_samples=200001"),
    ({"corrector_steps": -1}, "corrector_steps=-1 is not accepted; expected an integer in [0, 10]"),
    ({"corrector_steps": 11}, "corrector_steps=11"),
    ({"seed": -1}, "seed=-1"),
    ({"weak_factor": 0.9}, "weak_factor=0.9 is not accepted; expected a finite number in [1.0, 5.0]"),
    ({"weak_factor": 5.5}, "weak_factor=5.5"),
    ({"weak_factor": math.inf}, "weak_factor=inf"),
    ({"weak_factor": "2"}, "weak_factor='2'"),
])
def test_invalid_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)) as caught:
        run_testbed(**kwargs)
    assert "\n" not in str(caught.value)


def test_numpy_integers_are_accepted() -> None:
    r = run_testbed(steps=np.int64(2), num_samples=np.int32(100), corrector_steps=np.int64(0))
    assert r.steps == 2 and r.num_samples == 100 and len(r.methods["PCG"].samples) == 100


@pytest.mark.parametrize("preset", list(PRESETS))
def test_plot_is_an_rgb_image_of_the_expected_size(small: dict, preset: str) -> None:
    image = plot_testbed(small[preset])
    assert image.mode == "RGB" and image.size == (1600, 400)
    pixels = np.asarray(image).astype(float)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_plot_clips_a_collapsed_ddim_end_point_and_shows_notes() -> None:
    r = run_testbed("gaussian", weight=20.0, steps=64, num_samples=500)
    assert r.methods["CFG + DDIM"].var < 1e-6 and r.notes and "steps=64" in r.notes[0]
    assert plot_testbed(r).size == (1600, 400)
    assert run_testbed(steps=50, num_samples=100).notes == ()


def test_same_seed_same_results_other_seed_other_results() -> None:
    def run(seed: int) -> object:
        return run_testbed("mixture", weight=4.0, steps=8, num_samples=300, seed=seed)

    a, b, c = run(5), run(5), run(6)
    for name in METHODS:
        assert np.array_equal(a.methods[name].samples, b.methods[name].samples)
        assert not np.array_equal(a.methods[name].samples, c.methods[name].samples)
    assert a.w1_floor == b.w1_floor != c.w1_floor
    # The three methods share the initial latents but not their end points.
    assert not np.array_equal(a.methods["CFG + DDPM"].samples, a.methods["PCG"].samples)


def test_concurrent_calls_match_sequential_ones() -> None:
    seeds = [0, 1, 2]
    expected = [run_testbed("gaussian", steps=6, num_samples=400, seed=s) for s in seeds]
    results: dict[int, object] = {}

    def work(seed: int) -> None:
        results[seed] = run_testbed("gaussian", steps=6, num_samples=400, seed=seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, exp in zip(seeds, expected, strict=True):
        for name in METHODS:
            assert np.array_equal(results[seed].methods[name].samples, exp.methods[name].samples)
