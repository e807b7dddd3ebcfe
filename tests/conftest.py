"""Shared test helpers: contexts for the pure guidance maths."""

from __future__ import annotations

import pytest
import torch

from guidekit.guidance.base import GuidanceContext
from guidekit.parameterization import NoiseLevel

# One thread: results do not depend on the thread count, and a busy second core does not stall the tests.
torch.set_num_threads(1)


def make_context(x: torch.Tensor, *, sigma: float = 1.5, space: str = "eps", step: int = 0, num_steps: int = 10,
                 tau: float = 0.5, corrector: bool = False) -> GuidanceContext:
    """A context over all rows of ``x`` at VP noise level ``sigma``."""
    return GuidanceContext(x=x, level=NoiseLevel.from_sigma(sigma), model_space=space, step=step,
                           num_steps=num_steps, step_sigma=sigma, tau=tau, corrector=corrector,
                           rows=torch.arange(len(x)), batch_size=len(x))


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def demo_url() -> str:
    """The demo served in this process on a free port of 127.0.0.1, on the embedded default model."""
    import socket

    from guidekit.app.compare import Comparer
    from guidekit.app.ui import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, url = launch(Comparer(device="cpu"), port=port, block=False)
    yield url
    demo.close()
