"""The Gaussian-mixture testbed as a genuine diffusers pipeline and model.

:class:`MixtureDenoiser` is a ``ModelMixin``/``ConfigMixin`` that answers denoiser calls with the exact
denoiser of a :class:`~guidekit.testbed.GaussianMixture`: in eps form under the discrete VP schedule of
its config (``parameterization="vp_eps"``, like SD and DiT), or as a flow-matching velocity
(``parameterization="flow"``, like SD3). Class id ``num_classes`` is the null class, answered by the
unconditional denoiser. Its buffers are float64, and so are the pipeline's latents.

:class:`MixturePipeline` batches ``[uncond; cond]`` rows in one call when ``guidance_scale > 1``, as
SD's pipeline does, so ``set_guidance`` and every scheduler run on it unchanged. Latents are
``(batch, dim)`` vectors.

The timestep the model receives is mapped to a noise level as the schedulers map it: VP timesteps
by linear interpolation of ``log sigma`` over the training table (the inverse of diffusers'
``_sigma_to_t``; exact at integer timesteps), flow timesteps as ``t / num_train_timesteps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from guidekit.bridge.class_pipeline import check_call, denoise_with_cfg
from guidekit.parameterization import NoiseLevel
from guidekit.testbed.mixture import GaussianMixture

PARAMETERIZATIONS = ("vp_eps", "flow")


@dataclass
class MixtureDenoiserOutput(BaseOutput):
    """The model's prediction (eps or flow velocity), ``(batch, dim)``."""

    sample: torch.Tensor


class MixtureDenoiser(ModelMixin, ConfigMixin):
    """Exact denoiser of a Gaussian mixture, answering diffusers-style ``(sample, timestep, class_labels)`` calls.

    Args:
        means, covs, weights, labels: the mixture (see :class:`~guidekit.testbed.GaussianMixture`).
        parameterization: ``"vp_eps"`` or ``"flow"``.
        num_train_timesteps, beta_start, beta_end, beta_schedule: the VP schedule that maps timesteps to
            noise levels (diffusers' ``DDPMScheduler`` defines it; SD's values by default).
    """

    @register_to_config
    def __init__(self, means: list[list[float]], covs: list[list[list[float]]], weights: list[float],
                 labels: list[int], parameterization: str = "vp_eps", num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, beta_schedule: str = "scaled_linear") -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization={parameterization!r} is not accepted; expected one of "
                             f"{', '.join(PARAMETERIZATIONS)}")
        f64 = torch.float64
        self.mixture = GaussianMixture(torch.tensor(means, dtype=f64), torch.tensor(covs, dtype=f64),
                                       torch.tensor(weights, dtype=f64), torch.tensor(labels))
        vp = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                           beta_schedule=beta_schedule)
        abar = vp.alphas_cumprod.double()
        self.register_buffer("log_sigmas", 0.5 * torch.log((1 - abar) / abar), persistent=False)

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, **config: object) -> MixtureDenoiser:
        """A model for ``mixture`` (``config``: the other constructor arguments)."""
        return cls(mixture.means.tolist(), mixture.covs.tolist(), mixture.weights.tolist(), mixture.labels.tolist(),
                   **config)

    @property
    def num_classes(self) -> int:
        """Real classes; id ``num_classes`` is the null class."""
        return self.mixture.num_classes

    def level(self, timestep: float) -> NoiseLevel:
        """The noise level of a call at ``timestep``."""
        if self.config.parameterization == "flow":
            return NoiseLevel.from_flow_time(timestep / self.config.num_train_timesteps)
        table = self.log_sigmas
        t = min(max(timestep, 0.0), len(table) - 1.0)
        low = min(math.floor(t), len(table) - 2)
        frac = t - low
        log_sigma = (1 - frac) * float(table[low]) + frac * float(table[low + 1])
        return NoiseLevel.from_sigma(math.exp(log_sigma))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor,
                return_dict: bool = True) -> MixtureDenoiserOutput | tuple[torch.Tensor]:
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        level = self.level(t)
        x_t = sample.detach().to("cpu", torch.float64)  # the mixture is small and lives on the CPU, in float64
        x_edm = x_t / level.alpha if level.alpha > 0 else x_t
        labels = torch.as_tensor(class_labels).cpu().reshape(-1).expand(len(sample))
        null = labels == self.num_classes
        x0 = torch.empty_like(x_t)
        if bool(null.any()):
            x0[null] = self.mixture.denoise(x_edm[null], level.sigma)
        if not bool(null.all()):
            x0[~null] = self.mixture.denoise(x_edm[~null], level.sigma, labels[~null])
        space = "flow" if self.config.parameterization == "flow" else "eps"
        out = level.from_x0(x0, x_t, space).to(sample.device, sample.dtype)
        return MixtureDenoiserOutput(sample=out) if return_dict else (out,)


@dataclass
class MixturePipelineOutput(BaseOutput):
    """Final samples, ``(batch, dim)``, in data space."""

    samples: torch.Tensor


class MixturePipeline(DiffusionPipeline):
    """Class-conditional sampling of a :class:`MixtureDenoiser` with any diffusers scheduler.

    The loop is SD's: ``set_timesteps``, latents scaled by ``init_noise_sigma``, ``scale_model_input``,
    one denoiser call on ``[uncond; cond]`` rows under CFG, ``step`` (with ``generator`` when the
    scheduler's ``step`` accepts one).
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: MixtureDenoiser, scheduler: object) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, parameterization: str = "vp_eps",
                     scheduler: object | None = None, **schedule: object) -> MixturePipeline:
        """A pipeline for ``mixture`` with a VP schedule (SD's unless ``schedule`` gives ``num_train_timesteps``,
        ``beta_start``, ``beta_end``, ``beta_schedule``) or a flow schedule.

        The default scheduler is DDIM with ``timestep_spacing="trailing"`` and ``set_alpha_to_one=True``, so that
        sampling starts at the schedule's largest noise level and ends at sigma = 0 exactly (SD's own
        ``"leading"`` spacing and final ``alphas_cumprod[0]`` would end at sigma 0.029); flow Euler with
        ``shift=1`` for ``parameterization="flow"``.
        """
        model = MixtureDenoiser.from_mixture(mixture, parameterization=parameterization, **schedule)
        if scheduler is None:
            if parameterization == "flow":
                scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
            else:
                vp = {k: model.config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
                scheduler = DDIMScheduler(**vp, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        return cls(model, scheduler)

    def noisy_latents(self, class_labels: list[int] | torch.Tensor, timestep: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact draws of ``x_t`` at ``timestep`` (``alpha x0 + s eps`` with ``x0`` from the data), as unit-scale
        ``latents`` for :meth:`__call__`.

        A VP schedule does not reach pure noise (SD's ends at sigma 14.6), so starting from ``N(0, 1)`` biases
        the samples by about ``|mean| / sigma_max``; starting from these latents removes that bias.
        """
        mixture = self.transformer.mixture
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        null = labels == mixture.num_classes
        x0 = torch.empty(len(labels), mixture.dim, dtype=torch.float64)
        if bool(null.any()):
            x0[null] = mixture.sample(int(null.sum()), generator=generator)
        if not bool(null.all()):
            x0[~null] = mixture.sample(int((~null).sum()), labels[~null], generator=generator)
        level = self.transformer.level(float(timestep))
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return level.alpha * x0 + level.s * noise

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor, num_inference_steps: int = 50,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, return_dict: bool = True
                 ) -> MixturePipelineOutput | tuple[torch.Tensor]:
        """Draw one sample per entry of ``class_labels``.

        Args:
            class_labels: class ids in ``[0, num_classes)``, or ``num_classes`` for unconditional samples.
            num_inference_steps: solver steps, ``>= 1``.
            guidance_scale: CFG weight ``w`` (``1`` = none); the unconditional rows are computed when ``> 1``.
            generator: seeds the initial noise and the scheduler's noise.
            latents: initial latents ``(batch, dim)`` at unit scale (multiplied by ``init_noise_sigma``).
        """
        model = self.transformer
        labels = check_call(class_labels, model.num_classes, num_inference_steps)
        device, n = model.device, len(labels)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = torch.randn(n, model.mixture.dim, generator=generator, dtype=torch.float64)
        latents = latents.to(device, torch.float64) * self.scheduler.init_noise_sigma
        latents = denoise_with_cfg(self, model, latents, labels, model.num_classes, guidance_scale, generator)
        self.maybe_free_model_hooks()
        return MixturePipelineOutput(samples=latents) if return_dict else (latents,)
