"""guidekit's samplers (EDM Heun, PCG) and diffusers' own on the exact testbed, and inside tiny image pipelines."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from pipelines import final_latents, pipeline

import guidekit
from guidekit.bridge.testbed import MixturePipeline
from guidekit.samplers.cfgpp import CFGPPScheduler
from guidekit.samplers.edm_heun import EDMHeunScheduler
from guidekit.samplers.pcg import PCGScheduler
from guidekit.testbed import GaussianCFGOracle, GaussianMixture
from guidekit.testbed.mixture import UNCONDITIONAL

STD = 0.5  # data N(0, STD^2)


@pytest.fixture(scope="module")
def gaussian_pipe() -> MixturePipeline:
    p = MixturePipeline.from_mixture(GaussianMixture.isotropic([[0.0]], [STD], [0]))
    p.set_progress_bar_config(disable=True)
    return p


def _end_point_error(pipe: MixturePipeline, scheduler: object, steps: int) -> float:
    """Max over a few starts of |x_end - exact|: the exact probability-flow ODE to the last nonzero sigma,
    then the same final denoising step to 0 that every sampler here takes (``x_0 = D(x; sigma_last)``)."""
    pipe.scheduler = scheduler
    scheduler.set_timesteps(steps)
    sigmas = np.asarray(scheduler.sigmas, dtype=np.float64)
    s_first, s_last = float(sigmas.max()), float(sigmas[sigmas > 0].min())
    latents = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64)[:, None]
    vp_state = float(scheduler.init_noise_sigma) == 1.0
    x_start = latents * (math.hypot(1.0, s_first) if vp_state else float(scheduler.init_noise_sigma))
    x_last = x_start * math.sqrt(STD**2 + s_last**2) / math.sqrt(STD**2 + s_first**2)
    exact = x_last * STD**2 / (STD**2 + s_last**2)
    out = pipe([0] * 5, num_inference_steps=steps, latents=latents.clone()).samples
    return float((out - exact).abs().max())


def _schedulers(config: dict) -> dict[str, object]:
    return {
        "euler (diffusers, Karras)": diffusers.EulerDiscreteScheduler.from_config(
            config, use_karras_sigmas=True, timestep_spacing="linspace"),
        "heun (diffusers, Karras)": diffusers.HeunDiscreteScheduler.from_config(
            config, use_karras_sigmas=True, timestep_spacing="linspace"),
        "dpmpp_2m (diffusers, Karras)": diffusers.DPMSolverMultistepScheduler.from_config(
            config, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2),
        "edm heun (guidekit)": EDMHeunScheduler.from_config(config),
        # CFG++'s sampler without its guidance: plain Euler and DPM-Solver++(2M) on Karras sigmas.
        "cfg++ euler (guidekit)": CFGPPScheduler.from_config(config),
        "cfg++ dpmpp_2m (guidekit)": CFGPPScheduler.from_config(config, solver="dpmpp_2m"),
    }


@pytest.mark.parametrize(("name", "order"), [("euler (diffusers, Karras)", 1), ("heun (diffusers, Karras)", 2),
                                             ("dpmpp_2m (diffusers, Karras)", 2), ("edm heun (guidekit)", 2),
                                             ("cfg++ euler (guidekit)", 1), ("cfg++ dpmpp_2m (guidekit)", 2)])
def test_convergence_order_on_the_gaussian_end_point(gaussian_pipe: MixturePipeline, name: str, order: int) -> None:
    config = dict(gaussian_pipe.scheduler.config)
    steps = [8, 16, 32, 64]
    errors = [_end_point_error(gaussian_pipe, _schedulers(config)[name], n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) <= 0.2, (name, slope, errors)


def test_edm_heun_without_churn_equals_diffusers_heun_with_karras_sigmas() -> None:
    mixture = GaussianMixture.random(2, 2, 2, generator=torch.Generator().manual_seed(0))
    pipe = MixturePipeline.from_mixture(mixture)
    pipe.set_progress_bar_config(disable=True)
    heun = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    heun.set_timesteps(10)
    s_min, s_max = float(heun.sigmas[heun.sigmas > 0].min()), float(heun.sigmas.max())
    latents = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pipe.scheduler = EDMHeunScheduler.from_config(pipe.scheduler.config, sigma_min=s_min, sigma_max=s_max)
    ours = pipe([0, 1, 0, 1], num_inference_steps=10, guidance_scale=2.0, latents=latents.clone()).samples
    pipe.scheduler = heun
    theirs = pipe([0, 1, 0, 1], num_inference_steps=10, guidance_scale=2.0,
                  latents=latents * math.hypot(1.0, s_max) / float(heun.init_noise_sigma)).samples
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # diffusers keeps its sigmas in float32


def test_edm_heun_churn_adds_seeded_noise_where_the_window_allows(gaussian_pipe: MixturePipeline) -> None:
    config = gaussian_pipe.scheduler.config
    sched = EDMHeunScheduler.from_config(config, s_churn=40.0, s_tmin=0.05, s_tmax=5.0, s_noise=1.003)
    sched.set_timesteps(8)
    churned = [c.sigma for c, in zip(sched.calls, strict=True) if not c.corrector]
    for t, t_hat, g in zip(sched.sigmas[:-1], churned, sched.gammas, strict=True):
        assert g == (min(40.0 / 8, math.sqrt(2) - 1) if 0.05 <= t <= 5.0 else 0.0)
        assert t_hat == pytest.approx(t * (1 + g))
    gaussian_pipe.scheduler = sched
    run = [gaussian_pipe([0] * 3, num_inference_steps=8, generator=torch.Generator().manual_seed(s)).samples
           for s in (0, 0, 1)]
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])


# --- PCG -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_gaussians() -> MixturePipeline:
    """REFERENCE's example: p(x | c) = N(1, 0.5^2), p(x) = N(0, 1)."""
    p = MixturePipeline.from_mixture(GaussianMixture.isotropic([[1.0], [0.0]], [0.5, 1.0], [0, UNCONDITIONAL]))
    p.set_progress_bar_config(disable=True)
    return p


def _oracle_start(pipe: MixturePipeline) -> tuple[float, float]:
    s = pipe.transformer.level(999).sigma  # the VP schedule starts at sigma 14.6 from N(0, 1 + sigma^2)
    return s, math.hypot(1.0, s)


@pytest.mark.parametrize("params", [(1.0, 0.5, 0.0, 1.0, 3.0), (-0.5, 0.4, 0.5, 1.2, 2.0)])
def test_pcg_reaches_the_ddpm_end_point_and_ddpm_does_too(params: tuple[float, ...]) -> None:
    """PCG(gamma = 2w - 1), one corrector step, and CFG with ancestral DDPM at w: mean and variance within 2% of the
    closed form (Bradley & Nakkiran Theorem 1), 200k particles, 200 / 500 steps."""
    mc, sc, mu, su, w = params
    pipe = MixturePipeline.from_mixture(GaussianMixture.isotropic([[mc], [mu]], [sc, su], [0, UNCONDITIONAL]))
    pipe.set_progress_bar_config(disable=True)
    mean, var = GaussianCFGOracle(*params).sde(*_oracle_start(pipe))
    n = 200_000
    pipe.set_guidance(guidekit.PCG(2 * w - 1))
    try:
        pcg = pipe([0] * n, num_inference_steps=200, guidance_scale=w, generator=torch.Generator().manual_seed(0))
        stats = pipe.guidance_stats
    finally:
        pipe.set_guidance(None)
    assert stats.model_calls == 200 + 199 and stats.uncond_rows == 199 * n  # predictor calls: conditional rows only
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)  # restored
    # diffusers' DDPM with its fixed_large variance (beta_t); fixed_small converges to the same limit from below,
    # more slowly (0.0637 at 1000 steps on the first example).
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_large")
    ddpm = pipe([0] * n, num_inference_steps=500, guidance_scale=w, generator=torch.Generator().manual_seed(1))
    for out in (pcg.samples, ddpm.samples):
        assert out.mean().item() == pytest.approx(mean, rel=0.02)
        assert out.var().item() == pytest.approx(var, rel=0.02)


def test_ddim_end_point_is_the_ode_closed_form() -> None:
    """CFG with deterministic DDIM at 1000 steps ends within 2% of the ODE's closed-form mean and variance.

    DDIM maps the initial noise affinely, so two particles give its exact end mean and variance (no sampling error).
    The schedule is DDPM's linear one (beta 1e-4 .. 0.02: sigma from 157 down to 0.01). On SD's schedule the last
    step alone, from sigma 0.029 to 0, loses 0.8% of the variance, and 1000 steps end 2.3% low.
    """
    pipe = MixturePipeline.from_mixture(GaussianMixture.isotropic([[1.0], [0.0]], [0.5, 1.0], [0, UNCONDITIONAL]),
                                        beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe.set_progress_bar_config(disable=True)
    oracle = GaussianCFGOracle(1.0, 0.5, 0.0, 1.0, 3.0)
    mean, var = oracle.ode(*_oracle_start(pipe))
    assert (mean, var) == pytest.approx((1.4953, 0.015625), rel=0.002)  # REFERENCE's figures (at sigma 80)
    errors = []
    for steps in (100, 1000):
        out = pipe([0, 0], num_inference_steps=steps, guidance_scale=3.0,
                   latents=torch.tensor([[0.0], [1.0]], dtype=torch.float64)).samples.flatten()
        end_mean, end_var = out[0].item(), (out[1] - out[0]).item() ** 2
        errors.append((abs(end_mean / mean - 1), abs(end_var / var - 1)))
    assert max(errors[1]) < 0.02 and errors[1][1] < errors[0][1] / 3, errors


def test_pcg_without_corrector_steps_is_conditional_ddim(two_gaussians: MixturePipeline) -> None:
    latents = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    two_gaussians.scheduler = diffusers.DDIMScheduler.from_config(two_gaussians.scheduler.config)
    ddim = two_gaussians([0] * 8, num_inference_steps=20, latents=latents.clone()).samples
    two_gaussians.set_guidance(guidekit.PCG(5.0, corrector_steps=0))
    try:
        pcg = two_gaussians([0] * 8, num_inference_steps=20, guidance_scale=2.0, latents=latents.clone()).samples
        assert two_gaussians.guidance_stats.uncond_rows == 0
    finally:
        two_gaussians.set_guidance(None)
    torch.testing.assert_close(pcg, ddim, rtol=0, atol=1e-6)  # DDIM keeps alphas_cumprod in float32


def test_pcg_text_form_and_errors() -> None:
    assert guidekit.parse_guidance("pcg(gamma=5, corrector_steps=2)") == guidekit.PCG(5.0, corrector_steps=2)
    with pytest.raises(ValueError, match="corrector_steps=-1"):
        guidekit.PCG(3.0, corrector_steps=-1)
    with pytest.raises(ValueError, match="step_scale=0"):
        guidekit.PCG(3.0, step_scale=0)
    with pytest.raises(ValueError, match="corrector_steps=-1"):
        PCGScheduler(corrector_steps=-1)
    with pytest.raises(ValueError, match="s_churn=-1"):
        EDMHeunScheduler(s_churn=-1)
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'"):
        EDMHeunScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="flow-matching"):
        pipeline("sd3").set_guidance(guidekit.PCG(3.0))


# --- inside image pipelines ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd", "sdxl", "dit"])
@pytest.mark.parametrize("sampler", ["edm_heun", "edm_heun_churn", "pcg_scheduler", "cfgpp_scheduler", "pcg"])
def test_samplers_run_in_tiny_image_pipelines_with_and_without_guidance(family: str, sampler: str) -> None:
    """Each sampler set as the pipeline's scheduler: native CFG equals set_guidance(CFG(w)); APG in an interval runs.
    PCG as a guidance installs its own sampler and restores the pipeline's."""
    pipe = pipeline(family)
    original = pipe.scheduler
    try:
        if sampler == "pcg":
            pipe.set_guidance(guidekit.PCG(3.0))
            assert isinstance(pipe.scheduler, PCGScheduler)
            out = final_latents(pipe, family, steps=3, guidance_scale=2.0)
            assert pipe.guidance_stats.model_calls == 5
            pipe.set_guidance(None)
            assert pipe.scheduler is original
        else:
            pipe.scheduler = {
                "edm_heun": lambda c: EDMHeunScheduler.from_config(c),
                "edm_heun_churn": lambda c: EDMHeunScheduler.from_config(c, s_churn=10.0),
                "pcg_scheduler": lambda c: PCGScheduler.from_config(c),
                "cfgpp_scheduler": lambda c: CFGPPScheduler.from_config(c, solver="dpmpp_2m"),
            }[sampler](original.config)
            calls = 3 if sampler == "cfgpp_scheduler" else 5
            torch.manual_seed(0)  # DiT's pipeline passes no generator to step(): churn noise is global
            native = final_latents(pipe, family, steps=3, guidance_scale=4.0)
            pipe.set_guidance(guidekit.Interval(guidekit.APG(4.0), sigma_lo=0.28, sigma_hi=5.42))
            out = final_latents(pipe, family, steps=3, guidance_scale=4.0)
            assert pipe.guidance_stats.model_calls == calls
            if sampler != "cfgpp_scheduler":  # with a guidance attached CFG++'s sampler renoises with the uncond
                pipe.set_guidance(guidekit.CFG(4.0))
                torch.manual_seed(0)
                guided = final_latents(pipe, family, steps=3, guidance_scale=4.0)
                torch.testing.assert_close(guided, native, rtol=0, atol=1e-5)
        assert torch.isfinite(out).all()
    finally:
        pipe.set_guidance(None)
        pipe.scheduler = original


# --- timestep spacing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_first_timestep_is_diffusers_own(spacing: str, steps_offset: int) -> None:
    from guidekit.samplers.base import first_timestep

    for n in (1, 2, 7, 20, 33, 50, 999):
        ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
        ddim.set_timesteps(n)
        if not (spacing == "linspace" and n == 1):  # diffusers' single linspace step starts at 0
            assert first_timestep(n, 1000, spacing, steps_offset) == ddim.timesteps[0].item(), n


def test_samplers_start_where_ddim_starts() -> None:
    """From SD's "leading" config, PCG's levels count down evenly from DDIM's first timestep ("trailing" spacing
    below it), and the Karras levels of EDM Heun and CFG++ start where diffusers' Euler with Karras sigmas starts.
    Built on their own, they start at the top of the table and PCG's levels are DDIM's "trailing" ones."""
    from guidekit.samplers import CFGPPScheduler

    config = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     steps_offset=1, timestep_spacing="leading").config
    ddim = diffusers.DDIMScheduler.from_config(config)
    ddim.set_timesteps(20)
    abar = ddim.alphas_cumprod.double()

    def sigma(t: int) -> float:
        return float(((1 - abar[t]) / abar[t]).sqrt())

    pcg = PCGScheduler.from_config(config)
    pcg.set_timesteps(20)
    assert int(ddim.timesteps[0]) == 951
    assert pcg.sigmas[:-1] == pytest.approx([sigma(round(952 - i * 952 / 20) - 1) for i in range(20)], rel=1e-12)
    trailing = diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing")
    trailing.set_timesteps(20)
    own = PCGScheduler(beta_schedule="scaled_linear")
    own.set_timesteps(20)
    assert own.sigmas[:-1] == pytest.approx([sigma(int(t)) for t in trailing.timesteps], rel=1e-12)
    euler = diffusers.EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    euler.set_timesteps(20)
    for cls in (EDMHeunScheduler, CFGPPScheduler):
        sampler = cls.from_config(config)
        sampler.set_timesteps(20)
        assert sampler.sigmas[0] == pytest.approx(float(euler.sigmas[0]), rel=1e-5)
        alone = cls()
        alone.set_timesteps(20)
        assert alone.sigmas[0] == pytest.approx(float(alone.train_sigmas[-1]))
    with pytest.raises(ValueError, match="timestep_spacing='middle'"):
        PCGScheduler(timestep_spacing="middle")
