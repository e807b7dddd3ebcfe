"""Exact metrics of samples on the Gaussian-mixture testbed, in 1-D and 2-D.

* :func:`powered_density`: the ``w``-powered target ``p_w(x | c) ∝ p(x | c)^w p(x)^(1 - w)`` (``w = 1``:
  ``p(x | c)``) on a regular grid, normalised by the grid's quadrature. It is exact up to the grid's resolution and
  extent; the grid must cover the mass.
* :func:`wasserstein`: the Wasserstein-1 distance between samples and a grid density. In 1-D it is exact:
  ``W1 = ∫ |F_samples(x) - F(x)| dx`` between the empirical CDF and the grid density's CDF (piecewise linear, i.e.
  the density piecewise constant on the grid cells). In 2-D it is the sliced Wasserstein-1 distance: the mean over
  ``directions`` evenly spaced angles of the 1-D distance between the projected samples and the projected grid
  mass (the grid cells' mass placed at the cells' projected centres).
* :func:`mode_coverage`: per component, the share of samples whose most responsible component (at ``sigma = 0``, the
  data density) it is, beside the target's own share (its mass under the target on the grid).
"""

from __future__ import annotations

import math

import torch

from guidekit.testbed.mixture import GaussianMixture
from guidekit.validation import check_int, check_number


def grid(low: float, high: float, points: int, dim: int) -> tuple[torch.Tensor, float]:
    """The cell centres ``(points ** dim, dim)`` of a regular grid over ``[low, high]^dim`` and a cell's volume."""
    check_int("points", points, low=2)
    check_int("dim", dim, low=1, high=2)
    if not high > low:
        raise ValueError(f"low={low!r}, high={high!r} are not accepted; expected low < high")
    step = (high - low) / points
    axis = low + step * (torch.arange(points, dtype=torch.float64) + 0.5)
    if dim == 1:
        return axis[:, None], step
    rows, columns = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([rows.flatten(), columns.flatten()], dim=1), step * step


def powered_density(mixture: GaussianMixture, cls: int, weight: float, points: torch.Tensor, volume: float
                    ) -> torch.Tensor:
    """``p_w(x | c)`` at the grid ``points`` (module docstring), normalised so that its sum times ``volume`` is 1."""
    check_number("weight", weight, low=0.0)
    classes = torch.full((len(points),), cls, dtype=torch.long)
    log = weight * mixture.log_prob(points, classes=classes) + (1 - weight) * mixture.log_prob(points)
    density = torch.exp(log - log.max())
    return density / (density.sum() * volume)


def _wasserstein_1d(samples: torch.Tensor, centres: torch.Tensor, mass: torch.Tensor) -> float:
    """W1 between 1-D ``samples`` and point masses ``mass`` at ``centres``: ``∫ |F_s - F| dx`` over the merged
    support, both CDFs right-continuous step functions."""
    values = torch.cat([samples, centres])
    weights = torch.cat([torch.full_like(samples, 1.0 / len(samples)), -mass / mass.sum()])
    order = torch.argsort(values)
    values, cdf_gap = values[order], torch.cumsum(weights[order], 0)
    return float((cdf_gap[:-1].abs() * torch.diff(values)).sum())


def wasserstein(samples: torch.Tensor, points: torch.Tensor, density: torch.Tensor, volume: float,
                directions: int = 64) -> float:
    """W1 (1-D) or sliced W1 (2-D) between ``samples`` ``(n, d)`` and the grid density (module docstring). In 1-D
    the density is taken as constant on each cell, so its CDF is piecewise linear; the cells are split into
    ``16`` sub-cells for that."""
    samples = torch.as_tensor(samples, dtype=torch.float64)
    if samples.ndim != 2 or samples.shape[1] != points.shape[1] or len(samples) < 1:
        raise ValueError(f"samples of shape {tuple(samples.shape)} are not accepted; expected (n, "
                         f"{points.shape[1]}) with n >= 1")
    check_int("directions", directions, low=1)
    mass = density * volume
    if points.shape[1] == 1:
        width = volume
        offsets = (torch.arange(16, dtype=torch.float64) + 0.5) / 16 - 0.5
        centres = (points[:, 0, None] + width * offsets).flatten()
        return _wasserstein_1d(samples[:, 0], centres, (mass[:, None] / 16).expand(-1, 16).flatten())
    angles = torch.arange(directions, dtype=torch.float64) * math.pi / directions
    axes = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return sum(_wasserstein_1d(samples @ a, points @ a, mass) for a in axes) / directions


def mode_coverage(mixture: GaussianMixture, samples: torch.Tensor, points: torch.Tensor, density: torch.Tensor,
                  volume: float) -> list[tuple[float, float]]:
    """Per component, ``(share of the samples, share of the target)``: each sample (and each grid cell, by mass)
    counts for the component with the largest ``pi_k N(x; m_k, S_k)``."""
    samples = torch.as_tensor(samples, dtype=torch.float64)
    k = len(mixture.weights)

    def owners(x: torch.Tensor) -> torch.Tensor:
        return (torch.log(mixture.weights)[:, None] + mixture._log_component_densities(x, 0.0)).argmax(0)

    sample_share = torch.bincount(owners(samples), minlength=k).double() / len(samples)
    target_share = torch.zeros(k, dtype=torch.float64).index_add_(0, owners(points), density * volume)
    return list(zip(sample_share.tolist(), (target_share / target_share.sum()).tolist(), strict=True))


__all__ = ["grid", "mode_coverage", "powered_density", "wasserstein"]
