"""Autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024,
arXiv:2406.02507, eq. 1; NVlabs/edm2 ``generate_images.py``: ``ref_Dx.lerp(Dx, guidance)``).

A weaker network ``D_0`` (smaller, or trained shorter) of the same model family, given the same inputs and the same
conditioning as the main network ``D_1``, guides it:

    D = D_0 + w (D_1 - D_0)

``w = 1`` is the main network alone and computes no row of the weak one. The rule is an affine combination, so it
is the same in every prediction space; it runs in the model's own. ``weak`` is the network itself, or the path (or
hub id) of a saved denoiser that the bridge loads when the guidance is attached; only the latter has a text form,
``autoguidance(weak='path/to/unet', scale=2)``. It adds to other terms: ``CFG(w) + AutoGuidance(weak, w')``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import (
    COND,
    Guidance,
    GuidanceContext,
    OtherDenoiser,
    Pass,
    PassMasks,
    Predictions,
    constant_mask,
    set_field,
)
from guidekit.limits import MAX_PATH_CHARS, check_text
from guidekit.validation import check_number


@dataclass(frozen=True)
class AutoGuidance(Guidance):
    """Autoguidance: ``D_weak + w (D - D_weak)`` (module docstring).

    Args:
        weak: the guiding network, a ``torch.nn.Module`` called exactly like the pipeline's denoiser (same
            family and latent shape, on the same device), or the path or hub id of one saved with
            ``save_pretrained`` (a denoiser folder, or a pipeline folder whose denoiser is used), which the bridge
            loads with the denoiser's class, dtype and device at ``set_guidance``; its output must have the
            denoiser's shape.
        scale: the weight ``w >= 0`` (EDM2's presets: 1.7 to 2.9).
    """

    weak: torch.nn.Module | str
    scale: float

    def __post_init__(self) -> None:
        if isinstance(self.weak, str):
            check_text("weak", self.weak, high=MAX_PATH_CHARS, limit="MAX_PATH_CHARS")
            if not self.weak.strip():
                raise ValueError("weak='' is not accepted; expected a torch.nn.Module or the path of a saved denoiser")
        elif not isinstance(self.weak, torch.nn.Module):
            raise TypeError(f"weak of type {type(self.weak).__name__} is not accepted; expected a torch.nn.Module "
                            "called like the pipeline's denoiser, or the path of a saved one")
        set_field(self, "scale", check_number("scale", self.scale, low=0.0))

    @property
    def guiding(self) -> Pass:
        """The pass of the weak network's prediction."""
        return Pass("weak", OtherDenoiser(self.weak))

    def passes(self) -> frozenset[Pass]:
        return frozenset({self.guiding}) if self.scale != 1.0 else frozenset()

    def needs(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> PassMasks:
        weight = self.scale if scale is None else scale
        return {self.guiding: constant_mask(len(ctx.rows), weight != 1.0)}

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: Any, scale: float | None = None
              ) -> torch.Tensor:
        main = preds[COND]
        weak = preds.get(self.guiding)
        if weak is None:
            return main
        weight = self.scale if scale is None else scale
        return weak + weight * (main - weak)
