"""How guidekit's samplers talk to the guidance bridge: typed protocols, checked with ``isinstance``.

A scheduler that plans its own denoiser calls (several per solver step, at levels of its own) reports each call
through :class:`ReportsCalls`; one whose step needs the unconditional prediction as well as the guided one (CFG++
renoises with it) receives it through :class:`TakesUnconditional`. The guidance half of such a sampler builds it
through :class:`guidekit.guidance.base.BringsSampler`.
"""

from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import torch

from guidekit.parameterization import NoiseLevel


def conforms(obj: object, protocol: type) -> bool:
    """``isinstance(obj, protocol)`` for a runtime-checkable protocol of methods, worked out once per class of
    ``obj`` (the protocol's own check costs some microseconds at every call, and its answer depends on the class)."""
    return _conforms(type(obj), protocol)


@functools.cache
def _conforms(cls: type, protocol: type) -> bool:
    return issubclass(cls, protocol)


@runtime_checkable
class ReportsCalls(Protocol):
    """A scheduler that says where each denoiser call of its plan stands."""

    def denoiser_call(self, timestep: float | torch.Tensor) -> tuple[NoiseLevel, bool, float, int]:
        """The noise level, corrector flag, normalised time ``t / T`` and solver step (in the whole plan) of the
        denoiser call about to be made."""


@runtime_checkable
class TakesUnconditional(Protocol):
    """A scheduler whose step also uses the unconditional prediction of the call it steps."""

    def receive_unconditional(self, prediction: torch.Tensor) -> None:
        """Receive the unconditional prediction (model space, every sample) of the call about to be stepped."""
