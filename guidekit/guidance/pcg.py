"""PCG, predictor-corrector guidance (Bradley & Nakkiran 2024, "Classifier-Free Guidance is a
Predictor-Corrector", Algorithm 2; REFERENCE section 1).

The guidance half of PCG: predictor calls use the conditional prediction only (no unconditional row is
computed), corrector calls the CFG combination at weight ``gamma``, the exponent of the tilted distribution
``p(x | c)^gamma p(x)^(1 - gamma)`` that the Langevin corrector targets. The sampler half is
:class:`guidekit.samplers.pcg.PCGScheduler`, which :meth:`PCG.make_sampler` builds with ``corrector_steps``
and ``step_scale`` and ``set_guidance`` installs. ``PCG(gamma=2 w - 1)`` with one corrector step and
``step_scale=1`` approximates CFG with ancestral DDPM at weight ``w`` (Theorem 1 of the paper).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import UNCOND, GuidanceContext, Pass, TwoPassGuidance, constant_mask, set_field
from guidekit.limits import check_corrector_steps
from guidekit.validation import check_number


@dataclass(frozen=True)
class PCG(TwoPassGuidance):
    """Predictor-corrector guidance.

    Args:
        gamma: exponent of the tilted target (``1`` = unguided corrector), ``>= 0``.
        corrector_steps: Langevin corrector steps per solver step, 0 to
            :data:`~guidekit.limits.MAX_CORRECTOR_STEPS`.
        step_scale: multiplier of the Langevin step size, ``> 0``.
    """

    gamma: float
    corrector_steps: int = 1
    step_scale: float = 1.0

    def __post_init__(self) -> None:
        set_field(self, "gamma", check_number("gamma", self.gamma, low=0.0))
        set_field(self, "corrector_steps", check_corrector_steps("corrector_steps", self.corrector_steps))
        set_field(self, "step_scale", check_number("step_scale", self.step_scale, low=0.0, low_open=True))

    def passes(self) -> frozenset[Pass]:
        return frozenset({UNCOND}) if self.gamma != 1.0 and self.corrector_steps > 0 else frozenset()

    def make_sampler(self, scheduler_config: Mapping[str, Any]) -> Any:
        """PCG's predictor-corrector scheduler on the schedule of ``scheduler_config``."""
        from guidekit.samplers.pcg import PCGScheduler

        return PCGScheduler.from_config(scheduler_config, corrector_steps=self.corrector_steps,
                                        step_scale=self.step_scale)

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        weight = self.gamma if scale is None else scale
        return constant_mask(len(ctx.rows), ctx.corrector and weight != 1.0)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        """CFG at weight ``gamma`` (affine, so it runs in the model's own space and dtype)."""
        weight = self.gamma if scale is None else scale
        return uncond + weight * (cond - uncond)
