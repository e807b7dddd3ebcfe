"""Smoothed Energy Guidance (SEG; Hong, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy
Curvature of Attention", NeurIPS 2024, arXiv:2408.00760).

The perturbed prediction ``D_s`` is the conditional one with the queries of chosen self-attention layers blurred by a
2-D Gaussian of standard deviation ``sigma`` over the token grid (:class:`~guidekit.guidance.base.BlurredQueries`);
the paper shows this blurs the attention weights, which lowers the curvature of the attention's energy. The update is
the official SEG-SDXL rule, linear like PAG's:

    D = D_c + s (D_c - D_s)

and ``CFG(w) + SEG(s)`` gives ``D_u + w (D_c - D_u) + s (D_c - D_s)`` (the official pipeline's rule with CFG). As
``sigma`` grows the blur tends to the mean query: every token then attends with the same, averaged, query, which
the official code uses above ``sigma = 9999`` and which is the default here (the official ``seg_blur_sigma`` is
9999999).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from guidekit.guidance.base import BlurredQueries, Pass, PerturbedGuidance, set_field
from guidekit.guidance.pag import DEFAULT_LAYERS, check_layers
from guidekit.validation import check_number


@dataclass(frozen=True)
class SEG(PerturbedGuidance):
    """Smoothed Energy Guidance: ``D_c + s (D_c - D_s)`` with the queries of ``layers`` blurred (module docstring).

    Args:
        scale: the SEG weight ``s >= 0`` (the official ``seg_scale``, 3.0, "generally fixed"). ``0`` computes
            nothing.
        blur_sigma: the blur's standard deviation in tokens, ``> 0``; ``inf`` (the default), or anything above
            9999, is the infinite blur. The official README also uses 100, and suggests trying 1, 4, 16, ...
        layers: the denoiser's layers whose self-attention queries are blurred (official: ``["mid"]`` on SDXL);
            matched as for :class:`~guidekit.guidance.pag.PAG`.
    """

    scale: float = 3.0
    blur_sigma: float = math.inf
    layers: tuple[str, ...] = DEFAULT_LAYERS

    def __post_init__(self) -> None:
        set_field(self, "scale", check_number("scale", self.scale, low=0.0))
        sigma = self.blur_sigma
        if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma == math.inf):
            sigma = check_number("blur_sigma", sigma, low=0.0, low_open=True)
        set_field(self, "blur_sigma", float(sigma))
        set_field(self, "layers", check_layers(self.layers))

    @property
    def perturbed(self) -> Pass:
        """The pass of the blurred-query prediction: ``seg:``, the layers and the blur."""
        return Pass(f"seg:{','.join(self.layers)}:{self.blur_sigma:g}", BlurredQueries(self.layers, self.blur_sigma))
