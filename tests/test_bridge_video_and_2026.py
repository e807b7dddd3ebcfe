"""The 2026 pipelines beside Wan: Chroma and Qwen-Image (two calls per step on packed latents; Qwen-Image rescales each
token of the guided prediction to the conditional one's norm), LTX-Video (one batched call on packed video tokens)
and CogVideoX (one batched call on ``(B, T, C, H, W)`` latents), against the pipelines' own results."""

from __future__ import annotations

import pytest
import torch
from pipelines import FirstSampleOnly, count_rows, final_latents, guided_latents, pipeline

from guidekit import CFG, Interval

STEPS = 3
FAMILIES = ("chroma", "qwenimage", "ltx", "cogvideox")
#: The argument that turns CFG on, where it is not guidance_scale.
SCALE_ARG = {"qwenimage": "true_cfg_scale"}


def _scale(family: str, value: float) -> dict[str, float]:
    return {SCALE_ARG.get(family, "guidance_scale"): value}


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_equals_native_and_none_restores(family: str) -> None:
    pipe = pipeline(family)
    native = final_latents(pipe, family, steps=STEPS, batch_size=2, **_scale(family, 5.0))
    guided, stats = guided_latents(pipe, family, CFG(5.0), steps=STEPS, batch_size=2, **_scale(family, 5.0))
    assert stats.uncond_rows == stats.cond_rows == 2 * STEPS
    assert (guided - native).abs().max().item() <= 1e-5
    assert torch.equal(final_latents(pipe, family, steps=STEPS, batch_size=2, **_scale(family, 5.0)), native)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_interval_computes_no_unconditional_rows(family: str) -> None:
    pipe = pipeline(family)
    conditional_only = final_latents(pipe, family, steps=STEPS, batch_size=2, **_scale(family, 1.0))
    rows, handle = count_rows(pipe, "transformer")
    try:
        out, stats = guided_latents(pipe, family, Interval(CFG(5.0), 1e4, 2e4), steps=STEPS, batch_size=2,
                                    **_scale(family, 5.0))
    finally:
        handle.remove()
    assert rows == [2] * STEPS and stats.uncond_rows == 0
    assert (out - conditional_only).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwenimage", "chroma"])
def test_partial_guidance_evaluates_only_guided_rows(family: str) -> None:
    """Sample 0 guided, sample 1 not: the unconditional call gets sample 0's row only (with its per-sample
    arguments, Qwen-Image's img_shapes and masks, cut to it)."""
    pipe = pipeline(family)
    cfg = final_latents(pipe, family, steps=STEPS, batch_size=2, **_scale(family, 5.0))
    conditional_only = final_latents(pipe, family, steps=STEPS, batch_size=2, **_scale(family, 1.0))
    rows, handle = count_rows(pipe, "transformer")
    try:
        out, stats = guided_latents(pipe, family, FirstSampleOnly(5.0), steps=STEPS, batch_size=2,
                                    **_scale(family, 5.0))
    finally:
        handle.remove()
    assert rows == [2, 1] * STEPS and stats.uncond_rows_per_sample == [STEPS, 0]
    assert (out[0] - cfg[0]).abs().max().item() <= 1e-5
    assert (out[1] - conditional_only[1]).abs().max().item() <= 1e-5
