"""The CFG++ samplers (Chung et al., ICLR 2025) as a diffusers scheduler: Euler and DPM-Solver++(2M).

With ``D`` the guided prediction at weight ``lam`` and ``U`` the unconditional one, EDM variables,
``h = log(sigma_i / sigma_{i+1})``:

* Euler (the paper's CFG++ DDIM, Algorithm 1, in EDM form): ``x_{i+1} = D_i + sigma_{i+1} (x_i - U_i) / sigma_i``;
* DPM-Solver++(2M): ``x_{i+1} = (sigma_{i+1} / sigma_i) (x_i - U_i) + D_i + (1 - e^-h) / (2 r) (D_i - U_{i-1})``
  with ``r = h_{i-1} / h_i``; first order at the first step and at a step to ``sigma = 0``. This is the form of
  ComfyUI's ``sample_dpmpp_2m_cfg_pp``; the paper's appendix was not available here (UNVERIFIED).

With ``lam = 0`` (``D = U``) both are the plain solver on the unconditional model; tested against diffusers'
Euler and DPM-Solver++(2M). Noise levels are Karras's between the training schedule's extremes.

The unconditional prediction reaches the scheduler through the bridge
(:class:`~guidekit.samplers.protocols.TakesUnconditional`), once per call, before ``step``. Without it (the
scheduler used without ``set_guidance(CFGPP(...))``), ``U = D`` and the steps are plain Euler and DPM-Solver++(2M).
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from guidekit.guidance.cfgpp import CFGPP_SOLVERS
from guidekit.samplers.base import SamplerCall, VPSampler


class CFGPPScheduler(VPSampler):
    """CFG++ with Euler or DPM-Solver++(2M) on a model's discrete VP schedule.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type: the model's
            schedule, as in its own scheduler config.
        solver: ``"euler"`` or ``"dpmpp_2m"``.
        timestep_spacing, steps_offset: where the Karras levels start by default (see
            :meth:`~guidekit.samplers.base.VPSampler.karras_levels`; diffusers' meaning, ``"linspace"`` by default).
        sigma_min, sigma_max, rho: the Karras noise levels (default: the training schedule's range, or under
            ``"leading"`` spacing from where DDIM starts; rho 7).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
                 solver: str = "euler", sigma_min: float | None = None,
                 sigma_max: float | None = None, rho: float = 7.0) -> None:
        self._setup_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             prediction_type, timestep_spacing, steps_offset)
        if solver not in CFGPP_SOLVERS:
            raise ValueError(f"solver={solver!r} is not accepted; expected one of {', '.join(CFGPP_SOLVERS)}")
        self._karras_range(sigma_min, sigma_max, rho)
        self.sigmas: list[float] = []
        self._unconditional: torch.Tensor | None = None
        self._previous_unconditional: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """One call per step at Karras noise levels; the last step goes to ``sigma = 0``."""
        self._check_steps(num_inference_steps)
        self.sigmas = self.karras_levels(num_inference_steps)
        self._finish_plan([SamplerCall(s, False) for s in self.sigmas[:-1]], num_inference_steps, device)
        self._start_at(0)

    def _start_at(self, call: int) -> None:
        """Forget the unconditional predictions of earlier calls: DPM-Solver++(2M)'s first step from ``call`` is
        first order, as diffusers' multistep solvers' first step after ``set_begin_index`` is."""
        self._unconditional = None
        self._previous_unconditional = None

    def receive_unconditional(self, prediction: torch.Tensor) -> None:
        """Receive the unconditional prediction (model space) of the call about to be stepped."""
        self._unconditional = prediction

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """One CFG++ step from ``sigma_i`` to ``sigma_{i+1}``."""
        i = self._call
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        dtype = sample.dtype
        model_output, sample = self.upcast(model_output, sample)
        x = self.to_edm(sample, sigma)
        guided = self.denoised(model_output, sample, sigma)
        uncond = guided
        if self._unconditional is not None:
            (u,) = self.upcast(self._unconditional)
            if len(u) != len(sample):  # DiT steps its doubled [x; x] batch
                u = u.repeat(len(sample) // len(u), *([1] * (u.ndim - 1)))
            uncond = self.denoised(u, sample, sigma)
            self._unconditional = None
        ratio = sigma_next / sigma
        x_next = guided + ratio * (x - uncond)
        previous = self._previous_unconditional
        if self.config.solver == "dpmpp_2m" and previous is not None and sigma_next > 0:
            h = math.log(sigma / sigma_next)
            r = math.log(self.sigmas[i - 1] / sigma) / h
            x_next = x_next + (1 - ratio) / (2 * r) * (guided - previous)
        self._previous_unconditional = uncond
        return self._output(self.from_edm(x_next, sigma_next), dtype, return_dict)
