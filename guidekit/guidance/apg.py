"""Adaptive Projected Guidance (Sadat, Hilliges & Weber, ICLR 2025, arXiv 2410.02416).

In the denoised (``x0``) space, with ``Delta_k = D_c - D_u`` at model evaluation ``k``:

* reverse momentum (Sec. 4.3): ``Dbar_k = Delta_k + beta Dbar_{k-1}``, ``Dbar_{-1} = 0``, ``beta < 0``;
* norm clamp (eq. 9): ``Dbar <- Dbar min(1, r / ||Dbar||)`` per sample (``r = 0`` disables it);
* projection onto ``D_c`` (eq. 6-7, in float64): ``par = <Dbar, D_c> / ||D_c||^2 D_c``,
  ``orth = Dbar - par``;
* output (eq. 8): ``D = D_c + (w - 1) (orth + eta par)``.

With ``eta = 1``, ``r = 0`` and ``beta = 0`` this is CFG. The momentum buffer keeps the un-clamped
average and is updated once per model evaluation, as in the authors' reference algorithm; it is per
sample and lives in the per-call state (:class:`APGState`), new at each pipeline call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import GuidanceContext, WeightedGuidance, per_sample_dot, per_sample_norm, set_field
from guidekit.parameterization import check_space
from guidekit.validation import check_number


@dataclass
class APGState:
    """APG's state in one pipeline call: the momentum buffer ``Dbar`` of every sample (``None`` until the first
    guided evaluation)."""

    buffer: torch.Tensor | None = None


@dataclass(frozen=True)
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

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "eta", check_number("eta", self.eta))
        set_field(self, "norm_threshold", check_number("norm_threshold", self.norm_threshold, low=0.0))
        set_field(self, "momentum", check_number("momentum", self.momentum, low=-1.0, high=1.0, low_open=True,
                                                 high_open=True))
        check_space("space", self.space, allow_model=True)

    def init_state(self, batch_size: int) -> APGState | None:
        return APGState() if self.momentum != 0.0 else None

    def combine_in_space(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any,
                         scale: float) -> torch.Tensor:
        diff = cond - uncond
        if self.momentum != 0.0:
            if state.buffer is None or state.buffer.shape[1:] != diff.shape[1:]:
                state.buffer = diff.new_zeros((ctx.batch_size, *diff.shape[1:]))
            if ctx.whole_batch:  # no index: on a GPU, a CPU index costs a copy and a synchronisation
                diff = diff + self.momentum * state.buffer
                state.buffer = diff
            else:
                rows = ctx.rows.to(diff.device)
                diff = diff + self.momentum * state.buffer[rows]
                state.buffer[rows] = diff
        if self.norm_threshold > 0:
            diff = diff * torch.clamp(self.norm_threshold / per_sample_norm(diff), max=1.0)
        c64, d64 = cond.double(), diff.double()
        parallel = per_sample_dot(d64, c64) / per_sample_dot(c64, c64) * c64
        update = (d64 - parallel) + self.eta * parallel
        return cond + (scale - 1.0) * update.to(cond.dtype)
