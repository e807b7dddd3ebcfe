"""MAMBO-G, magnitude-aware guidance (Zhu et al., "MAMBO-G: Magnitude-Aware Mitigation for Boosted Guidance",
arXiv 2508.03442).

The weight shrinks where the guidance update is large against the prediction. Per sample, over all non-batch
dimensions:

    r = ||c - u|| / ||u||,        w_eff = 1 + (w - 1) exp(-alpha r),        y = u + w_eff (c - u)

(the rule of diffusers' ``MagnitudeAwareGuidance``, which the authors merged into diffusers). The ratio makes it
depend on the prediction space: the paper works with flow velocities, so the default space is ``"flow"``, the model's
own output on flow-matching models; ``space="model"`` reproduces diffusers on any model. A sample whose ``u`` is zero
gets ``w_eff = 1`` (diffusers divides by zero there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import GuidanceContext, WeightedGuidance, per_sample_norm, set_field
from guidekit.parameterization import check_space
from guidekit.validation import check_number


@dataclass(frozen=True)
class MAMBOG(WeightedGuidance):
    """Magnitude-aware guidance: CFG whose weight decays with the relative size of the update (module docstring).

    Args:
        scale: the largest weight ``w`` (``1`` = no guidance; diffusers' and the authors' default is 10).
        alpha: decay rate ``alpha >= 0`` of the weight in the ratio ``r`` (default 8, the authors'); ``0`` is CFG.
        space: prediction space of the ratio: ``"flow"`` (the paper's), ``"eps"``, ``"x0"``, ``"v"``, or ``"model"``
            (diffusers' behaviour).
    """

    alpha: float = 8.0
    space: str = "flow"

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "alpha", check_number("alpha", self.alpha, low=0.0))
        check_space("space", self.space, allow_model=True)

    def combine_in_space(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any,
                         scale: float) -> torch.Tensor:
        diff = cond - uncond
        norm_u = per_sample_norm(uncond)
        ratio = per_sample_norm(diff) / norm_u.clamp_min(torch.finfo(norm_u.dtype).tiny)
        decay = torch.where(norm_u > 0, torch.exp(-self.alpha * ratio), 0.0)
        return uncond + (1.0 + (scale - 1.0) * decay) * diff
