"""An exact testbed: Gaussian-mixture data whose denoiser is known in closed form at every noise level.

``mixture`` holds the mixture and its exact conditional and unconditional denoisers; ``oracles`` the
closed forms for one-dimensional Gaussians under CFG (Bradley & Nakkiran, "Classifier-Free Guidance is
a Predictor-Corrector"); ``ode`` a reference integrator of the probability-flow ODE for such denoisers. The
diffusers pipeline and model built on them live in :mod:`guidekit.bridge.testbed`.
"""

from guidekit.testbed.mixture import GaussianMixture
from guidekit.testbed.ode import probability_flow
from guidekit.testbed.oracles import GaussianCFGOracle

__all__ = ["GaussianCFGOracle", "GaussianMixture", "probability_flow"]
