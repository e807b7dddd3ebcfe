"""The predictor-corrector sampler of PCG (Bradley & Nakkiran 2024, "Classifier-Free Guidance is a
Predictor-Corrector", section 5 and Algorithm 2) as a diffusers scheduler.

Step ``i`` from ``sigma_i`` to ``sigma_{i+1}`` (EDM variables, REFERENCE section 1):

* predictor: one DDIM step with the conditional denoiser only, ``x <- D_c + sigma_{i+1} (x - D_c) / sigma_i``;
* corrector (``corrector_steps`` times, unless ``sigma_{i+1} = 0``): a Langevin step at ``sigma_{i+1}`` on the
  guided score ``s_gamma = (D_gamma - x) / sigma_{i+1}^2``,
  ``x <- x + eps s_gamma + sqrt(2 eps) z`` with ``eps = step_scale (sigma_i^2 - sigma_{i+1}^2) / 2``.

With ``step_scale = 1`` and one corrector step this is, to first order in the step, CFG with ancestral DDPM at
weight ``w = (gamma + 1) / 2``: DDPM's step is the ODE step plus ``eps s_w + sqrt(2 eps) z``, and
``2 s_w - s_1 = s_{2w - 1}``. The noise levels are DDIM's ``"trailing"`` ones, with a final step to ``sigma = 0``,
so PCG and CFG-DDIM/DDPM can be compared on the same grid. They count down from where DDIM starts in the
``timestep_spacing`` of the config the sampler is built from: the top of the table, or under ``"leading"`` spacing
``(N - 1) (T // N) + steps_offset``. A cosine schedule's top (sigma 2e4) is out of reach of an eps model's x0
estimate. ``"leading"``'s own levels end at timestep ``steps_offset``, far below the one before; a Langevin step
there injects noise of about the level before, ``sqrt(2 eps)``, which the last step cannot remove (the embedded
default model gave noise).

In img2img and inpaint pipelines, ``order`` (calls per step) makes diffusers' ``strength`` slice of ``timesteps``
start at a predictor call, and ``set_begin_index`` starts the plan there (:class:`~guidekit.samplers.base.VPSampler`).

The scheduler only moves the latents; which branch the model evaluates is the guidance's business:
attach :class:`guidekit.PCG` with ``pipe.set_guidance``, which installs this scheduler and makes predictor
calls conditional-only and corrector calls guided at ``gamma``.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from guidekit.limits import check_corrector_steps
from guidekit.samplers.base import SamplerCall, VPSampler, first_timestep
from guidekit.validation import check_number


class PCGScheduler(VPSampler):
    """DDIM predictor plus Langevin corrector steps (Bradley & Nakkiran, Algorithm 2).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type: the model's
            schedule, as in its own scheduler config.
        timestep_spacing, steps_offset: where the levels start (diffusers' meaning; ``"trailing"`` by default).
        corrector_steps: Langevin steps per solver step, 0 (conditional DDIM) to
            :data:`~guidekit.limits.MAX_CORRECTOR_STEPS`.
        step_scale: multiplies the Langevin step size ``(sigma_i^2 - sigma_{i+1}^2) / 2`` (``> 0``).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "trailing", steps_offset: int = 0,
                 corrector_steps: int = 1, step_scale: float = 1.0) -> None:
        self._setup_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             prediction_type, timestep_spacing, steps_offset)
        check_corrector_steps("corrector_steps", corrector_steps)
        check_number("step_scale", step_scale, low=0.0, low_open=True)
        self.sigmas: list[float] = []

    @property
    def order(self) -> int:
        """Denoiser calls per solver step: the predictor and ``corrector_steps`` correctors (the last step has the
        predictor only). diffusers' img2img and inpaint pipelines slice ``timesteps[t_start * order:]``, which then
        starts at the predictor call of step ``t_start``, and the remaining calls are the plan of the remaining
        steps."""
        return 1 + self.config.corrector_steps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Plan one predictor call per step and ``corrector_steps`` corrector calls after each step that does not
        end at ``sigma = 0``."""
        self._check_steps(num_inference_steps)
        n, T = num_inference_steps, len(self.train_sigmas)
        top = first_timestep(n, T, self.config.timestep_spacing, self.config.steps_offset) + 1
        steps = [round(top - i * top / n) - 1 for i in range(n)]  # "trailing" spacing below DDIM's first timestep
        self.sigmas = [float(self.train_sigmas[t]) for t in steps] + [0.0]
        calls = []
        for i in range(n):
            correctors = self.config.corrector_steps if self.sigmas[i + 1] > 0 else 0
            calls += [SamplerCall(self.sigmas[i], False)] + [SamplerCall(self.sigmas[i + 1], True)] * correctors
        self._finish_plan(calls, n, device)

    def _start_at(self, call: int) -> None:
        """PCG's state is the index of the next call alone (``call_steps`` gives its solver step), so the plan
        starts at any call: at a predictor under ``strength``, and also at a corrector (SDXL's ``denoising_start``
        cutting a step after its predictor)."""

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """Advance by one call: the conditional DDIM predictor of step ``i``, or one of its Langevin correctors."""
        call = self.calls[self._call]
        dtype = sample.dtype
        model_output, sample = self.upcast(model_output, sample)
        i, sigma = self.call_steps[self._call], call.sigma
        x = self.to_edm(sample, sigma)
        denoised = self.denoised(model_output, sample, sigma)
        if not call.corrector:
            sigma_next = self.sigmas[i + 1]
            x = denoised + sigma_next / sigma * (x - denoised)
            return self._output(self.from_edm(x, sigma_next), dtype, return_dict)
        eps = self.config.step_scale * (self.sigmas[i] ** 2 - sigma**2) / 2
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + eps * (denoised - x) / sigma**2 + math.sqrt(2 * eps) * noise
        return self._output(self.from_edm(x, sigma), dtype, return_dict)
