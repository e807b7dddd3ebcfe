"""Conversions between denoiser parameterisations: the one place in guidekit that knows them.

Every model guidekit drives is written as ``x_t = alpha * x0 + s * eps`` at the model's input
(REFERENCE section 0):

* variance preserving (SD, SDXL, DiT, PixArt): ``alpha = 1 / sqrt(1 + sigma^2)``,
  ``s = sigma / sqrt(1 + sigma^2)``;
* flow matching (SD3, Flux, Sana): ``alpha = 1 - t``, ``s = t``, ``sigma = t / (1 - t)``;

where ``sigma`` is the EDM (variance-exploding) noise level, ``x_edm = x_t / alpha``. The canonical
prediction is the denoised sample ``x0 = D(x_edm; sigma)``. A prediction can be written in any of
these spaces, each affine in ``x0`` at fixed ``(x_t, sigma)``:

* ``"x0"``: the denoised sample ``D``;
* ``"eps"``: ``(x_t - alpha x0) / s``;
* ``"v"``: the v-prediction of Salimans & Ho, ``a eps - b x0`` with ``a = 1 / sqrt(1 + sigma^2)``,
  ``b = sigma / sqrt(1 + sigma^2)`` (for VP models ``a = alpha``, ``b = s``);
* ``"flow"``: the flow-matching velocity ``eps - x0``.

Formulas are written in ``(alpha, s)`` rather than in ``x_edm`` so that flow models at ``t = 1``
(``alpha = 0``, ``sigma = inf``) stay finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Space = Literal["x0", "eps", "v", "flow"]
SPACES: tuple[str, ...] = ("x0", "eps", "v", "flow")


def check_space(name: str, value: str, *, allow_model: bool = False) -> str:
    """Return ``value`` if it names a prediction space, else raise a ``ValueError`` naming ``name``."""
    accepted = SPACES + (("model",) if allow_model else ())
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not a prediction space; accepted: {', '.join(accepted)}")
    return value


@dataclass(frozen=True)
class NoiseLevel:
    """The coefficients of one model call: ``x_t = alpha * x0 + s * eps``.

    ``alpha`` and ``s`` are Python floats: every sample of a pipeline call shares the timestep.
    """

    alpha: float
    s: float

    @classmethod
    def from_sigma(cls, sigma: float) -> NoiseLevel:
        """Variance-preserving coefficients for the EDM noise level ``sigma``."""
        if math.isinf(sigma):
            return cls(0.0, 1.0)
        norm = math.sqrt(1.0 + sigma * sigma)
        return cls(1.0 / norm, sigma / norm)

    @classmethod
    def from_alphas_cumprod(cls, alpha_bar: float) -> NoiseLevel:
        """Variance-preserving coefficients ``(sqrt(abar), sqrt(1 - abar))`` of a discrete VP schedule."""
        return cls(math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar))

    @classmethod
    def from_flow_time(cls, t: float) -> NoiseLevel:
        """Rectified-flow coefficients ``(1 - t, t)``."""
        return cls(1.0 - t, t)

    @property
    def sigma(self) -> float:
        """The EDM noise level ``s / alpha`` (``inf`` at ``alpha = 0``)."""
        return math.inf if self.alpha == 0.0 else self.s / self.alpha

    def _v_coefficients(self) -> tuple[float, float]:
        norm = math.hypot(self.alpha, self.s)
        return self.alpha / norm, self.s / norm

    def to_x0(self, y: torch.Tensor, x_t: torch.Tensor, space: str) -> torch.Tensor:
        """Convert a prediction ``y`` in ``space`` into the denoised sample ``x0``."""
        if space == "x0":
            return y
        if space == "eps":
            return (x_t - self.s * y) / self.alpha
        if space == "flow":
            # x_t = alpha x0 + s (y + x0)  =>  x0 = (x_t - s y) / (alpha + s)
            return (x_t - self.s * y) / (self.alpha + self.s)
        if space == "v":
            a, b = self._v_coefficients()
            # y = a eps - b x0 with eps = (x_t - alpha x0) / s
            return (a * x_t - self.s * y) / (a * self.alpha + b * self.s)
        raise ValueError(f"space={space!r} is not a prediction space; accepted: {', '.join(SPACES)}")

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, space: str) -> torch.Tensor:
        """Write the denoised sample ``x0`` as a prediction in ``space``."""
        if space == "x0":
            return x0
        eps = (x_t - self.alpha * x0) / self.s
        if space == "eps":
            return eps
        if space == "flow":
            return eps - x0
        if space == "v":
            a, b = self._v_coefficients()
            return a * eps - b * x0
        raise ValueError(f"space={space!r} is not a prediction space; accepted: {', '.join(SPACES)}")

    def convert(self, y: torch.Tensor, x_t: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """Convert a prediction from space ``src`` to space ``dst`` (identity when they agree)."""
        if src == dst:
            return y
        return self.from_x0(self.to_x0(y, x_t, src), x_t, dst)
