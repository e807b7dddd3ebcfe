"""Guidance methods side by side on one pipeline, from the same seeds: the computation behind the demo's first tab.

A :class:`Comparer` loads pipelines (the embedded default model, a hub id or a local directory; see
:func:`~guidekit.bridge.loading.load_pipeline`), keeps the last two, and runs each method with the same seeds,
steps and scheduler through :func:`~guidekit.bridge.sampling.sample_guided`, which decides what runs. Every input is
checked before any model is loaded or called, and a bad one raises a ``ValueError`` that names it, its value and
what is accepted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from guidekit.bridge.loading import DEFAULT_MODEL, load_pipeline
from guidekit.bridge.sampling import SampleSettings, sample_guided, takes_prompt
from guidekit.evaluation.image_metrics import saturation
from guidekit.guidance.base import Guidance
from guidekit.guidance.spec import format_guidance, parse_guidance
from guidekit.limits import DEMO_MAX_IMAGES as MAX_IMAGES
from guidekit.limits import DEMO_MAX_METHODS as MAX_METHODS
from guidekit.limits import DEMO_MAX_STEPS as MAX_STEPS
from guidekit.limits import check_num_images, check_seed, check_steps

#: Images are shown at least this many pixels wide (the default model's are 8 x 8), upscaled without smoothing.
DISPLAY_SIZE = 96


@dataclass
class MethodResult:
    """One column of a comparison.

    Attributes:
        label: the method as the user wrote it.
        guidance: the method's canonical text form (every parameter written out).
        scheduler: the scheduler that ran (PCG and CFG++ bring their own).
        images: the images, one per seed.
        model_calls: network forward passes (a batched CFG call counts once).
        uncond_rows_skipped: unconditional rows native CFG would have computed and the method skipped.
        seconds: wall time of the pipeline call.
        saturation: mean HSV saturation of the images (:func:`~guidekit.evaluation.image_metrics.saturation`).
    """

    label: str
    guidance: str
    scheduler: str
    images: list[Image.Image]
    model_calls: int
    uncond_rows_skipped: int
    seconds: float
    saturation: float

    def caption(self) -> str:
        """A one-line label: method, model calls, wall time and saturation."""
        return (f"{self.label} | {self.model_calls} model calls | {self.seconds:.2f} s | "
                f"saturation {self.saturation:.3f}")

    def strip(self) -> Image.Image:
        """The images side by side, upscaled without smoothing to at least :data:`DISPLAY_SIZE` pixels high."""
        width, height = self.images[0].size
        zoom = max(1, -(-DISPLAY_SIZE // height))
        strip = Image.new("RGB", (width * zoom * len(self.images), height * zoom))
        for i, image in enumerate(self.images):
            big = image.convert("RGB").resize((width * zoom, height * zoom), Image.NEAREST)
            strip.paste(big, (i * width * zoom, 0))
        return strip


def _check_methods(methods: Sequence[str]) -> list[tuple[str, Guidance]]:
    texts = [m for m in methods if m and m.strip()]  # checked as sent: the length limit counts every character
    if not texts:
        raise ValueError(f"methods has no guidance text ({len(methods)} blank entries), which is not accepted; "
                         f"expected 1 to {MAX_METHODS} guidance texts such as 'cfg(scale=3)'")
    if len(texts) > MAX_METHODS:
        raise ValueError(f"methods has {len(texts)} entries, which is not accepted; expected at most {MAX_METHODS} "
                         "(limit DEMO_MAX_METHODS)")
    return [(t.strip(), parse_guidance(t)) for t in texts]


class Comparer:
    """Runs comparisons; thread-safe (one comparison at a time).

    Args:
        model: the model used when a request names none (``"default"``: the embedded model).
        device: ``"cuda"`` when available unless given.
        dtype: the pipelines' dtype.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self._pipes: dict[str, tuple[DiffusionPipeline, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def _load(self, model: str) -> tuple[DiffusionPipeline, dict[str, Any]]:
        """The pipeline and its default call arguments; the comparer's own model and the last other one are kept."""
        if model not in self._pipes:
            pipe, defaults = load_pipeline(model, dtype=self.dtype)
            pipe = pipe.to(self.device)
            for name in [m for m in self._pipes if m != self.model]:
                del self._pipes[name]
            self._pipes[model] = (pipe, defaults)
        return self._pipes[model]

    def _name(self, model: str | None) -> str:
        """``model`` without surrounding blanks; the comparer's own model when it is empty."""
        return (model or "").strip() or self.model

    def describe(self, model: str | None = None) -> str:
        """What the pipeline of ``model`` is conditioned on, for the page."""
        with self._lock:
            pipe, defaults = self._load(self._name(model))
        if takes_prompt(pipe):
            return f"{type(pipe).__name__}: text-to-image (prompt)"
        label = defaults.get("class_labels", [0])[0]
        return f"{type(pipe).__name__}: class-conditional (class label, e.g. {label})"

    def compare(self, methods: Sequence[str], *, model: str | None = None, prompt: str | None = None,
                negative_prompt: str | None = None, class_label: int | None = None, seed: int = 0, steps: int = 20,
                scheduler: str | None = None, num_images: int = 1) -> list[MethodResult]:
        """Sample ``num_images`` images (seeds ``seed .. seed + num_images - 1``) with each method in turn.

        Args:
            methods: 1 to :data:`MAX_METHODS` guidance texts (``"cfg(scale=3)"``, ``"pcg(gamma=5)"``); blanks are
                left out.
            model: ``"default"``, a hub id or a local directory; the comparer's own model if ``None``.
            prompt, negative_prompt: for text-to-image pipelines; class_label: for class-conditional ones.
            seed: seed of the first image, 0 to :data:`~guidekit.limits.MAX_SEED` (and so are the others).
            steps: solver steps, 1 to :data:`MAX_STEPS`.
            scheduler: a name of :data:`~guidekit.bridge.schedulers.SCHEDULER_NAMES`, or ``None`` for the
                pipeline's own. Methods that bring their own sampler (PCG, CFG++) run it and refuse a scheduler.
            num_images: images per method, 1 to :data:`MAX_IMAGES`.

        The pipeline comes back from each method as it was (:func:`~guidekit.bridge.sampling.sample_guided`), so
        methods and requests do not affect each other.
        """
        parsed = _check_methods(methods)
        steps = check_steps("steps", steps, high=MAX_STEPS, limit="DEMO_MAX_STEPS")
        seed = check_seed("seed", seed)
        num_images = check_num_images("num_images", num_images, high=MAX_IMAGES, limit="DEMO_MAX_IMAGES")
        runs = [(text, SampleSettings(guidance=guidance, scheduler=scheduler, steps=steps,
                                      seeds=range(seed, seed + num_images), prompt=prompt or None,
                                      negative_prompt=negative_prompt or None, class_label=class_label))
                for text, guidance in parsed]
        with self._lock:
            pipe, defaults = self._load(self._name(model))
            results = []
            for text, settings in runs:
                run = sample_guided(pipe, settings, defaults=defaults)
                pixels = np.stack([np.asarray(image.convert("RGB")) for image in run.images])
                results.append(MethodResult(
                    text, format_guidance(settings.guidance), run.scheduler, run.images, run.stats.model_calls,
                    run.stats.uncond_rows_skipped, run.seconds, float(saturation(pixels, layout="NHWC").mean())))
        return results
