"""A guidekit guidance as the ``guider`` of Modular Diffusers pipelines: :func:`as_guider`.

Modular pipelines run their denoiser once per batch that the guider asks for (``num_conditions``: the conditional
batch, then the unconditional one) and combine the predictions with the guider. :class:`GuidekitGuider` asks for the
unconditional batch only at the steps where some sample needs it (so ``Interval`` and ``AdaptiveGuidance`` skip whole
batches; the modular loop has no per-sample rows), and combines with the guidance, over the samples that need it.
What the guidance needs beyond the predictions comes from the pipeline's scheduler (the call's noise level and step,
read as :class:`~guidekit.bridge.schedulers.SchedulerReader` reads it for ``set_guidance``) and from a forward pre-hook
that the guider puts on the denoiser between ``prepare_models`` and ``cleanup_models`` (the model input ``x``).
Guidances whose passes go beyond the conditional and unconditional predictions (PAG, SEG, SLG, STG, autoguidance),
that change the conditional prediction (NAG) or bring a sampler (PCG, CFG++) are refused: Modular Diffusers has
guiders of its own for the perturbations.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from guidekit.bridge.schedulers import SchedulerCall, SchedulerReader, check_scheduler, model_space
from guidekit.guidance.base import (
    UNCOND,
    BringsSampler,
    Guidance,
    GuidanceContext,
    PassMasks,
    apply_guidance,
    constant_mask,
)
from guidekit.guidance.spec import format_guidance, parse_guidance


class GuidekitGuider(BaseGuidance):
    """A Modular Diffusers guider that runs a guidekit guidance (module docstring).

    Args:
        guidance: the guidance's text form (``format_guidance``), kept in the guider's config.
        start: diffusers' guider window start (a fraction of the steps); guidekit's ``Interval`` is the window in
            sigma.
        stop: diffusers' guider window stop.
        enabled: whether the guider guides at all.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]  # noqa: RUF012 (diffusers' class attribute)

    @register_to_config
    def __init__(self, guidance: str, start: float = 0.0, stop: float = 1.0, enabled: bool = True) -> None:
        super().__init__(start, stop, enabled)
        self.guidance = _check_guidance(parse_guidance(guidance))
        self.scheduler: Any = None
        self._reader: SchedulerReader | None = None
        self._state: Any = None
        self._call: SchedulerCall | None = None
        self._step_sigma = self._tau = float("nan")
        self._masks: PassMasks = {}
        self._x: torch.Tensor | None = None
        self._hook: Any = None

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if self.scheduler is None:
            raise ValueError("scheduler=None is not accepted; expected the pipeline's scheduler: make the guider with "
                             "guidekit.as_guider(guidance, pipe.scheduler)")
        if step == 0 or self._reader is None:  # a new pipeline call
            self._reader, self._state = SchedulerReader(self.scheduler), None
        self._call, self._masks = self._reader(timestep), {}
        if not self._call.corrector:
            self._step_sigma, self._tau = self._call.level.sigma, self._call.tau

    def _context(self, x: torch.Tensor, b: int) -> GuidanceContext:
        call = self._call
        assert call is not None
        return GuidanceContext(x=x, level=call.level, model_space=model_space(self.scheduler), step=call.step,
                               num_steps=call.num_steps, step_sigma=self._step_sigma, tau=self._tau,
                               corrector=call.corrector, rows=torch.arange(b), batch_size=b)

    def _window(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[Any]:
        first = (v[0] if isinstance(v, tuple) else v for v in data.values())
        b = next(v for v in first if isinstance(v, torch.Tensor)).shape[0]
        if self._state is None:
            self._state = self.guidance.init_state(b)
        # The guidance decides from the noise level, the step and its state; the input x is not known yet.
        masks = dict(self.guidance.needs(self._context(torch.empty(b, 0), b), self._state))
        if UNCOND not in masks or not self._window():
            masks[UNCOND] = constant_mask(b, False)
        self._masks = masks
        return [self._prepare_batch(data, i, name)
                for i, name in enumerate(self._input_predictions[:self.num_conditions])]

    @property
    def num_conditions(self) -> int:
        """2 where the step's samples need the unconditional batch; before a step's inputs are prepared (the
        pipeline's prompt encoding asks then), 2 if the guidance may ever need it."""
        guided = self._masks.get(UNCOND)
        if guided is None:
            return 2 if self._enabled and self.guidance.uses_unconditional else 1
        return 2 if bool(guided.any()) else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        if self._hook is None:
            self._hook = denoiser.register_forward_pre_hook(self._capture, with_kwargs=True)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        masks, b = self._masks, pred_cond.shape[0]
        if self._x is None:
            raise RuntimeError("guidekit's guider saw no denoiser input: prepare_models was not called")
        c = min(self._x.shape[1], pred_cond.shape[1])
        extra = {}
        if pred_uncond is not None:
            extra[UNCOND] = pred_uncond[masks[UNCOND].nonzero().flatten().to(pred_uncond.device), :c]
        else:
            extra[UNCOND] = pred_cond[:0, :c]
        pred = apply_guidance(self.guidance, pred_cond[:, :c], extra, masks, self._context(self._x[:, :c], b),
                              self._state)
        if c != pred_cond.shape[1]:
            pred = torch.cat([pred, pred_cond[:, c:]], dim=1)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


def _check_guidance(guidance: Guidance) -> Guidance:
    if (isinstance(guidance, BringsSampler) or guidance.conditional_change() is not None
            or guidance.passes() - {UNCOND}):
        raise ValueError(f"guidance={format_guidance(guidance)} is not accepted as a Modular Diffusers guider; "
                         "expected a guidance of the conditional and unconditional predictions only (not PAG, SEG, "
                         "SLG, STG, autoguidance, NAG, PCG or CFG++)")
    return guidance


def as_guider(guidance: Guidance | str, scheduler: Any) -> GuidekitGuider:
    """A Modular Diffusers guider running ``guidance`` (an object or its text form) on a pipeline whose scheduler is
    ``scheduler``: ``pipe.update_components(guider=guidekit.as_guider("apg(scale=5)", pipe.scheduler))``."""
    text = guidance if isinstance(guidance, str) else format_guidance(guidance)
    check_scheduler(scheduler)
    guider = GuidekitGuider(text)
    guider.scheduler = scheduler
    return guider


__all__ = ["GuidekitGuider", "as_guider"]
