"""The 2026 pipelines beside Wan: Chroma (two calls per step on packed latents), LTX-Video (one batched call on packed
video tokens) and CogVideoX (one batched call on ``(B, T, C, H, W)`` latents), against the pipelines' own results."""

from __future__ import annotations

import pytest
import torch
from pipelines import count_rows, final_latents, guided_latents, pipeline

from guidekit import CFG, Interval

STEPS = 3
FAMILIES = ("chroma", "ltx", "cogvideox")


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_equals_native_and_none_restores(family: str) -> None:
    pipe = pipeline(family)
    native = final_latents(pipe, family, steps=STEPS, guidance_scale=5.0, batch_size=2)
    guided, stats = guided_latents(pipe, family, CFG(5.0), steps=STEPS, guidance_scale=5.0, batch_size=2)
    assert stats.uncond_rows == stats.cond_rows == 2 * STEPS
    assert (guided - native).abs().max().item() <= 1e-5
    assert torch.equal(final_latents(pipe, family, steps=STEPS, guidance_scale=5.0, batch_size=2), native)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_interval_computes_no_unconditional_rows(family: str) -> None:
    pipe = pipeline(family)
    conditional_only = final_latents(pipe, family, steps=STEPS, guidance_scale=1.0, batch_size=2)
    rows, handle = count_rows(pipe, "transformer")
    try:
        out, stats = guided_latents(pipe, family, Interval(CFG(5.0), 1e4, 2e4), steps=STEPS, guidance_scale=5.0,
                                    batch_size=2)
    finally:
        handle.remove()
    assert rows == [2] * STEPS and stats.uncond_rows == 0
    assert (out - conditional_only).abs().max().item() <= 1e-5
