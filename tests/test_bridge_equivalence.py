"""set_guidance(CFG(w)) against diffusers' native CFG on every supported family and scheduler."""

from __future__ import annotations

import pytest
import torch
from pipelines import FLOW_FAMILIES, FLOW_SCHEDULERS, VP_FAMILIES, VP_SCHEDULERS, final_latents, pipeline, scheduler

import guidekit

CASES = [(f, s) for f in VP_FAMILIES for s in VP_SCHEDULERS] + [(f, s) for f in FLOW_FAMILIES for s in FLOW_SCHEDULERS]


@pytest.mark.parametrize(("family", "scheduler_name"), CASES)
def test_cfg_equals_native_and_none_restores(family: str, scheduler_name: str) -> None:
    pipe = pipeline(family)
    original = pipe.scheduler
    pipe.scheduler = scheduler(pipe, scheduler_name)
    try:
        native = final_latents(pipe, family, guidance_scale=5.0, batch_size=2)
        pipe.set_guidance(guidekit.CFG(5.0))
        guided = final_latents(pipe, family, guidance_scale=5.0, batch_size=2)
        assert pipe.guidance_stats.uncond_rows == pipe.guidance_stats.cond_rows > 0
        pipe.set_guidance(None)
        restored = final_latents(pipe, family, guidance_scale=5.0, batch_size=2)
    finally:
        pipe.set_guidance(None)
        pipe.scheduler = original
    assert native.abs().max() > 0 and torch.isfinite(native).all()
    assert torch.equal(guided, native)  # the pipeline's own arithmetic: CFG at its scale
    assert torch.equal(restored, native)


@pytest.mark.parametrize("family", VP_FAMILIES + FLOW_FAMILIES)
def test_pipeline_guidance_scale_is_ignored_under_guidance(family: str) -> None:
    """The proxy returns [g; g], so the pipeline's own guidance_scale has no effect on the result."""
    pipe = pipeline(family)
    native = final_latents(pipe, family, guidance_scale=3.0)
    pipe.set_guidance(guidekit.CFG(3.0))
    try:
        other_scale = final_latents(pipe, family, guidance_scale=9.0)
    finally:
        pipe.set_guidance(None)
    assert (other_scale - native).abs().max().item() <= 1e-5
