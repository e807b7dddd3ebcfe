"""CFG normalisation: CFG, then the guided prediction's norm brought to, or capped at, the conditional one's.

Three rules that pipelines and tools ship, as named variants (``g = u + w (c - u)``, ``r`` the ``limit``):

* ``"per_token"`` (Qwen-Image; diffusers' ``QwenImagePipeline``): ``y = g r ||c|| / ||g||`` with the norms over the
  channels of each token of the packed latent (a token is a 2 x 2 patch of the latent's channels): a full rescale,
  up or down. On a latent laid out ``(B, C, H, W)`` the same tokens are the 2 x 2 patches.
* ``"per_sample"`` (Lumina-Image 2.0's ``forward_with_cfg`` with ``renorm_cfg = r``; Z-Image's
  ``cfg_normalization``): ``y = g min(1, r ||c|| / ||g||)`` with the norms over the whole sample: a clamp only.
* ``"per_pixel"`` (ComfyUI's ``CFGNorm`` node): ``y = g min(1, r ||c|| / (||g|| + 1e-8))`` with the norms over the
  channels at each latent pixel (or token), in the denoised space.

The first two run on the model's output (flow velocity in those pipelines), ComfyUI's on the denoised prediction;
those are the variants' default spaces. With ``r = 1`` the clamps never enlarge the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidekit.guidance.base import GuidanceContext, WeightedGuidance, per_sample_norm, set_field
from guidekit.parameterization import check_space
from guidekit.validation import check_number

#: Variant -> the space it runs in by default.
VARIANTS: dict[str, str] = {"per_token": "model", "per_sample": "model", "per_pixel": "x0"}


def _patch_norm(y: torch.Tensor) -> torch.Tensor:
    """Norm over the channels of each token: the last dimension of a packed ``(B, N, D)`` latent, or the channels
    and 2 x 2 patch of a ``(B, C, H, W)`` one (broadcast back to its shape)."""
    if y.ndim == 3:
        return y.norm(dim=-1, keepdim=True)
    if y.ndim != 4 or y.shape[2] % 2 or y.shape[3] % 2:
        raise ValueError(f"variant='per_token' is not accepted for a latent of shape {tuple(y.shape)}; expected "
                         "packed tokens (B, N, D) or (B, C, H, W) with even H and W")
    b, c, h, w = y.shape
    patches = torch.linalg.vector_norm(y.view(b, c, h // 2, 2, w // 2, 2), dim=(1, 3, 5), keepdim=True)
    return patches.expand(b, c, h // 2, 2, w // 2, 2).reshape(y.shape)


def _channel_norm(y: torch.Tensor) -> torch.Tensor:
    """Norm over the channels at each position: dimension 1 of ``(B, C, ...)``, the last of packed tokens."""
    return y.norm(dim=-1 if y.ndim == 3 else 1, keepdim=True)


@dataclass(frozen=True)
class CFGNorm(WeightedGuidance):
    """CFG with the guided prediction's norm normalised to the conditional one's (module docstring).

    Args:
        scale: guidance weight ``w`` (``1`` = no guidance).
        variant: ``"per_token"`` (Qwen-Image), ``"per_sample"`` (Lumina-Image 2.0, Z-Image) or ``"per_pixel"``
            (ComfyUI's CFGNorm).
        limit: ``r > 0``, the norm the prediction is brought to (``per_token``) or capped at, as a multiple of the
            conditional prediction's (Lumina's ``renorm_cfg``, Z-Image's ``cfg_normalization``); default 1.
        space: prediction space of the norms; ``None`` takes the variant's (``"model"`` for ``per_token`` and
            ``per_sample``, ``"x0"`` for ``per_pixel``).
    """

    variant: str = "per_sample"
    limit: float = 1.0
    space: str | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not accepted; expected one of {', '.join(VARIANTS)}")
        set_field(self, "limit", check_number("limit", self.limit, low=0.0, low_open=True))
        set_field(self, "space", check_space("space", VARIANTS[self.variant] if self.space is None else self.space,
                                             allow_model=True))

    def combine_in_space(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any,
                         scale: float) -> torch.Tensor:
        guided = uncond + scale * (cond - uncond)
        if self.variant == "per_token":
            return guided * (self.limit * _patch_norm(cond) / _patch_norm(guided))
        if self.variant == "per_sample":
            norm_c, norm_g = per_sample_norm(cond), per_sample_norm(guided)
            return guided * torch.clamp(self.limit * norm_c / norm_g.clamp_min(torch.finfo(norm_g.dtype).tiny),
                                        max=1.0)
        return guided * torch.clamp(self.limit * _channel_norm(cond) / (_channel_norm(guided) + 1e-8), max=1.0)
