"""Flux's true CFG: two denoiser calls per step, cond then uncond, against the pipeline's own result."""

from __future__ import annotations

import pytest
import torch
from pipelines import FirstSampleOnly, count_rows, final_latents, guided_latents, pipeline

import guidekit


def test_true_cfg_equals_native_and_none_restores() -> None:
    pipe = pipeline("flux")
    native = final_latents(pipe, "flux", true_cfg_scale=5.0, batch_size=2)
    guided, stats = guided_latents(pipe, "flux", guidekit.CFG(5.0), true_cfg_scale=5.0, batch_size=2)
    assert stats.model_calls == 8 and stats.uncond_rows == stats.cond_rows == 8
    assert (guided - native).abs().max().item() <= 1e-5
    assert torch.equal(final_latents(pipe, "flux", true_cfg_scale=5.0, batch_size=2), native)


def test_pipeline_scale_does_not_change_the_result() -> None:
    pipe = pipeline("flux")
    native = final_latents(pipe, "flux", true_cfg_scale=3.0)
    guided, _ = guided_latents(pipe, "flux", guidekit.CFG(3.0), true_cfg_scale=7.0)
    assert (guided - native).abs().max().item() <= 1e-5


def test_empty_interval_skips_the_unconditional_call() -> None:
    pipe = pipeline("flux")
    conditional_only = final_latents(pipe, "flux", true_cfg_scale=1.0, negative_prompt=None, batch_size=2)
    rows, handle = count_rows(pipe, "transformer")
    try:
        out, stats = guided_latents(pipe, "flux", guidekit.Interval(guidekit.CFG(5.0), 1e4, 2e4), true_cfg_scale=5.0,
                                    batch_size=2)
    finally:
        handle.remove()
    assert rows == [2] * 4 and stats.model_calls == 4 and stats.uncond_rows == 0
    assert (out - conditional_only).abs().max().item() <= 1e-5


def test_partial_guidance_evaluates_only_guided_rows() -> None:
    pipe = pipeline("flux")
    cfg = final_latents(pipe, "flux", true_cfg_scale=5.0, batch_size=2)
    conditional_only = final_latents(pipe, "flux", true_cfg_scale=1.0, negative_prompt=None, batch_size=2)
    rows, handle = count_rows(pipe, "transformer")
    try:
        out, stats = guided_latents(pipe, "flux", FirstSampleOnly(5.0), true_cfg_scale=5.0, batch_size=2)
    finally:
        handle.remove()
    assert rows == [2, 1] * 4 and stats.uncond_rows_per_sample == [4, 0]
    assert (out[0] - cfg[0]).abs().max().item() <= 1e-5
    assert (out[1] - conditional_only[1]).abs().max().item() <= 1e-5


def test_missing_negative_prompt_is_an_error() -> None:
    pipe = pipeline("flux")
    pipe.set_guidance(guidekit.CFG(5.0))
    try:
        with pytest.raises(ValueError, match=r"negative_prompt=None is not accepted.*true_cfg_scale > 1"):
            final_latents(pipe, "flux", true_cfg_scale=5.0, negative_prompt=None, steps=2)
        with pytest.raises(ValueError, match=r"true_cfg_scale=1\.0 is not accepted"):
            final_latents(pipe, "flux", true_cfg_scale=1.0, steps=2)
    finally:
        pipe.set_guidance(None)


def test_context_grid_is_the_unpacked_latent_size() -> None:
    """The packed tokens' positions (img_ids) give the guidance the unpacked latent's (height, width): a 32 x 32
    image through the tiny autoencoder (factor 2) is a 16 x 16 latent, packed into 8 x 8 tokens."""
    grids: list[tuple[int, int] | None] = []

    class RecordsGrid(guidekit.CFG):
        def combine(self, cond, uncond, ctx, state=None, scale=None):  # type: ignore[no-untyped-def]
            grids.append(ctx.grid)
            return super().combine(cond, uncond, ctx, state, scale)

    pipe = pipeline("flux")
    guided_latents(pipe, "flux", RecordsGrid(5.0), true_cfg_scale=5.0)
    assert grids == [(16, 16)] * 4
