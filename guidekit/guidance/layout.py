"""Latents packed into tokens (Flux, Qwen-Image) and their image layout.

A packed latent ``(B, N, 4C)`` holds a ``(B, C, H, W)`` latent cut into ``N = (H/2)(W/2)`` patches of 2x2 pixels,
row-major over the patch grid; a token lists its patch's channels first, then the patch rows, then the patch columns:

    packed[b, i (W/2) + j, 4 c + 2 p + q] = latent[b, c, 2 i + p, 2 j + q]

This is the arithmetic of diffusers' ``FluxPipeline._pack_latents`` and ``_unpack_latents``; the latter takes the
pixel size and the VAE factor, these take the latent's own ``(H, W)`` (both even).
"""

from __future__ import annotations

import numbers

import torch


def _check_grid(grid: object) -> tuple[int, int]:
    ok = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 and s % 2 == 0 for s in grid)
    if not ok:
        raise ValueError(f"grid={grid!r} is not accepted; expected (height, width) of the unpacked latent, two "
                         "positive even integers")
    return int(grid[0]), int(grid[1])  # type: ignore[index]


def unpack_tokens(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The ``(B, C, H, W)`` latent of the packed tokens ``x`` ``(B, N, 4C)``, with ``grid = (H, W)``."""
    h, w = _check_grid(grid)
    n = (h // 2) * (w // 2)
    if x.ndim != 3 or x.shape[1] != n or x.shape[2] % 4 != 0 or x.shape[2] == 0:
        raise ValueError(f"x.shape={tuple(x.shape)!r} is not accepted; expected (batch, {n}, 4 * channels), "
                         f"{n} tokens of 2x2 patches for grid={grid!r}")
    b, c = x.shape[0], x.shape[2] // 4
    return x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def pack_tokens(x: torch.Tensor) -> torch.Tensor:
    """The packed tokens ``(B, (H/2)(W/2), 4C)`` of the latent ``x`` ``(B, C, H, W)`` (``H``, ``W`` even)."""
    if x.ndim != 4 or x.shape[2] % 2 != 0 or x.shape[3] % 2 != 0:
        raise ValueError(f"x.shape={tuple(x.shape)!r} is not accepted; expected (batch, channels, height, width) "
                         "with an even height and width")
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
