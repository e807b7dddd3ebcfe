"""EDM's stochastic Heun sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 2) as a diffusers scheduler.

For ``i = 0 .. N-1`` with Karras noise levels ``t_0 > ... > t_{N-1}`` and ``t_N = 0``:

* churn: ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` if ``S_tmin <= t_i <= S_tmax`` else 0,
  ``t_hat = t_i (1 + gamma_i)``, ``x_hat = x_i + sqrt(t_hat^2 - t_i^2) S_noise z``;
* Euler: ``d = (x_hat - D(x_hat; t_hat)) / t_hat``, ``x' = x_hat + (t_{i+1} - t_hat) d``;
* Heun correction unless ``t_{i+1} = 0``: ``d' = (x' - D(x'; t_{i+1})) / t_{i+1}``,
  ``x_{i+1} = x_hat + (t_{i+1} - t_hat) (d + d') / 2``.

diffusers' ``HeunDiscreteScheduler`` is the ``S_churn = 0`` case (with ``use_karras_sigmas=True`` the two
agree to rounding; tested). The churn of step ``i + 1`` is applied at the end of step ``i`` so that the
model is called at ``t_hat`` with the timestep of ``t_hat``. The first step's churn is folded into the initial
noise: the pipeline's latents are taken to be at ``t_hat_0``, which for pure-noise latents has the same
distribution as EDM's ``x_0 + churn``. With EDM's ImageNet-64 settings (``S_tmax = 50 < sigma_max``) the
first step has no churn anyway.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from guidekit.samplers.base import SamplerCall, VPSampler
from guidekit.validation import check_number


class EDMHeunScheduler(VPSampler):
    """EDM Algorithm 2 (stochastic Heun) on a model's discrete VP schedule.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type: the model's
            schedule, as in its own scheduler config (``EDMHeunScheduler.from_config(pipe.scheduler.config)``).
        timestep_spacing, steps_offset: where the Karras levels start by default (see
            :meth:`~guidekit.samplers.base.VPSampler.karras_levels`; diffusers' meaning, ``"linspace"`` by default).
        sigma_min, sigma_max: range of the Karras noise levels; default: the training schedule's range
            (0.0292 and 14.6146 for SD), or under ``"leading"`` spacing from where DDIM starts.
        rho: Karras exponent (7).
        s_churn, s_tmin, s_tmax, s_noise: EDM's churn (0, 0, inf, 1: deterministic Heun). ImageNet-64 in the
            paper: 40, 0.05, 50, 1.003.
    """

    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = 7.0, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                 s_noise: float = 1.0) -> None:
        self._setup_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             prediction_type, timestep_spacing, steps_offset)
        self._karras_range(sigma_min, sigma_max, rho)
        check_number("s_churn", s_churn, low=0.0)
        check_number("s_noise", s_noise, low=0.0)
        if not s_tmin >= 0 or not s_tmax >= s_tmin:
            raise ValueError(f"s_tmin={s_tmin!r}, s_tmax={s_tmax!r} are not accepted; expected 0 <= s_tmin <= s_tmax")
        self.sigmas: list[float] = []
        self.gammas: list[float] = []
        self._saved: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Plan ``2N - 1`` calls: at ``t_hat_i`` for every step, and at ``t_{i+1}`` for every correction."""
        self._check_steps(num_inference_steps)
        n, c = num_inference_steps, self.config
        self.sigmas = self.karras_levels(n)
        self.gammas = [min(c.s_churn / n, math.sqrt(2) - 1) if c.s_tmin <= t <= c.s_tmax else 0.0
                       for t in self.sigmas[:-1]]
        calls = []
        for i in range(n):
            calls.append(SamplerCall(self.sigmas[i] * (1 + self.gammas[i]), False))
            if self.sigmas[i + 1] > 0:
                calls.append(SamplerCall(self.sigmas[i + 1], True))
        self._finish_plan(calls, n, device)
        self._step = 0
        self._saved = None

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """Advance by one call: the Euler half of a step, or its Heun correction followed by the next churn."""
        call = self.calls[self._call]
        dtype = sample.dtype
        model_output, sample = self.upcast(model_output, sample)
        i = self._step
        x = self.to_edm(sample, call.sigma)
        d = (x - self.denoised(model_output, sample, call.sigma)) / call.sigma
        t_next = self.sigmas[i + 1]
        if not call.corrector:
            x_next = x + (t_next - call.sigma) * d
            if t_next > 0:
                self._saved = (x, d, call.sigma)
                return self._output(self.from_edm(x_next, t_next), dtype, return_dict)
        else:
            x_hat, d_hat, t_hat = self._saved
            x_next = x_hat + (t_next - t_hat) * (d_hat + d) / 2
            self._saved = None
        self._step += 1
        if self._step < len(self.gammas) and self.gammas[self._step] > 0:
            t, t_hat = t_next, t_next * (1 + self.gammas[self._step])
            noise = randn_tensor(x_next.shape, generator=generator, device=x_next.device, dtype=x_next.dtype)
            x_next = x_next + math.sqrt(t_hat**2 - t**2) * self.config.s_noise * noise
            t_next = t_hat
        return self._output(self.from_edm(x_next, t_next), dtype, return_dict)
