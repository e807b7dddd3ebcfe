"""CFG++ (Chung et al., ICLR 2025, "CFG++: Manifold-constrained Classifier Free Guidance"; REFERENCE section 1).

CFG++ denoises with the guided prediction at a small weight ``lam`` in ``[0, 1]`` and renoises with the
unconditional one. In EDM variables, its DDIM/Euler step is
``x_{i+1} = D_lam + sigma_{i+1} (x - D_u) / sigma_i`` with ``D_lam = D_u + lam (D_c - D_u)``;
``lam = 0.6`` is about CFG 7.5 on SD1.5 in the paper.

This is the guidance half: it hands the pipeline ``D_lam`` (CFG at weight ``lam``, affine, so it runs in the
model's own space and dtype). The sampler half, :class:`guidekit.samplers.cfgpp.CFGPPScheduler`, is built by
:meth:`CFGPP.make_sampler`, installed by ``set_guidance``, and receives the unconditional prediction from the
bridge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import GuidanceContext, TwoPassGuidance, constant_mask, set_field
from guidekit.validation import check_number

#: Solvers CFG++ is defined for here.
CFGPP_SOLVERS = ("euler", "dpmpp_2m")


@dataclass(frozen=True)
class CFGPP(TwoPassGuidance):
    """CFG++ at weight ``lam`` with the ``solver`` it renoises in.

    Args:
        lam: guidance weight ``lambda`` in ``[0, 1]`` (0: unconditional sampling).
        solver: ``"euler"`` (the paper's DDIM form in EDM variables) or ``"dpmpp_2m"``.
    """

    lam: float
    solver: str = "euler"

    def __post_init__(self) -> None:
        set_field(self, "lam", check_number("lam", self.lam, low=0.0, high=1.0))
        if self.solver not in CFGPP_SOLVERS:
            raise ValueError(f"solver={self.solver!r} is not accepted; expected one of {', '.join(CFGPP_SOLVERS)}")

    def make_sampler(self, scheduler_config: Mapping[str, Any]) -> Any:
        """The CFG++ scheduler with ``solver`` on the schedule of ``scheduler_config``."""
        from guidekit.samplers.cfgpp import CFGPPScheduler

        return CFGPPScheduler.from_config(scheduler_config, solver=self.solver)

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        return constant_mask(len(ctx.rows), True)  # the sampler renoises with it, whatever lam is

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        weight = self.lam if scale is None else scale
        return uncond + weight * (cond - uncond)
