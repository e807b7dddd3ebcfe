"""A Laplacian pyramid in plain torch (Burt & Adelson 1983), the frequency transform of FDG.

On ``(B, C, H, W)`` tensors, with ``K = k^T k / 256``, ``k = [1, 4, 6, 4, 1]``, applied per channel with a reflected
border (``blur``), and bilinear resizing with ``align_corners=False``:

    down(g) = resize(blur(g), (H/2, W/2)),        up(g) = blur(resize(g, (2H, 2W)))
    g_0 = x,  g_{i+1} = down(g_i);                L_i = g_i - up(g_{i+1}) (i < L - 1),  L_{L-1} = g_{L-1}

Index 0 is the highest frequency band and the last level is the low-pass residual. The reconstruction runs the
other way, ``x_{L-1} = L_{L-1}``, ``x_i = up(x_{i+1}) + L_i``, and telescopes: ``x_0 = x`` to rounding.

This is the arithmetic of kornia's ``build_laplacian_pyramid`` (``pyrdown``, ``pyrup``, default arguments), which
diffusers' ``FrequencyDecoupledGuidance`` uses, wherever kornia pads nothing: when each side is divisible by
``2^(L-1)`` and at least one side is a power of two. The sizes differ elsewhere:

* kornia reflect-pads the right and bottom to the next power of two and returns levels of the padded size
  (``(152, 104)`` becomes ``(256, 128)``); here a side is padded only to the next multiple of ``2^(L-1)``, the least
  that halving ``L - 1`` times needs, and :class:`~guidekit.guidance.fdg.FDG` crops the result back to the input's
  size. Padding reflects where the side allows it and replicates otherwise.
* kornia's reflected border needs each blurred side to be at least 3 pixels; here a side of 1 or 2 pixels (the
  coarsest levels of a small latent) has a replicated border instead, so every latent with sides ``>= 2^(L-1)``
  has an ``L``-level pyramid.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

from guidekit.validation import check_int


def _pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Pad the width, then the height; each side reflects where it is longer than its padding and replicates
    otherwise (both are separable, so this equals one 2-D reflection when both sides allow it)."""
    for side, pads in ((x.shape[-1], (left, right, 0, 0)), (x.shape[-2], (0, 0, top, bottom))):
        if any(pads):
            x = F.pad(x, pads, mode="reflect" if max(pads) < side else "replicate")
    return x


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The 5x5 binomial filter ``K`` per channel, same size (module docstring)."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (torch.outer(k, k) / 256.0).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(_pad(x, 2, 2, 2, 2), kernel, groups=x.shape[1])


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(_blur(x), size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)


def _up(x: torch.Tensor) -> torch.Tensor:
    return _blur(F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False))


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The ``levels`` bands ``[L_0, ..., L_{levels-1}]`` of ``x`` ``(B, C, H, W)``, highest frequency first.

    ``H`` and ``W`` must be at least ``2^(levels-1)``; they are padded on the bottom and right to the next multiple
    of it, and every level is shaped from the padded size (``L_i`` is ``2^i`` times smaller).
    """
    levels = check_int("levels", levels, low=1)
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x.shape={tuple(x.shape)!r} is not accepted; expected a floating (batch, channels, height, "
                         "width) tensor")
    stride = 2 ** (levels - 1)
    h, w = x.shape[-2:]
    if h < stride or w < stride:
        raise ValueError(f"x.shape={tuple(x.shape)!r} is not accepted; expected height and width >= "
                         f"2**(levels - 1) = {stride} for levels={levels}")
    gauss = [_pad(x, 0, -w % stride, 0, -h % stride)]
    for _ in range(levels - 1):
        gauss.append(_down(gauss[-1]))
    return [g - _up(coarser) for g, coarser in pairwise(gauss)] + [gauss[-1]]


def reconstruct(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """The tensor whose :func:`laplacian_pyramid` is ``pyramid`` (of the padded size, as the levels are)."""
    shapes = [tuple(level.shape) for level in pyramid]
    if not shapes or any(len(s) != 4 for s in shapes) or any(
            fine[:2] != coarse[:2] or fine[2:] != (2 * coarse[2], 2 * coarse[3]) for fine, coarse in pairwise(shapes)):
        raise ValueError(f"pyramid shapes={shapes!r} are not accepted; expected one or more (B, C, H, W) levels, "
                         "each twice the height and width of the next")
    out = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        out = _up(out) + band
    return out
