"""Test helpers around the tiny offline pipelines: cached builds, scheduler swaps, final latents."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline

import guidekit
from guidekit.bridge.schedulers import make_scheduler
from guidekit.testing.tiny import VIDEO_FAMILIES, build_tiny_pipeline, random_picture, tiny_call_kwargs

VP_FAMILIES = ("sd", "sd-v", "sdxl", "dit", "pixart")
FLOW_FAMILIES = ("sd3", "sana")
VP_SCHEDULERS = ("ddim", "euler", "heun", "dpmpp_2m", "unipc")
FLOW_SCHEDULERS = ("flow_euler", "dpmpp_2m_flow", "unipc_flow")


@functools.cache
def pipeline(family: str) -> DiffusionPipeline:
    """One tiny pipeline per family per test session (tests restore whatever they change)."""
    return build_tiny_pipeline(family)


def scheduler(pipe: DiffusionPipeline, name: str) -> Any:
    """A scheduler by short name; ``*_flow`` names are the multistep solvers in flow-matching mode."""
    if name.endswith("_flow"):
        cls = {"dpmpp_2m_flow": diffusers.DPMSolverMultistepScheduler,
               "unipc_flow": diffusers.UniPCMultistepScheduler}[name]
        return cls(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    return make_scheduler(name, pipe.scheduler.config)


def final_latents(pipe: DiffusionPipeline, family: str, *, steps: int = 4, seed: int = 0, batch_size: int = 1,
                  **kwargs: Any) -> torch.Tensor:
    """The latents a call ends with (DiT always decodes, so its decoder input is captured)."""
    call = {**tiny_call_kwargs(family, batch_size), "num_inference_steps": steps, **kwargs}
    generator = torch.Generator().manual_seed(seed)
    if family in VIDEO_FAMILIES:
        return pipe(**call, generator=generator, output_type="latent").frames
    if family != "dit":
        return pipe(**call, generator=generator, output_type="latent").images
    captured: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def spy(latents: torch.Tensor, *args: Any, **kw: Any) -> Any:
        captured.append(latents.clone())
        return decode(latents, *args, **kw)

    pipe.vae.decode = spy
    try:
        pipe(**call, generator=generator, output_type="np")
    finally:
        del pipe.vae.decode
    return captured[0]


def guided_latents(pipe: DiffusionPipeline, family: str, guidance: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Final latents and ``guidance_stats`` of one call with ``guidance`` attached (detached afterwards)."""
    pipe.set_guidance(guidance)
    try:
        return final_latents(pipe, family, **kwargs), pipe.guidance_stats
    finally:
        pipe.set_guidance(None)


def count_rows(pipe: DiffusionPipeline, denoiser: str) -> tuple[list[int], Any]:
    """Record the rows the network really evaluates: a forward hook on its first layer (the patch embedding
    or input convolution), below anything guidekit wraps."""
    module = getattr(pipe, denoiser)
    first = next(getattr(module, name) for name in ("conv_in", "x_embedder", "patch_embedding", "patch_embed",
                                                     "proj_in", "img_in", "pos_embed", "t_embedder")
                 if hasattr(module, name))
    rows: list[int] = []
    handle = first.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    return rows, handle


@dataclasses.dataclass(frozen=True)
class FirstSampleOnly(guidekit.CFG):
    """CFG for sample 0 of the batch only: a test instrument for per-sample row selection."""

    def needs_unconditional(self, ctx: Any, state: Any = None, scale: float | None = None) -> torch.Tensor:
        return ctx.rows == 0


#: diffusers' own PAG pipelines of the UNet families, the oracle of PAG and (with SEG's processors) of SEG.
PAG_PIPELINES = {"sd": diffusers.StableDiffusionPAGPipeline, "sdxl": diffusers.StableDiffusionXLPAGPipeline}


def pag_pair(family: str) -> tuple[str, DiffusionPipeline, DiffusionPipeline]:
    """A fresh tiny pipeline of ``family`` and diffusers' PAG pipeline built from its components (PAG on ``mid``)."""
    pipe = build_tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    native = PAG_PIPELINES[family](**pipe.components, pag_applied_layers=["mid"])
    native.set_progress_bar_config(disable=True)
    return family, pipe, native


def images(pipe: DiffusionPipeline, family: str, steps: int, **kwargs: Any) -> torch.Tensor:
    """The images (``output_type="pt"``) of a call on the family's tiny call arguments, seed 0."""
    call = {**tiny_call_kwargs(family), "num_inference_steps": steps, "output_type": "pt", **kwargs}
    return pipe(**call, generator=torch.Generator().manual_seed(0)).images


@contextlib.contextmanager
def forward_replaced(module: torch.nn.Module, forward: Any) -> Iterator[None]:
    """``module.forward`` is ``forward`` inside the block (an oracle wrapping the module's own), and its own after."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


#: Image- and video-conditioned variants of the tiny families: class name -> (family whose components it takes,
#: the extra call arguments at a pixel side).
VARIANTS: dict[str, tuple[str, Any]] = {
    "FluxImg2ImgPipeline": ("flux", lambda s: {"image": random_picture(s, 1), "strength": 0.8}),
    "FluxInpaintPipeline": ("flux", lambda s: {"image": random_picture(s, 1), "mask_image": random_picture(s, 2),
                                               "strength": 0.8}),
    "ChromaImg2ImgPipeline": ("chroma", lambda s: {"image": random_picture(s, 1), "strength": 0.8}),
    "QwenImageImg2ImgPipeline": ("qwenimage", lambda s: {"image": random_picture(s, 1), "strength": 0.8}),
    "QwenImageInpaintPipeline": ("qwenimage", lambda s: {"image": random_picture(s, 1),
                                                         "mask_image": random_picture(s, 2), "strength": 0.8}),
    # one reference image per prompt, as the processor pairs them with the prompts' image placeholders
    "QwenImageEditInpaintPipeline": ("qwenimage-edit", lambda s: {"image": [random_picture(s, 1)] * 2,
                                                                  "mask_image": random_picture(s, 2), "strength": 0.8}),
    "WanVideoToVideoPipeline": ("wan", lambda s: {"video": [random_picture(s, i) for i in range(9)], "strength": 0.8}),
    "CogVideoXVideoToVideoPipeline": ("cogvideox", lambda s: {"video": [random_picture(s, i) for i in range(9)],
                                                              "strength": 0.8}),
    "LTXImageToVideoPipeline": ("ltx", lambda s: {"image": random_picture(s, 1)}),
}


@functools.cache
def variant(name: str) -> DiffusionPipeline:
    """The variant ``name`` of :data:`VARIANTS` on its family's tiny components (one per test session)."""
    family, _ = VARIANTS[name]
    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in pipeline(family).components.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def variant_call(name: str, batch_size: int = 2) -> dict[str, Any]:
    """The call arguments of the variant ``name``: its family's tiny ones and its image or video."""
    family, extra = VARIANTS[name]
    call = tiny_call_kwargs(family, batch_size)
    if "video" in extra(2):
        call.pop("num_frames", None)
    return {**call, **extra(call["height"])}
