"""Frequency-decoupled guidance (FDG; Sadat, Vontobel, Salehi & Weber, "Guidance in the Frequency Domain Enables
High-Fidelity Sampling at Low CFG Scales", arXiv 2506.19713).

CFG with one weight per frequency band. With ``P(y) = [P_0(y), ..., P_{L-1}(y)]`` the Laplacian pyramid of a
prediction (:mod:`guidekit.guidance.pyramid`, ``P_0`` the highest frequencies, ``P_{L-1}`` the low-pass residual),
``c`` and ``u`` the conditional and unconditional predictions, per level ``l``:

    Delta_l = P_l(c) - P_l(u)
    Delta_l <- eta_l par_l + (Delta_l - par_l),    par_l = <Delta_l, P_l(c)> / ||P_l(c)||^2 P_l(c)   (if eta_l != 1)
    G_l = P_l(u) + w_l Delta_l

and the guided prediction is the reconstruction of ``[G_0, ..., G_{L-1}]`` (paper's Algorithm 2). The projection is
per sample, over all of its dimensions, in float64; a sample whose ``P_l(c)`` is zero has ``par_l = 0``. A level
whose weight is ``w_l = 1`` keeps ``G_l = P_l(c)`` (what the formula gives unless ``eta_l != 1``): diffusers' rule
for a level with guidance disabled, and what :meth:`FDG.conditional_only` returns when every weight is 1.

The code follows the rule of diffusers' ``FrequencyDecoupledGuidance`` (``guidance_scales`` = ``scales``,
``parallel_weights``, the pyramid of kornia's ``build_laplacian_pyramid``). Without the projection the rule is
affine in the predictions, ``G = u + sum_l w_l B_l (c - u)`` with ``B_l`` the band of level ``l``
(``sum_l B_l = I``), so its result does not depend on the prediction space: guidekit runs it in the model's own
space and dtype, and equal weights ``w`` are CFG at ``w`` to rounding. With the projection it depends on the space;
``space`` chooses it (``"x0"`` by default, the denoised predictions the paper guides; ``"model"`` is diffusers'
behaviour, which guides whatever the model outputs).

Differences from diffusers 0.42.1, none of which guidekit has:

* for a latent whose sides are not both divisible by ``2^(L-1)``, or neither a power of two, kornia pads it to
  powers of two and diffusers returns the padded latent (``(1, 4, 152, 104)`` becomes ``(1, 4, 256, 128)``);
  guidekit pads only to the next multiple of ``2^(L-1)`` and crops the result back to the latent's size;
* a level with weight 1 (disabled) crashes the guider (it reads a band of another level, or an unbound name);
* packed-token latents ``(B, N, 4C)`` (Flux, Qwen-Image) and video latents ``(B, C, T, H, W)`` are refused by
  kornia; guidekit unpacks tokens with ``GuidanceContext.grid`` and runs a video frame by frame (the projection
  still spans the whole sample).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from guidekit.guidance.base import (
    UNCOND,
    GuidanceContext,
    Pass,
    TwoPassGuidance,
    constant_mask,
    per_sample_dot,
    set_field,
)
from guidekit.guidance.layout import pack_tokens, unpack_tokens
from guidekit.guidance.pyramid import laplacian_pyramid, reconstruct
from guidekit.parameterization import check_space
from guidekit.validation import check_number

#: The number of pyramid levels FDG accepts (``len(scales)``).
MIN_LEVELS, MAX_LEVELS = 2, 8


def _to_planes(x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """``x`` as ``(B', C, H, W)`` images: as it is, a video's frames in the batch, or packed tokens unpacked."""
    if x.ndim == 4:
        return x
    if x.ndim == 5:
        b, c, t, h, w = x.shape
        return x.transpose(1, 2).reshape(b * t, c, h, w)
    if x.ndim == 3 and grid is not None:
        return unpack_tokens(x, grid)
    raise ValueError(f"cond.shape={tuple(x.shape)!r} is not accepted with ctx.grid={grid!r}; expected (B, C, H, W), "
                     "(B, C, T, H, W), or packed tokens (B, N, 4C) with ctx.grid the unpacked latent's (H, W)")


def _from_planes(planes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_to_planes` for a tensor shaped like ``like``."""
    if like.ndim == 4:
        return planes
    if like.ndim == 5:
        b, c, t, h, w = like.shape
        return planes.reshape(b, t, c, h, w).transpose(1, 2).contiguous()
    return pack_tokens(planes)


def _band(cond: torch.Tensor, uncond: torch.Tensor, weight: float, parallel: float, batch: int) -> torch.Tensor:
    """``G_l`` of one level (module docstring); the projection is over each of the ``batch`` samples' rows."""
    if weight == 1.0:
        return cond
    shift = cond - uncond
    if parallel != 1.0:
        s, c = shift.reshape(batch, -1), cond.reshape(batch, -1)
        norm2 = per_sample_dot(c, c)
        par = torch.where(norm2 > 0, per_sample_dot(s, c) / norm2.clamp_min(torch.finfo(c.dtype).tiny), 0.0) * c
        shift = (parallel * par + (s - par)).reshape(shift.shape)
    return uncond + weight * shift


@dataclass(frozen=True)
class FDG(TwoPassGuidance):
    """Frequency-decoupled guidance: CFG per Laplacian-pyramid level (module docstring).

    Args:
        scales: the weight ``w_l`` of each level, highest frequency first (diffusers' ``guidance_scales``), each
            ``>= 0``; 2 to 8 levels. The paper's SDXL setting is ``(10, 5)``; equal weights are CFG.
        parallel_weights: the weight ``eta_l`` of the update's component parallel to ``P_l(c)``, one per level;
            ``None`` is 1 on every level (no projection), and is stored as that tuple. The paper recommends values
            in ``[0, 1]``.
        space: prediction space of the projection: ``"x0"`` (default), ``"eps"``, ``"v"``, ``"flow"``, or
            ``"model"`` (diffusers' behaviour); without the projection the space does not matter.
    """

    scales: tuple[float, ...] = (10.0, 5.0)
    parallel_weights: tuple[float, ...] | None = None
    space: str = "x0"

    def __post_init__(self) -> None:
        scales = self.scales
        if not isinstance(scales, (tuple, list)) or not MIN_LEVELS <= len(scales) <= MAX_LEVELS:
            raise ValueError(f"scales={scales!r} is not accepted; expected {MIN_LEVELS} to {MAX_LEVELS} weights, one "
                             "per pyramid level, highest frequency first")
        set_field(self, "scales", tuple(check_number(f"scales[{i}]", w, low=0.0) for i, w in enumerate(scales)))
        weights = (1.0,) * len(scales) if self.parallel_weights is None else self.parallel_weights
        if not isinstance(weights, (tuple, list)) or len(weights) != len(scales):
            raise ValueError(f"parallel_weights={weights!r} is not accepted; expected None or {len(scales)} numbers, "
                             f"one per level of scales={self.scales!r}")
        set_field(self, "parallel_weights",
                  tuple(check_number(f"parallel_weights[{i}]", e) for i, e in enumerate(weights)))
        check_space("space", self.space, allow_model=True)

    @property
    def guided(self) -> bool:
        """Whether any level is guided (a weight other than 1); if none is, FDG is the conditional prediction."""
        return any(w != 1.0 for w in self.scales)

    @property
    def projects(self) -> bool:
        """Whether any level projects its update (a parallel weight other than 1)."""
        return any(e != 1.0 for e in self.parallel_weights)  # type: ignore[union-attr]

    def passes(self) -> frozenset[Pass]:
        return frozenset({UNCOND}) if self.guided else frozenset()

    def _check_scale(self, scale: float | None) -> None:
        if scale is not None:
            raise ValueError(f"scale={scale!r} is not accepted; expected None: FDG weighs each pyramid level with its "
                             f"own weight (scales={self.scales!r}), so there is no single weight to override or "
                             "schedule")

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        self._check_scale(scale)
        return constant_mask(len(ctx.rows), self.guided)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        """The guided prediction (model space, ``cond``'s shape and dtype).

        Without projection the rule runs in the model's space and dtype; with it, the conversions to and from
        ``space`` and the rule run in float64 and the result is cast back to the model's dtype.
        """
        self._check_scale(scale)
        if not self.projects:
            return self._guide(cond, uncond, ctx.grid)
        space = ctx.model_space if self.space == "model" else self.space
        ctx64 = replace(ctx, x=ctx.x.double())
        out = self._guide(ctx64.to_space(cond.double(), space), ctx64.to_space(uncond.double(), space), ctx.grid)
        return ctx64.from_space(out, space).to(cond.dtype)

    def _guide(self, cond: torch.Tensor, uncond: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """The rule of the module docstring on predictions in any layout, in their own space and dtype."""
        c, u = _to_planes(cond, grid), _to_planes(uncond, grid)
        h, w = c.shape[-2:]
        levels = len(self.scales)
        if min(h, w) < 2 ** (levels - 1):
            raise ValueError(f"scales={self.scales!r} is not accepted for a latent of height {h} and width {w}; "
                             f"expected at most {min(h, w).bit_length()} levels (each side >= 2**(levels - 1))")
        per_level = laplacian_pyramid(c, levels), laplacian_pyramid(u, levels), self.scales, self.parallel_weights
        bands = [_band(pc, pu, weight, eta, len(cond)) for pc, pu, weight, eta in zip(*per_level, strict=True)]
        return _from_planes(reconstruct(bands)[..., :h, :w], cond)
