"""One guided sampling call of any supported pipeline, from a user's inputs: used by ``guidekit sample`` and the
demo app.

:func:`call_kwargs` turns a prompt or class label into the pipeline's own call arguments; :func:`sample_guided`
attaches a guidance, swaps the scheduler if asked, seeds image ``i`` with ``seed + i`` and times the call.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline

from guidekit.bridge.families import family_of_class
from guidekit.bridge.install import set_guidance
from guidekit.bridge.proxy import GuidanceStats
from guidekit.bridge.schedulers import make_scheduler
from guidekit.guidance.base import Guidance


def _call_parameters(pipe: DiffusionPipeline) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(type(pipe).__call__).parameters


def takes_prompt(pipe: DiffusionPipeline) -> bool:
    """Whether the pipeline is conditioned on text (otherwise on class labels)."""
    return "prompt" in _call_parameters(pipe)


def call_kwargs(pipe: DiffusionPipeline, defaults: dict[str, Any], num_images: int, *, prompt: str | None = None,
                negative_prompt: str | None = None, class_label: int | None = None, height: int | None = None,
                width: int | None = None) -> dict[str, Any]:
    """Call arguments for ``num_images`` images: the text or class conditioning, falling back on ``defaults``
    (those :func:`~guidekit.bridge.loading.load_pipeline` returns) for what is not given."""
    kwargs, params = dict(defaults), _call_parameters(pipe)
    if "prompt" in params:
        kwargs["prompt"] = [prompt] * num_images if prompt is not None else kwargs.get("prompt", [""])[:1] * num_images
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * num_images
        elif "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = kwargs["negative_prompt"][:1] * num_images
    elif "class_labels" in params:
        label = class_label if class_label is not None else kwargs.get("class_labels", [0])[0]
        kwargs["class_labels"] = [label] * num_images
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    return kwargs


@dataclass
class GuidedRun:
    """What one guided call produced.

    Attributes:
        images: the pipeline's output images (PIL unless ``kwargs`` asked otherwise).
        stats: the network work (:class:`~guidekit.bridge.proxy.GuidanceStats`).
        seconds: wall time of the pipeline call.
        scheduler: class name of the scheduler that ran (the guidance's own sampler for PCG and CFG++).
    """

    images: list[Any]
    stats: GuidanceStats
    seconds: float
    scheduler: str


def sample_guided(pipe: DiffusionPipeline, guidance: Guidance, kwargs: dict[str, Any], *, steps: int, seed: int,
                  num_images: int, scheduler: str | None = None) -> GuidedRun:
    """Sample ``num_images`` images with ``guidance`` attached; image ``i`` uses seed ``seed + i``.

    ``scheduler`` (a name of :data:`~guidekit.bridge.schedulers.SCHEDULER_NAMES`) replaces the pipeline's
    scheduler for good; ``None`` keeps it. The guidance stays attached afterwards (detach it with
    ``set_guidance(pipe, None)``, which also gives back a scheduler that PCG or CFG++ swapped in).
    """
    if scheduler is not None:
        set_guidance(pipe, None)  # a scheduler that PCG or CFG++ swapped in goes first
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    set_guidance(pipe, guidance)
    device = pipe.device
    generator = [torch.Generator(device).manual_seed(seed + i) for i in range(num_images)]
    # Under set_guidance the pipeline's scale only switches its unconditional branch on (> 1) or off.
    kwargs = {**kwargs, family_of_class(type(pipe)).scale_arg: 2.0 if guidance.uses_unconditional else 1.0}
    start = time.perf_counter()
    images = pipe(**kwargs, num_inference_steps=steps, generator=generator).images
    seconds = time.perf_counter() - start
    return GuidedRun(list(images), pipe.guidance_stats, seconds, type(pipe.scheduler).__name__)
