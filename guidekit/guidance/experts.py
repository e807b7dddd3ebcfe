"""One guidance per denoiser, for pipelines that switch denoisers during sampling (Wan 2.2 A14B).

Wan 2.2 runs a high-noise transformer above a noise boundary and a low-noise ``transformer_2`` below it, with a
CFG weight each (diffusers' ``guidance_scale`` and ``guidance_scale_2``; the official T2V weights are 4 high, 3 low).
``ByExpert(high, low)`` runs ``high`` on the calls of the pipeline's main denoiser (``GuidanceContext.expert`` 0) and
``low`` on those of its second one (expert 1): ``ByExpert(CFG(4), CFG(3))`` is the pipeline's own CFG with both
weights. Each keeps its per-call state across the calls it runs; any guidance can be either half, and a pass that
the running half does not ask for is not computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guidekit.guidance.base import (
    BringsSampler,
    Guidance,
    GuidanceContext,
    Pass,
    PassMasks,
    Perturbation,
    Predictions,
)


@dataclass(frozen=True)
class ByExpert(Guidance):
    """``high`` on the calls of the pipeline's main denoiser, ``low`` on those of its second expert (module
    docstring).

    Args:
        high: the guidance of expert 0 (Wan 2.2: the high-noise ``transformer``).
        low: the guidance of expert 1 (Wan 2.2: the low-noise ``transformer_2``).
    """

    high: Guidance
    low: Guidance

    def __post_init__(self) -> None:
        for name in ("high", "low"):
            value = getattr(self, name)
            if not isinstance(value, Guidance) or isinstance(value, BringsSampler):
                raise TypeError(f"{name}={value!r} is not accepted; expected a guidekit guidance without a sampler "
                                "of its own")
            if value.conditional_change() is not None:
                raise TypeError(f"{name}={value!r} is not accepted; it changes the conditional prediction at every "
                                "call (NAG), which ByExpert cannot switch: add it beside ByExpert instead")

    def _half(self, ctx: GuidanceContext) -> Guidance:
        if ctx.expert not in (0, 1):
            raise ValueError(f"expert={ctx.expert!r} is not accepted by ByExpert; expected 0 (the main denoiser) or "
                             "1 (the second expert)")
        return self.low if ctx.expert else self.high

    def conditional_change(self) -> Perturbation | None:
        return None

    def passes(self) -> frozenset[Pass]:
        return self.high.passes() | self.low.passes()

    def init_state(self, batch_size: int) -> tuple[object, object]:
        return self.high.init_state(batch_size), self.low.init_state(batch_size)

    def cfg_weight(self, ctx: GuidanceContext, state: tuple, scale: float | None = None) -> float | None:
        return self._half(ctx).cfg_weight(ctx, state[ctx.expert], scale)

    def needs(self, ctx: GuidanceContext, state: tuple, scale: float | None = None) -> PassMasks:
        return self._half(ctx).needs(ctx, state[ctx.expert], scale)

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: tuple, scale: float | None = None
              ) -> torch.Tensor:
        return self._half(ctx).guide(preds, ctx, state[ctx.expert], scale)
