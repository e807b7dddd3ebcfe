"""Per-image metrics: HSV saturation (over-saturation at high guidance) and CLIP score (text alignment)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_LAYOUTS = ("NCHW", "NHWC")


def _images(images: Any, layout: str | None) -> tuple[torch.Tensor, int]:
    """The images as a tensor and the index of their channel axis."""
    tensor = images.detach() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r} is not accepted; expected one of {_LAYOUTS} or None (detect)")
    shape = tuple(tensor.shape)
    if tensor.ndim != 4 or 3 not in (shape[1], shape[3]):
        raise ValueError(f"images of shape {shape} are not accepted; expected (N, 3, H, W) or (N, H, W, 3)")
    if layout is None:
        if shape[1] == shape[3] == 3:
            raise ValueError(f"images of shape {shape} are ambiguous; pass layout='NCHW' or layout='NHWC'")
        layout = "NCHW" if shape[1] == 3 else "NHWC"
    axis = 1 if layout == "NCHW" else 3
    if shape[axis] != 3:
        raise ValueError(f"images of shape {shape} are not accepted with layout={layout!r}; expected 3 channels")
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise ValueError(f"images of dtype {tensor.dtype} are not accepted; expected uint8 or floating point")
    return tensor, axis


def saturation(images: Any, *, layout: str | None = None, chunk_size: int = 64) -> np.ndarray:
    """Per-image mean HSV saturation in ``[0, 1]``, float64 ``(N,)``.

    Per pixel ``S = (max(R, G, B) - min(R, G, B)) / max(R, G, B)``, and ``S = 0`` where ``max = 0`` (black), the
    HSV definition of Smith (1978) used by ``colorsys`` and PIL; the mean is over all pixels of an image. ``S`` is
    scale invariant, so uint8 images and float images in ``[0, 1]`` give the same value; PIL's ``convert("HSV")``
    truncates ``255 * S`` to an integer, so it reads up to ``1/255`` lower.

    Args:
        images: ``(N, 3, H, W)`` or ``(N, H, W, 3)`` RGB images, uint8 or non-negative float, numpy or torch.
        layout: ``"NCHW"`` or ``"NHWC"``; ``None`` detects it from the axis of size 3 (an error if both are 3).
        chunk_size: images converted to float64 at a time, which bounds the temporary memory.
    """
    tensor, axis = _images(images, layout)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not accepted; expected an integer >= 1")
    means = []
    for start in range(0, tensor.shape[0], chunk_size):
        chunk = tensor[start:start + chunk_size]
        high, low = chunk.amax(dim=axis).to(torch.float64), chunk.amin(dim=axis).to(torch.float64)
        if (low < 0).any():
            raise ValueError("images with negative values are not accepted; expected uint8 or non-negative float")
        sat = torch.where(high > 0, (high - low) / high, 0.0)
        means.append(sat.flatten(1).mean(dim=1).cpu())
    return torch.cat(means).numpy()


def clip_score(image_features: Any, text_features: Any) -> np.ndarray:
    """Per-pair CLIP score ``100 * max(cos(E_I, E_C), 0)``, float64 ``(N,)``, from paired CLIP embeddings.

    Hessel et al. (2021) define CLIPScore ``w * max(cos(E_I, E_C), 0)`` with ``w = 2.5``. We use ``w = 100``, the
    scale of torchmetrics' ``CLIPScore`` (with CLIP ViT-L/14 and captions truncated to 77 tokens) that
    text-to-image papers report, so numbers are comparable with theirs; divide by 40 for Hessel's scale. The
    clamp is per pair as in Hessel et al.; torchmetrics clamps only the mean over pairs, which gives the same
    mean whenever no pair has a negative cosine (matched CLIP pairs sit near 0.2 to 0.35).

    Args:
        image_features: ``(N, D)`` CLIP image embeddings (normalised here; numpy or torch).
        text_features: ``(N, D)`` CLIP text embeddings of the matching captions.
    """
    a, b = (x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
            for x in (image_features, text_features))
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 1:
        raise ValueError(f"image_features of shape {tuple(a.shape)} and text_features of shape {tuple(b.shape)} "
                         "are not accepted; expected the same shape (N, D) with N >= 1")
    a, b = a.to(torch.float64), b.to(device=a.device, dtype=torch.float64)
    norms = a.norm(dim=1) * b.norm(dim=1)
    if not (norms > 0).all():
        raise ValueError("zero-length embeddings are not accepted; expected non-zero image and text features")
    return (100.0 * ((a * b).sum(dim=1) / norms).clamp(min=0.0)).cpu().numpy()
