"""guidekit guidances as the guider of Modular Diffusers pipelines (the tiny SDXL and SD3 modular pipelines, built
from the tiny classic pipelines' components), against diffusers' own ClassifierFreeGuidance guider; and APG there
against the classic pipeline under set_guidance."""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.stable_diffusion_3 import StableDiffusion3AutoBlocks
from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks
from pipelines import count_rows

import guidekit
from guidekit import APG, CFG, Interval
from guidekit.testing.tiny import build_tiny_pipeline, tiny_call_kwargs

STEPS = 4


BLOCKS = {"sdxl": StableDiffusionXLAutoBlocks, "sd3": StableDiffusion3AutoBlocks}


@pytest.fixture(scope="module", params=list(BLOCKS))
def modular(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    base = build_tiny_pipeline(request.param)
    pipe = BLOCKS[request.param]().init_pipeline()
    pipe.update_components(**{k: v for k, v in base.components.items() if v is not None})
    pipe.set_progress_bar_config(disable=True)
    pipe.family = request.param
    return pipe


def _call(family: str) -> dict:
    k = tiny_call_kwargs(family, batch_size=2)
    return {**k, "negative_prompt": ["a blurry photo"] * 2, "num_inference_steps": STEPS}


def _run(pipe, guider) -> torch.Tensor:  # type: ignore[no-untyped-def]
    pipe.update_components(guider=guider)
    return pipe(**_call(pipe.family), generator=torch.Generator().manual_seed(0), output="latents")


def test_cfg_equals_diffusers_guider(modular) -> None:  # type: ignore[no-untyped-def]
    expected = _run(modular, ClassifierFreeGuidance(guidance_scale=5.0))
    ours = _run(modular, guidekit.as_guider(CFG(5.0), modular.scheduler))
    assert (ours - expected).abs().max().item() <= 1e-5
    assert (_run(modular, ClassifierFreeGuidance(guidance_scale=1.0)) - expected).abs().max().item() > 1e-3


def test_empty_interval_runs_the_conditional_batch_only(modular) -> None:  # type: ignore[no-untyped-def]
    expected = _run(modular, ClassifierFreeGuidance(guidance_scale=1.0))
    rows, handle = count_rows(modular, "unet" if modular.family == "sdxl" else "transformer")
    try:
        ours = _run(modular, guidekit.as_guider("interval(cfg(scale=5), sigma_lo=1e4, sigma_hi=2e4)",
                                                modular.scheduler))
    finally:
        handle.remove()
    assert rows == [2] * STEPS and (ours - expected).abs().max().item() <= 1e-5


def test_interval_guides_inside_only(modular) -> None:  # type: ignore[no-untyped-def]
    """Interval over the first steps: two batches there, one after."""
    rows, handle = count_rows(modular, "unet" if modular.family == "sdxl" else "transformer")
    try:
        _run(modular, guidekit.as_guider(Interval(APG(5.0), 1.0, float("inf")), modular.scheduler))
    finally:
        handle.remove()
    sigmas = modular.scheduler.sigmas[:STEPS].tolist()
    if modular.family == "sd3":  # flow time t: EDM sigma t / (1 - t)
        sigmas = [t / (1 - t) if t < 1 else float("inf") for t in sigmas]
    assert rows == [r for s in sigmas for r in ([2, 2] if s > 1.0 else [2])]
    assert 0 < sum(s > 1.0 for s in sigmas) < STEPS


def test_apg_equals_the_classic_pipeline_under_set_guidance(modular) -> None:  # type: ignore[no-untyped-def]
    """The same components and seed: the modular pipeline with guidekit's guider and the classic pipeline with
    set_guidance compute the same APG (native CFG agrees between the two first). The modular loop runs the two
    batches as separate forwards, the classic one as one batched forward: equal to float rounding, 1e-5 relative to
    the latents' largest value (SDXL's Euler latents reach about 6)."""
    classic = build_tiny_pipeline(modular.family)
    call = _call(modular.family)
    native = classic(**call, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent")
    tolerance = 1e-5 * native.images.abs().max().item()
    assert (native.images - _run(modular, ClassifierFreeGuidance(guidance_scale=5.0))).abs().max() <= tolerance
    with guidekit.guided(classic, APG(5.0)):
        expected = classic(**call, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                           output_type="latent").images
    ours = _run(modular, guidekit.as_guider(APG(5.0), modular.scheduler))
    assert (ours - expected).abs().max().item() <= tolerance and (ours - native.images).abs().max().item() > 1e-3


def test_perturbation_guidances_are_refused(modular) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"^guidance=.* is not accepted as a Modular Diffusers guider"):
        guidekit.as_guider(CFG(5.0) + guidekit.PAG(3.0), modular.scheduler)
