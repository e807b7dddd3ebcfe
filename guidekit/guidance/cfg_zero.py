"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models").

In flow-velocity space, per sample over all non-batch dimensions:

* optimised scale (eq. 9): ``s* = <v_c, v_u> / (||v_u||^2 + 1e-8)`` (the ``1e-8`` as in the authors'
  code);
* guided velocity (eq. 10): ``v = s* v_u + w (v_c - s* v_u)``;
* zero-init (Sec. 3.3): the velocity is set to zero for the first ``zero_init_steps`` solver steps
  (the authors' code zeroes step 0 only, ``zero_steps = 0``), so those steps need no network
  evaluation of the unconditional branch.

For variance-preserving models the velocity is obtained through :mod:`guidekit.parameterization`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import GuidanceContext, WeightedGuidance, per_sample_dot, set_field
from guidekit.parameterization import check_space
from guidekit.validation import check_int


@dataclass(frozen=True)
class CFGZeroStar(WeightedGuidance):
    """CFG with an optimised unconditional scale and zero-initialised first steps.

    Args:
        scale: guidance weight ``w`` (``1`` = no guidance).
        zero_init_steps: number of initial solver steps whose velocity is zeroed (``0`` disables).
        space: prediction space of the formula; the paper's is ``"flow"``.
    """

    zero_init_steps: int = 1
    space: str = "flow"

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "zero_init_steps", check_int("zero_init_steps", self.zero_init_steps, low=0))
        check_space("space", self.space, allow_model=True)

    def _zeroed(self, ctx: GuidanceContext) -> bool:
        return ctx.step < self.zero_init_steps

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        mask = super().needs_unconditional(ctx, state, scale)
        return mask & (not self._zeroed(ctx))

    def conditional_only(self, cond: torch.Tensor, ctx: GuidanceContext, state: Any = None) -> torch.Tensor:
        if self._zeroed(ctx):
            x64 = ctx.x.double()
            return ctx.level.convert(torch.zeros_like(x64), x64, "flow", ctx.model_space).to(cond.dtype)
        return cond

    def combine_in_space(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any,
                         scale: float) -> torch.Tensor:
        s_star = per_sample_dot(cond, uncond) / (per_sample_dot(uncond, uncond) + 1e-8)
        return s_star * uncond + scale * (cond - s_star * uncond)
