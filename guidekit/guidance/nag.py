"""Normalized Attention Guidance (NAG; Chen, Bandyopadhyay, Zou & Song, "Normalized Attention Guidance: Universal
Negative Guidance for Diffusion Models", arXiv:2505.21179).

NAG guides inside attention instead of on predictions. In every cross-attention layer, for the rows conditioned on
the prompt, with ``Z+ = Attn(Q, K+, V+)`` the attention output of the prompt and ``Z- = Attn(Q, K-, V-)`` that of
the negative prompt (the same queries), per token, with ``L^p`` norms over the features (``p = 1``: the paper and
the official ``NAGAttnProcessor2_0``; ``p = 2``: the official first Flux release, ``NAGFluxAttnProcessor2_0``):

    Z~ = s Z+ - (s - 1) Z-,        r = ||Z~||_p / ||Z+||_p,        Z^ = Z~ min(r, tau) / r,
    Z  = alpha Z^ + (1 - alpha) Z+

then the layer's output projection as usual. It adds no network evaluation, only the negative prompt's keys,
values and attention in the guided layers. It changes the conditional prediction itself (and every perturbed pass,
which repeats it), so it adds to any other guidance: ``CFG(5) + NAG(...)`` is CFG between the unconditional
prediction and the NAG-guided conditional one, the official pipelines' rule with CFG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import (
    COND,
    Guidance,
    GuidanceContext,
    NegativePromptAttention,
    Pass,
    PassMasks,
    Predictions,
    set_field,
)
from guidekit.limits import MAX_PROMPT_CHARS, check_text
from guidekit.validation import check_number


def nag_attention(positive: torch.Tensor, negative: torch.Tensor, scale: float, tau: float, alpha: float,
                  p: int = 1) -> torch.Tensor:
    """NAG's attention output from the prompt's ``positive`` and the negative prompt's ``negative`` outputs
    ``(..., tokens, features)``, with ``L^p`` norms over the features (module docstring)."""
    guided = positive * scale - negative * (scale - 1)
    ratio = guided.norm(p=p, dim=-1, keepdim=True) / positive.norm(p=p, dim=-1, keepdim=True)
    capped = guided * torch.clamp(ratio, max=tau) / ratio
    return capped * alpha + positive * (1 - alpha)


@dataclass(frozen=True)
class NAG(Guidance):
    """Normalized Attention Guidance in the cross-attention layers (module docstring).

    Args:
        scale: the extrapolation weight ``s > 1`` (the official ``nag_scale``; 5 in its examples; ``1`` would be
            no guidance and is refused).
        negative_prompt: the text to steer away from; required.
        tau: the cap ``tau > 0`` of the norm ratio (official 2.5).
        alpha: the blend ``alpha`` in ``[0, 1]`` towards the capped output (official SDXL 0.5, Flux 0.25).
        p: the order of the per-token norms, 1 (the paper, the official SD/SDXL processor) or 2 (the official
            first Flux release).
    """

    scale: float
    negative_prompt: str = ""
    tau: float = 2.5
    alpha: float = 0.5
    p: int = 1

    def __post_init__(self) -> None:
        set_field(self, "scale", check_number("scale", self.scale, low=1.0, low_open=True))
        if not isinstance(self.negative_prompt, str) or not self.negative_prompt.strip():
            raise ValueError(f"negative_prompt={self.negative_prompt!r} is not accepted; expected the text NAG steers "
                             "away from (NAG needs a negative prompt)")
        check_text("negative_prompt", self.negative_prompt, high=MAX_PROMPT_CHARS, limit="MAX_PROMPT_CHARS")
        set_field(self, "tau", check_number("tau", self.tau, low=0.0, low_open=True))
        set_field(self, "alpha", check_number("alpha", self.alpha, low=0.0, high=1.0))
        if isinstance(self.p, bool) or self.p not in (1, 2):
            raise ValueError(f"p={self.p!r} is not accepted; expected 1 or 2 (the order of NAG's per-token norms)")
        set_field(self, "p", int(self.p))

    def conditional_change(self) -> NegativePromptAttention:
        return NegativePromptAttention(self.negative_prompt, self.scale, self.tau, self.alpha, self.p)

    def passes(self) -> frozenset[Pass]:
        return frozenset()

    def needs(self, ctx: GuidanceContext, state: Any, scale: float | None = None) -> PassMasks:
        return {}

    def guide(self, preds: Predictions, ctx: GuidanceContext, state: Any, scale: float | None = None
              ) -> torch.Tensor:
        return preds[COND]
