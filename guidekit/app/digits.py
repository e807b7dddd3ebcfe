"""Coloured handwritten digits: the data of guidekit's embedded default model.

The shapes are real: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits" test set
(1797 images of 8 x 8 pixels, 16 grey levels, classes 0-9; no download). The colour is procedural. Every image
gets a random foreground colour (any hue, saturation 0.5-1, value 0.7-1) and a dark background (any hue,
saturation 0-0.5, value 0-0.25), mixed by the digit's intensity. The class is the digit, not the colour, so
guidance acts on shape, and the oversaturation of strong guidance shows in the colours.

The split is fixed: a seeded permutation puts 80% of the images in ``"train"`` and 20% in ``"test"`` (held out for
the model card's classifier accuracy and FID).
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
SIZE = 8
SPLITS = ("train", "test")


def digit_shapes(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(intensity (N, 8, 8) float in [0, 1], labels (N,))`` of a fixed 80/20 split."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not accepted; expected one of {', '.join(SPLITS)}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(20261123).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    index = order[:cut] if split == "train" else order[cut:]
    return digits.images[index] / 16.0, digits.target[index].astype(np.int64)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(N, 3)`` RGB in [0, 1] of HSV triples in [0, 1]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def colourise(intensity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """RGB images ``(N, 3, H, W)`` in [0, 1] from intensities ``(N, H, W)``, with random colours per image."""
    n = len(intensity)
    u = torch.rand(n, 6, generator=generator)
    fg = _hsv_to_rgb(u[:, 0], 0.5 + 0.5 * u[:, 1], 0.7 + 0.3 * u[:, 2])
    bg = _hsv_to_rgb(u[:, 3], 0.5 * u[:, 4], 0.25 * u[:, 5])
    m = intensity[:, None].float()
    return bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m


def coloured_digits(split: str, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One colouring of a split: uint8 images ``(N, 3, 8, 8)`` and labels ``(N,)``."""
    intensity, labels = digit_shapes(split)
    images = colourise(torch.from_numpy(intensity), generator)
    return (images * 255).round().to(torch.uint8), torch.from_numpy(labels)


def _shape_features(images: torch.Tensor) -> np.ndarray:
    """Colour-free features of uint8 RGB images: luminance, min-max normalised per image, flattened."""
    x = images.float() / 255
    luminance = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    low = luminance.flatten(1).min(1).values[:, None, None]
    high = luminance.flatten(1).max(1).values[:, None, None]
    return ((luminance - low) / (high - low).clamp_min(1e-6)).flatten(1).numpy()


class DigitClassifier:
    """A logistic-regression classifier of the digit in coloured images, trained on the training split under
    ``colourings`` random colourings; it reads shape, not colour."""

    def __init__(self, colourings: int = 3, seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression

        generator = torch.Generator().manual_seed(seed)
        batches = [coloured_digits("train", generator) for _ in range(colourings)]
        features = np.concatenate([_shape_features(images) for images, _ in batches])
        labels = np.concatenate([labels.numpy() for _, labels in batches])
        self.model = LogisticRegression(max_iter=3000).fit(features, labels)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Predicted digits of uint8 RGB images ``(N, 3, 8, 8)``."""
        return self.model.predict(_shape_features(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))
