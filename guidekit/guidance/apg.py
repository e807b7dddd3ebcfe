"""Adaptive Projected Guidance (Sadat, Hilliges & Weber, ICLR 2025, arXiv 2410.02416).

In the denoised (``x0``) space, with ``Delta_k = D_c - D_u`` at model evaluation ``k``:

* reverse momentum (Sec. 4.3): ``Dbar_k = Delta_k + beta Dbar_{k-1}``, ``Dbar_{-1} = 0``, ``beta < 0``;
* norm clamp (eq. 9): ``Dbar <- Dbar min(1, r / ||Dbar||)`` per sample (``r = 0`` disables it);
* projection onto ``D_c`` (eq. 6-7, in float64): ``par = <Dbar, D_c> / ||D_c||^2 D_c``,
  ``orth = Dbar - par``;
* output (eq. 8): ``D = D_c + (w - 1) (orth + eta par)``.

With ``eta = 1``, ``r = 0`` and ``beta = 0`` this is CFG. The momentum buffer keeps the un-clamped
average and is updated once per model evaluation, as in the authors' reference algorithm; it is per
sample and reset at the start of each pipeline call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from guidekit.guidance.base import GuidanceContext, WeightedGuidance, check_number, per_sample_dot, per_sample_norm
from guidekit.parameterization import check_space


@dataclass(eq=True)
class APG(WeightedGuidance):
    """Adaptive projected guidance.

    Args:
        scale: guidance weight ``w`` (``1`` = no guidance).
        eta: weight of the component parallel to ``D_c`` (paper default 0).
        norm_threshold: ``r``, the norm clamp of the update (SDXL 15; 0 disables it).
        momentum: ``beta``, the reverse-momentum coefficient (SDXL -0.5; 0 disables it).
        space: prediction space the formula runs in; the paper's is ``"x0"``.
    """

    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    space: str = "x0"
    _buffer: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eta = check_number("eta", self.eta)
        self.norm_threshold = check_number("norm_threshold", self.norm_threshold, low=0.0)
        self.momentum = check_number("momentum", self.momentum, low=-1.0, high=1.0, low_open=True,
                                     high_open=True)
        check_space("space", self.space, allow_model=True)

    def reset(self, batch_size: int) -> None:
        self._buffer = None

    def combine_in_space(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext,
                         scale: float) -> torch.Tensor:
        diff = cond - uncond
        if self.momentum != 0.0:
            if self._buffer is None or self._buffer.shape[1:] != diff.shape[1:]:
                self._buffer = diff.new_zeros((ctx.batch_size, *diff.shape[1:]))
            diff = diff + self.momentum * self._buffer[ctx.rows]
            self._buffer[ctx.rows] = diff
        if self.norm_threshold > 0:
            diff = diff * torch.clamp(self.norm_threshold / per_sample_norm(diff), max=1.0)
        c64, d64 = cond.double(), diff.double()
        parallel = per_sample_dot(d64, c64) / per_sample_dot(c64, c64) * c64
        update = (d64 - parallel) + self.eta * parallel
        return cond + (scale - 1.0) * update.to(cond.dtype)
