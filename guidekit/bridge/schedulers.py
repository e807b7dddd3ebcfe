"""Where a diffusers scheduler stands at each denoiser call: noise level, solver step, output space.

The traps (REFERENCE section 2) and how they are handled:

* Heun-type schedulers make two calls per step with duplicated timesteps; ``state_in_first_order``
  tells the predictor from the corrector, and the call's sigma is the one ``scale_model_input``
  divided by (KDPM2 reads it from ``sigmas_interpol``, its ancestral variant one entry earlier).
* Multistep schedulers and flow pipelines initialise ``step_index`` only in ``step()``; before the
  first step of a loop the index is ``begin_index`` (img2img) or 0, because ``set_timesteps``
  resets it.
* DDIM, DDPM, PNDM and CogVideoX's DDIM and DPM keep no sigmas: the call's level is ``alphas_cumprod[t]`` at the integer
  timestep of the call, found by counting calls from the first call's timestep (PNDM's repeated
  timestep is one call per entry, like every other entry).
* ``scheduler.timesteps`` lives on the accelerator: it is copied to the CPU once per pipeline call so
  that no call waits for the device.
* Flow schedulers (``FlowMatch*``, or DPM-Solver with ``use_flow_sigmas``) store flow time ``t`` in
  ``sigmas``.
* Subclasses of a supported scheduler (LML's) are read as their base class. guidekit's own samplers
  report their state themselves (:class:`~guidekit.samplers.protocols.ReportsCalls`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

import guidekit.samplers
from guidekit.parameterization import NoiseLevel
from guidekit.samplers.protocols import ReportsCalls

#: Scheduler class name -> how the call's noise level is read.
_SIGMA_TABLE = "sigmas"
_ALPHAS_CUMPROD = "alphas_cumprod"
_SELF_REPORTING = "self-reporting"
SUPPORTED_SCHEDULERS: dict[str, str] = {
    "DDIMScheduler": _ALPHAS_CUMPROD,
    "DDPMScheduler": _ALPHAS_CUMPROD,
    "PNDMScheduler": _ALPHAS_CUMPROD,
    "EulerDiscreteScheduler": _SIGMA_TABLE,
    "EulerAncestralDiscreteScheduler": _SIGMA_TABLE,
    "HeunDiscreteScheduler": _SIGMA_TABLE,
    "KDPM2DiscreteScheduler": _SIGMA_TABLE,
    "KDPM2AncestralDiscreteScheduler": _SIGMA_TABLE,
    "LMSDiscreteScheduler": _SIGMA_TABLE,
    "DPMSolverMultistepScheduler": _SIGMA_TABLE,
    "DPMSolverSinglestepScheduler": _SIGMA_TABLE,
    "UniPCMultistepScheduler": _SIGMA_TABLE,
    "DEISMultistepScheduler": _SIGMA_TABLE,
    "FlowMatchEulerDiscreteScheduler": _SIGMA_TABLE,
    "CogVideoXDDIMScheduler": _ALPHAS_CUMPROD,
    "CogVideoXDPMScheduler": _ALPHAS_CUMPROD,
}

_PREDICTION_SPACES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


@dataclass(frozen=True)
class SchedulerCall:
    """The scheduler's state at one denoiser call.

    ``step`` is the solver step of the call in the scheduler's whole plan, so a pipeline that starts mid-plan
    (img2img, inpaint, a refiner) sees the steps it runs under their own numbers.
    """

    level: NoiseLevel
    corrector: bool
    tau: float
    num_steps: int
    step: int


def _supported_base(scheduler: SchedulerMixin) -> str | None:
    """The name of the first class in the scheduler's MRO that guidekit knows how to read, if any."""
    return _base_of_class(type(scheduler))


@functools.cache
def _base_of_class(cls: type) -> str | None:
    """:func:`_supported_base` of a class, worked out once per class (a protocol check is slow)."""
    if issubclass(cls, ReportsCalls):
        return cls.__name__
    return next((c.__name__ for c in cls.__mro__ if c.__name__ in SUPPORTED_SCHEDULERS), None)


@functools.cache
def _takes_flow_sigmas(cls: type) -> bool:
    """Whether the scheduler class's constructor takes ``use_flow_sigmas`` (read once per class)."""
    return "use_flow_sigmas" in inspect.signature(cls.__init__).parameters


def _flow_class(scheduler: SchedulerMixin) -> bool:
    return (_supported_base(scheduler) or "").startswith("FlowMatch")


def _is_flow(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler`` samples a flow-matching model: a ``FlowMatch*`` class, or a class that takes
    ``use_flow_sigmas`` with it set (a class that does not take it keeps the key of the config it was made from,
    unused)."""
    return _flow_class(scheduler) or (_takes_flow_sigmas(type(scheduler))
                                      and bool(scheduler.config.get("use_flow_sigmas")))


def model_space(scheduler: SchedulerMixin) -> str:
    """The prediction space the scheduler expects from the model."""
    if _flow_class(scheduler):
        return "flow"
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION_SPACES:
        raise ValueError(f"scheduler prediction_type={prediction!r} is not supported; "
                         f"accepted: {', '.join(_PREDICTION_SPACES)}")
    return _PREDICTION_SPACES[prediction]


def check_scheduler(scheduler: SchedulerMixin) -> None:
    """Raise a ``ValueError`` naming the supported schedulers if ``scheduler`` is not one of them."""
    if _supported_base(scheduler) is None:
        raise ValueError(f"scheduler={type(scheduler).__name__} is not supported by set_guidance; supported: "
                         f"{', '.join(SUPPORTED_SCHEDULERS)}, their subclasses and guidekit's samplers")
    model_space(scheduler)


class SchedulerReader:
    """Reads the scheduler's state at each denoiser call of one pipeline call.

    Create it at the first denoiser call (after the pipeline's ``set_timesteps``). It copies the
    schedule to the CPU once, so reading a call costs no host-device synchronisation. Schedulers
    without a sigma table are followed by counting calls from the first call's timestep (one
    synchronisation, at the first call).
    """

    def __init__(self, scheduler: SchedulerMixin) -> None:
        self.scheduler = scheduler
        base = _supported_base(scheduler)
        self.kind = SUPPORTED_SCHEDULERS.get(base, _SELF_REPORTING)
        self.timesteps: list[float] = scheduler.timesteps.detach().to("cpu", torch.float64).tolist()
        self.num_train = float(scheduler.config.num_train_timesteps)
        n = getattr(scheduler, "num_inference_steps", None)
        self.num_steps = int(n) if n else len(self.timesteps)
        if self.kind == _ALPHAS_CUMPROD:  # the state of each step, made once: a call then only counts
            ts = [int(t) for t in self.timesteps]
            abar = scheduler.alphas_cumprod[ts].tolist()
            self._table = [SchedulerCall(NoiseLevel.from_alphas_cumprod(a), False, t / self.num_train, self.num_steps,
                                         i) for i, (t, a) in enumerate(zip(ts, abar, strict=True))]
        self.flow = _is_flow(scheduler)
        # Resolved once: a missing attribute costs a formatted error message in diffusers' ConfigMixin.
        self.two_calls_per_step = hasattr(scheduler, "state_in_first_order")
        self.interpolated = hasattr(scheduler, "sigmas_interpol")
        if self.kind == _SIGMA_TABLE:
            self.sigmas: list[float] = scheduler.sigmas.tolist()
            self.sigmas_interpol: list[float] = scheduler.sigmas_interpol.tolist() if self.interpolated else []
        self.interpolated_offset = 1 if base == "KDPM2AncestralDiscreteScheduler" else 0
        self._calls = 0
        self._first_index: int | None = None

    def __call__(self, timestep: torch.Tensor | float) -> SchedulerCall:
        """The state at the denoiser call being made now at ``timestep`` (the scheduler's units)."""
        if self.kind == _SELF_REPORTING:
            level, corrector, tau, step = self.scheduler.denoiser_call(timestep)
            return SchedulerCall(level, corrector, tau, self.num_steps, step)
        if self.kind == _ALPHAS_CUMPROD:
            if self._first_index is None:
                self._first_index = self.timesteps.index(float(torch.as_tensor(timestep).flatten()[0]))
            self._calls += 1
            return self._table[self._first_index + self._calls - 1]
        scheduler = self.scheduler
        if scheduler.step_index is not None:
            idx = int(scheduler.step_index)
        else:  # set_timesteps reset it and no step() ran yet: the loop's first step
            idx = 0 if scheduler.begin_index is None else int(scheduler.begin_index)
        corrector = self.two_calls_per_step and not scheduler.state_in_first_order
        if corrector and self.interpolated:
            sigma = self.sigmas_interpol[idx - self.interpolated_offset]
        else:
            sigma = self.sigmas[idx]
        level = NoiseLevel.from_flow_time(sigma) if self.flow else NoiseLevel.from_sigma(sigma)
        tau = float(self.timesteps[min(idx, len(self.timesteps) - 1)]) / self.num_train
        step = idx // 2 if self.two_calls_per_step else idx  # Heun-type plans: predictor, corrector, per step
        return SchedulerCall(level, corrector, tau, self.num_steps, step)


#: Short scheduler names (for the command line) -> (diffusers class name, config overrides).
SCHEDULER_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    # guidekit's own (PCG and CFG++ come with their guidance: --guidance "pcg(gamma=5)", "cfgpp(lam=0.6)")
    "edm_heun": ("EDMHeunScheduler", {}),
    "ddim_lml": ("DDIMLMScheduler", {}),
    "dpmpp_2m_lml": ("DPMSolverMultistepLMScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "flow_euler_lml": ("FlowMatchEulerLMScheduler", {}),
}


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """A scheduler by short name (``SCHEDULER_NAMES``) from an existing scheduler's ``config``."""
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler={name!r} is not accepted; expected one of {', '.join(SCHEDULER_NAMES)}")
    class_name, overrides = SCHEDULER_NAMES[name]
    cls = getattr(diffusers, class_name, None) or getattr(guidekit.samplers, class_name)
    return cls.from_config(config, **overrides)
