"""A guided prediction that is not finite stops the call with an error naming the method and the step."""

from __future__ import annotations

import pytest
import torch
from pipelines import final_latents, forward_replaced, pipeline

import guidekit
from guidekit.bridge.proxy import GuidedDenoiser


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


@pytest.mark.parametrize(("family", "poisoned_call"), [("sd", 2), ("flux", 3), ("flux", 4)])
def test_a_prediction_that_turns_non_finite_on_the_pass_through_path_is_caught(
        family: str, poisoned_call: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first step, plain CFG at the pipeline's own weight passes the pipeline's batch through without
    asking the guidance (``_steady_call``); its outputs are still checked. A network output that turns NaN at step 1
    (SD's second call; Flux's conditional or unconditional call of its second step) stops the call naming that
    step."""
    pipe = pipeline(family)
    denoiser = pipe.unet if family == "sd" else pipe.transformer
    own, calls, steady = denoiser.forward, [], []
    original = GuidedDenoiser._steady_call
    monkeypatch.setattr(GuidedDenoiser, "_steady_call", lambda self, a, k: steady.append(1) or original(self, a, k))

    def poisoned(*args, **kwargs):
        out = own(*args, **kwargs)
        calls.append(1)
        return (torch.full_like(out[0], float("nan")), *out[1:]) if len(calls) == poisoned_call else out

    scale = {"true_cfg_scale" if family == "flux" else "guidance_scale": 5.0}
    with forward_replaced(denoiser, poisoned), \
            pytest.raises(ValueError, match=r"guidance cfg\(scale=5\.0.* not finite at step 1 "), \
            guidekit.guided(pipe, "cfg(scale=5)"):
        final_latents(pipe, family, steps=3, **scale)
    assert steady and len(calls) == 3 * (1 + (family == "flux"))  # the pass-through path ran every later call
