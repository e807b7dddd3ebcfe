"""CFG weight schedules (Wang et al., TMLR 2024, arXiv 2404.13040, Sec. 3 and Table 1).

``tau = t / T`` runs from 1 (pure noise) to 0 (data); guidekit takes ``t`` as the step's timestep in
the scheduler's units and ``T`` as ``num_train_timesteps`` (for flow models ``tau`` is the flow time).

The paper writes guidance as ``eps_c + w_HS (eps_c - eps_u)`` and its Fig. 1 pseudocode schedules
that Ho & Salimans weight (``w = max(1, w0 * 2 t / T)``; ``eps = (w + 1) eps_c - w eps_u``). So a
schedule here multiplies ``w - 1``, not ``w``: with ``f`` the shape below,
``w(tau) = 1 + f(tau, w - 1)``. The linear, inverse-linear, cosine, sine, V and Lambda shapes have
mean ``w`` over ``tau`` in ``[0, 1]`` (the paper's area normalisation); ``clamp_linear`` adds a floor
``c`` on the Ho & Salimans weight, and ``pcs`` is not normalised (``s = 1`` has mean ``(w + 1) / 2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.autoguidance import AutoGuidance
from guidekit.guidance.base import (
    UNCOND,
    Guidance,
    GuidanceContext,
    GuidanceSum,
    GuidanceWrapper,
    Pass,
    PassMasks,
    PerturbedGuidance,
    Predictions,
    set_field,
)
from guidekit.validation import check_number


def _linear(tau: float, w: float) -> float:
    return 2 * w * (1 - tau)


def _inverse_linear(tau: float, w: float) -> float:
    return 2 * w * tau


def _cosine(tau: float, w: float) -> float:
    return w * (1 + math.cos(math.pi * tau))


def _sine(tau: float, w: float) -> float:
    return w * (1 - math.cos(math.pi * tau))


def _v_shape(tau: float, w: float) -> float:
    return 2 * w * abs(1 - 2 * tau)


def _lambda_shape(tau: float, w: float) -> float:
    return 2 * w * (1 - abs(1 - 2 * tau))


def _clamp_linear(tau: float, w: float, c: float) -> float:
    return max(c, 2 * w * (1 - tau))


def _pcs(tau: float, w: float, s: float) -> float:
    return w * (1 - math.cos(math.pi * (1 - tau) ** s)) / 2


#: Schedule name -> (function of (tau, w, **params), names of its parameters).
SCHEDULES: dict[str, tuple[Callable[..., float], tuple[str, ...]]] = {
    "constant": (lambda tau, w: w, ()),  # the unscheduled weight, for sweeps
    "linear": (_linear, ()),
    "inverse_linear": (_inverse_linear, ()),
    "cosine": (_cosine, ()),
    "sine": (_sine, ()),
    "v_shape": (_v_shape, ()),
    "lambda_shape": (_lambda_shape, ()),
    "clamp_linear": (_clamp_linear, ("c",)),
    "pcs": (_pcs, ("s",)),
}


def schedule_weight(schedule: str, tau: float, w: float, **params: float) -> float:
    """The guidance weight (``1`` = none) of ``schedule`` at normalised time ``tau`` for base weight ``w``.

    The shape is applied to the Ho & Salimans weight ``w - 1`` (see the module docstring).
    """
    fn, _ = SCHEDULES[schedule]
    return 1.0 + fn(tau, w - 1.0, **params)


def _innermost(guidance: Guidance) -> Guidance:
    while isinstance(guidance, GuidanceWrapper):
        guidance = guidance.inner
    return guidance


@dataclass(frozen=True, init=False)
class Scheduled(GuidanceWrapper):
    """Run ``inner`` with its weight replaced, at each step, by the schedule's.

    For a weight whose "no guidance" value is 1 (CFG and its reshapings, autoguidance) the scheduled weight is
    ``schedule_weight(schedule, tau, inner.scale)``, the shape applied to ``w - 1``. For one whose "no guidance" value
    is 0 (PAG, SEG, SLG: ``D_c + s (D_c - D_p)``) the shape is applied to ``s`` itself: ``f(tau, s)``. A sum is
    scheduled term by term: ``Scheduled(CFG(5) + PAG(3), "linear")`` is ``Scheduled(CFG(5), "linear") +
    Scheduled(PAG(3), "linear")`` (and is built as that sum).

    Args:
        inner: a guidance with a ``scale`` (CFG, APG, CFG-Zero*, TCFG, MAMBO-G, CFG normalisation, PAG, SEG, SLG,
            autoguidance, or a wrapper of one), or a sum of them.
        schedule: one of ``SCHEDULES``.
        params: the schedule's parameters (``c`` for ``clamp_linear``, the floor of the Ho & Salimans
            weight; ``s`` for ``pcs``, the exponent), kept as sorted ``(name, value)`` pairs.
    """

    inner: Guidance
    schedule: str
    params: tuple[tuple[str, float], ...]

    def __new__(cls, inner: Guidance, schedule: str, **params: float) -> Any:
        if isinstance(inner, GuidanceSum):
            return GuidanceSum(tuple(cls(term, schedule, **params) for term in inner.terms))
        return super().__new__(cls)

    def __init__(self, inner: Guidance, schedule: str, **params: float) -> None:
        set_field(self, "inner", inner)
        set_field(self, "schedule", schedule)
        self._check_inner(any_guidance=True)
        if not hasattr(inner, "scale"):
            raise TypeError(f"inner={inner!r} is not accepted; expected a guidance with a scale")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not accepted; expected one of {', '.join(SCHEDULES)}")
        expected = SCHEDULES[schedule][1]
        if set(params) != set(expected):
            raise ValueError(f"schedule {schedule!r} takes parameters ({', '.join(expected) or 'none'}); "
                             f"got {', '.join(params) or 'none'}")
        set_field(self, "params", tuple(sorted((name, check_number(name, value, low=0.0))
                                               for name, value in params.items())))

    def __getnewargs_ex__(self) -> tuple[tuple, dict]:
        return (self.inner, self.schedule), dict(self.params)

    @property
    def _from_zero(self) -> bool:
        """Whether the weight's "no guidance" value is 0 (a perturbed-pass method) rather than 1."""
        return isinstance(_innermost(self.inner), PerturbedGuidance)

    def passes(self) -> frozenset[Pass]:
        # A schedule can move the weight away from its "no guidance" value even where ``inner.scale`` is at it.
        inner = _innermost(self.inner)
        if isinstance(inner, PerturbedGuidance):
            return frozenset({inner.perturbed})
        if isinstance(inner, AutoGuidance):
            return frozenset({inner.guiding})
        return frozenset({UNCOND}) if self.two_pass else self.inner.passes()

    def weight(self, tau: float) -> float:
        """The scheduled weight at normalised time ``tau``."""
        scale = self.inner.scale  # type: ignore[attr-defined]
        if self._from_zero:
            fn, _ = SCHEDULES[self.schedule]
            return fn(tau, scale, **dict(self.params))
        return schedule_weight(self.schedule, tau, scale, **dict(self.params))

    def cfg_weight(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> float | None:
        return self.inner.cfg_weight(ctx, state, self.weight(ctx.tau)) if self.two_pass else None

    def needs(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> PassMasks:
        if self.two_pass:
            return super().needs(ctx, state, scale)
        return self.inner.needs(ctx, state, self.weight(ctx.tau))

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: Any, scale: float | None = None
              ) -> torch.Tensor:
        if self.two_pass:
            return super().guide(preds, ctx, state, scale)
        return self.inner.guide(preds, ctx, state, self.weight(ctx.tau))

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        return self.inner.needs_unconditional(ctx, state, self.weight(ctx.tau))

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        return self.inner.combine(cond, uncond, ctx, state, self.weight(ctx.tau))

