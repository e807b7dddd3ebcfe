"""The guidance interface: which predictions (passes) a denoiser call needs, per sample, and how they combine.

A guidance is an immutable value: hashable, comparable, picklable, with a text form (:mod:`guidekit.guidance.spec`).
Whatever it accumulates during one pipeline call (APG's momentum, Adaptive Guidance's switches) lives in a state
object that :meth:`Guidance.init_state` makes at the start of each call and the caller hands back at every
denoiser call, so one guidance object can serve several pipelines in several threads.

At each denoiser call the bridge asks :meth:`Guidance.needs` which passes each sample needs beyond the conditional
prediction (always computed), evaluates only those rows, and hands :meth:`Guidance.guide` the predictions of a
group of samples that have the same passes. Predictions arrive and leave in the model's own output space; each
method converts to the space its paper uses through :mod:`guidekit.parameterization`.

Weights follow REFERENCE section 0: ``w = 1`` is no guidance, ``D_w = D_u + w (D_c - D_u)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from guidekit.parameterization import NoiseLevel
from guidekit.validation import check_number


@dataclass(frozen=True)
class Perturbation:
    """A change of the network for the rows of one pass (a description only: the bridge applies it).

    Subclasses are frozen dataclasses; :attr:`kind` names the change in pass names and messages."""

    kind: ClassVar[str] = "perturbation"


@dataclass(frozen=True)
class AttentionPerturbation(Perturbation):
    """A change of the self-attention in the named layers, applied to the perturbed rows only (they can share the
    forward of the other rows).

    Attributes:
        layers: layer patterns of the denoiser, matched to its self-attention modules by the bridge (``"mid"``,
            ``"down_blocks.1"``, ``"transformer_blocks.7"``); a pattern matches whole dot-separated name parts.
    """

    layers: tuple[str, ...]


@dataclass(frozen=True)
class IdentitySelfAttention(AttentionPerturbation):
    """Self-attention replaced by the identity map: the attention output of a token is its own value vector,
    ``Attn(Q, K, V) = V`` (PAG, Ahn et al. 2024, eq. 6)."""

    kind: ClassVar[str] = "identity_self_attention"


#: Blur widths above this are the infinite blur (the official SEG code's ``inf_blur_threshold``).
INFINITE_BLUR = 9999.0


@dataclass(frozen=True)
class BlurredQueries(AttentionPerturbation):
    """Self-attention whose queries are blurred over the token grid with a Gaussian of standard deviation ``sigma``
    tokens, per head channel, before the attention weights are formed (SEG, Hong 2024, Sec. 3; the official
    SEG-SDXL processor). ``sigma > INFINITE_BLUR`` replaces every query by the mean query.

    Attributes:
        layers: as for :class:`AttentionPerturbation`.
        sigma: the blur's standard deviation in tokens, ``> 0``; ``inf`` (or anything above ``INFINITE_BLUR``) is
            the infinite blur.
    """

    sigma: float = math.inf

    kind: ClassVar[str] = "blurred_queries"

    @property
    def infinite(self) -> bool:
        """Whether the blur is the infinite one (every query the mean query)."""
        return self.sigma > INFINITE_BLUR


@dataclass(frozen=True)
class SkipLayers(Perturbation):
    """Chosen transformer blocks skipped: their input passes to the next block unchanged (Skip Layer Guidance, as
    in Stability AI's SD3.5 reference code and diffusers' ``skip_layers`` argument of ``SD3Transformer2DModel``).

    Attributes:
        layers: indices of the denoiser's transformer blocks, from 0.
    """

    layers: tuple[int, ...]

    kind: ClassVar[str] = "skip_layers"


@dataclass(frozen=True)
class OtherDenoiser(Perturbation):
    """Another network in place of the pipeline's denoiser, given the same inputs (autoguidance's weaker model).

    Attributes:
        module: the network (a ``torch.nn.Module`` called like the pipeline's denoiser); compared and hashed by
            identity.
    """

    module: Any

    kind: ClassVar[str] = "other_denoiser"


@dataclass(frozen=True)
class NegativePromptAttention(Perturbation):
    """The prompt's attention steered away from a negative prompt's, in every cross- or joint-attention layer and
    for every row conditioned on the prompt (NAG; the rule is :func:`guidekit.guidance.nag.nag_attention`).

    Attributes:
        negative_prompt: the text whose keys and values give the negative attention output.
        scale: the extrapolation weight ``s > 1`` (the official ``nag_scale``).
        tau: the cap of the per-token norm ratio (``nag_tau``).
        alpha: the blend towards the capped output (``nag_alpha``).
        p: the order of the per-token norms (1 or 2).
    """

    negative_prompt: str
    scale: float
    tau: float
    alpha: float
    p: int = 1

    kind: ClassVar[str] = "negative_prompt_attention"


@dataclass(frozen=True)
class Pass:
    """A prediction of the denoiser that a guidance can ask for at a call.

    Attributes:
        name: ``"cond"`` (the conditional prediction), ``"uncond"`` (the negative prompt or null class), or the
            name of a perturbed conditional pass (``"pag:mid"``).
        perturbation: for a perturbed pass, the change of the network its rows run with; the conditioning is the
            conditional pass's. ``None`` for ``cond`` and ``uncond``.
    """

    name: str
    perturbation: Perturbation | None = None
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.name, self.perturbation)))  # dict keys at every call

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type, tuple[str, Perturbation | None]]:
        return Pass, (self.name, self.perturbation)  # the hash is remade: string hashes differ between processes


#: The conditional prediction; computed for every sample at every call.
COND = Pass("cond")
#: The unconditional prediction (the negative prompt, or the null class).
UNCOND = Pass("uncond")

#: Per pass, a boolean CPU mask over the rows of a context.
PassMasks = dict[Pass, torch.Tensor]
#: Per pass, the predictions (model space) of the rows of a context.
Predictions = Mapping[Pass, torch.Tensor]


@dataclass(frozen=True)
class GuidanceContext:
    """What a guidance method knows about one denoiser call.

    Attributes:
        x: the model input ``x_t`` of the rows in ``rows`` (shape ``(len(rows), ...)``).
        level: the call's noise level (``x_t = alpha x0 + s eps``).
        model_space: the space of the model's output (``eps``, ``v``, ``flow`` or ``x0``).
        step: the solver step (0-based); the two calls of a Heun step share it.
        num_steps: the number of solver steps of the pipeline call.
        step_sigma: the EDM sigma at the start of the solver step (equals ``level.sigma`` but
            for corrector calls).
        tau: normalised time of the step, 1 at pure noise and 0 at the data (``t / T``).
        corrector: whether this is the second (corrector) call of a solver step.
        rows: indices (a CPU tensor), within the pipeline batch, of the samples in ``x``.
        batch_size: the number of samples in the pipeline batch.
        grid: for a latent packed into tokens, ``(B, N, 4C)`` with each token a 2x2 patch of ``C`` channels (Flux,
            Qwen-Image), the ``(height, width)`` of the unpacked latent; ``None`` for a latent laid out as
            ``(B, C, H, W)`` or ``(B, C, T, H, W)``.
        expert: which of the pipeline's denoisers runs this call: 0 for its main one, 1 for the first expert it
            switches to (Wan 2.2's low-noise ``transformer_2``).
    """

    x: torch.Tensor
    level: NoiseLevel
    model_space: str
    step: int
    num_steps: int
    step_sigma: float
    tau: float
    corrector: bool
    rows: torch.Tensor
    batch_size: int
    grid: tuple[int, int] | None = None
    expert: int = 0

    @property
    def sigma(self) -> float:
        """EDM sigma of this call."""
        return self.level.sigma

    @property
    def whole_batch(self) -> bool:
        """Whether ``rows`` are every sample of the pipeline batch (then in order: ``rows`` ascend)."""
        return self.rows.shape[0] == self.batch_size

    def subset(self, rows: torch.Tensor) -> GuidanceContext:
        """The context restricted to ``rows`` (CPU positions into this context's rows)."""
        return replace(self, x=self.x[rows.to(self.x.device)], rows=self.rows[rows])

    def to_space(self, y: torch.Tensor, space: str) -> torch.Tensor:
        """Convert a model-space prediction of these rows into ``space``."""
        return self.level.convert(y, self.x, self.model_space, space)

    def from_space(self, y: torch.Tensor, space: str) -> torch.Tensor:
        """Convert a prediction of these rows from ``space`` back into model space."""
        return self.level.convert(y, self.x, space, self.model_space)


def constant_mask(n: int, value: bool) -> torch.Tensor:
    """A boolean CPU mask of ``n`` samples, all ``value``: one shared tensor per ``(n, value)``, made once (masks are
    combined into new ones, never changed in place)."""
    key = (n, bool(value))
    mask = _CONSTANT_MASKS.get(key)
    if mask is None:
        mask = _CONSTANT_MASKS[key] = torch.full((n,), key[1], dtype=torch.bool)
    return mask


#: The masks :func:`constant_mask` hands out.
_CONSTANT_MASKS: dict[tuple[int, bool], torch.Tensor] = {}


def set_field(obj: object, name: str, value: object) -> None:
    """Set a field of a frozen dataclass during its own ``__post_init__`` (validated, normalised values)."""
    object.__setattr__(obj, name, value)


class Guidance:
    """Base class of every guidance method (an immutable value; see the module docstring).

    Subclasses say which passes they may ever ask for (:meth:`passes`), which each sample needs at a call
    (:meth:`needs`), and how the predictions combine (:meth:`guide`). Methods with per-call state override
    :meth:`init_state`.
    """

    def __add__(self, other: object) -> Guidance:
        """``a + b``: the :class:`GuidanceSum` of both (sums are flattened)."""
        if not isinstance(other, Guidance):
            return NotImplemented
        left = self.terms if isinstance(self, GuidanceSum) else (self,)
        right = other.terms if isinstance(other, GuidanceSum) else (other,)
        return GuidanceSum((*left, *right))

    def passes(self) -> frozenset[Pass]:
        """Every pass beyond :data:`COND` that the method may ask for."""
        return frozenset({UNCOND})

    def conditional_change(self) -> Perturbation | None:
        """A change of the network for every row conditioned on the prompt, at every call (NAG), or ``None``: the
        conditional pass (and the perturbed passes, which repeat it) then runs with it."""
        return None

    def constant_cfg_weight(self) -> float | None:
        """``w`` if, at every call, every sample needs the unconditional pass and nothing else, and its guided
        prediction is the pipeline's own ``D_u + w (D_c - D_u)`` (plain CFG); ``None`` otherwise. The bridge then
        hands the pipeline's batch to the network and its output back unchanged, without asking :meth:`needs` and
        :meth:`cfg_weight` at each call."""
        return None

    def cfg_weight(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> float | None:
        """``w`` if, at this call, the guided prediction of every sample that has both predictions is the pipeline's
        own ``D_u + w (D_c - D_u)`` in the model's space and dtype (CFG, and wrappers that only choose its samples or
        weight); ``None`` otherwise. The bridge then lets the pipeline's arithmetic do the combination."""
        return None

    @property
    def uses_unconditional(self) -> bool:
        """Whether the method ever asks for the unconditional prediction."""
        return UNCOND in self.passes()

    def init_state(self, batch_size: int) -> Any:
        """The per-call state of a new pipeline call with ``batch_size`` samples (``None``: stateless)."""
        return None

    def needs(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> PassMasks:
        """For each pass of :meth:`passes`, a boolean CPU mask over ``ctx.rows``: the samples that need it.

        ``scale`` overrides the method's own weight, as in :meth:`guide`.
        """
        raise NotImplementedError

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: Any, scale: float | None = None
              ) -> torch.Tensor:
        """Guided prediction (model space) of the samples in ``ctx.rows``.

        ``preds`` holds :data:`COND` and the passes these samples were found to need. ``scale`` overrides the
        method's own weight (used by weight schedules). The predictions may be views of the network's output:
        copy what is kept beyond the call.
        """
        raise NotImplementedError


class PerturbedGuidance(Guidance):
    """A guidance of the conditional prediction and one perturbed conditional pass ``D_p`` of the same network:
    ``D = D_c + w (D_c - D_p)`` (PAG's eq. 8; SLG's rule). A call whose weight is 0 computes no perturbed row.

    Subclasses have a ``scale`` field and give :attr:`perturbed` (the pass) and, where the weight is not
    ``scale`` at every call, :meth:`weight`.
    """

    scale: float

    @property
    def perturbed(self) -> Pass:
        """The perturbed pass."""
        raise NotImplementedError

    def weight(self, ctx: GuidanceContext, scale: float | None = None) -> float:
        """The weight ``w`` at this call (``scale`` overrides the method's own, as in :meth:`Guidance.guide`)."""
        return self.scale if scale is None else scale

    def passes(self) -> frozenset[Pass]:
        return frozenset({self.perturbed}) if self.scale > 0 else frozenset()

    def needs(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> PassMasks:
        return {self.perturbed: constant_mask(ctx.rows.shape[0], self.weight(ctx, scale) > 0)}

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: Any, scale: float | None = None
              ) -> torch.Tensor:
        cond = preds[COND]
        perturbed = preds.get(self.perturbed)
        if perturbed is None:
            return cond
        return cond + self.weight(ctx, scale) * (cond - perturbed)


@runtime_checkable
class BringsSampler(Protocol):
    """A guidance that is half of a sampler (PCG, CFG++): attaching it also installs its scheduler."""

    def make_sampler(self, scheduler_config: Mapping[str, Any]) -> Any:
        """The guidance's own scheduler, built from the pipeline's scheduler config (a VP schedule)."""


class TwoPassGuidance(Guidance):
    """A guidance of the conditional and unconditional predictions (CFG and its reshapings).

    Subclasses write :meth:`needs_unconditional`, :meth:`combine` (samples that have both predictions) and,
    where it is not the conditional prediction itself, :meth:`conditional_only`.
    """

    def needs(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> PassMasks:
        return {UNCOND: self.needs_unconditional(ctx, state, scale)}

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: Any, scale: float | None = None
              ) -> torch.Tensor:
        if UNCOND in preds:
            return self.combine(preds[COND], preds[UNCOND], ctx, state, scale)
        return self.conditional_only(preds[COND], ctx, state)

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        """Boolean CPU mask over ``ctx.rows``: which samples need the unconditional prediction."""
        return constant_mask(ctx.rows.shape[0], True)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        """Guided prediction (model space) of the samples in ``ctx.rows`` from both predictions."""
        raise NotImplementedError

    def conditional_only(self, cond: torch.Tensor, ctx: GuidanceContext, state: Any = None) -> torch.Tensor:
        """Prediction (model space) of samples that have no unconditional prediction at this call."""
        return cond


@dataclass(frozen=True)
class WeightedGuidance(TwoPassGuidance):
    """A guidance with a weight ``scale`` that works in one prediction space.

    ``space="model"`` means the model's own output space.
    """

    scale: float

    space = "model"

    #: Whether the formula is linear in the predictions; linear formulas run in the model's own space and
    #: dtype, which makes plain CFG reproduce the pipeline's native arithmetic bit for bit.
    linear: ClassVar[bool] = False

    def __post_init__(self) -> None:
        set_field(self, "scale", check_number("scale", self.scale, low=0.0))

    def passes(self) -> frozenset[Pass]:
        return frozenset({UNCOND}) if self.scale != 1.0 else frozenset()

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        weight = self.scale if scale is None else scale
        return constant_mask(ctx.rows.shape[0], weight != 1.0)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        """Convert to ``self.space``, apply the formula, convert back.

        Non-linear formulas, and every conversion, run in float64, so that a method that reduces to
        CFG does so to rounding of the model's dtype rather than to conversion error.
        """
        weight = self.scale if scale is None else scale
        if self.linear:
            return self.combine_in_space(cond, uncond, ctx, state, weight)
        space = ctx.model_space if self.space == "model" else self.space
        ctx64 = replace(ctx, x=ctx.x.double())
        out = self.combine_in_space(ctx64.to_space(cond.double(), space), ctx64.to_space(uncond.double(), space),
                                    ctx64, state, weight)
        return ctx64.from_space(out, space).to(cond.dtype)

    def combine_in_space(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any,
                         scale: float) -> torch.Tensor:
        """The method's formula, with both predictions already in ``self.space``."""
        raise NotImplementedError


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


def per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a_i, b_i>`` over all non-batch dimensions, shaped to broadcast against ``a``."""
    return _broadcast((a * b).flatten(1).sum(1), a)


def per_sample_norm(a: torch.Tensor) -> torch.Tensor:
    """``||a_i||_2`` over all non-batch dimensions, shaped to broadcast against ``a``."""
    return _broadcast(a.flatten(1).norm(dim=1), a)


def per_sample_std(a: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation of each sample over all non-batch dimensions, shaped to broadcast."""
    return _broadcast(a.flatten(1).std(dim=1), a)


def apply_guidance(guidance: Guidance, cond: torch.Tensor, extra: Predictions, masks: PassMasks,
                   ctx: GuidanceContext, state: Any) -> torch.Tensor:
    """Combine one call's predictions for the whole batch.

    Samples are grouped by the passes they have; :meth:`Guidance.guide` runs once per group.

    Args:
        guidance: the method.
        cond: conditional predictions of every sample, model space, ``(B, ...)``.
        extra: per pass of ``masks``, the predictions of the samples whose mask is set, in row order.
        masks: per pass, the boolean CPU mask ``(B,)`` of the samples for which it was computed.
        ctx: the call's context over all ``B`` samples.
        state: the guidance's state for this pipeline call.
    """
    flags = {p: m.tolist() for p, m in masks.items()}
    if all(all(f) or not any(f) for f in flags.values()):  # one group: every sample has the same passes
        preds = {COND: cond, **{p: extra[p] for p, f in flags.items() if f and f[0]}}
        out = guidance.guide(preds, ctx, state)
        return out if out.dtype == cond.dtype else out.to(cond.dtype)
    passes = list(flags)
    keys = list(zip(*flags.values(), strict=True))
    out = torch.empty_like(cond)
    positions = {p: masks[p].cumsum(0) - 1 for p in passes}
    for key in sorted(set(keys)):
        idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
        preds = {COND: cond[idx.to(cond.device)]}
        for p, on in zip(passes, key, strict=True):
            if on:
                preds[p] = extra[p][positions[p][idx].to(cond.device)]
        out[idx.to(cond.device)] = guidance.guide(preds, ctx.subset(idx), state).to(out.dtype)
    return out


def _select(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``pred`` whose (CPU) ``mask`` is set: ``pred`` itself where every row is, with no host-to-device
    copy of the mask nor the synchronisation a boolean index costs on a GPU."""
    if bool(mask.all()):
        return pred
    return pred[mask.nonzero().flatten().to(pred.device)]


class GuidanceWrapper(TwoPassGuidance):
    """A guidance that modifies another guidance (``inner``): everything it does not override is delegated, the
    per-call state included.

    Most wrappers take a two-pass guidance (CFG, APG, CFG-Zero*, or a wrapper of one). Those that decide only
    *which samples are guided* (``Interval``, ``AdaptiveGuidance``) also take any other guidance without its own
    sampler, such as PAG or a sum ``CFG(5) + PAG(3)``: they then filter its pass masks (:meth:`needs`) and hand
    its :meth:`guide` the passes that were computed.
    """

    inner: Guidance

    def _check_inner(self, *, any_guidance: bool = False) -> None:
        if isinstance(self.inner, Guidance) and self.inner.conditional_change() is not None:
            raise TypeError(f"inner={self.inner!r} is not accepted; it changes the conditional prediction at every "
                            "call (NAG), which a wrapper cannot switch: add it beside the wrapper instead "
                            "(Interval(CFG(5), ...) + NAG(...))")
        if isinstance(self.inner, TwoPassGuidance):
            return
        if any_guidance and isinstance(self.inner, Guidance) and not isinstance(self.inner, BringsSampler):
            return
        also = "; or any guidance without its own sampler, such as PAG or a sum" if any_guidance else ""
        raise TypeError(f"inner={self.inner!r} is not accepted; expected a guidekit guidance of the conditional "
                        f"and unconditional predictions (CFG, APG, CFG-Zero*, or a wrapper of one){also}")

    @property
    def two_pass(self) -> bool:
        """Whether ``inner`` is a two-pass guidance (then the two-pass methods below apply)."""
        return isinstance(self.inner, TwoPassGuidance)

    def passes(self) -> frozenset[Pass]:
        return self.inner.passes()

    @property
    def scale(self) -> float:
        """The weight of the innermost weighted guidance."""
        return self.inner.scale  # type: ignore[attr-defined]

    def init_state(self, batch_size: int) -> Any:
        return self.inner.init_state(batch_size)

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        return self.inner.needs_unconditional(ctx, state, scale)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        return self.inner.combine(cond, uncond, ctx, state, scale)

    def conditional_only(self, cond: torch.Tensor, ctx: GuidanceContext, state: Any = None) -> torch.Tensor:
        return self.inner.conditional_only(cond, ctx, state)


@dataclass
class WrappedState:
    """Per-call state of a wrapper with state of its own: ``own``, and its inner guidance's ``inner``."""

    own: Any
    inner: Any


@dataclass
class SumState:
    """Per-call state of a :class:`GuidanceSum`: each term's own state, and each term's pass masks of the current
    call over the whole batch (set by :meth:`GuidanceSum.needs`, read by :meth:`GuidanceSum.guide`)."""

    terms: list[Any]
    masks: list[PassMasks]


@dataclass(frozen=True)
class GuidanceSum(Guidance):
    """Guidance terms added: ``D = g_1 + sum_{i >= 2} (g_i - D_c)``, each ``g_i`` a term's guided prediction.

    With ``g_i = D_c + Delta_i`` this is ``D_c + sum_i Delta_i``: ``CFG(5) + PAG(3)`` is
    ``D_u + 5 (D_c - D_u) + 3 (D_c - D_p)``, diffusers' PAG rule (``pipelines/pag/pag_utils.py``) and the PAG
    paper's eq. 9 with CFG. Each term sees only the passes it asked for at a call, so a wrapped term
    (``Interval``, ``AdaptiveGuidance``) skips as it does alone, and a pass no term needs for a sample is not
    computed for it. Written ``a + b`` in Python and in the text form.
    """

    terms: tuple[Guidance, ...]

    def __post_init__(self) -> None:
        terms = tuple(self.terms)
        if len(terms) < 2 or not all(isinstance(t, Guidance) for t in terms):
            raise TypeError(f"terms={terms!r} is not accepted; expected two or more guidekit guidances")
        if any(isinstance(t, BringsSampler) for t in terms):
            raise TypeError(f"terms={terms!r} is not accepted; a guidance that brings its own sampler (PCG, CFG++) "
                            "does not add to others")
        if sum(t.conditional_change() is not None for t in terms) > 1:
            raise TypeError(f"terms={terms!r} is not accepted; expected at most one term that changes the "
                            "conditional prediction (NAG)")
        set_field(self, "terms", terms)

    def conditional_change(self) -> Perturbation | None:
        return next((c for t in self.terms if (c := t.conditional_change()) is not None), None)

    def passes(self) -> frozenset[Pass]:
        return frozenset().union(*(t.passes() for t in self.terms))

    def init_state(self, batch_size: int) -> SumState:
        return SumState([t.init_state(batch_size) for t in self.terms], [])

    def needs(self, ctx: GuidanceContext, state: SumState, scale: float | None = None) -> PassMasks:
        state.masks = [t.needs(ctx, s) for t, s in zip(self.terms, state.terms, strict=True)]
        union: PassMasks = {}
        for masks in state.masks:
            for p, m in masks.items():
                union[p] = union[p] | m if p in union else m.clone()
        return union

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: SumState, scale: float | None = None
              ) -> torch.Tensor:
        cond = preds[COND]
        rows = ctx.rows  # positions in the batch, over which needs() made the masks
        out = None
        for term, term_state, masks in zip(self.terms, state.terms, state.masks, strict=True):
            # A pass absent from preds was computed for none of these samples (a wrapper may have removed it).
            own = {p: m[rows] if p in preds else torch.zeros(len(rows), dtype=torch.bool) for p, m in masks.items()}
            extra = {p: _select(preds[p], m) for p, m in own.items() if bool(m.any())}
            g = apply_guidance(term, cond, extra, own, ctx, term_state)
            out = g if out is None else out + (g - cond)
        return out  # type: ignore[return-value]
