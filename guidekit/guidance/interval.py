"""Guidance in a limited interval (Kynkaanniemi et al., NeurIPS 2024, arXiv 2404.07724, eq. 5).

``w(sigma) = w`` for ``sigma`` in ``(sigma_lo, sigma_hi]``, else ``1``. Outside the interval the
network runs conditional-only: no unconditional row is computed (over a guidance with further passes, such as
``CFG(5) + PAG(3)`` or ``PAG(3)`` alone, none of them). As in the authors' EDM sampler
(kynkaat/guidance-interval), the decision is taken once per solver step at the step's starting
sigma, so both evaluations of a Heun step share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import Guidance, GuidanceContext, GuidanceWrapper, PassMasks, Predictions, set_field
from guidekit.validation import check_number


@dataclass(frozen=True)
class Interval(GuidanceWrapper):
    """Apply ``inner`` only while the step's sigma lies in ``(sigma_lo, sigma_hi]`` (EDM sigma).

    Args:
        inner: the guidance used inside the interval.
        sigma_lo: lower end (exclusive), ``>= 0``.
        sigma_hi: upper end (inclusive), ``> sigma_lo``; ``float("inf")`` for no upper end.
    """

    inner: Guidance
    sigma_lo: float
    sigma_hi: float

    def __post_init__(self) -> None:
        self._check_inner(any_guidance=True)
        set_field(self, "sigma_lo", check_number("sigma_lo", self.sigma_lo, low=0.0))
        if self.sigma_hi != float("inf"):
            set_field(self, "sigma_hi", check_number("sigma_hi", self.sigma_hi, low=0.0))
        if self.sigma_lo >= self.sigma_hi:
            raise ValueError(f"sigma_lo={self.sigma_lo!r}, sigma_hi={self.sigma_hi!r} are not accepted; "
                             "expected 0 <= sigma_lo < sigma_hi")

    def contains(self, sigma: float) -> bool:
        """Whether guidance applies at a step that starts at ``sigma``."""
        return self.sigma_lo < sigma <= self.sigma_hi

    def cfg_weight(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> float | None:
        return self.inner.cfg_weight(ctx, state, scale) if self.contains(ctx.step_sigma) else None

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        inside = self.inner.needs_unconditional(ctx, state, scale)
        return inside if self.contains(ctx.step_sigma) else torch.zeros_like(inside)

    def needs(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> PassMasks:
        if self.two_pass:
            return super().needs(ctx, state, scale)
        masks = self.inner.needs(ctx, state, scale)
        return masks if self.contains(ctx.step_sigma) else {p: torch.zeros_like(m) for p, m in masks.items()}

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: Any, scale: float | None = None
              ) -> torch.Tensor:
        if self.two_pass:
            return super().guide(preds, ctx, state, scale)
        return self.inner.guide(preds, ctx, state, scale)
