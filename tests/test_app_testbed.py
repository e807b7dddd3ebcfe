"""The demo's Gaussian-mixture testbed tab (guidekit.app.testbed_view) against independent oracles: the closed forms
of Bradley & Nakkiran (section 4, Theorem 1) and densities recomputed with scipy."""

from __future__ import annotations

import math
import re
import threading

import numpy as np
import pytest
from scipy import integrate, special, stats

from guidekit.app import testbed_view
from guidekit.app.testbed_view import METHODS, PRESETS, plot_testbed, run_testbed
from guidekit.testbed import GaussianCFGOracle

GAUSSIANS = (1.0, 0.5, 0.0, 1.0)  # REFERENCE's example: p(x | c) = N(1, 0.5^2), p(x) = N(0, 1)


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
    # Network work per trajectory: PCG's predictor is conditional-only, its corrector a batched CFG call.
    assert [r.methods[n].model_calls for n in METHODS] == [200, 200, 200 + 199]
    assert [r.methods[n].evaluations_per_sample for n in METHODS] == [400, 400, 200 + 2 * 199]
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


def _scipy_densities(weight: float, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Conditional density and the powered target of the "mixture" preset, recomputed with scipy (quadrature)."""
    spec = testbed_view._PRESETS["mixture"]
    comps = list(zip(spec.means, spec.stds, spec.weights, spec.labels, strict=True))

    def log_density(x: np.ndarray | float, members: list[tuple[float, float, float, int]]) -> np.ndarray:
        x = np.atleast_1d(np.asarray(x, dtype=float))
        logw = np.log([pi for _, _, pi, _ in members]) - np.log(sum(pi for _, _, pi, _ in members))
        terms = [lw + stats.norm.logpdf(x, m, s) for lw, (m, s, _, _) in zip(logw, members, strict=True)]
        return special.logsumexp(terms, axis=0)

    in_class = [c for c in comps if c[3] == 0]

    def powered(x: np.ndarray | float) -> np.ndarray:
        return np.exp(weight * log_density(x, in_class) + (1 - weight) * log_density(x, comps))

    lo = min(m - 12 * s for m, s, _, _ in comps)
    hi = max(m + 12 * s for m, s, _, _ in comps)
    z, _ = integrate.quad(lambda x: powered(x)[0], lo, hi, points=list(spec.means), limit=400, epsabs=1e-13)
    return np.exp(log_density(grid, in_class)), powered(grid) / z


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
])
def test_invalid_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        run_testbed(**kwargs)


def test_numpy_integers_are_accepted() -> None:
    r = run_testbed(steps=np.int64(2), num_samples=np.int32(100), corrector_steps=np.int64(0))
    assert r.steps == 2 and r.num_samples == 100 and len(r.methods["PCG"].samples) == 100


@pytest.mark.parametrize("preset", list(PRESETS))
def test_plot_is_an_rgb_image_of_the_expected_size(small: dict, preset: str) -> None:
    image = plot_testbed(small[preset])
    assert image.mode == "RGB" and image.size == (1200, 400)
    pixels = np.asarray(image).astype(float)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_plot_clips_a_collapsed_ddim_end_point_and_shows_notes() -> None:
    r = run_testbed("gaussian", weight=20.0, steps=64, num_samples=500)
    assert r.methods["CFG + DDIM"].var < 1e-6 and r.notes and "steps=64" in r.notes[0]
    assert plot_testbed(r).size == (1200, 400)
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
