"""PCG and CFG++ where the plan starts mid-way: ``add_noise`` against its closed form and DDPM's, ``order`` and
``set_begin_index`` against the full plan, and SD / SDXL img2img and inpaint calls against the tail of the plan."""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import diffusers
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from pipelines import pipeline

import guidekit
from guidekit.bridge.schedulers import SchedulerReader
from guidekit.samplers.base import VPSampler
from guidekit.samplers.cfgpp import CFGPPScheduler
from guidekit.samplers.edm_heun import EDMHeunScheduler
from guidekit.testing.tiny import tiny_call_kwargs

STEPS = 5
STRENGTH = 0.6
GUIDANCES = {
    "pcg": guidekit.PCG(gamma=5),
    "pcg-2-correctors": guidekit.PCG(gamma=5, corrector_steps=2),
    "cfgpp-euler": guidekit.CFGPP(0.6),
    "cfgpp-dpmpp_2m": guidekit.CFGPP(0.6, solver="dpmpp_2m"),
}
VARIANTS = {"img2img": StableDiffusionImg2ImgPipeline, "inpaint": StableDiffusionInpaintPipeline,
            "sdxl-img2img": StableDiffusionXLImg2ImgPipeline, "sdxl-inpaint": StableDiffusionXLInpaintPipeline}
IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
MASK = (torch.arange(32)[None, None, :, None] < 16).float().expand(1, 1, 32, 32)  # repaint the top half


def _plan(guidance: guidekit.Guidance, steps: int = STEPS, family: str = "sd") -> VPSampler:
    """The sampler ``set_guidance`` installs for ``guidance``, with the full plan of ``steps`` steps."""
    sampler = guidance.make_sampler(pipeline(family).scheduler.config)
    sampler.set_timesteps(steps)
    return sampler


def _start_call(plan: VPSampler) -> int:
    """The plan index where ``strength = STRENGTH`` starts: the predictor call of solver step ``t_start``, so that
    ``int(strength * steps)`` solver steps remain."""
    t_start = STEPS - int(STEPS * STRENGTH)
    return [j for j, c in enumerate(plan.calls) if not c.corrector][t_start]


def _closed_form(x0: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """VP latents at EDM level ``sigma``: ``alpha x0 + s eps``, ``alpha = 1 / sqrt(1 + sigma^2)``,
    ``s = sigma alpha``."""
    alpha = 1 / math.sqrt(1 + sigma**2)
    return alpha * x0 + sigma * alpha * eps


def _variant(name: str) -> tuple[Any, str, dict[str, Any]]:
    """An img2img or inpaint pipeline on the components of the tiny text-to-image one, and its call arguments."""
    family = "sdxl" if name.startswith("sdxl") else "sd"
    cls = VARIANTS[name]
    accepted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in pipeline(family).components.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": tiny_call_kwargs(family)["prompt"], "image": IMAGE, "strength": STRENGTH,
            "num_inference_steps": STEPS, "guidance_scale": 2.0, "output_type": "latent"}
    if name.endswith("inpaint"):
        call["mask_image"] = MASK
    return pipe, family, call


@contextmanager
def _recorded(pipe: Any, guidance: guidekit.Guidance) -> Iterator[dict[str, list]]:
    """Attach ``guidance`` and record, per denoiser call, the timestep the pipeline feeds the network and the call
    the bridge reads (plan index, level, corrector flag), and every ``add_noise`` call (arguments and result)."""
    pipe.set_guidance(guidance)
    sampler = pipe.scheduler
    record: dict[str, list] = {"timesteps": [], "calls": [], "add_noise": []}
    read, add_noise = sampler.denoiser_call, sampler.add_noise

    def denoiser_call(timestep: Any) -> Any:
        level, corrector, tau, step = read(timestep)
        record["calls"].append((sampler.step_index, level.sigma, corrector))
        return level, corrector, tau, step

    def noised(original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = add_noise(original, noise, timesteps)
        record["add_noise"].append((original, noise, torch.as_tensor(timesteps).flatten().tolist(), out))
        return out

    def fed(module: Any, args: tuple, kwargs: dict) -> None:
        record["timesteps"].append(float(args[1] if len(args) > 1 else kwargs["timestep"]))

    sampler.denoiser_call, sampler.add_noise = denoiser_call, noised
    handle = pipe.unet.register_forward_pre_hook(fed, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()
        pipe.set_guidance(None)


def _assert_calls(recorded: list[tuple[int, float, bool]], plan: VPSampler, first: int) -> None:
    """``recorded`` (plan index, level, corrector flag) are the plan's calls from ``first`` on, to the end unless
    fewer were recorded; levels to rounding (the bridge's ``NoiseLevel`` holds ``alpha`` and ``s``)."""
    expected = [(j, c.sigma, c.corrector) for j, c in enumerate(plan.calls)][first:first + len(recorded)]
    assert [(j, c) for j, _, c in recorded] == [(j, c) for j, _, c in expected]
    assert [s for _, s, _ in recorded] == pytest.approx([s for _, s, _ in expected], rel=1e-12)


# add_noise


@pytest.mark.parametrize("name", GUIDANCES)
def test_add_noise_at_a_planned_timestep_is_the_closed_form_at_that_calls_level(name: str) -> None:
    sampler = _plan(GUIDANCES[name])
    n = len(sampler.calls)
    gen = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(n, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = torch.stack([_closed_form(x0[j], eps[j], c.sigma) for j, c in enumerate(sampler.calls)])
    torch.testing.assert_close(sampler.add_noise(x0, eps, sampler.timesteps), expected, rtol=0, atol=1e-12)
    for b in range(n):  # where the pipeline stands when it calls add_noise: the call about to be made
        sampler.set_begin_index(b)
        one = sampler.timesteps[b:b + 1]
        torch.testing.assert_close(sampler.add_noise(x0, eps, one), _closed_form(x0, eps, sampler.calls[b].sigma),
                                   rtol=0, atol=1e-12)


def test_add_noise_tells_apart_planned_levels_that_share_a_timestep() -> None:
    """Karras levels below the training table all get timestep 0 (``sigma_to_t`` clamps): at each such call
    ``add_noise`` uses that call's own level."""
    sampler = CFGPPScheduler.from_config(pipeline("sd").scheduler.config, sigma_min=1e-3)
    sampler.set_timesteps(12)
    clamped = [j for j, t in enumerate(sampler.timesteps.tolist()) if t == 0]
    assert len(clamped) >= 2
    x0, eps = torch.ones(1, 2, dtype=torch.float64), torch.full((1, 2), 2.0, dtype=torch.float64)
    for j in clamped:
        sampler.set_begin_index(j)
        torch.testing.assert_close(sampler.add_noise(x0, eps, sampler.timesteps[j:j + 1]),
                                   _closed_form(x0, eps, sampler.calls[j].sigma), rtol=0, atol=1e-12)


def test_add_noise_off_the_plan_is_ddpm_and_inverts_sigma_to_t() -> None:
    config = pipeline("sd").scheduler.config
    sampler = _plan(guidekit.PCG(gamma=5))
    gen = torch.Generator().manual_seed(2)
    x0, eps = (torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    ts = torch.tensor([0, 1, 17, 500, 998, 999])
    ddpm = diffusers.DDPMScheduler.from_config(config).add_noise(x0, eps, ts)
    torch.testing.assert_close(sampler.add_noise(x0, eps, ts), ddpm, rtol=0, atol=1e-12)
    fractional = torch.tensor([0.25, 123.5, 998.75], dtype=torch.float64)
    one, zero = torch.ones(3, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
    sigma = sampler.add_noise(zero, one, fractional) / sampler.add_noise(one, zero, fractional)
    assert [sampler.sigma_to_t(float(s)) for s in sigma] == pytest.approx(fractional.tolist(), abs=1e-9)


# order and set_begin_index


@pytest.mark.parametrize("corrector_steps", [0, 1, 2, 3])
def test_pcg_order_slices_timesteps_at_whole_steps(corrector_steps: int) -> None:
    """img2img runs ``timesteps[t_start * order:]``: the predictor of step ``t_start`` and all calls after it."""
    sampler = _plan(guidekit.PCG(gamma=5, corrector_steps=corrector_steps), steps=6)
    assert sampler.order == 1 + corrector_steps
    for t_start in range(6):
        tail = sampler.calls[t_start * sampler.order:]
        assert not tail[0].corrector and tail[0].sigma == sampler.sigmas[t_start]
        assert [c.sigma for c in tail if not c.corrector] == sampler.sigmas[t_start:-1]
        assert len(tail) == (6 - t_start - 1) * sampler.order + 1


def _denoiser(sample: torch.Tensor, timestep: float) -> torch.Tensor:
    """A smooth stand-in for a network's eps prediction."""
    return 0.3 * sample + torch.sin(sample + timestep / 250)


def _run(sampler: VPSampler, latents: torch.Tensor, generator: torch.Generator, calls: range,
         until: int | None = None) -> torch.Tensor:
    """Step ``calls`` of the plan the way a pipeline loop does, checking what the bridge reads at each call; stop
    before call ``until``."""
    reader = SchedulerReader(sampler)
    for j in calls:
        if j == until:
            break
        t = sampler.timesteps[j]
        state = reader(t)
        _assert_calls([(sampler.step_index, state.level.sigma, state.corrector)], sampler, j)
        assert state.tau == float(t) / 1000
        latents = sampler.step(_denoiser(latents, float(t)), t, latents, generator=generator).prev_sample
    return latents


@pytest.mark.parametrize("name", ["pcg", "pcg-2-correctors", "cfgpp-euler"])
def test_starting_at_any_call_continues_the_full_plan(name: str) -> None:
    """From the latents and generator state the full plan has before call ``b``, a plan started at ``b``
    (``set_begin_index``) makes the same calls and ends at the same latents, bitwise."""
    full = _plan(GUIDANCES[name], steps=4)
    start = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    n = len(full.calls)
    reference = _run(full, start, torch.Generator().manual_seed(4), range(n))
    for b in range(1, n):
        full.set_timesteps(4)
        gen = torch.Generator().manual_seed(4)
        latents = _run(full, start, gen, range(n), until=b)
        resumed = _plan(GUIDANCES[name], steps=4)
        resumed.set_begin_index(b)
        assert resumed.begin_index == b
        assert torch.equal(_run(resumed, latents, gen, range(b, n)), reference), b


def test_dpmpp_2m_started_mid_plan_takes_a_first_order_step_first() -> None:
    """DPM-Solver++(2M) has no earlier prediction at its first call, as diffusers' multistep solvers after
    ``set_begin_index``: its first step is the Euler step; its second is not."""
    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    ends: dict[str, list[torch.Tensor]] = {"cfgpp-euler": [], "cfgpp-dpmpp_2m": []}
    for name, k in itertools.product(ends, (1, 2)):
        sampler = _plan(GUIDANCES[name])
        sampler.set_begin_index(2)
        ends[name].append(_run(sampler, latents, torch.Generator(), range(2, 2 + k)))
    assert torch.equal(ends["cfgpp-euler"][0], ends["cfgpp-dpmpp_2m"][0])
    assert not torch.allclose(ends["cfgpp-euler"][1], ends["cfgpp-dpmpp_2m"][1])


def test_begin_index_errors_and_reset() -> None:
    sampler = _plan(guidekit.PCG(gamma=5))
    n = len(sampler.calls)
    with pytest.raises(ValueError, match=rf"^begin_index={n} is not accepted; expected an integer in \[0, {n - 1}\]$"):
        sampler.set_begin_index(n)
    sampler.set_begin_index(3)
    sampler.set_timesteps(STEPS)
    assert sampler.begin_index is None and sampler.step_index == 0
    heun = EDMHeunScheduler.from_config(pipeline("sd").scheduler.config)
    heun.set_timesteps(STEPS)
    heun.set_begin_index(0)
    with pytest.raises(ValueError, match=r"^begin_index=2 is not accepted by EDMHeunScheduler; expected 0 "):
        heun.set_begin_index(2)


# pipelines


@pytest.mark.parametrize("variant", ["img2img", "inpaint"])
@pytest.mark.parametrize("name", GUIDANCES)
def test_sd_img2img_and_inpaint_run_the_tail_of_the_plan(variant: str, name: str) -> None:
    """strength * steps solver steps: the network gets the timesteps of the plan's calls from the predictor of
    step ``t_start``, the bridge reads those calls, and the image is noised to the first one's level."""
    pipe, _, call = _variant(variant)
    plan = _plan(GUIDANCES[name])
    b = _start_call(plan)
    with _recorded(pipe, GUIDANCES[name]) as record:
        out = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        stats = pipe.guidance_stats
    assert torch.isfinite(out).all()
    assert record["timesteps"] == plan.timesteps[b:].tolist()
    _assert_calls(record["calls"], plan, b)
    assert len(record["calls"]) == stats.model_calls == len(plan.calls) - b
    x0, noise, timesteps, noised = record["add_noise"][0]
    assert timesteps == [plan.timesteps[b].item()]
    torch.testing.assert_close(noised, _closed_form(x0, noise, plan.calls[b].sigma), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", GUIDANCES)
def test_inpaint_renoises_the_kept_region_to_the_level_of_the_next_call(name: str) -> None:
    """With a 4-channel UNet the pipeline noises the original latents to ``timesteps[i + 1]`` after every call but
    the last: they must be at the level the sampler's latents have at that next call."""
    pipe, _, call = _variant("inpaint")
    with _recorded(pipe, GUIDANCES[name]) as record:
        pipe(**call, generator=torch.Generator().manual_seed(0))
    calls = record["calls"]
    assert len(record["add_noise"]) == len(calls)  # prepare_latents, then after every call but the last
    for (x0, noise, timesteps, noised), (_, sigma, _) in zip(record["add_noise"], calls, strict=True):
        assert len(timesteps) == 1
        torch.testing.assert_close(noised, _closed_form(x0, noise, sigma), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", GUIDANCES)
def test_img2img_at_full_strength_is_text_to_image_from_the_noised_image(name: str) -> None:
    """strength 1 runs the whole plan from ``alpha_0 x0 + s_0 eps`` at the first call's level, as diffusers' own
    schedulers do: text-to-image from those latents, with the generator in the same state, gives the same result."""
    guidance = GUIDANCES[name]
    img2img, _, call = _variant("img2img")
    text2img = pipeline("sd")
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))  # latents: no VAE sampling
    img2img.set_guidance(guidance)
    try:
        ours = img2img(**{**call, "image": x0, "strength": 1.0}, generator=torch.Generator().manual_seed(7)).images
    finally:
        img2img.set_guidance(None)
    gen = torch.Generator().manual_seed(7)
    noise = randn_tensor(x0.shape, generator=gen, dtype=x0.dtype)
    latents = _closed_form(x0, noise, _plan(guidance).calls[0].sigma)
    text2img.set_guidance(guidance)
    try:
        theirs = text2img(**tiny_call_kwargs("sd"), latents=latents, num_inference_steps=STEPS, guidance_scale=2.0,
                          output_type="latent", generator=gen).images
    finally:
        text2img.set_guidance(None)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["sdxl-img2img", "sdxl-inpaint"])
@pytest.mark.parametrize("name", ["pcg", "cfgpp-dpmpp_2m"])
def test_sdxl_img2img_and_inpaint_run_the_tail_of_the_plan(variant: str, name: str) -> None:
    pipe, family, call = _variant(variant)
    plan = _plan(GUIDANCES[name], family=family)
    b = _start_call(plan)
    with _recorded(pipe, GUIDANCES[name]) as record:
        out = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()
    _assert_calls(record["calls"], plan, b)
    assert len(record["calls"]) == len(plan.calls) - b


@pytest.mark.parametrize("name", ["pcg-2-correctors", "cfgpp-euler", "cfgpp-dpmpp_2m"])
def test_sdxl_base_and_refiner_split_the_plan(name: str) -> None:
    """``denoising_end`` in the base and ``denoising_start`` in the refiner: every call of the plan once, in order
    (PCG with one corrector step is left out: diffusers starts an order-2 refiner one call early)."""
    guidance, steps = GUIDANCES[name], 6
    base = pipeline("sdxl")
    refiner, _, call = _variant("sdxl-img2img")
    prompt = call["prompt"]
    with _recorded(base, guidance) as first:
        latents = base(prompt=prompt, num_inference_steps=steps, denoising_end=0.5, guidance_scale=2.0,
                       output_type="latent").images
    with _recorded(refiner, guidance) as second:
        out = refiner(prompt=prompt, image=latents, num_inference_steps=steps, denoising_start=0.5,
                      guidance_scale=2.0, output_type="latent").images
    plan = _plan(guidance, steps=steps, family="sdxl")
    assert torch.isfinite(out).all() and first["calls"] and second["calls"]
    _assert_calls(first["calls"] + second["calls"], plan, 0)
    assert len(first["calls"]) + len(second["calls"]) == len(plan.calls)


def test_sdxl_refiner_with_an_order_2_sampler_is_refused_by_name() -> None:
    """PCG with one corrector step has order 2, which diffusers' SDXL refiner reads as Heun's: refused up front."""
    refiner, _, call = _variant("sdxl-img2img")
    refiner.set_guidance(guidekit.PCG(5.0))
    try:
        with pytest.raises(ValueError, match=r"denoising_start=0\.5 is not accepted"):
            refiner(**{**call, "strength": 0.3}, denoising_start=0.5)
    finally:
        refiner.set_guidance(None)
