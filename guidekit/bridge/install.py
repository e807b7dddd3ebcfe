"""``set_guidance`` and ``guided``: attach a guidance to a diffusers pipeline, and detach it exactly.

Attaching swaps the pipeline instance's class for a cached subclass of the same name whose
``__call__`` validates the call, swaps the denoiser's ``forward`` for a
:class:`~guidekit.bridge.proxy.GuidedDenoiser` for the duration of the call only, and records
``pipe.guidance_stats``. The denoiser module itself is never replaced, so ``pipe.config``,
``save_pretrained``, CPU offload hooks, attention processors and ``torch.compile`` wrappers are
untouched. ``set_guidance(pipe, None)`` restores the original class and removes every attribute
guidekit added.

A guidance that comes with its own sampler (:class:`~guidekit.guidance.base.BringsSampler`: PCG, CFG++) also
swaps the pipeline's scheduler for that sampler, built from the current scheduler's config; the original
scheduler comes back on the next ``set_guidance`` call.

:func:`guided` is the same as a context manager: ``with guided(pipe, g) as run: pipe(...)`` attaches ``g``,
exposes the call's ``run.stats``, and on exit, also when the call raised, gives the pipeline back as it was.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from diffusers import DiffusionPipeline

from guidekit.bridge.families import Family, family_of_class
from guidekit.bridge.loading import load_denoiser_like
from guidekit.bridge.nag import check_nag, nag_runner
from guidekit.bridge.perturb import check_skip_layers, perturbation_processors, resolve_layers, takes_skip_layers
from guidekit.bridge.proxy import GuidanceStats, GuidedDenoiser, is_compiled
from guidekit.bridge.schedulers import _is_flow, check_scheduler
from guidekit.guidance.base import (
    UNCOND,
    AttentionPerturbation,
    BringsSampler,
    Guidance,
    IdentitySelfAttention,
    NegativePromptAttention,
    OtherDenoiser,
    Pass,
    SkipLayers,
)
from guidekit.guidance.spec import parse_guidance
from guidekit.samplers.protocols import ReportsCalls, conforms

_GUIDED_CLASSES: dict[type, type] = {}
_GUIDED_CLASSES_LOCK = threading.Lock()
_ATTRIBUTES = ("_guidekit_guidance", "guidance_stats", "_guidekit_scheduler", "_guidekit_weak")
#: The passes this bridge evaluates.
_SUPPORTED_PASSES = frozenset({UNCOND})

#: The denoisers serving a guided pipeline call now, in any thread: a guided call replaces its denoisers' ``forward``
#: for its duration, so a denoiser serves one guided call at a time (:func:`_serving`).
_SERVING: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_SERVING_LOCK = threading.Lock()

#: Per denoiser, its repeated blocks (:func:`_compiled_blocks`).
_REPEATED_BLOCKS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.nn.Module, ...]] = weakref.WeakKeyDictionary()


def brings_sampler(guidance: Guidance) -> bool:
    """Whether ``set_guidance`` swaps the pipeline's scheduler for a sampler of the guidance's own (PCG, CFG++)."""
    return conforms(guidance, BringsSampler)


def _own_sampler(guidance: Guidance, scheduler: Any) -> Any | None:
    """The scheduler a guidance brings with it, built from the pipeline's ``scheduler`` config, or ``None``."""
    if not brings_sampler(guidance):
        return None
    if _is_flow(scheduler):
        raise ValueError(f"guidance {guidance!r} is not accepted on a flow-matching pipeline (scheduler "
                         f"{type(scheduler).__name__}); its sampler needs a VP schedule (SD, SDXL, DiT, PixArt)")
    return guidance.make_sampler(scheduler.config)


def _restore_scheduler(pipe: DiffusionPipeline) -> None:
    original = pipe.__dict__.pop("_guidekit_scheduler", None)
    if original is not None:
        pipe.scheduler = original


def _guided_class(cls: type) -> type:
    """The guided subclass of ``cls``; its family and ``__call__`` signature are resolved once, here."""
    with _GUIDED_CLASSES_LOCK:
        if cls not in _GUIDED_CLASSES:
            _GUIDED_CLASSES[cls] = _make_guided_class(cls)
    return _GUIDED_CLASSES[cls]


def _make_guided_class(cls: type) -> type:
    original_call = cls.__call__
    family, signature = family_of_class(cls), inspect.signature(original_call)
    defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}

    @functools.wraps(original_call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = {**defaults, **signature.bind(self, *args, **kwargs).arguments}
        return _guided_call(self, original_call, args, kwargs, arguments, family)

    return type(cls.__name__, (cls,), {
        "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__, "_guidekit_guided": True, "_guidekit_original": cls,
    })


def _perturbed_passes(guidance: Guidance) -> tuple[Pass | None, tuple[Pass, ...]]:
    """The perturbed passes ``guidance`` may ask for: the one that changes attention (it shares the main forward;
    ``set_guidance`` has checked that there is at most one), and those that run as forwards of their own, in a
    fixed order."""
    perturbed = sorted((p for p in guidance.passes() if p.perturbation is not None), key=lambda p: p.name)
    shared = next((p for p in perturbed if isinstance(p.perturbation, AttentionPerturbation)), None)
    return shared, tuple(p for p in perturbed if p is not shared)


def _weak_networks(pipe: DiffusionPipeline, family: Family, path: str | None = None) -> dict[str, torch.nn.Module]:
    """The weak networks loaded for this pipeline by path (autoguidance given a path), loading ``path`` if new.

    Kept in the pipeline while its guidance names them; ``set_guidance`` with another guidance drops the others."""
    loaded: dict[str, torch.nn.Module] = pipe.__dict__.setdefault("_guidekit_weak", {})
    if path is not None and path not in loaded:
        loaded[path] = load_denoiser_like(path, getattr(pipe, family.denoiser), family.denoiser)
    return loaded


def _check_passes(pipe: DiffusionPipeline, family: Family, guidance: Guidance) -> None:
    """A ``ValueError`` naming ``guidance`` unless this bridge evaluates its passes on ``pipe``: the conditional
    and unconditional ones, at most one pass with a changed self-attention, and any passes with skipped layers or
    another network, whose layers or networks suit the pipeline's denoiser."""
    change = guidance.conditional_change()
    if change is not None:
        if not isinstance(change, NegativePromptAttention):
            raise ValueError(f"guidance={guidance!r} is not accepted; this bridge applies NAG's change of the "
                             f"conditional prediction, not {change.kind}")
        check_nag(type(pipe), getattr(pipe, family.denoiser))
    perturbed = [p for p in guidance.passes() if p.perturbation is not None]
    unsupported = [p for p in guidance.passes() - _SUPPORTED_PASSES
                   if not isinstance(p.perturbation, (AttentionPerturbation, SkipLayers, OtherDenoiser))]
    attention = [p for p in perturbed if isinstance(p.perturbation, AttentionPerturbation)]
    if unsupported or len(attention) > 1:
        raise ValueError(f"guidance={guidance!r} is not accepted; it asks for the passes "
                         f"{', '.join(sorted(p.name for p in guidance.passes()))}, and this bridge evaluates "
                         f"{', '.join(sorted(p.name for p in _SUPPORTED_PASSES))}, at most one pass with a changed "
                         "self-attention, and any passes with skipped layers or another network")
    denoiser = getattr(pipe, family.denoiser)
    for perturbation in (p.perturbation for p in perturbed):
        if isinstance(perturbation, SkipLayers):
            check_skip_layers(denoiser, perturbation.layers)
        elif isinstance(perturbation, OtherDenoiser):
            if isinstance(perturbation.module, str):
                _weak_networks(pipe, family, perturbation.module)
            elif perturbation.module is denoiser:
                raise ValueError(f"weak={type(denoiser).__name__} is not accepted; it is the pipeline's own "
                                 f"{family.denoiser}, expected another (weaker) network")
        else:
            resolve_layers(denoiser, perturbation.layers,  # type: ignore[union-attr]
                           identity=isinstance(perturbation, IdentitySelfAttention))


def set_guidance(pipe: DiffusionPipeline, guidance: Guidance | str | None) -> DiffusionPipeline:
    """Attach ``guidance`` (an object or its text form) to ``pipe``, or detach with ``None``.

    Returns ``pipe``. Raises ``ValueError`` for pipelines outside the supported families.
    """
    if guidance is None:
        _restore_scheduler(pipe)
        original = getattr(type(pipe), "_guidekit_original", None)
        if original is not None:
            pipe.__class__ = original
        for name in _ATTRIBUTES:
            pipe.__dict__.pop(name, None)
        return pipe
    if isinstance(guidance, str):
        guidance = parse_guidance(guidance)
    if not isinstance(guidance, Guidance):
        raise TypeError(f"guidance={guidance!r} is not accepted; expected a guidekit guidance, its text form "
                        "or None")
    family = family_of_class(type(pipe))
    _check_passes(pipe, family, guidance)
    named = {p.perturbation.module for p in guidance.passes() if isinstance(p.perturbation, OtherDenoiser)}
    loaded = _weak_networks(pipe, family)
    for path in set(loaded) - named:  # networks loaded for an earlier guidance
        del loaded[path]
    original_scheduler = pipe.__dict__.get("_guidekit_scheduler", pipe.scheduler)
    sampler = _own_sampler(guidance, original_scheduler)
    _restore_scheduler(pipe)
    if sampler is not None:
        pipe.__dict__["_guidekit_scheduler"] = pipe.scheduler
        pipe.scheduler = sampler
    if not getattr(type(pipe), "_guidekit_guided", False):
        pipe.__class__ = _guided_class(type(pipe))
    pipe.__dict__["_guidekit_guidance"] = guidance
    pipe.__dict__["guidance_stats"] = None
    return pipe


def _check_call(pipe: DiffusionPipeline, family: Family, guidance: Guidance,
                arguments: dict[str, Any]) -> bool:
    """Validate a guided call; return whether the pipeline will batch unconditional rows."""
    check_scheduler(pipe.scheduler)
    start = arguments.get("denoising_start")
    if start is not None and conforms(pipe.scheduler, ReportsCalls) and pipe.scheduler.order == 2:
        # diffusers' SDXL get_timesteps takes an order-2 scheduler for Heun and starts it one call early
        raise ValueError(f"denoising_start={start!r} is not accepted with guidance {guidance!r}, whose sampler "
                         "makes two calls per step; expected None, or a sampler with another order (PCG with "
                         "corrector_steps != 1)")
    scale = arguments.get(family.scale_arg)
    weight = family.weight(scale)
    batched = weight is not None and weight > 1
    if guidance.uses_unconditional and not batched:
        raise ValueError(f"{family.scale_arg}={scale!r} is not accepted while guidance {guidance!r} is set: the "
                         f"pipeline computes unconditional predictions only when {family.scale_arg} > "
                         f"{1 - family.scale_offset:g} "
                         "(its value is otherwise ignored under set_guidance)")
    if family.negative_args and batched and all(arguments.get(a) is None for a in family.negative_args):
        if guidance.uses_unconditional:
            raise ValueError(f"{family.negative_args[0]}=None is not accepted while guidance {guidance!r} is set: "
                             f"the pipeline makes its unconditional call only with {family.scale_arg} > 1 and a "
                             f"negative prompt (expected one of {', '.join(family.negative_args)})")
        batched = False
    for name, scale_arg in zip(family.experts, family.expert_scale_args, strict=True):
        expert_scale = arguments.get(scale_arg)
        if batched and getattr(pipe, name, None) is not None and expert_scale is not None and expert_scale == 1:
            raise ValueError(f"{scale_arg}={expert_scale!r} is not accepted while guidance {guidance!r} is set: the "
                             f"pipeline's combination with it ignores the unconditional prediction of {name}; "
                             f"expected None or a value other than 1")
    rescale = arguments.get("guidance_rescale") or 0.0
    if rescale > 0:
        raise ValueError(f"guidance_rescale={rescale!r} is not accepted while a guidance is set; expected 0 "
                         "(use CFG(scale, rescale=phi) instead)")
    for name, neutral in family.neutral_args:
        if arguments.get(name, neutral) != neutral:
            raise ValueError(f"{name}={arguments[name]!r} is not accepted while guidance {guidance!r} is set: it "
                             f"changes which denoiser calls the pipeline makes; expected {neutral!r} (use Interval "
                             "for guidance in part of the steps)")
    for name in family.unsupported_args:
        if arguments.get(name):
            raise ValueError(f"{name}={arguments[name]!r} is not supported together with set_guidance; "
                             "expected None")
    return batched


def _entry(denoiser: torch.nn.Module) -> str:
    """The attribute through which a call of ``denoiser`` reaches its network, which the guided call stands in for:
    ``forward``; for a module compiled in place (``module.compile()``), its compiled call, so that the proxy runs
    outside the compiled region and hands each forward to it (a stand-in ``forward`` would be traced into it)."""
    return "_compiled_call_impl" if denoiser.__dict__.get("_compiled_call_impl") is not None else "forward"


def _compiled_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``denoiser`` (its class's ``_repeated_blocks``, which diffusers'
    ``compile_repeated_blocks`` compiles) that are compiled in place, where the denoiser itself is not compiled. The
    blocks are found once per denoiser; whether each is compiled is read at every call."""
    if is_compiled(denoiser):
        return []
    blocks = _REPEATED_BLOCKS.get(denoiser)
    if blocks is None:
        names = frozenset(getattr(denoiser, "_repeated_blocks", None) or ())
        blocks = tuple(m for m in denoiser.modules() if type(m).__name__ in names) if names else ()
        _REPEATED_BLOCKS[denoiser] = blocks
    return [block for block in blocks if block.__dict__.get("_compiled_call_impl") is not None]


@contextmanager
def _standing_in(proxy: GuidedDenoiser, stand_ins: dict[torch.nn.Module, Any], blocks: list[torch.nn.Module]
                 ) -> Iterator[None]:
    """Each denoiser's network reached through its stand-in (:func:`_entry`) for the block, and, where diffusers'
    cache hooks are on, its ``cache_context`` recorded for the proxy's forwards; the compiled call of each of
    ``blocks`` (:func:`_compiled_blocks`) through :meth:`GuidedDenoiser.compiled_block_call`. Afterwards the modules'
    own attributes, exactly."""
    proxy.cache_contexts = [module.cache_context if getattr(module, "is_cache_enabled", False) else None
                            for module in stand_ins]
    names = [(module, name) for module in stand_ins for name in (_entry(module), "cache_context")]
    saved = {(module, name): module.__dict__.get(name)
             for module, name in [*names, *((block, "_compiled_call_impl") for block in blocks)]}
    try:
        for (module, stand_in), opener in zip(stand_ins.items(), proxy.cache_contexts, strict=True):
            setattr(module, _entry(module), stand_in)
            if opener is not None:
                module.cache_context = proxy.recording_cache_context(opener)
        proxy.regional = bool(blocks)
        for block in blocks:
            block._compiled_call_impl = proxy.compiled_block_call(block._compiled_call_impl)
        yield
    finally:
        for (module, name), value in saved.items():
            if value is not None:
                setattr(module, name, value)
            elif name in module.__dict__:
                delattr(module, name)


@contextmanager
def _serving(pipe: DiffusionPipeline, denoisers: dict[str, torch.nn.Module]) -> Iterator[None]:
    """Hold ``denoisers`` (by the pipeline's attribute names) for one guided call of ``pipe``; one that another guided
    call holds (a pipeline sharing it, in another thread) is refused before anything changes."""
    with _SERVING_LOCK:
        for name, module in denoisers.items():
            if module in _SERVING:
                raise RuntimeError(f"{name}={type(module).__name__} of {type(pipe).__name__} is serving another guided "
                                   "call (a pipeline sharing it, in another thread); expected one guided call per "
                                   "denoiser at a time: give each thread a pipeline with its own denoiser, or call "
                                   "one after the other")
        _SERVING.update(denoisers.values())
    try:
        yield
    finally:
        with _SERVING_LOCK:
            _SERVING.difference_update(denoisers.values())


def _guided_call(pipe: DiffusionPipeline, original_call: Any, args: tuple, kwargs: dict, arguments: dict[str, Any],
                 family: Family) -> Any:
    """One call of a guided pipeline: ``original_call(pipe, *args, **kwargs)``, whose ``arguments`` by name (the
    defaults included) are validated first."""
    guidance: Guidance = pipe.__dict__["_guidekit_guidance"]
    batched = _check_call(pipe, family, guidance, arguments)
    denoiser = getattr(pipe, family.denoiser)
    present = {name: module for name in (family.denoiser, *family.experts)
               if (module := getattr(pipe, name, None)) is not None}
    with _serving(pipe, present):
        scale = family.weight(arguments.get(family.scale_arg)) or 1.0
        blocks = [block for module in present.values() for block in _compiled_blocks(module)]
        proxy = GuidedDenoiser(getattr(denoiser, _entry(denoiser)), guidance, family, pipe.scheduler, batched, scale,
                               compiled=is_compiled(denoiser))
        stand_ins = {denoiser: proxy}
        for name, scale_arg in zip(family.experts, family.expert_scale_args, strict=True):
            if name in present:
                expert, expert_scale = present[name], arguments.get(scale_arg)
                stand_ins[expert] = proxy.expert(getattr(expert, _entry(expert)),
                                                 scale if expert_scale is None else float(expert_scale))
        proxy.shared, proxy.own = _perturbed_passes(guidance)
        proxy.weak_networks = _weak_networks(pipe, family)
        proxy.denoisers, proxy.skips_itself = list(stand_ins), takes_skip_layers(denoiser)
        try:
            with _standing_in(proxy, stand_ins, blocks), ExitStack() as perturbing:
                if proxy.shared is not None:
                    for module in stand_ins:
                        proxy.processors += perturbing.enter_context(
                            perturbation_processors(module, proxy.shared.perturbation))  # type: ignore[arg-type]
                change = guidance.conditional_change()
                if isinstance(change, NegativePromptAttention):
                    proxy.nag = perturbing.enter_context(nag_runner(pipe, denoiser, change, arguments))
                output = original_call(pipe, *args, **kwargs)
        finally:
            pipe.__dict__["guidance_stats"] = proxy.stats
    proxy.check_finite()  # no image made from a prediction that was not finite
    return output


class GuidedRun:
    """What :func:`guided` yields: the stats of the pipeline calls made in its block."""

    def __init__(self, pipe: DiffusionPipeline) -> None:
        self._pipe = pipe
        self._final: GuidanceStats | None = None
        self._closed = False

    @property
    def stats(self) -> GuidanceStats | None:
        """The network work of the last guided call in the block (``None`` before the first)."""
        return self._final if self._closed else self._pipe.__dict__.get("guidance_stats")

    def _close(self) -> None:
        self._final, self._closed = self._pipe.__dict__.get("guidance_stats"), True


@contextmanager
def guided(pipe: DiffusionPipeline, guidance: Guidance | str) -> Iterator[GuidedRun]:
    """Attach ``guidance`` for the duration of a ``with`` block; on exit, also when the block raises, the pipeline
    gets back the guidance it had before (``None``: it is restored bitwise, its scheduler included)."""
    previous = pipe.__dict__.get("_guidekit_guidance")
    set_guidance(pipe, guidance)
    run = GuidedRun(pipe)
    try:
        yield run
    finally:
        run._close()
        set_guidance(pipe, previous)


def install_pipeline_method() -> None:
    """Give every ``DiffusionPipeline`` a ``set_guidance`` method (done on ``import guidekit``)."""
    DiffusionPipeline.set_guidance = set_guidance  # type: ignore[attr-defined]


__all__ = ["GuidanceStats", "GuidedRun", "brings_sampler", "guided", "install_pipeline_method", "set_guidance"]
