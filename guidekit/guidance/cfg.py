"""Classifier-free guidance and CFG-rescale.

CFG (Ho & Salimans 2022, eq. 6, written with ``w = 1 + w_HS``): ``y = y_u + w (y_c - y_u)``. It is
affine in the prediction, so its result does not depend on the space it runs in; guidekit runs it in
the model's own output space and dtype, which makes it equal to diffusers' native CFG bit for bit.

CFG-rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
Algorithm 2 / eq. 15-16): ``y_res = y_cfg * std(y_c) / std(y_cfg)`` per sample over all non-batch
dimensions, ``y = phi y_res + (1 - phi) y_cfg``. The paper works on v-predictions, so the default
``rescale_space`` is ``"v"``; ``rescale_space="model"`` reproduces diffusers' ``guidance_rescale``,
which rescales whatever the model outputs (eps for SD1.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import GuidanceContext, WeightedGuidance, per_sample_std, set_field
from guidekit.parameterization import check_space
from guidekit.validation import check_number


@dataclass(frozen=True)
class CFG(WeightedGuidance):
    """Classifier-free guidance at weight ``scale`` (``1`` = no guidance), optionally rescaled.

    Args:
        scale: guidance weight ``w`` (diffusers' ``guidance_scale``), ``>= 0``.
        rescale: CFG-rescale factor ``phi`` in ``[0, 1]``; ``0`` disables it (the paper uses 0.7).
        rescale_space: prediction space of the rescale: ``"v"`` (paper), ``"eps"``, ``"x0"``,
            ``"flow"`` or ``"model"`` (diffusers' behaviour).
    """

    rescale: float = 0.0
    rescale_space: str = "v"

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "rescale", check_number("rescale", self.rescale, low=0.0, high=1.0))
        check_space("rescale_space", self.rescale_space, allow_model=True)

    @property
    def space(self) -> str:  # type: ignore[override]
        return self.rescale_space

    @property
    def linear(self) -> bool:  # type: ignore[override]
        return self.rescale == 0

    def cfg_weight(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> float | None:
        if not self._pipeline_arithmetic():
            return None
        return self.scale if scale is None else scale

    def constant_cfg_weight(self) -> float | None:
        cls = type(self)  # a subclass that chooses its samples or weight per call is not constant
        if self.scale == 1.0 or (cls.needs, cls.needs_unconditional, cls.cfg_weight) != _PLAN:
            return None
        return self.scale if self._pipeline_arithmetic() else None

    def _pipeline_arithmetic(self) -> bool:
        """Whether the guided prediction is the pipeline's ``u + w (c - u)``: no rescale, and CFG's own arithmetic
        (a subclass that changes it is not the pipeline's CFG)."""
        cls = type(self)
        return self.rescale == 0 and (cls.guide, cls.combine, cls.combine_in_space) == _ARITHMETIC

    def combine_in_space(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any,
                         scale: float) -> torch.Tensor:
        guided = uncond + scale * (cond - uncond)
        if self.rescale == 0:
            return guided
        rescaled = guided * (per_sample_std(cond) / per_sample_std(guided))
        return self.rescale * rescaled + (1 - self.rescale) * guided


#: CFG's own arithmetic: :meth:`CFG.cfg_weight` holds for instances whose class keeps it.
_ARITHMETIC = (CFG.guide, CFG.combine, CFG.combine_in_space)

#: CFG's own choice of samples and weight: :meth:`CFG.constant_cfg_weight` holds for instances whose class keeps it.
_PLAN = (CFG.needs, CFG.needs_unconditional, CFG.cfg_weight)
