"""CFG++ (Chung et al., ICLR 2025, "CFG++: Manifold-constrained Classifier Free Guidance"; REFERENCE section 1).

CFG++ denoises with the guided prediction at a small weight ``lam`` in ``[0, 1]`` and renoises with the
unconditional one. In EDM variables, its DDIM/Euler step is
``x_{i+1} = D_lam + sigma_{i+1} (x - D_u) / sigma_i`` with ``D_lam = D_u + lam (D_c - D_u)``;
``lam = 0.6`` is about CFG 7.5 on SD1.5 in the paper.

This is the guidance half: it hands the pipeline ``D_lam`` (CFG at weight ``lam``, affine, so it runs in the
model's own space and dtype). The sampler half, :class:`guidekit.samplers.cfgpp.CFGPPScheduler`, is
installed by ``set_guidance`` and receives the unconditional prediction from the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guidekit.guidance.base import Guidance, GuidanceContext, check_number

#: Solvers CFG++ is defined for here.
CFGPP_SOLVERS = ("euler", "dpmpp_2m")


@dataclass(eq=True)
class CFGPP(Guidance):
    """CFG++ at weight ``lam`` with the ``solver`` it renoises in.

    Args:
        lam: guidance weight ``lambda`` in ``[0, 1]`` (0: unconditional sampling).
        solver: ``"euler"`` (the paper's DDIM form in EDM variables) or ``"dpmpp_2m"``.
    """

    lam: float
    solver: str = "euler"

    def __post_init__(self) -> None:
        self.lam = check_number("lam", self.lam, low=0.0, high=1.0)
        if self.solver not in CFGPP_SOLVERS:
            raise ValueError(f"solver={self.solver!r} is not accepted; expected one of {', '.join(CFGPP_SOLVERS)}")

    def needs_unconditional(self, ctx: GuidanceContext, scale: float | None = None) -> torch.Tensor:
        return torch.ones(len(ctx.rows), dtype=torch.bool)  # the sampler renoises with it, whatever lam is

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext,
                scale: float | None = None) -> torch.Tensor:
        weight = self.lam if scale is None else scale
        return uncond + weight * (cond - uncond)
