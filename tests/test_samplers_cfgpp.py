"""CFG++ (Euler and DPM-Solver++(2M)) against diffusers' solvers at lam = 0 and a hand-written loop at lam > 0."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch
from pipelines import final_latents, pipeline

import guidekit
from guidekit.bridge.testbed import MixturePipeline
from guidekit.samplers.cfgpp import CFGPPScheduler
from guidekit.testbed import GaussianMixture

STEPS = 12


@pytest.fixture(scope="module")
def testbed() -> MixturePipeline:
    p = MixturePipeline.from_mixture(GaussianMixture.random(2, 2, 2, generator=torch.Generator().manual_seed(4)))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def latents() -> torch.Tensor:
    return torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _cfgpp(pipe: MixturePipeline, guidance: guidekit.CFGPP, latents: torch.Tensor, labels: list[int]
           ) -> torch.Tensor:
    pipe.set_guidance(guidance)
    try:
        assert isinstance(pipe.scheduler, CFGPPScheduler)
        return pipe(labels, num_inference_steps=STEPS, guidance_scale=2.0, latents=latents.clone()).samples
    finally:
        pipe.set_guidance(None)


def test_lam_zero_euler_is_diffusers_euler_on_the_unconditional_model(testbed: MixturePipeline,
                                                                        latents: torch.Tensor) -> None:
    ours = _cfgpp(testbed, guidekit.CFGPP(0.0), latents, [0, 1] * 3)
    original = testbed.scheduler
    testbed.scheduler = diffusers.EulerDiscreteScheduler.from_config(original.config, use_karras_sigmas=True,
                                                                     timestep_spacing="linspace")
    try:
        s_max = float(testbed.transformer.level(999).sigma)
        theirs = testbed([2] * 6, num_inference_steps=STEPS,  # 2 = the null class
                         latents=latents * math.hypot(1.0, s_max) / float(testbed.scheduler.init_noise_sigma)).samples
    finally:
        testbed.scheduler = original
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_reference_loop_at_lam_zero_is_diffusers_dpmpp_2m_on_the_unconditional_model(
        testbed: MixturePipeline, latents: torch.Tensor) -> None:
    """Closes the chain scheduler = reference loop (next test) = diffusers' DPM-Solver++(2M) at lam = 0.

    diffusers' default spacing is used: with Karras sigmas it rounds the model's timesteps to integers, so the model
    would be called off the solver's noise levels."""
    original = testbed.scheduler
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(original.config, algorithm_type="dpmsolver++",
                                                            solver_order=2)
    testbed.scheduler = dpm
    try:
        theirs = testbed([2] * 6, num_inference_steps=STEPS, latents=latents.clone()).samples
    finally:
        testbed.scheduler = original
    sigmas = dpm.sigmas.double().tolist()
    x = latents * math.hypot(1.0, sigmas[0])
    ours = _reference_loop(testbed.transformer.mixture, x, torch.tensor([0, 1] * 3), 0.0, sigmas, "dpmpp_2m")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def _reference_loop(mixture: GaussianMixture, x: torch.Tensor, labels: torch.Tensor, lam: float, sigmas: list[float],
                    solver: str) -> torch.Tensor:
    """CFG++ written from REFERENCE (Euler) and ComfyUI's sample_dpmpp_2m_cfg_pp (2M), EDM variables."""
    old_u = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d_c, d_u = mixture.denoise(x, s, labels), mixture.denoise(x, s)
        d = d_u + lam * (d_c - d_u)
        h = math.log(s / s_next) if s_next > 0 else math.inf
        if solver == "euler" or old_u is None or s_next == 0:
            mix = -math.exp(-h) * d_u
        else:
            r = math.log(sigmas[i - 1] / s) / h
            mix = -math.exp(-h) * d_u - math.expm1(-h) / (2 * r) * (d - old_u)
        x = d + mix + math.exp(-h) * x
        old_u = d_u
    return x


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_cfgpp_equals_the_reference_loop(testbed: MixturePipeline, latents: torch.Tensor, solver: str) -> None:
    labels = [0, 1] * 3
    ours = _cfgpp(testbed, guidekit.CFGPP(0.6, solver=solver), latents, labels)
    sched = CFGPPScheduler.from_config(testbed.scheduler.config, solver=solver)
    sched.set_timesteps(STEPS)
    x = latents * math.hypot(1.0, sched.sigmas[0])
    expected = _reference_loop(testbed.transformer.mixture, x, torch.tensor(labels), 0.6, sched.sigmas, solver)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-7)  # the model reads float32 timesteps


def test_cfgpp_errors_and_text_form() -> None:
    with pytest.raises(ValueError, match=r"lam=1\.5"):
        guidekit.CFGPP(1.5)
    with pytest.raises(ValueError, match="solver='heun'"):
        guidekit.CFGPP(0.5, solver="heun")
    with pytest.raises(ValueError, match="solver='heun'"):
        CFGPPScheduler(solver="heun")
    assert guidekit.parse_guidance("cfgpp(lam=0.6, solver='dpmpp_2m')") == guidekit.CFGPP(0.6, "dpmpp_2m")


@pytest.mark.parametrize("family", ["sd", "sdxl", "dit"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_cfgpp_runs_in_tiny_image_pipelines(family: str, solver: str) -> None:
    pipe = pipeline(family)
    original = pipe.scheduler
    pipe.set_guidance(guidekit.CFGPP(0.6, solver=solver))
    try:
        out = final_latents(pipe, family, steps=3, guidance_scale=2.0)
        assert pipe.guidance_stats.model_calls == 3 and pipe.guidance_stats.uncond_rows == 3
    finally:
        pipe.set_guidance(None)
    assert pipe.scheduler is original and torch.isfinite(out).all()
