"""What guidekit's samplers share: a VP noise schedule read from a diffusers config, EDM-space steps, and a
per-call record of the noise level that the guidance bridge reads.

The samplers keep the pipeline's latents in the model's own input space (VP ``x_t = alpha x0 + s eps``), so
``init_noise_sigma`` is 1 and ``scale_model_input`` is the identity: they work in pipelines that do not
scale their initial noise (DiT) as well as in those that do (SD, SDXL). Each step converts to the EDM
variables of REFERENCE section 0, ``x = x_t / alpha`` at ``sigma = s / alpha``, with the denoised
``D = x0`` read from the model output in its ``prediction_type``, and back.

The timestep handed to the model for a noise level ``sigma`` is diffusers' ``_sigma_to_t``: linear
interpolation of ``log sigma`` over the training table, clamped to its range.

img2img and inpaint pipelines start the plan mid-way: they slice ``timesteps[t_start * order:]``, call
``set_begin_index(t_start * order)`` and noise the image to the first remaining call's level with ``add_noise``
(inpaint also re-noises the kept region to the level of every following call).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from guidekit.parameterization import NoiseLevel
from guidekit.validation import check_int, check_number

_PREDICTION_SPACES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def first_timestep(n: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0) -> int:
    """The training timestep where diffusers' DDIM starts ``n`` steps in ``timestep_spacing`` (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2): the top of the table, ``T - 1``, for
    ``"linspace"`` and ``"trailing"``; ``(n - 1) (T // n) + steps_offset`` for ``"leading"``."""
    if spacing == "leading":
        return min((n - 1) * (num_train_timesteps // n) + steps_offset, num_train_timesteps - 1)
    return num_train_timesteps - 1


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022) eq. 5: ``n`` noise levels from ``sigma_max`` down to ``sigma_min`` (no final 0)."""
    if n == 1:
        return [sigma_max]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]


@dataclass(frozen=True)
class SamplerCall:
    """One planned denoiser call: its EDM noise level and whether it is a corrector call."""

    sigma: float
    corrector: bool


class VPSampler(SchedulerMixin, ConfigMixin):
    """Base of guidekit's samplers on a discrete VP schedule (SD, SDXL, DiT, PixArt, the testbed).

    Subclasses plan their calls in ``set_timesteps`` and advance the latents by one call in ``step``; this class
    turns the plan into ``timesteps``, converts between VP and EDM variables, starts the plan mid-way for img2img
    and inpaint pipelines (``set_begin_index``, ``add_noise``), and answers the bridge's ``denoiser_call``
    (:class:`~guidekit.samplers.protocols.ReportsCalls`).
    """

    order = 1
    init_noise_sigma = 1.0

    def _setup_schedule(self, num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                        trained_betas: list[float] | None, prediction_type: str, timestep_spacing: str,
                        steps_offset: int) -> None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing={timestep_spacing!r} is not accepted; expected one of "
                             f"{', '.join(TIMESTEP_SPACINGS)}")
        check_int("steps_offset", steps_offset, low=0)
        if prediction_type not in _PREDICTION_SPACES:
            raise ValueError(f"prediction_type={prediction_type!r} is not accepted; expected one of "
                             f"{', '.join(_PREDICTION_SPACES)}")
        vp = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                           beta_schedule=beta_schedule, trained_betas=trained_betas)
        abar = vp.alphas_cumprod.double().numpy()
        self.train_sigmas = np.sqrt((1 - abar) / abar)
        self._log_sigmas = np.log(self.train_sigmas)
        self.space = _PREDICTION_SPACES[prediction_type]
        self.calls: list[SamplerCall] = []
        self.call_steps: list[int] = []
        self.timesteps = torch.zeros(0)
        self.num_inference_steps: int | None = None
        self._call = 0
        self._begin_index: int | None = None
        self._planned_timesteps: list[float] = []

    def first_sigma(self, n: int) -> float:
        """The training noise level where DDIM with the configured ``timestep_spacing`` starts ``n`` steps."""
        t = first_timestep(n, len(self.train_sigmas), self.config.timestep_spacing, self.config.steps_offset)
        return float(self.train_sigmas[t])

    def _karras_range(self, sigma_min: float | None, sigma_max: float | None, rho: float) -> None:
        """Check the range of Karras noise levels; ``None`` takes the default of :meth:`karras_levels`."""
        check_number("rho", rho, low=0.0, low_open=True)
        self.sigma_min = float(self.train_sigmas[0] if sigma_min is None else sigma_min)
        if not 0 < self.sigma_min < (self.train_sigmas[-1] if sigma_max is None else sigma_max):
            raise ValueError(f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r} are not accepted; expected "
                             "0 < sigma_min < sigma_max")

    def karras_levels(self, n: int) -> list[float]:
        """``n`` Karras noise levels and a final 0. They run from ``sigma_max`` (default: :meth:`first_sigma`, the
        top of the training table, or under ``"leading"`` spacing where DDIM starts, as diffusers' Karras sigmas do)
        down to ``sigma_min`` (default: the bottom of the table)."""
        sigma_max = self.config.sigma_max if self.config.sigma_max is not None else self.first_sigma(n)
        if not self.sigma_min < sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min!r} is not accepted with {n} steps; expected it below the "
                             f"first noise level {sigma_max!r}")
        return [*karras_sigmas(n, self.sigma_min, sigma_max, self.config.rho), 0.0]

    def sigma_to_t(self, sigma: float) -> float:
        """The (fractional) training timestep of EDM noise level ``sigma``."""
        log_sigma = math.log(max(sigma, 1e-10))
        table = self._log_sigmas
        if log_sigma <= table[0]:
            return 0.0
        if log_sigma >= table[-1]:
            return float(len(table) - 1)
        high = int(np.searchsorted(table, log_sigma))
        low = high - 1
        return low + (log_sigma - table[low]) / (table[high] - table[low])

    def t_to_sigma(self, t: float) -> float:
        """The EDM noise level of (fractional) training timestep ``t``: the inverse of :meth:`sigma_to_t`,
        ``log sigma`` interpolated linearly over the training table, ``t`` clamped to ``[0, T - 1]``."""
        table = self._log_sigmas
        t = min(max(t, 0.0), len(table) - 1.0)
        low = min(int(t), len(table) - 2)
        w = t - low
        return math.exp((1 - w) * table[low] + w * table[low + 1])

    def timestep_sigma(self, timestep: float) -> float:
        """The EDM noise level that ``timestep`` stands for: the level of the call about to be made if the plan has
        it there, else of the first planned call at ``timestep``, else :meth:`t_to_sigma`. A planned timestep is
        the float32 ``sigma_to_t`` of its call's level, so its call gives the level exactly (and tells apart calls
        whose levels the clamp of ``sigma_to_t`` maps to the same timestep)."""
        planned = self._planned_timesteps
        if self._call < len(planned) and planned[self._call] == timestep:
            return self.calls[self._call].sigma
        if timestep in planned:
            return self.calls[planned.index(timestep)].sigma
        return self.t_to_sigma(timestep)

    def _check_steps(self, num_inference_steps: int) -> None:
        check_int("num_inference_steps", num_inference_steps, low=1)

    def _finish_plan(self, calls: list[SamplerCall], num_inference_steps: int, device: str | torch.device | None
                     ) -> None:
        self.calls = calls
        # the solver step of each call: a step's corrector calls follow its predictor call
        self.call_steps = [k - 1 for k in itertools.accumulate(not c.corrector for c in calls)]
        self.num_inference_steps = num_inference_steps
        timesteps = torch.tensor([self.sigma_to_t(c.sigma) for c in calls], dtype=torch.float32)
        self._planned_timesteps = timesteps.tolist()
        self.timesteps = timesteps.to(device)
        self._call = 0
        self._begin_index = None

    @property
    def step_index(self) -> int:
        """The index in the plan (and in ``timesteps``) of the denoiser call about to be made."""
        return self._call

    @property
    def begin_index(self) -> int | None:
        """The call the pipeline started the plan at (``set_begin_index``), or ``None`` since ``set_timesteps``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Make call ``begin_index`` of the plan the next one. diffusers' img2img and inpaint pipelines pass
        ``t_start * order`` (the first call of solver step ``t_start``); SDXL's with ``denoising_start`` pass the
        first call whose timestep is below the cut (one call earlier for a scheduler of order 2)."""
        check_int("begin_index", begin_index, low=0, high=max(len(self.calls) - 1, 0))
        self._start_at(begin_index)
        self._begin_index = begin_index
        self._call = begin_index

    def _start_at(self, call: int) -> None:
        """Put the solver's own state where a plan that starts at ``call`` needs it. This default starts only at
        the first call; samplers that can start later override it."""
        if call:
            raise ValueError(f"begin_index={call!r} is not accepted by {type(self).__name__}; expected 0 (it "
                             "starts only at its first call: use strength=1 in img2img and inpaint pipelines)")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | float
                  ) -> torch.Tensor:
        """``original_samples`` noised to the level of ``timesteps`` (one per sample, or one for all) in the
        model's VP input space: ``alpha x0 + s eps`` with ``alpha = 1 / sqrt(1 + sigma^2)``, ``s = sigma alpha``
        (DDPM's ``q(x_t | x0)``, Ho et al. 2020 eq. 4), ``sigma`` from :meth:`timestep_sigma`. At an integer
        training timestep off the plan this is ``DDPMScheduler.add_noise``; at a planned one, the latents that
        call expects."""
        sigmas = [self.timestep_sigma(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
        alpha = torch.tensor([1 / math.hypot(1.0, s) for s in sigmas], dtype=torch.float64)
        scale = alpha * torch.tensor(sigmas, dtype=torch.float64)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha, scale = (v.to(original_samples.device, original_samples.dtype).reshape(shape) for v in (alpha, scale))
        return alpha * original_samples + scale * noise

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The latents are already the model's input (VP space)."""
        return sample

    def denoiser_call(self, timestep: float | torch.Tensor) -> tuple[NoiseLevel, bool, float, int]:
        """The noise level, corrector flag, normalised time and solver step of the denoiser call about to be made
        (a step's corrector calls follow its predictor call in the plan)."""
        call = self.calls[self._call]
        return NoiseLevel.from_sigma(call.sigma), call.corrector, self._planned_timesteps[self._call] / len(
            self.train_sigmas), self.call_steps[self._call]

    def denoised(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float) -> torch.Tensor:
        """``D`` (= ``x0``) from the model output at the VP latents ``sample`` of level ``sigma``."""
        return NoiseLevel.from_sigma(sigma).to_x0(model_output, sample, self.space)

    @staticmethod
    def to_edm(sample: torch.Tensor, sigma: float) -> torch.Tensor:
        """VP latents at ``sigma`` to EDM ``x = x_t / alpha``."""
        return sample * math.hypot(1.0, sigma)

    @staticmethod
    def from_edm(x: torch.Tensor, sigma: float) -> torch.Tensor:
        """EDM ``x`` at ``sigma`` to VP latents (the data itself at ``sigma = 0``)."""
        return x / math.hypot(1.0, sigma)

    @staticmethod
    def upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Half-precision tensors in float32 (steps are computed in at least float32, as diffusers' are)."""
        return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)

    def _output(self, prev: torch.Tensor, dtype: torch.dtype, return_dict: bool
                ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Count the call and wrap the new latents, in the pipeline's ``dtype``, as diffusers' schedulers do."""
        self._call += 1
        prev = prev.to(dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return len(self.train_sigmas)
