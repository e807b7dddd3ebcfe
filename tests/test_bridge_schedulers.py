"""The noise level guidekit reads at each call against diffusers' own x0 for that call."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pipelines import pipeline

from guidekit.bridge.schedulers import SchedulerReader, make_scheduler, model_space

# Schedulers whose step() returns the x0 it used, or stores it as its latest model output.
ORACLE_SCHEDULERS = ("ddim", "ddpm", "euler", "euler_a", "heun", "kdpm2", "kdpm2_a", "lms", "dpmpp_2m", "dpmpp_2s",
                     "unipc")


def _record(pipe: Any, steps: int) -> list[dict[str, Any]]:
    """Run the tiny SD pipeline without CFG, recording per call our level and the scheduler's x0."""
    calls: list[dict[str, Any]] = []
    sched = pipe.scheduler
    step = sched.step
    readers: list[SchedulerReader] = []

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        if not readers:  # made at the first call, after the pipeline's set_timesteps, as the bridge does
            readers.append(SchedulerReader(sched))
        calls.append({"x_t": args[0].clone(), "state": readers[0](args[1])})

    def spy_step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        out = step(model_output, timestep, sample, *args, **kwargs, return_dict=True)
        x0 = getattr(out, "pred_original_sample", None)
        calls[-1]["x0"] = (x0 if x0 is not None else sched.model_outputs[-1]).clone()
        calls[-1]["out"] = model_output.clone()
        return out if return_dict else (out.prev_sample,)

    handle = pipe.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    sched.step = spy_step
    try:
        pipe(prompt="a cat", num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
        del sched.step
    return calls


@pytest.mark.parametrize("name", ORACLE_SCHEDULERS)
@pytest.mark.parametrize("karras", [False, True])
def test_level_matches_scheduler_x0(name: str, karras: bool) -> None:
    pipe = pipeline("sd")
    original = pipe.scheduler
    config = dict(original.config)
    if karras:
        if name in ("ddim", "ddpm"):
            pytest.skip("no Karras sigmas for this scheduler")
        config["use_karras_sigmas"] = True
    pipe.scheduler = make_scheduler(name, config)
    try:
        calls = _record(pipe, steps=5)
    finally:
        pipe.scheduler = original
    assert len(calls) >= 5
    for call in calls:
        ours = call["state"].level.to_x0(call["out"].double(), call["x_t"].double(), model_space(pipe.scheduler))
        torch.testing.assert_close(ours.float(), call["x0"], rtol=1e-4, atol=1e-4)


def test_heun_steps_and_correctors() -> None:
    """Heun's 2N-1 calls: predictor flags alternate, corrector levels are the next step's sigma."""
    pipe = pipeline("sd")
    original = pipe.scheduler
    pipe.scheduler = make_scheduler("heun", original.config)
    try:
        calls = _record(pipe, steps=4)
        sigmas = [float(s) for s in pipe.scheduler.sigmas]
    finally:
        pipe.scheduler = original
    flags = [c["state"].corrector for c in calls]
    assert flags == [False, True, False, True, False, True, False]
    assert [round(c["state"].level.sigma, 4) for c in calls] == [round(s, 4) for s in sigmas[:-1]]


def test_flow_level_is_the_transformer_timestep() -> None:
    """SD3 hands the transformer t * 1000 with t the flow time: our s must equal it."""
    pipe = pipeline("sd3")
    seen: list[tuple[float, float]] = []
    readers: list[SchedulerReader] = []

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        if not readers:
            readers.append(SchedulerReader(pipe.scheduler))
        seen.append((readers[0](kwargs["timestep"]).level.s, float(kwargs["timestep"][0]) / 1000))

    handle = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        pipe(prompt="a cat", num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    finally:
        handle.remove()
    assert len(seen) == 4
    for ours, theirs in seen:
        assert ours == pytest.approx(theirs, rel=1e-6)
