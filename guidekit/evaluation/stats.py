"""Running first and second moments of feature vectors, mergeable across shards.

FID needs the mean ``mu`` and covariance ``Sigma`` of the Inception features (Heusel et al. 2017). Storing the
sufficient statistics ``n``, ``s = sum_i x_i`` and ``S = sum_i x_i x_i^T`` in float64 lets every worker, batch or
resumed run keep its own accumulator: merging is plain addition, so the result does not depend on how the rows
were split. From them

    mu = s / n,        Sigma = (S - n mu mu^T) / (n - 1)

which is the unbiased (``ddof=1``) covariance of ``np.cov``. The subtraction cancels when ``|mu|`` is large
compared with the feature spread; in float64 this is harmless for Inception-like features (non-negative,
mean and spread of the same order).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def _as_float64_rows(features: Any, dim: int) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        array = features.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"features of shape {tuple(array.shape)} are not accepted; expected (n, {dim})")
    return array


class RunningStatistics:
    """Float64 running ``count``, ``sum`` ``(d,)`` and ``sum_outer`` ``(d, d)`` of feature rows.

    ``update`` takes a batch ``(n, d)`` (numpy or torch, any float dtype, any device; it is accumulated in
    float64 on the CPU). ``merge`` or ``+`` combines two accumulators, ``mean`` and ``covariance`` give the
    Gaussian statistics that :func:`guidekit.evaluation.frechet_distance` takes, and ``to_arrays`` /
    ``from_arrays`` round-trip through ``np.savez``.
    """

    def __init__(self, dim: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"dim={dim!r} is not accepted; expected a positive integer")
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, features: Any) -> RunningStatistics:
        """Add the rows of ``features`` ``(n, dim)``; returns ``self`` so calls can be chained."""
        rows = _as_float64_rows(features, self.dim)
        self.count += rows.shape[0]
        self.sum += rows.sum(axis=0)
        self.sum_outer += rows.T @ rows
        return self

    def merge(self, other: RunningStatistics) -> RunningStatistics:
        """A new accumulator holding the rows of both ``self`` and ``other`` (neither is modified)."""
        if not isinstance(other, RunningStatistics):
            raise TypeError(f"other of type {type(other).__name__} is not accepted; expected RunningStatistics")
        if other.dim != self.dim:
            raise ValueError(f"other.dim={other.dim} is not accepted; expected {self.dim} (the dim of self)")
        merged = RunningStatistics(self.dim)
        merged.count = self.count + other.count
        merged.sum = self.sum + other.sum
        merged.sum_outer = self.sum_outer + other.sum_outer
        return merged

    __add__ = merge

    @property
    def mean(self) -> np.ndarray:
        """``mu = s / n``, float64 ``(dim,)``."""
        if self.count < 1:
            raise ValueError("mean is undefined with count=0; expected at least 1 row")
        return self.sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance ``(S - n mu mu^T) / (n - 1)``, float64 ``(dim, dim)``, as ``np.cov(x, rowvar=False)``."""
        if self.count < 2:
            raise ValueError(f"covariance is undefined with count={self.count}; expected at least 2 rows")
        mu = self.sum / self.count
        cov = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as arrays ``count`` (int64 scalar), ``sum`` and ``sum_outer``, e.g. for ``np.savez``."""
        return {"count": np.array(self.count, dtype=np.int64), "sum": self.sum.copy(),
                "sum_outer": self.sum_outer.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> RunningStatistics:
        """Rebuild an accumulator from :meth:`to_arrays` output (a dict or an ``np.load``-ed ``.npz``)."""
        missing = [key for key in ("count", "sum", "sum_outer") if key not in arrays]
        if missing:
            raise ValueError(f"arrays without {missing} are not accepted; expected keys count, sum, sum_outer")
        total = np.asarray(arrays["sum"], dtype=np.float64)
        outer = np.asarray(arrays["sum_outer"], dtype=np.float64)
        count = np.asarray(arrays["count"])
        if total.ndim != 1 or outer.shape != (total.shape[0], total.shape[0]) or count.shape != ():
            raise ValueError(f"shapes count {count.shape}, sum {total.shape}, sum_outer {outer.shape} are not "
                             "accepted; expected (), (d,), (d, d)")
        if int(count) < 0 or int(count) != count:
            raise ValueError(f"count={count} is not accepted; expected a non-negative integer")
        stats = cls(total.shape[0])
        stats.count = int(count)
        stats.sum = total.copy()
        stats.sum_outer = outer.copy()
        return stats

    def __repr__(self) -> str:
        return f"RunningStatistics(dim={self.dim}, count={self.count})"
