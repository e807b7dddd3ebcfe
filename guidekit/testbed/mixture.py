"""Class-conditional Gaussian mixtures with exact denoisers (EDM space, float64).

Data ``x0 ~ sum_k pi_k N(m_k, S_k)``. At EDM noise level ``sigma`` (``x = x0 + sigma n``) each component
stays Gaussian, ``x ~ N(m_k, S_k + sigma^2 I)``, and the posterior mean is (REFERENCE section 1, PCG)::

    D(x; sigma) = sum_k r_k(x) [m_k + S_k (S_k + sigma^2 I)^-1 (x - m_k)],
    r_k(x) = pi_k N(x; m_k, S_k + sigma^2 I) / sum_j pi_j N(x; m_j, S_j + sigma^2 I).

The conditional denoiser of class ``c`` restricts the sums to the components labelled ``c``. The
unconditional denoiser uses every component, unless some components carry the label
:data:`UNCONDITIONAL` (-1): then the unconditional distribution is those components alone. That lets
``p(x)`` differ from the mixture of the ``p(x | c)``, as in the two-Gaussian example of Bradley &
Nakkiran (section 4), where ``p(x | c) = N(1, 0.5^2)`` and ``p(x) = N(0, 1)``.
"""

from __future__ import annotations

import math

import torch

#: Label of components that belong to the unconditional distribution only.
UNCONDITIONAL = -1


class GaussianMixture:
    """A class-conditional Gaussian mixture in ``dim`` dimensions.

    Args:
        means: ``(K, d)`` component means.
        covs: ``(K, d, d)`` symmetric positive-definite component covariances.
        weights: ``(K,)`` positive weights (normalised within each class).
        labels: ``(K,)`` class of each component (``0 .. num_classes - 1``, or ``UNCONDITIONAL``).
    """

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        k, d = self.means.shape if self.means.ndim == 2 else (None, None)
        if k is None or self.covs.shape != (k, d, d) or self.weights.shape != (k,) or self.labels.shape != (k,):
            raise ValueError(f"means {tuple(self.means.shape)}, covs {tuple(self.covs.shape)}, weights "
                             f"{tuple(self.weights.shape)} and labels {tuple(self.labels.shape)} are not accepted; "
                             "expected (K, d), (K, d, d), (K,) and (K,)")
        if not bool((self.weights > 0).all()):
            raise ValueError(f"weights={self.weights.tolist()} are not accepted; expected positive numbers")
        if not torch.allclose(self.covs, self.covs.transpose(1, 2)) or bool(
                (torch.linalg.eigvalsh(self.covs) <= 0).any()):
            raise ValueError("covs are not accepted; expected symmetric positive-definite matrices")
        if bool((self.labels < UNCONDITIONAL).any()):
            raise ValueError(f"labels={self.labels.tolist()} are not accepted; expected class ids >= 0 or -1")
        self.num_classes = int(self.labels.max()) + 1 if bool((self.labels >= 0).any()) else 0
        self._chol = torch.linalg.cholesky(self.covs)

    @property
    def dim(self) -> int:
        """Dimension of the data."""
        return self.means.shape[1]

    @classmethod
    def isotropic(cls, means: list[list[float]] | torch.Tensor, stds: list[float] | torch.Tensor,
                  labels: list[int] | torch.Tensor, weights: list[float] | torch.Tensor | None = None
                  ) -> GaussianMixture:
        """Components ``N(m_k, std_k^2 I)``, equal weights unless given."""
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        eye = torch.eye(means.shape[1], dtype=torch.float64)
        covs = stds[:, None, None] ** 2 * eye
        weights = torch.ones(len(means), dtype=torch.float64) if weights is None else weights
        return cls(means, covs, weights, labels)

    @classmethod
    def random(cls, num_classes: int, components_per_class: int, dim: int, *, spread: float = 2.0,
               generator: torch.Generator | None = None) -> GaussianMixture:
        """A random mixture: ``components_per_class`` components per class with random means, full
        covariances of scale about 0.1-0.5, and random weights."""
        k = num_classes * components_per_class
        g = generator
        means = spread * torch.randn(k, dim, generator=g, dtype=torch.float64)
        a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64) * 0.3
        covs = a @ a.transpose(1, 2) / dim + 0.05 * torch.eye(dim, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        labels = torch.arange(num_classes).repeat_interleave(components_per_class)
        return cls(means, covs, weights, labels)

    def _components(self, classes: torch.Tensor | None, n: int) -> torch.Tensor:
        """``(n, K)`` boolean mask of the components each row's distribution uses."""
        if classes is None:
            uncond = self.labels == UNCONDITIONAL
            members = uncond if bool(uncond.any()) else torch.ones_like(uncond)
            return members.expand(n, -1)
        classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1).expand(n)
        if bool(((classes < 0) | (classes >= self.num_classes)).any()):
            raise ValueError(f"classes={classes.unique().tolist()} are not accepted; expected ids in "
                             f"[0, {self.num_classes - 1}]")
        return classes[:, None] == self.labels[None, :]

    def _log_component_densities(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """``(K, n)``: ``log N(x; m_k, S_k + sigma^2 I)`` (component-major: reductions over ``K`` are fast)."""
        cov = self.covs + sigma * sigma * torch.eye(self.dim, dtype=torch.float64)
        chol = torch.linalg.cholesky(cov)
        z = torch.einsum("kij,knj->kni", torch.linalg.inv(chol), x[None] - self.means[:, None])
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        quad = torch.einsum("kni,kni->kn", z, z)
        return -0.5 * quad - (0.5 * logdet + 0.5 * self.dim * math.log(2 * math.pi))[:, None]

    def _log_weights(self, classes: torch.Tensor | None, n: int) -> torch.Tensor:
        """``(K, n)``: log weight of each component in each row's distribution (``-inf`` outside it)."""
        return torch.where(self._components(classes, n).T, torch.log(self.weights)[:, None], -torch.inf)

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``log p_sigma(x | c)`` (or ``log p_sigma(x)`` without ``classes``) of each row of ``x`` ``(n, d)``."""
        x = torch.as_tensor(x, dtype=torch.float64)
        logw = self._log_weights(classes, len(x))
        logw = logw - torch.logsumexp(logw, dim=0)
        return torch.logsumexp(logw + self._log_component_densities(x, sigma), dim=0)

    def denoise(self, x: torch.Tensor, sigma: float, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``E[x0 | x]`` at EDM noise level ``sigma`` for rows ``x`` ``(n, d)``, float64.

        ``classes``: a class id per row (or one for all) for the conditional denoiser; ``None`` for the
        unconditional one. ``sigma = inf`` gives the prior mean.
        """
        x = torch.as_tensor(x, dtype=torch.float64)
        logits = self._log_weights(classes, len(x))
        if math.isinf(sigma):
            return torch.softmax(logits, dim=0).T @ self.means
        logits = logits + self._log_component_densities(x, sigma)
        r = torch.exp(logits - logits.amax(0))
        r = r / r.sum(0)  # (K, n) responsibilities
        cov = self.covs + sigma * sigma * torch.eye(self.dim, dtype=torch.float64)
        gain = self.covs @ torch.linalg.inv(cov)  # S_k (S_k + sigma^2 I)^-1, (K, d, d)
        expect = self.means[:, None] + torch.einsum("kij,knj->kni", gain, x[None] - self.means[:, None])
        return torch.einsum("kn,kni->ni", r, expect)

    def score(self, x: torch.Tensor, sigma: float, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``grad_x log p_sigma(x | c)`` by Tweedie's formula: ``(D(x; sigma) - x) / sigma^2``."""
        x = torch.as_tensor(x, dtype=torch.float64)
        return (self.denoise(x, sigma, classes) - x) / (sigma * sigma)

    def sample(self, n: int, classes: torch.Tensor | int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact draws of the data, ``(n, d)`` float64, from class ``classes`` (per row or one for all)
        or from the unconditional distribution."""
        members = self._components(None if classes is None else torch.as_tensor(classes), n)
        probs = torch.where(members, self.weights, 0.0)
        k = torch.multinomial(probs, 1, replacement=True, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        return self.means[k] + (self._chol[k] @ z).squeeze(-1)

    def moments(self, classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean ``(d,)`` and covariance ``(d, d)`` of class ``classes`` (or of ``p(x)``)."""
        members = self._components(None if classes is None else torch.tensor([classes]), 1)[0]
        w = self.weights[members] / self.weights[members].sum()
        m, s = self.means[members], self.covs[members]
        mean = w @ m
        centred = m - mean
        cov = (w[:, None, None] * (s + centred[:, :, None] * centred[:, None, :])).sum(0)
        return mean, cov
