"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

KID is the squared maximum mean discrepancy between the real and fake feature distributions under the cubic
polynomial kernel ``k(x, y) = (gamma x.y + coef0)^degree`` with ``gamma = 1/d``, ``coef0 = 1``, ``degree = 3``.
For subsets ``X = {x_1..x_m}`` (fake) and ``Y = {y_1..y_m}`` (real) KID uses the unbiased U-statistic estimator
(Gretton et al. 2012, "A Kernel Two-Sample Test", Lemma 6)

    MMD^2_u = 1/(m(m-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m^2 sum_{i, j} k(x_i, y_j).

As in StyleGAN2-ADA, clean-fid and torch-fidelity, it is averaged over ``num_subsets`` random subsets of
``m = subset_size`` rows drawn without replacement from each set; the spread over subsets is reported as well.
The estimator is unbiased, so it can be slightly negative when the distributions match. On the CPU the kernels
are summed on one thread (:func:`~guidekit.evaluation.frechet.one_thread`), so the value is the same bits whatever
thread count the process runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from guidekit.evaluation.frechet import one_thread


def _features(features: Any, name: str) -> torch.Tensor:
    tensor = features.detach() if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if tensor.ndim != 2 or tensor.shape[0] < 2 or tensor.shape[1] < 1:
        raise ValueError(f"{name} of shape {tuple(tensor.shape)} is not accepted; expected (n, d) with n >= 2")
    return tensor


def kernel_inception_distance(real: Any, fake: Any, *, num_subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int | np.random.Generator | None = 0) -> tuple[float, float]:
    """KID between ``real`` ``(N, d)`` and ``fake`` ``(M, d)`` features: mean and std of ``MMD^2_u`` over subsets.

    Args:
        real, fake: feature arrays (numpy or torch; computed in float64 on the device of ``real`` if it is a
            tensor, else of ``fake``, else the CPU).
        num_subsets: number of random subset pairs averaged (100 in StyleGAN2-ADA and clean-fid).
        subset_size: rows per subset ``m``; clipped to ``min(N, M)`` as StyleGAN2-ADA and clean-fid do.
        degree, gamma, coef0: polynomial kernel ``(gamma x.y + coef0)^degree``; ``gamma=None`` means ``1/d``.
        seed: integer seed or ``np.random.Generator`` choosing the subsets (``None``: fresh entropy).

    Returns:
        ``(mean, std)`` of the per-subset estimates (population std, ``ddof=0``, as torch-fidelity reports it).
        KID is often quoted multiplied by 1000.
    """
    x_all, y_all = _features(fake, "fake"), _features(real, "real")
    if x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"real of shape {tuple(y_all.shape)} and fake of shape {tuple(x_all.shape)} are not "
                         "accepted; expected the same feature dimension")
    for name, value, low in (("num_subsets", num_subsets, 1), ("subset_size", subset_size, 2), ("degree", degree, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} is not accepted; expected an integer >= {low}")
    dim = x_all.shape[1]
    gamma = 1.0 / dim if gamma is None else float(gamma)
    if not gamma > 0:
        raise ValueError(f"gamma={gamma!r} is not accepted; expected a positive number or None (meaning 1/d)")
    device = next((t.device for t in (real, fake) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    m = min(subset_size, x_all.shape[0], y_all.shape[0])

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (gamma * (a @ b.T) + coef0) ** degree

    estimates = []
    with one_thread():
        for _ in range(num_subsets):
            x = x_all[torch.from_numpy(rng.choice(x_all.shape[0], m, replace=False))].to(device, torch.float64)
            y = y_all[torch.from_numpy(rng.choice(y_all.shape[0], m, replace=False))].to(device, torch.float64)
            k_xx, k_yy = kernel(x, x), kernel(y, y)
            within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
            estimates.append((within - 2.0 * kernel(x, y).sum() / m**2).item())
    values = np.asarray(estimates)
    return float(values.mean()), float(values.std())
