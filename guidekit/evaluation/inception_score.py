"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs").

``IS = exp( E_x KL( p(y|x) || p(y) ) )`` with ``p(y) = E_x p(y|x)``, evaluated on each of ``splits`` contiguous
parts of the samples (``p(y)`` estimated within the part) and reported as mean and std over the parts, as in the
original improved-gan code. The ADM evaluator uses contiguous parts of 5000 samples, i.e. ``splits=10`` for its
50k samples. It lies in ``[1, C]`` for ``C`` classes: 1 when every prediction is the same, ``C`` when each
prediction is confident and the classes are used equally.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier ``logits`` ``(N, C)`` (numpy or torch): ``(mean, std)`` over ``splits``.

    The softmax is taken inside, in float64, through ``log_softmax`` so that zero probabilities contribute
    ``0 * log 0 = 0``. Per part ``s`` of the rows, ``IS_s = exp( mean_i sum_c p_ic (log p_ic - log pbar_c) )``
    with ``pbar_c = mean_i p_ic`` (Salimans et al. 2016, section 4). The std is the population std (``ddof=0``).
    """
    if logits is None:
        raise ValueError("logits=None is not accepted: the Inception Score needs the classifier logits (N, C) of "
                         "the samples (e.g. the 1008-way logits of the FID Inception network); pool3 features alone "
                         "are not enough, so run the feature extractor with its logits output enabled")
    tensor = logits.detach() if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    if tensor.ndim != 2 or tensor.shape[1] < 2:
        raise ValueError(f"logits of shape {tuple(tensor.shape)} are not accepted; expected (N, C) with C >= 2")
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= tensor.shape[0]:
        raise ValueError(f"splits={splits!r} is not accepted; expected an integer in [1, N={tensor.shape[0]}]")
    log_p = torch.log_softmax(tensor.to(torch.float64), dim=1)
    if not torch.isfinite(log_p).all():
        raise ValueError("logits holding non-finite values are not accepted; expected finite logits")
    n = tensor.shape[0]
    scores = []
    for s in range(splits):
        part = log_p[s * n // splits:(s + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    values = np.asarray(scores)
    return float(values.mean()), float(values.std())
