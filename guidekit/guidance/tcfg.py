"""Tangential Damping CFG (TCFG; Kwon et al., "TCFG: Tangential Damping Classifier-free Guidance", CVPR 2025,
arXiv 2503.18137).

Per sample, with the conditional and unconditional predictions flattened to vectors ``c, u`` and
``A = [c; u]`` (2 x d), the first right singular vector ``v_1`` of ``A`` (largest singular value) is the direction
both predictions share; the unconditional prediction keeps only its component along it, and CFG runs on that:

    u' = <u, v_1> v_1,        y = u' + w (c - u')

(the rule of diffusers' ``TangentialClassifierFreeGuidance`` and ComfyUI's ``TCFG`` node). ``v_1`` lies in the span
of ``c`` and ``u``: it is ``A^T a / ||A^T a||`` with ``a`` the top eigenvector of the 2 x 2 Gram matrix ``A A^T``, so
guidekit computes it from three dot products in float64 instead of an SVD of ``A``. The projection passes through
the origin, so the result depends on the prediction space: the paper filters scores, which at fixed ``(x, sigma)``
are multiples of ``eps``, so the default space is ``"eps"``; ``space="model"`` reproduces diffusers, which filters
whatever the model outputs (the same as ``"eps"`` on eps-prediction models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import GuidanceContext, WeightedGuidance
from guidekit.parameterization import check_space


def tangential_unconditional(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """``u' = <u, v_1> v_1`` per sample (module docstring), computed in float64 and returned in ``uncond``'s
    dtype. A sample whose predictions are both zero gives zero."""
    c, u = cond.double().flatten(1), uncond.double().flatten(1)
    cc, cu, uu = (c * c).sum(1), (c * u).sum(1), (u * u).sum(1)
    gram = torch.stack([torch.stack([cc, cu], -1), torch.stack([cu, uu], -1)], -2)  # (B, 2, 2)
    a = torch.linalg.eigh(gram).eigenvectors[..., 1:]  # eigenvalues ascend: the last column is the largest's
    v1 = a[:, 0] * c + a[:, 1] * u
    norm = v1.norm(dim=1, keepdim=True)
    v1 = torch.where(norm > 0, v1 / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return ((u * v1).sum(1, keepdim=True) * v1).view(uncond.shape).to(uncond.dtype)


@dataclass(frozen=True)
class TCFG(WeightedGuidance):
    """Tangential damping CFG: CFG on the unconditional prediction projected onto the predictions' shared
    direction (module docstring).

    Args:
        scale: guidance weight ``w`` (``1`` = no guidance).
        space: prediction space of the projection: ``"eps"`` (the paper's scores), ``"x0"``, ``"v"``, ``"flow"``,
            or ``"model"`` (diffusers' behaviour).
    """

    space: str = "eps"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_space("space", self.space, allow_model=True)

    def combine_in_space(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any,
                         scale: float) -> torch.Tensor:
        damped = tangential_unconditional(cond, uncond)
        return damped + scale * (cond - damped)
