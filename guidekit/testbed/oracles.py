"""Closed forms for CFG on one-dimensional Gaussians (Bradley & Nakkiran 2024, "Classifier-Free Guidance
is a Predictor-Corrector", section 4; REFERENCE section 1, PCG).

Variance-exploding process ``x_sigma = x0 + sigma n``, ``p(x | c) = N(mc, sc^2)``, ``p(x) = N(mu, su^2)``,
guidance weight ``w``, sampling from ``N(0, S0^2)`` at ``sigma = S`` (``S -> inf`` by default; ``S0 = S``
unless given: a VP pipeline starts from ``N(0, 1 + S^2)`` in EDM units) down to 0.
With ``k(s) = w / (sc^2 + s^2) + (1 - w) / (su^2 + s^2)``, ``j(s) = w mc / (sc^2 + s^2) +
(1 - w) mu / (su^2 + s^2)`` and ``h(s) = (sc^2 + s^2)^(w/2) (su^2 + s^2)^((1-w)/2)``, the CFG score is
``j(s) - k(s) x``, and the guided probability-flow ODE and reverse SDE are linear, so the end point is
Gaussian:

* ODE (DDIM): variance ``S0^2 h(0)^2 / h(S)^2``, mean ``h(0) int_0^S s j(s) / h(s) ds``;
* SDE (DDPM): variance ``h(0)^4 [S0^2 / h(S)^4 + int_0^S 2 s / h(s)^4 ds]``,
  mean ``h(0)^2 int_0^S 2 s j(s) / h(s)^2 ds``;
* the ``w``-powered target ``p(x | c)^w p(x)^(1-w)``: precision ``w / sc^2 + (1 - w) / su^2``.

Autoguidance (Karras et al. 2024) with a weak model ``q(x | c) = N(mc, sq^2)`` of ``p(x | c)``, ``D_q + w (D_c -
D_q)``, is the same denoiser with ``(mu, su) = (mc, sq)``: ``GaussianCFGOracle(mc, sc, mc, sq, w)``. Then
``j(s) = mc k(s)``, so the ODE is a contraction towards ``mc``: ``x(0) = mc + (h(0) / h(S)) (x(S) - mc)``.

The integrals are evaluated by Gauss-Legendre quadrature after ``s = tan(theta)``, which maps
``[0, inf)`` onto a finite interval with a bounded integrand; 400 nodes give about 1e-12.

Note on REFERENCE's worked example (``mc=1, sc=0.5, mu=0, su=1, w=3``): the ODE mean is 1.5 in the limit
``S -> inf``; the 1.4953 quoted there is the value at ``S = 80`` (EDM's ``sigma_max``). The other figures
(DDIM variance 0.015625, DDPM mean 1.3125 and variance 0.0666) hold in both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(400)


def _integral(f: Callable[[np.ndarray], np.ndarray], upper: float, lower: float = 0.0) -> float:
    """``int_lower^upper f(s) ds`` with ``s = tan(theta)``."""
    top = math.atan(upper) if math.isfinite(upper) else math.pi / 2
    bottom = math.atan(lower)
    theta = bottom + 0.5 * (top - bottom) * (_NODES + 1.0)
    s = np.tan(theta)
    return float(0.5 * (top - bottom) * np.sum(_WEIGHTS * f(s) / np.cos(theta) ** 2))


@dataclass(frozen=True)
class GaussianCFGOracle:
    """Exact end points of CFG samplers for ``p(x | c) = N(mc, sc^2)``, ``p(x) = N(mu, su^2)`` at weight ``w``."""

    mc: float
    sc: float
    mu: float
    su: float
    w: float

    def _h(self, s: np.ndarray | float) -> np.ndarray | float:
        return (self.sc ** 2 + s ** 2) ** (self.w / 2) * (self.su ** 2 + s ** 2) ** ((1 - self.w) / 2)

    def _j(self, s: np.ndarray | float) -> np.ndarray | float:
        return self.w * self.mc / (self.sc ** 2 + s ** 2) + (1 - self.w) * self.mu / (self.su ** 2 + s ** 2)

    def target(self) -> tuple[float, float]:
        """Mean and variance of the ``w``-powered distribution ``p(x | c)^w p(x)^(1-w)``."""
        precision = self.w / self.sc ** 2 + (1 - self.w) / self.su ** 2
        if precision <= 0:
            raise ValueError(f"w={self.w} is not accepted here; the powered distribution is not normalisable")
        return (self.w * self.mc / self.sc ** 2 + (1 - self.w) * self.mu / self.su ** 2) / precision, 1 / precision

    def ode(self, start_sigma: float = math.inf, start_std: float | None = None) -> tuple[float, float]:
        """Mean and variance at ``sigma = 0`` of the CFG probability-flow ODE (deterministic DDIM) started from
        ``N(0, start_std^2)`` at ``start_sigma``."""
        h0, S = self._h(0.0), start_sigma
        S0 = S if start_std is None else start_std
        var = h0 ** 2 if math.isinf(S) else S0 ** 2 * h0 ** 2 / self._h(S) ** 2
        mean = h0 * _integral(lambda s: s * self._j(s) / self._h(s), S)
        return mean, var

    def ode_map(self, start_sigma: float, end_sigma: float) -> tuple[float, float]:
        """``(a, b)`` with ``x(end_sigma) = a x(start_sigma) + b`` along the CFG probability-flow ODE:
        ``x(s) = h(s) [x(S) / h(S) + int_s^S u j(u) / h(u) du]``, since ``d log h / ds = s k(s)``."""
        h_end = self._h(end_sigma)
        return h_end / self._h(start_sigma), h_end * _integral(lambda u: u * self._j(u) / self._h(u), start_sigma,
                                                               end_sigma)

    def denoise(self, x: np.ndarray | float, sigma: float) -> np.ndarray | float:
        """The CFG denoiser ``D_u + w (D_c - D_u)`` of the two Gaussians at ``sigma``."""
        d_c = self.mc + self.sc**2 / (self.sc**2 + sigma**2) * (x - self.mc)
        d_u = self.mu + self.su**2 / (self.su**2 + sigma**2) * (x - self.mu)
        return d_u + self.w * (d_c - d_u)

    def sde(self, start_sigma: float = math.inf, start_std: float | None = None) -> tuple[float, float]:
        """Mean and variance at ``sigma = 0`` of the CFG reverse SDE (ancestral DDPM) started from
        ``N(0, start_std^2)`` at ``start_sigma``."""
        h0, S = self._h(0.0), start_sigma
        S0 = S if start_std is None else start_std
        start = 0.0 if math.isinf(S) else S0 ** 2 / self._h(S) ** 4
        var = h0 ** 4 * (start + _integral(lambda s: 2 * s / self._h(s) ** 4, S))
        mean = h0 ** 2 * _integral(lambda s: 2 * s * self._j(s) / self._h(s) ** 2, S)
        return mean, var
