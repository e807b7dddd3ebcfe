"""The Frechet distance between two Gaussians (Dowson & Landau 1982; FID of Heusel et al. 2017).

``d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``. The matrix square roots are taken
by symmetric eigendecomposition. Eigenvalues below the rounding level of the matrix (``d * eps * max |lambda|``,
the rank tolerance of ``numpy.linalg.matrix_rank``) are set to zero, so the null space of a rank-deficient
(positive semi-definite) covariance contributes nothing rather than square roots of rounding noise, and the result
does not depend on scipy's ``sqrtm``.

The eigendecompositions and matrix products run in torch, float64, on one CPU thread (:func:`one_thread`):
multi-threaded LAPACK splits its reductions by thread count, so numpy's ``eigh`` changes in the last bits with
``OMP_NUM_THREADS``. On one thread the distance is the same bits in every process of a machine, whatever thread
count the launcher gives it (``accelerate launch`` and a plain ``python`` differ).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from numpy.typing import ArrayLike


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU operations (its BLAS and LAPACK included) on one thread inside the block, then restore the
    thread count: reductions then add in one order whatever the process's thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _clean(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix with rounding-level (and negative) ones set to zero."""
    tolerance = len(values) * torch.finfo(torch.float64).eps * float(values.abs().max())
    return torch.where(values > tolerance, values, 0.0)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * _clean(values).sqrt()) @ vectors.T


def gaussian_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of ``features`` ``(n, d)``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features of shape {x.shape} are not accepted; expected (n, d) with n >= 2")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, in float64 on one CPU thread."""
    m1, m2 = np.asarray(mu1, dtype=np.float64).ravel(), np.asarray(mu2, dtype=np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = len(m1)
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape} are not "
                         "accepted; expected (d,), (d, d), (d,), (d, d)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    with one_thread():
        root = _psd_sqrt(torch.from_numpy(s1))
        cross = root @ torch.from_numpy(s2) @ root
        trace_sqrt = float(_clean(torch.linalg.eigvalsh((cross + cross.T) / 2)).sqrt().sum())
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
