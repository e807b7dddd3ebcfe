"""Wan 2.1 and 2.2 (two calls per step on 5-D video latents; 2.2 switches to a second transformer below its noise
boundary, with its own CFG weight) against the pipelines' own results."""

from __future__ import annotations

import pytest
import torch
from pipelines import count_rows, final_latents, guided_latents, pipeline

import guidekit
from guidekit import CFG, AdaptiveGuidance, ByExpert, Interval

STEPS = 4


@pytest.mark.parametrize("family", ["wan", "wan22"])
def test_cfg_equals_native_and_none_restores(family: str) -> None:
    pipe = pipeline(family)
    native = final_latents(pipe, family, steps=STEPS, guidance_scale=5.0, batch_size=2)
    guided, stats = guided_latents(pipe, family, CFG(5.0), steps=STEPS, guidance_scale=5.0, batch_size=2)
    assert native.ndim == 5 and stats.model_calls == 2 * STEPS and stats.uncond_rows == stats.cond_rows == 2 * STEPS
    assert (guided - native).abs().max().item() <= 1e-5
    assert torch.equal(final_latents(pipe, family, steps=STEPS, guidance_scale=5.0, batch_size=2), native)


@pytest.mark.parametrize("family", ["wan22", "wan22-i2v"])
def test_wan22_per_expert_weights_equal_native_guidance_scale_2(family: str) -> None:
    """The official Wan 2.2 T2V weights: 4 on the high-noise expert, 3 on the low-noise one. CFG(4) alone is not
    the pipeline's result; ByExpert(CFG(4), CFG(3)) is, and names the expert of each step. The image-to-video
    pipeline's transformers take 36 channels (latent, mask, image latent) and return 16: the first 16 are guided."""
    pipe = pipeline(family)
    native = final_latents(pipe, family, steps=STEPS, guidance_scale=4.0, guidance_scale_2=3.0)
    ours, stats = guided_latents(pipe, family, ByExpert(CFG(4.0), CFG(3.0)), steps=STEPS, guidance_scale=4.0,
                                 guidance_scale_2=3.0)
    one_weight, _ = guided_latents(pipe, family, CFG(4.0), steps=STEPS, guidance_scale=4.0, guidance_scale_2=3.0)
    assert (ours - native).abs().max().item() <= 1e-5
    assert (one_weight - native).abs().max().item() > 1e-3
    # timesteps 1000, 858, 602, 9 against the boundary 0.875 * 1000 (I2V: 0.9 * 1000)
    assert [s.expert for s in stats.steps] == [0, 1, 1, 1]


def test_wan22_interval_and_adaptive_guidance_follow_the_boundary() -> None:
    """The steps start at EDM sigma inf, 6.04, 1.51 and 0.009 (timesteps 1000, 858, 602, 9); the boundary 875 puts
    the first on the high-noise expert. Interval (5, inf] guides the first two steps, across the switch of experts;
    AdaptiveGuidance switches CFG off for good once the cosine threshold is met, whichever expert runs."""
    pipe = pipeline("wan22")
    _, stats = guided_latents(pipe, "wan22", Interval(CFG(5.0), 5.0, float("inf")), steps=STEPS, guidance_scale=5.0,
                              batch_size=2)
    assert [(s.expert, s.computed["uncond"]) for s in stats.steps] == [(0, 2), (1, 2), (1, 0), (1, 0)]
    _, stats = guided_latents(pipe, "wan22", AdaptiveGuidance(CFG(5.0), threshold=1e-6), steps=STEPS,
                              guidance_scale=5.0, batch_size=2)
    assert [(s.expert, s.computed["uncond"]) for s in stats.steps] == [(0, 2), (1, 0), (1, 0), (1, 0)]
    # the same switch on the high-noise expert only: the low-noise one keeps its CFG
    _, stats = guided_latents(pipe, "wan22", ByExpert(AdaptiveGuidance(CFG(5.0), threshold=1e-6), CFG(3.0)),
                              steps=STEPS, guidance_scale=5.0, batch_size=2)
    assert [(s.expert, s.computed["uncond"]) for s in stats.steps] == [(0, 2), (1, 2), (1, 2), (1, 2)]


def test_empty_interval_computes_no_unconditional_rows() -> None:
    pipe = pipeline("wan22")
    conditional_only = final_latents(pipe, "wan22", steps=STEPS, guidance_scale=1.0, batch_size=2)
    rows_high, high = count_rows(pipe, "transformer")
    rows_low, low = count_rows(pipe, "transformer_2")
    try:
        out, stats = guided_latents(pipe, "wan22", Interval(CFG(5.0), 1e4, 2e4), steps=STEPS, guidance_scale=5.0,
                                    batch_size=2)
    finally:
        high.remove()
        low.remove()
    assert rows_high == [2] and rows_low == [2] * 3 and stats.uncond_rows == 0
    assert (out - conditional_only).abs().max().item() <= 1e-5


def test_expert_scale_of_one_is_refused() -> None:
    pipe = pipeline("wan22")
    with guidekit.guided(pipe, CFG(5.0)), \
            pytest.raises(ValueError, match=r"^guidance_scale_2=1.0 is not accepted while guidance"):
        final_latents(pipe, "wan22", steps=2, guidance_scale=5.0, guidance_scale_2=1.0)
    with pytest.raises(TypeError, match=r"^high=.* changes the conditional prediction"):
        ByExpert(guidekit.NAG(5.0, negative_prompt="x"), CFG(3.0))
