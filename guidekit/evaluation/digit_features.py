"""Features for the embedded 8 x 8 digits model: the direction of a small digit classifier's penultimate layer.

The Inception network sees an 8 x 8 image resized to 299 x 299, far from what it was trained on, and costs a second
per few images on a CPU. For the embedded model guidekit ships a classifier trained on the same data (coloured
handwritten digits, :mod:`guidekit.app.digits`; ``scripts/train_digit_features.py``), like the LeNet features used
for MNIST FIDs: two 3 x 3 convolutions (16 and 32 channels, ReLU), a 2 x 2 max-pool, a 64-unit hidden layer and a
10-way head on its ReLU (the logits). FD, precision/recall and density/coverage of thousands of samples then take
seconds on a CPU. Select it with ``feature_network="digits"``.

The feature is the hidden layer before its ReLU, scaled to length ``sqrt(64) = 8`` (a mean square of 1 per
coordinate). The length of a classifier's hidden vector grows with its confidence, which guidance raises by
construction; FD on the raw vectors then measures confidence and ranks guidance weights unlike Inception FID. The
direction keeps which digit and which shape (docs/evaluation.md gives the measured rank correlations).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from guidekit.app.digits import NUM_CLASSES
from guidekit.evaluation.features import TorchFeatures, file_sha256, preprocess

#: The shipped weights and their training record.
WEIGHTS = Path(__file__).resolve().parents[1] / "app" / "default_model" / "digit_features" / "model.safetensors"
RECORD = WEIGHTS.with_name("training.json")
#: The feature dimension.
DIM = 64


class DigitNet(nn.Module):
    """The digit classifier (module docstring): RGB ``(N, 3, 8, 8)`` in ``[0, 1]`` to its hidden layer after ReLU
    ``(N, 64)``; :meth:`logits` maps that to the 10 classes, :meth:`embed` gives the feature network's output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, DIM), nn.ReLU())
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features (the hidden layer before its ReLU, scaled to length ``sqrt(DIM)``) and the logits."""
        hidden = self.body[:-1](images)
        return F.normalize(hidden, dim=1) * DIM ** 0.5, self.head(hidden.relu())


def load_digit_net(path: str | Path = WEIGHTS) -> DigitNet:
    """The classifier with the weights at ``path`` (the shipped ones by default)."""
    net = DigitNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


class DigitFeatures(TorchFeatures):
    """The classifier's features (64, :meth:`DigitNet.embed`) and logits (10) of uint8 images ``(N, 3, 8, 8)``;
    its identity names the feature, the weights file by sha256 and the held-out accuracy of its training."""

    module: DigitNet

    def __init__(self, path: str | Path = WEIGHTS, device: str | torch.device = "cpu", batch_size: int = 1024) -> None:
        path = Path(path)
        net = load_digit_net(path)
        record = json.loads(path.with_name("training.json").read_text()) if path.with_name("training.json").exists() \
            else {}
        super().__init__(net, "digits-cnn-direction", DIM, preprocessing="unit", logits_fn=net.logits, device=device,
                         batch_size=batch_size,
                         extra_identity={"weights_sha256": file_sha256(path),
                                         "held_out_accuracy": record.get("held_out_accuracy")})

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.shape[-2:] != (8, 8):
            raise ValueError(f"images of size {tuple(images.shape[-2:])} are not accepted by the digits feature "
                             "network; expected 8 x 8 (the embedded model's)")
        return self.module.embed(preprocess(images, self.preprocessing, self.device))


__all__ = ["DIM", "WEIGHTS", "DigitFeatures", "DigitNet", "load_digit_net"]
