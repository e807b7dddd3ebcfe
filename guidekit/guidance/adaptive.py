"""Adaptive Guidance (Castillo et al., arXiv 2312.12487, Sec. 4).

At each solver step the cosine similarity ``gamma_t = cos(eps_c, eps_u)`` of the two noise
predictions is measured per sample (flattened). Guidance runs while ``gamma_t < gamma_bar``; from the
first step at which ``gamma_t >= gamma_bar`` the sample is switched to conditional-only for the rest
of the pipeline call (the switch is permanent). The step that triggers the switch is still guided,
and the switch takes effect at the next solver step, so both calls of a Heun step agree. Samples of
a batch switch independently, and only the rows still guided are evaluated; over a guidance with further passes
(``CFG(5) + PAG(3)``) a switched sample drops all of them. The switches live in the per-call
state (:class:`~guidekit.guidance.base.WrappedState`, ``own``: the last guided step of each sample).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from guidekit.guidance.base import (
    COND,
    UNCOND,
    Guidance,
    GuidanceContext,
    GuidanceWrapper,
    PassMasks,
    Predictions,
    WrappedState,
    per_sample_dot,
    per_sample_norm,
    set_field,
)
from guidekit.parameterization import check_space
from guidekit.validation import check_number

_NEVER = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class AdaptiveGuidance(GuidanceWrapper):
    """Guide with ``inner`` until the two predictions align, then stop guiding that sample.

    Args:
        inner: the guidance applied while a sample is still guided.
        threshold: ``gamma_bar`` in ``(0, 1]``; the paper uses 0.991, 0.994 or 0.996. A cosine
            similarity never exceeds 1, so ``1.0`` keeps guiding unless the predictions are exactly
            parallel.
        space: the prediction space of the cosine similarity (the paper's is ``"eps"``).
    """

    inner: Guidance
    threshold: float = 0.991
    space: str = "eps"

    def __post_init__(self) -> None:
        self._check_inner(any_guidance=True)
        if UNCOND not in self.inner.passes():
            raise ValueError(f"inner={self.inner!r} is not accepted; AdaptiveGuidance measures the conditional and "
                             "unconditional predictions, so the inner guidance must use the unconditional one")
        set_field(self, "threshold", check_number("threshold", self.threshold, low=0.0, high=1.0, low_open=True))
        check_space("space", self.space)

    def init_state(self, batch_size: int) -> WrappedState:
        """``own``: per sample, the last step that is guided (none yet: the largest int64)."""
        return WrappedState(torch.full((batch_size,), _NEVER, dtype=torch.int64), self.inner.init_state(batch_size))

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        still = ctx.step <= state.own[ctx.rows]
        return self.inner.needs_unconditional(ctx, state.inner, scale) & still

    def similarity(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext) -> torch.Tensor:
        """``gamma_t`` per sample: cosine similarity of the two predictions in ``self.space``."""
        ctx64 = replace(ctx, x=ctx.x.double())
        c, u = ctx64.to_space(cond.double(), self.space), ctx64.to_space(uncond.double(), self.space)
        return (per_sample_dot(c, u) / (per_sample_norm(c) * per_sample_norm(u))).flatten()

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        self._switch(cond, uncond, ctx, state)
        return self.inner.combine(cond, uncond, ctx, state.inner, scale)

    def _switch(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any) -> None:
        """Record this step as the last guided one of the samples whose predictions align."""
        switch = (self.similarity(cond, uncond, ctx) >= self.threshold).cpu()
        if switch.any():
            rows = ctx.rows[switch]
            state.own[rows] = torch.clamp(state.own[rows], max=ctx.step)

    def conditional_only(self, cond: torch.Tensor, ctx: GuidanceContext, state: Any = None) -> torch.Tensor:
        return self.inner.conditional_only(cond, ctx, state.inner)

    def needs(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> PassMasks:
        if self.two_pass:
            return super().needs(ctx, state, scale)
        still = ctx.step <= state.own[ctx.rows]
        return {p: m & still for p, m in self.inner.needs(ctx, state.inner, scale).items()}

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: Any, scale: float | None = None
              ) -> torch.Tensor:
        if self.two_pass:
            return super().guide(preds, ctx, state, scale)
        if UNCOND in preds:
            self._switch(preds[COND], preds[UNCOND], ctx, state)
        return self.inner.guide(preds, ctx, state.inner, scale)
