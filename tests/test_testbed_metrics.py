"""Exact metrics on the Gaussian-mixture testbed against closed forms: the powered target of two Gaussians is a
Gaussian; W1 between a distribution and its shift by ``delta`` is ``|delta|`` (1-D), and the sliced W1 in 2-D is
``|delta| * 2 / pi``; exact samples cover each component in proportion to its weight."""

from __future__ import annotations

import math

import pytest
import torch

from guidekit.testbed.metrics import grid, mode_coverage, powered_density, wasserstein
from guidekit.testbed.mixture import UNCONDITIONAL, GaussianMixture


def _normal_pdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("w", [1.0, 3.0, 0.5])
def test_powered_target_of_two_gaussians_is_the_closed_form(w: float) -> None:
    """Bradley & Nakkiran's example: p(x | c) = N(1, 0.5^2), p(x) = N(0, 1); p(x|c)^w p(x)^(1-w) is Gaussian with
    precision w / 0.25 + (1 - w) and mean (4 w) / precision."""
    mixture = GaussianMixture.isotropic([[1.0], [0.0]], [0.5, 1.0], [0, UNCONDITIONAL])
    points, volume = grid(-6.0, 6.0, 4000, 1)
    precision = w / 0.25 + (1 - w)
    expected = _normal_pdf(points[:, 0], 4 * w / precision, precision ** -0.5)
    ours = powered_density(mixture, 0, w, points, volume)
    assert (ours - expected).abs().max() < 1e-6
    assert (ours - _normal_pdf(points[:, 0], 1.0, 0.5)).abs().max() > 0.05 or w == 1.0


def test_wasserstein_1d_of_a_shift_is_the_shift() -> None:
    mixture = GaussianMixture.isotropic([[0.5]], [1.0], [0])
    points, volume = grid(-8.0, 8.0, 2000, 1)
    density = powered_density(mixture, 0, 1.0, points, volume)
    generator = torch.Generator().manual_seed(0)
    same = mixture.sample(20000, 0, generator)
    shifted = same - 0.5
    assert wasserstein(same, points, density, volume) < 0.02
    assert abs(wasserstein(shifted, points, density, volume) - 0.5) < 0.02


def test_sliced_wasserstein_2d_of_a_shift_is_two_over_pi_of_it() -> None:
    mixture = GaussianMixture.isotropic([[0.5, 0.0]], [1.0], [0])
    points, volume = grid(-7.0, 7.0, 200, 2)
    density = powered_density(mixture, 0, 1.0, points, volume)
    same = mixture.sample(20000, 0, torch.Generator().manual_seed(1))
    shifted = same - torch.tensor([0.5, 0.0], dtype=torch.float64)
    assert wasserstein(same, points, density, volume) < 0.03
    assert abs(wasserstein(shifted, points, density, volume) - 0.5 * 2 / math.pi) < 0.03


def test_exact_samples_cover_each_mode_by_its_weight() -> None:
    mixture = GaussianMixture.isotropic([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], [0.5, 0.5, 0.5], [0, 0, 0],
                                        weights=[0.5, 0.3, 0.2])
    points, volume = grid(-7.0, 7.0, 200, 2)
    density = powered_density(mixture, 0, 1.0, points, volume)
    samples = mixture.sample(10000, 0, torch.Generator().manual_seed(2))
    coverage = mode_coverage(mixture, samples, points, density, volume)
    for (share, target), weight in zip(coverage, (0.5, 0.3, 0.2), strict=True):
        assert abs(target - weight) < 1e-3 and abs(share - weight) < 0.02
    # the samples near the first component alone: the others uncovered
    near = (samples - mixture.means[0]).norm(dim=1) < 1.5
    lopsided = mode_coverage(mixture, samples[near], points, density, volume)
    assert lopsided[0][0] == 1.0 and lopsided[1][0] == lopsided[2][0] == 0.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^dim=3 is not accepted"):
        grid(-1.0, 1.0, 10, 3)
    with pytest.raises(ValueError, match=r"^low=1.0, high=1.0 are not accepted"):
        grid(1.0, 1.0, 10, 1)
    points, volume = grid(-1.0, 1.0, 10, 1)
    with pytest.raises(ValueError, match=r"^samples of shape \(4, 2\) are not accepted"):
        wasserstein(torch.zeros(4, 2), points, torch.ones(10), volume)
