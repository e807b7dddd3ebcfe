"""A reference integrator of the probability-flow ODE for denoisers known in closed form (EDM space, float64).

With ``x = x0 + sigma n`` and a denoiser ``D(x; sigma)`` (the exact ``E[x0 | x]``, or any combination of exact
denoisers such as a guided one), the probability-flow ODE is (Karras et al. 2022, eq. 3 with ``sigma(t) = t``)::

    dx / dsigma = (x - D(x; sigma)) / sigma.

:func:`probability_flow` integrates it from ``start_sigma`` down to 0 with the classic fourth-order Runge-Kutta
rule on EDM's noise levels ``sigma_i = (S^(1/rho) + i / N (sigma_min^(1/rho) - S^(1/rho)))^rho``, ``i = 0 .. N``,
then takes one Euler step from ``sigma_min`` to 0, which lands on ``D(x; sigma_min)`` (EDM's last step). It runs
no scheduler, no timestep table and no pipeline: it is the reference that a pipeline's sampler is compared with.

Accuracy: the last step leaves ``sigma_min^2 / 2 |grad log p|``, about 1e-8 at ``sigma_min = 1e-4``. On the
1-D mixtures of the demo's testbed under autoguidance (weights 1 to 20, weak components 1 to 5 times wider, 4000
starts), 64 steps are within 2.3e-5 of 1024 steps in W1 (the mean over sorted samples) and 1.8e-3 at the worst
sample, next to the point where the flow splits between two modes; on a single Gaussian, whose flow is affine,
within 1.5e-5 of the closed form at every sample.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from guidekit.validation import check_int, check_number


def probability_flow(denoiser: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, start_sigma: float,
                     steps: int = 64, sigma_min: float = 1e-4, rho: float = 7.0) -> torch.Tensor:
    """End points at ``sigma = 0`` of the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` started
    from ``x`` at ``start_sigma`` (module docstring).

    Args:
        denoiser: ``D(x, sigma)`` for rows ``x`` ``(n, d)`` at EDM noise level ``sigma``.
        x: ``(n, d)`` float64 start points, in EDM units (``x0 + sigma n``).
        start_sigma: the noise level of ``x``, ``> sigma_min``.
        steps: Runge-Kutta steps ``N >= 1`` (four denoiser calls each, plus one for the last Euler step).
        sigma_min: the last noise level before the Euler step to 0, in ``(0, start_sigma)``.
        rho: EDM's spacing exponent (7: steps concentrate at low noise).
    """
    steps = check_int("steps", steps, low=1)
    start_sigma = check_number("start_sigma", start_sigma, low=0.0, low_open=True)
    sigma_min = check_number("sigma_min", sigma_min, low=0.0, high=start_sigma, low_open=True, high_open=True)
    rho = check_number("rho", rho, low=0.0, low_open=True)
    ramp = np.arange(steps + 1) / steps
    sigmas = (start_sigma ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - start_sigma ** (1 / rho))) ** rho

    def slope(y: torch.Tensor, sigma: float) -> torch.Tensor:
        return (y - denoiser(y, sigma)) / sigma

    x = torch.as_tensor(x, dtype=torch.float64)
    for high, low in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        h, mid = low - high, 0.5 * (high + low)
        k1 = slope(x, high)
        k2 = slope(x + 0.5 * h * k1, mid)
        k3 = slope(x + 0.5 * h * k2, mid)
        k4 = slope(x + h * k3, low)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return denoiser(x, float(sigmas[-1]))
