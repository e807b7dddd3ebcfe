"""The guidance interface: which predictions a call needs, and how they combine.

A guidance object sees one denoiser call at a time through a :class:`GuidanceContext`. It answers,
per sample, whether the unconditional prediction is needed (:meth:`Guidance.needs_unconditional`),
and combines the conditional and unconditional predictions of the samples that have both
(:meth:`Guidance.combine`). Predictions arrive and leave in the model's own output space; each
method converts to the space its paper uses (``space``) through :mod:`guidekit.parameterization`.

Weights follow REFERENCE section 0: ``w = 1`` is no guidance, ``D_w = D_u + w (D_c - D_u)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from guidekit.parameterization import NoiseLevel


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

    @property
    def sigma(self) -> float:
        """EDM sigma of this call."""
        return self.level.sigma

    def subset(self, rows: torch.Tensor) -> GuidanceContext:
        """The context restricted to ``rows`` (CPU positions into this context's rows)."""
        return replace(self, x=self.x[rows.to(self.x.device)], rows=self.rows[rows])

    def to_space(self, y: torch.Tensor, space: str) -> torch.Tensor:
        """Convert a model-space prediction of these rows into ``space``."""
        return self.level.convert(y, self.x, self.model_space, space)

    def from_space(self, y: torch.Tensor, space: str) -> torch.Tensor:
        """Convert a prediction of these rows from ``space`` back into model space."""
        return self.level.convert(y, self.x, space, self.model_space)


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float, or raise a ``ValueError`` that names the parameter and the range."""
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    accepted = f"a finite number in {lo or '(-inf'}, {hi or 'inf)'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not accepted; expected {accepted}")
    v = float(value)
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        raise ValueError(f"{name}={value!r} is not accepted; expected {accepted}")
    return v


def check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (not a bool; numpy's count) in ``[low, high]``, else a
    ``ValueError`` naming the parameter and the range."""
    accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
            or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is not accepted; expected {accepted}")
    return int(value)


class Guidance:
    """Base class of every guidance method.

    Subclasses override :meth:`needs_unconditional` and :meth:`combine`; stateful methods override
    :meth:`reset`, which the bridge calls at the start of every pipeline call.
    """

    #: Whether the method ever asks for the unconditional prediction.
    uses_unconditional: bool = True

    def reset(self, batch_size: int) -> None:
        """Forget per-sample state before a new pipeline call with ``batch_size`` samples."""

    def needs_unconditional(self, ctx: GuidanceContext, scale: float | None = None) -> torch.Tensor:
        """Boolean mask over ``ctx.rows``: which samples need the unconditional prediction.

        ``scale`` overrides the method's own weight, as in :meth:`combine`.
        """
        return torch.ones(len(ctx.rows), dtype=torch.bool)  # on the CPU, like every mask

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext,
                scale: float | None = None) -> torch.Tensor:
        """Guided prediction (model space) of the samples in ``ctx.rows`` from both predictions.

        ``scale`` overrides the method's own weight (used by weight schedules). ``cond`` and ``uncond`` may
        be views of the network's output: copy what is kept beyond the call.
        """
        raise NotImplementedError

    def conditional_only(self, cond: torch.Tensor, ctx: GuidanceContext) -> torch.Tensor:
        """Prediction (model space) of samples that have no unconditional prediction at this call."""
        return cond


@dataclass(eq=True)
class WeightedGuidance(Guidance):
    """A guidance with a weight ``scale`` that works in one prediction space.

    ``space="model"`` means the model's own output space.
    """

    scale: float

    space = "model"

    @property
    def uses_unconditional(self) -> bool:  # type: ignore[override]
        return self.scale != 1.0

    def __post_init__(self) -> None:
        self.scale = check_number("scale", self.scale, low=0.0)

    def needs_unconditional(self, ctx: GuidanceContext, scale: float | None = None) -> torch.Tensor:
        weight = self.scale if scale is None else scale
        return torch.full((len(ctx.rows),), weight != 1.0, dtype=torch.bool)

    #: Whether the formula is linear in the predictions; linear formulas run in the model's own space and
    #: dtype, which makes plain CFG reproduce the pipeline's native arithmetic bit for bit.
    linear: ClassVar[bool] = False

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext,
                scale: float | None = None) -> torch.Tensor:
        """Convert to ``self.space``, apply the formula, convert back.

        Non-linear formulas, and every conversion, run in float64, so that a method that reduces to
        CFG does so to rounding of the model's dtype rather than to conversion error.
        """
        weight = self.scale if scale is None else scale
        if self.linear:
            return self.combine_in_space(cond, uncond, ctx, weight)
        space = ctx.model_space if self.space == "model" else self.space
        ctx64 = replace(ctx, x=ctx.x.double())
        out = self.combine_in_space(ctx64.to_space(cond.double(), space), ctx64.to_space(uncond.double(), space),
                                    ctx64, weight)
        return ctx64.from_space(out, space).to(cond.dtype)

    def combine_in_space(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext,
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


def apply_guidance(guidance: Guidance, cond: torch.Tensor, uncond: torch.Tensor,
                   guided: torch.Tensor, ctx: GuidanceContext) -> torch.Tensor:
    """Combine one call's predictions for the whole batch.

    Args:
        guidance: the method.
        cond: conditional predictions of every sample, model space, ``(B, ...)``.
        uncond: unconditional predictions of the guided samples only, ``(guided.sum(), ...)``.
        guided: boolean CPU mask ``(B,)``: the samples whose unconditional prediction was computed.
        ctx: the call's context over all ``B`` samples.
    """
    n_guided = len(uncond)
    if n_guided == len(guided):
        return guidance.combine(cond, uncond, ctx).to(cond.dtype)
    if n_guided == 0:
        return guidance.conditional_only(cond, ctx).to(cond.dtype)
    idx, rest = guided.nonzero().squeeze(1), (~guided).nonzero().squeeze(1)
    out = torch.empty_like(cond)
    out[idx.to(cond.device)] = guidance.combine(cond[idx.to(cond.device)], uncond, ctx.subset(idx)).to(out.dtype)
    out[rest.to(cond.device)] = guidance.conditional_only(cond[rest.to(cond.device)], ctx.subset(rest)).to(out.dtype)
    return out


class GuidanceWrapper(Guidance):
    """A guidance that modifies another (``inner``): everything it does not override is delegated."""

    inner: Guidance

    def _check_inner(self) -> None:
        if not isinstance(self.inner, Guidance):
            raise TypeError(f"inner={self.inner!r} is not accepted; expected a guidekit guidance object")

    @property
    def uses_unconditional(self) -> bool:  # type: ignore[override]
        return self.inner.uses_unconditional

    @property
    def scale(self) -> float:
        """The weight of the innermost weighted guidance."""
        return self.inner.scale  # type: ignore[attr-defined]

    def reset(self, batch_size: int) -> None:
        self.inner.reset(batch_size)

    def needs_unconditional(self, ctx: GuidanceContext, scale: float | None = None) -> torch.Tensor:
        return self.inner.needs_unconditional(ctx, scale)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext,
                scale: float | None = None) -> torch.Tensor:
        return self.inner.combine(cond, uncond, ctx, scale)

    def conditional_only(self, cond: torch.Tensor, ctx: GuidanceContext) -> torch.Tensor:
        return self.inner.conditional_only(cond, ctx)
