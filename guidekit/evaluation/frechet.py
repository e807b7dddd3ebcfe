"""The Frechet distance between two Gaussians (Dowson & Landau 1982; FID of Heusel et al. 2017).

``d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``. The matrix square roots are taken
by symmetric eigendecomposition. Eigenvalues below the rounding level of the matrix (``d * eps * max |lambda|``,
the rank tolerance of ``numpy.linalg.matrix_rank``) are set to zero, so the null space of a rank-deficient
(positive semi-definite) covariance contributes nothing rather than square roots of rounding noise, and the result
does not depend on scipy's ``sqrtm``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _clean(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding-level (and negative) ones set to zero."""
    tolerance = len(values) * np.finfo(np.float64).eps * max(float(np.abs(values).max(initial=0.0)), 0.0)
    return np.where(values > tolerance, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(_clean(values))) @ vectors.T


def gaussian_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of ``features`` ``(n, d)``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features of shape {x.shape} are not accepted; expected (n, d) with n >= 2")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, in float64."""
    m1, m2 = np.asarray(mu1, dtype=np.float64).ravel(), np.asarray(mu2, dtype=np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = len(m1)
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape} are not "
                         "accepted; expected (d,), (d, d), (d,), (d, d)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    root = _psd_sqrt(s1)
    cross = root @ s2 @ root
    trace_sqrt = np.sqrt(_clean(np.linalg.eigvalsh((cross + cross.T) / 2))).sum()
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
