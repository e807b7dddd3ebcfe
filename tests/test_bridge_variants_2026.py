"""The image- and video-conditioned variants of the 2026 families (img2img, inpaint, video-to-video,
image-to-video), on the tiny families' components: native CFG equals set_guidance(CFG(w)) bitwise, detaching
restores the native result bitwise, and an empty interval computes no unconditional rows."""

from __future__ import annotations

import pytest
import torch
from pipelines import VARIANTS, variant, variant_call

import guidekit
from guidekit import CFG, Interval
from guidekit.bridge.families import family_of_class

STEPS = 4


def _latents(pipe, name: str, scale: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = pipe(**variant_call(name), num_inference_steps=STEPS, output_type="latent",
               generator=torch.Generator().manual_seed(0), **{family_of_class(type(pipe)).scale_arg: scale})
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cfg_equals_native_and_empty_interval_skips(name: str) -> None:
    pipe = variant(name)
    native = _latents(pipe, name, 4.0)
    with guidekit.guided(pipe, CFG(4.0)) as run:
        guided = _latents(pipe, name, 4.0)
    with guidekit.guided(pipe, Interval(CFG(4.0), 1e4, 2e4)) as empty:
        skipped = _latents(pipe, name, 4.0)
    assert torch.equal(guided, native) and run.stats.computed["uncond"] == run.stats.computed["cond"] > 0
    assert torch.equal(_latents(pipe, name, 4.0), native)
    conditional_only = _latents(pipe, name, 1.0)
    assert empty.stats.uncond_rows == 0 and (skipped - conditional_only).abs().max().item() <= 1e-5
    assert (native - conditional_only).abs().max().item() > 1e-3
