"""A guided prediction that is not finite stops the call with an error naming the method and the step."""

from __future__ import annotations

import pytest
import torch
from pipelines import final_latents, pipeline

import guidekit


@pytest.mark.parametrize("text", ["cfg(scale=1e308)", "apg(scale=1e300)"])
def test_a_non_finite_guided_prediction_raises_naming_method_and_step(text: str) -> None:
    pipe = pipeline("sd")
    native = final_latents(pipe, "sd", guidance_scale=float(text.split("=")[1].rstrip(")")), steps=2)
    assert not torch.isfinite(native).all()  # what the pipeline alone gives: non-finite latents, black images
    with pytest.raises(ValueError, match=r"guidance (cfg|apg)\(scale=1e\+30[08].*not finite at step 0"), \
            guidekit.guided(pipe, text):
        final_latents(pipe, "sd", guidance_scale=5.0, steps=2)


def test_finite_guidance_passes_the_check() -> None:
    pipe = pipeline("sd")
    with guidekit.guided(pipe, "apg(scale=5)") as run:
        assert torch.isfinite(final_latents(pipe, "sd", guidance_scale=5.0, steps=2)).all()
    assert run.stats.model_calls == 2


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_huge_weight_equal_to_the_pipelines_is_still_checked(family: str) -> None:
    """CFG at the pipeline's own scale is left to the pipeline's arithmetic, but not at weights whose combination of
    finite predictions can overflow: those are combined and checked by guidekit."""
    pipe = pipeline(family)
    scale = {"true_cfg_scale" if family == "flux" else "guidance_scale": 1e308}
    with pytest.raises(ValueError, match=r"not finite at step 0"), guidekit.guided(pipe, "cfg(scale=1e308)"):
        final_latents(pipe, family, steps=2, **scale)
