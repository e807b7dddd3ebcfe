"""One guided pipeline call from settings: what ``guidekit sample``, ``guidekit eval`` and the demo all run.

The split: callers load the pipeline (model, dtype, device) once, with the default call arguments of
:func:`~guidekit.bridge.loading.load_pipeline`, and keep it; :class:`SampleSettings` holds what one call draws
(guidance, scheduler, steps, seeds, conditioning, size, output type) and refuses a bad value when it is made, before
any model is loaded or called; :func:`sample_guided` runs a loaded pipeline, which has no guidance attached, with
those settings and hands the pipeline back as it found it.

The rules, decided here only:

* A guidance that brings its own sampler (PCG, CFG++: :func:`~guidekit.bridge.install.brings_sampler`) runs that
  sampler; an explicit ``scheduler`` together with such a guidance is refused.
* ``scheduler`` (a name of :data:`~guidekit.bridge.schedulers.SCHEDULER_NAMES`) replaces the pipeline's scheduler
  for the call, built from its config; ``None`` keeps the pipeline's own. A scheduler for the other kind of model
  (a flow-matching scheduler on a VP model, or the reverse) is refused by name before the call.
* Resource limits (:mod:`guidekit.limits`: steps, images per request, seeds, image size, prompt length) are checked
  by :class:`SampleSettings`; the images are drawn in pipeline calls of at most :data:`~guidekit.limits.MAX_BATCH`
  consecutive seeds, the same as separate requests of those seeds.
* With a guidance, the family's scale argument (``guidance_scale``, Flux's ``true_cfg_scale``) is 2.0 when the
  guidance uses unconditional predictions and 1.0 otherwise: under ``set_guidance`` it only switches the
  unconditional branch on or off. Without one, the pipeline runs its native CFG at ``guidance_scale`` (1.0 if
  ``None``).
* Image ``i`` uses ``seeds[i]`` through its own ``torch.Generator`` on the pipeline's device, so its noise does not
  depend on the other seeds (its pixels can, in the last bits: the network's kernels depend on the batch size).
* A prompt or class label applies to every image, a tuple of them gives one per image; conditioning the settings
  leave out comes from the loader's defaults, and conditioning the pipeline does not take is left out.
* The stats are ``pipe.guidance_stats`` with a guidance; under native CFG the denoiser's calls and rows are counted
  (a batched ``[uncond; cond]`` call counts its rows beyond one per image as unconditional). Over several pipeline
  calls they are added up.
* Afterwards the guidance is detached and the pipeline's own scheduler is back in place, so calls with different
  settings on one pipeline do not affect each other.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from guidekit import limits
from guidekit.bridge.families import Family, family_of_class
from guidekit.bridge.install import brings_sampler, set_guidance
from guidekit.bridge.proxy import GuidanceStats, _sample_and_timestep
from guidekit.bridge.schedulers import SCHEDULER_NAMES, _is_flow, make_scheduler
from guidekit.guidance.base import COND, UNCOND, Guidance
from guidekit.limits import check_image_side, check_num_images, check_seed, check_steps, check_text
from guidekit.validation import check_int, check_number

#: The output types :func:`sample_guided` accepts: PIL images, or a float array (N, H, W, C) in [0, 1].
OUTPUT_TYPES = ("pil", "np")


def _call_parameters(pipe: DiffusionPipeline) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(type(pipe).__call__).parameters


def takes_prompt(pipe: DiffusionPipeline) -> bool:
    """Whether the pipeline is conditioned on text (otherwise on class labels)."""
    return "prompt" in _call_parameters(pipe)


@dataclass(frozen=True)
class SampleSettings:
    """What one pipeline call draws; every value is checked here, before any model is loaded or called.

    Attributes:
        guidance: the guidekit guidance to attach, or ``None`` for the pipeline's native CFG.
        guidance_scale: the native CFG scale (only without ``guidance``; ``None``: 1.0).
        scheduler: a name of :data:`~guidekit.bridge.schedulers.SCHEDULER_NAMES` for this call, or ``None`` for the
            pipeline's own; must be ``None`` with a guidance that brings its own sampler.
        steps: solver steps, 1 to :data:`~guidekit.limits.MAX_STEPS`.
        seeds: one seed in ``[0, MAX_SEED]`` per image, at most :data:`~guidekit.limits.MAX_IMAGES_PER_REQUEST`
            (a list or range is stored as a tuple).
        prompt: text-to-image pipelines: one prompt for every image, or one per image; ``None``: the loader's
            default prompt. Prompts and the negative prompt hold at most :data:`~guidekit.limits.MAX_PROMPT_CHARS`
            characters.
        negative_prompt: one negative prompt for every image; ``None``: the loader's default, if any.
        class_label: class-conditional pipelines: one label for every image, or one per image; ``None``: the
            loader's default label. Conditioning the pipeline does not take is left out.
        height, width: image size in pixels, a multiple of 8 up to :data:`~guidekit.limits.MAX_IMAGE_SIDE`;
            ``None``: the loader's or the pipeline's default.
        output_type: ``"pil"`` or ``"np"`` (float NHWC in [0, 1]).
    """

    guidance: Guidance | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    steps: int = 20
    seeds: tuple[int, ...] = (0,)
    prompt: str | tuple[str, ...] | None = None
    negative_prompt: str | None = None
    class_label: int | tuple[int, ...] | None = None
    height: int | None = None
    width: int | None = None
    output_type: str = "pil"

    def __post_init__(self) -> None:
        # counted before a long range is turned into a tuple
        if isinstance(self.seeds, (list, tuple, range)) and _length(self.seeds) > limits.MAX_IMAGES_PER_REQUEST:
            check_num_images("num_images", _length(self.seeds))
        for name in ("seeds", "prompt", "class_label"):  # per-image lists become tuples, so settings stay frozen
            value = getattr(self, name)
            if isinstance(value, (list, range)):
                object.__setattr__(self, name, tuple(value))
        if self.guidance is not None and not isinstance(self.guidance, Guidance):
            raise TypeError(f"guidance={self.guidance!r} is not accepted; expected a guidekit guidance or None")
        if self.guidance is not None and self.guidance_scale is not None:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} is not accepted together with guidance "
                             f"{self.guidance!r}; expected None (a guidance sets the weight itself)")
        if self.guidance_scale is not None:
            check_number("guidance_scale", self.guidance_scale)
        if self.scheduler is not None and self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"scheduler={self.scheduler!r} is not accepted; expected one of "
                             f"{', '.join(SCHEDULER_NAMES)}")
        if self.scheduler is not None and self.guidance is not None and brings_sampler(self.guidance):
            raise ValueError(f"scheduler={self.scheduler!r} is not accepted with guidance {self.guidance!r}, which "
                             "installs its own sampler; expected no scheduler (the pipeline's own)")
        check_steps("steps", self.steps)
        if not isinstance(self.seeds, tuple) or not self.seeds:
            raise ValueError(f"seeds={self.seeds!r} is not accepted; expected one non-negative integer per image")
        for seed in self.seeds:
            check_seed("seeds", seed)
        for name in ("prompt", "class_label"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != len(self.seeds):
                raise ValueError(f"{name} has {len(value)} entries, which is not accepted; expected one for every "
                                 f"image, {len(self.seeds)} (one per seed), or a single value for all")
        for name in ("prompt", "negative_prompt"):
            for text in _per_image(getattr(self, name), 1):
                if isinstance(text, str):
                    check_text(name, text)
        if self.class_label is not None:
            for label in _per_image(self.class_label, 1):
                check_int("class_label", label, low=0)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_image_side(name, getattr(self, name))
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={self.output_type!r} is not accepted; expected one of "
                             f"{', '.join(OUTPUT_TYPES)}")

    @property
    def num_images(self) -> int:
        """Images the call draws: one per seed."""
        return len(self.seeds)


@dataclass
class SampleResult:
    """What one call produced.

    Attributes:
        images: PIL images (``output_type="pil"``) or a float array (N, H, W, C) in [0, 1] (``"np"``).
        stats: the network work (:class:`~guidekit.bridge.proxy.GuidanceStats`).
        seconds: wall time of the pipeline call.
        scheduler: class name of the scheduler that ran (the guidance's own sampler for PCG and CFG++).
    """

    images: list[Any] | np.ndarray
    stats: GuidanceStats
    seconds: float
    scheduler: str


def _per_image(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, tuple) else [value] * n


def _length(values: Sequence[Any]) -> int:
    """``len(values)``, also for a range longer than ``sys.maxsize`` (where ``len`` raises ``OverflowError``)."""
    if isinstance(values, range):
        return max(0, -(-(values.stop - values.start) // values.step))
    return len(values)


def _chunks(settings: SampleSettings) -> list[SampleSettings]:
    """``settings`` cut into runs of at most :data:`~guidekit.limits.MAX_BATCH` consecutive seeds, with per-image
    conditioning cut alike."""
    def part(value: Any, chunk: slice) -> Any:
        return value[chunk] if isinstance(value, tuple) else value

    cuts = [slice(i, i + limits.MAX_BATCH) for i in range(0, settings.num_images, limits.MAX_BATCH)]
    if len(cuts) == 1:
        return [settings]
    return [replace(settings, seeds=settings.seeds[c], prompt=part(settings.prompt, c),
                    class_label=part(settings.class_label, c)) for c in cuts]


def _added(parts: list[GuidanceStats]) -> GuidanceStats:
    """The stats of several pipeline calls as one: counts added, per-sample rows in the calls' order."""
    if len(parts) == 1:
        return parts[0]
    total = GuidanceStats(model_calls=sum(p.model_calls for p in parts), computed={}, skipped={},
                          uncond_rows_per_sample=[r for p in parts for r in p.uncond_rows_per_sample])
    for part in parts:
        for mine, theirs in ((total.computed, part.computed), (total.skipped, part.skipped)):
            for name, rows in theirs.items():
                mine[name] = mine.get(name, 0) + rows
    return total


def _builds(name: str, config: Any, flow: bool) -> bool:
    """Whether the scheduler ``name`` builds from ``config`` and samples a flow-matching model iff ``flow``."""
    try:
        return _is_flow(make_scheduler(name, config)) == flow
    except ValueError:
        return False


def _chosen_scheduler(pipe: DiffusionPipeline, name: str) -> SchedulerMixin:
    """The scheduler ``name`` made from the pipeline's scheduler config; refused by name when it samples the other
    kind of model than the pipeline's own (flow matching against VP), listing the names that fit this model."""
    config = pipe.scheduler.config
    scheduler = make_scheduler(name, config)
    flow = _is_flow(pipe.scheduler)
    if _is_flow(scheduler) != flow:
        accepted = [n for n in SCHEDULER_NAMES if _builds(n, config, flow)]
        kind = "a flow-matching model" if flow else "a VP (noise-prediction) model"
        raise ValueError(f"scheduler={name!r} is not accepted for {type(pipe).__name__}, {kind} with "
                         f"{type(pipe.scheduler).__name__}; expected one of {', '.join(accepted)}, or none (the "
                         "pipeline's own)")
    return scheduler


def _call_arguments(pipe: DiffusionPipeline, family: Family, settings: SampleSettings,
                    defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline's call arguments for ``settings`` but the generators: the conditioning, falling back on
    ``defaults`` for what the settings leave out, the size and the family's scale argument."""
    kwargs, params, n = dict(defaults), _call_parameters(pipe), settings.num_images
    if "prompt" in params:
        prompt = settings.prompt
        kwargs["prompt"] = (kwargs.get("prompt") or [""])[:1] * n if prompt is None else _per_image(prompt, n)
        if settings.negative_prompt is not None:
            kwargs["negative_prompt"] = [settings.negative_prompt] * n
        elif kwargs.get("negative_prompt"):
            kwargs["negative_prompt"] = kwargs["negative_prompt"][:1] * n
    elif "class_labels" in params:
        label = settings.class_label
        kwargs["class_labels"] = (kwargs.get("class_labels") or [0])[:1] * n if label is None else \
            _per_image(label, n)
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value is not None and name not in params:
            raise ValueError(f"{name}={value!r} is not accepted by {type(pipe).__name__}, which has a fixed size; "
                             "expected None")
        if value is not None:
            kwargs[name] = value
    if settings.guidance is not None:
        kwargs[family.scale_arg] = (2.0 if settings.guidance.uses_unconditional else 1.0) - family.scale_offset
    else:
        kwargs[family.scale_arg] = 1.0 if settings.guidance_scale is None else float(settings.guidance_scale)
    return kwargs


class _NativeRows:
    """A forward pre-hook that counts the denoiser's calls and rows under the pipeline's native CFG.

    A batched call holds ``[uncond; cond]``: its rows beyond one per image are unconditional. A pipeline that makes
    separate calls (Flux's true CFG) makes the unconditional call second, so with ``alternate`` every second call
    is unconditional.
    """

    def __init__(self, num_images: int, alternate: bool) -> None:
        self.num_images, self.alternate = num_images, alternate
        self.calls = self.cond = self.uncond = 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample, _ = _sample_and_timestep(args, kwargs)
        rows = int(sample.shape[0])
        cond = 0 if self.alternate and self.calls % 2 else min(rows, self.num_images)
        self.cond, self.uncond, self.calls = self.cond + cond, self.uncond + rows - cond, self.calls + 1

    def stats(self) -> GuidanceStats:
        return GuidanceStats(model_calls=self.calls, computed={COND.name: self.cond, UNCOND.name: self.uncond},
                             uncond_rows_per_sample=[self.uncond // self.num_images] * self.num_images)


def _alternates(family: Family, kwargs: Mapping[str, Any]) -> bool:
    """Whether a native call of a separate-calls family makes an unconditional call after each conditional one."""
    cfg = family.weight(kwargs[family.scale_arg]) > 1 and (not family.negative_args
                                            or any(kwargs.get(a) is not None for a in family.negative_args))
    return family.separate_calls and cfg


def sample_guided(pipe: DiffusionPipeline, settings: SampleSettings, *,
                  defaults: Mapping[str, Any] | None = None) -> SampleResult:
    """Draw ``settings.num_images`` images from ``pipe`` with ``settings``; image ``i`` uses ``settings.seeds[i]``.

    The images are drawn in pipeline calls of at most :data:`~guidekit.limits.MAX_BATCH` consecutive seeds; the
    result holds them in order, the stats and seconds of all calls added up.

    Args:
        pipe: a loaded pipeline of a supported family, without a guidance attached; it comes back the same (no
            guidance, its own scheduler).
        settings: what to draw (see the module's rules).
        defaults: call arguments that make a valid call of ``pipe`` (those
            :func:`~guidekit.bridge.loading.load_pipeline` returns), used for what ``settings`` leave out.
    """
    family = family_of_class(type(pipe))
    if hasattr(pipe, "guidance_stats"):
        raise ValueError(f"pipe={type(pipe).__name__} is not accepted while it has a guidance attached; expected a "
                         "pipeline without one (set_guidance(pipe, None))")
    scheduler = None if settings.scheduler is None else _chosen_scheduler(pipe, settings.scheduler)
    calls = [(part, _call_arguments(pipe, family, part, defaults or {})) for part in _chunks(settings)]
    images: list[Any] = []
    stats: list[GuidanceStats] = []
    seconds = 0.0
    with ExitStack() as restore:  # on the way out, also after an error: the guidance goes, the scheduler comes back
        restore.callback(setattr, pipe, "scheduler", pipe.scheduler)
        if scheduler is not None:
            pipe.scheduler = scheduler
        if settings.guidance is not None:
            restore.callback(set_guidance, pipe, None)  # also gives back a scheduler the guidance's sampler replaced
            set_guidance(pipe, settings.guidance)
        for part, kwargs in calls:
            generators = [torch.Generator(pipe.device).manual_seed(seed) for seed in part.seeds]
            counter = None if settings.guidance is not None else _NativeRows(part.num_images,
                                                                             _alternates(family, kwargs))
            with ExitStack() as hook:
                if counter is not None:
                    denoiser = getattr(pipe, family.denoiser)
                    hook.callback(denoiser.register_forward_pre_hook(counter, with_kwargs=True).remove)
                start = time.perf_counter()
                images.append(pipe(**kwargs, num_inference_steps=settings.steps, generator=generators,
                                   output_type=settings.output_type).images)
                seconds += time.perf_counter() - start
            stats.append(pipe.guidance_stats if counter is None else counter.stats())
        ran = type(pipe.scheduler).__name__
    joined = [image for part in images for image in part] if settings.output_type == "pil" else \
        np.concatenate([np.asarray(part) for part in images])
    return SampleResult(joined, _added(stats), seconds, ran)
