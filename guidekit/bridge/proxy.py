"""The denoiser proxy: runs only the rows a guidance needs and returns the guided prediction.

During a guided pipeline call the denoiser's ``forward`` is replaced by a :class:`GuidedDenoiser`.
For each call it reads the scheduler's state, asks the guidance which samples need an
unconditional prediction, runs the wrapped forward on the conditional rows plus those unconditional
rows only, combines them, and hands the pipeline ``[g; g]``. The pipeline's own CFG,
``u + s (c - u)``, then returns exactly ``g`` whatever its ``guidance_scale``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from guidekit.bridge.families import Family
from guidekit.bridge.schedulers import model_space, scheduler_call
from guidekit.guidance.base import Guidance, GuidanceContext, apply_guidance


@dataclass
class GuidanceStats:
    """Network work of the last guided pipeline call.

    Attributes:
        model_calls: denoiser calls.
        cond_rows / uncond_rows: rows evaluated by the network, per branch.
        cond_rows_skipped / uncond_rows_skipped: rows that native CFG would have evaluated and the
            guidance did not need.
        uncond_rows_per_sample: unconditional rows evaluated for each sample of the batch.
    """

    model_calls: int = 0
    cond_rows: int = 0
    uncond_rows: int = 0
    cond_rows_skipped: int = 0
    uncond_rows_skipped: int = 0
    uncond_rows_per_sample: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """All rows evaluated by the network."""
        return self.cond_rows + self.uncond_rows


def _take(value: Any, index: torch.Tensor, n: int) -> Any:
    """Select ``index`` along the batch axis of every tensor in ``value`` whose batch is ``n``."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.ndim > 0 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _take(v, index, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, index, n) for v in value)
    return value


def _sample_and_timestep(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    if not isinstance(sample, torch.Tensor) or timestep is None:
        raise TypeError("guidekit could not find the sample and timestep in the denoiser call")
    return sample, timestep


class GuidedDenoiser:
    """Stands in for a denoiser's ``forward`` during one guided pipeline call.

    Args:
        forward: the forward it replaces (possibly wrapped by accelerate hooks or torch.compile).
        guidance: the guidance to apply.
        family: how the pipeline batches the call.
        scheduler: the pipeline's scheduler, read at every call.
        batched: whether the pipeline batches unconditional rows (its ``guidance_scale > 1``).
    """

    def __init__(self, forward: Callable[..., Any], guidance: Guidance, family: Family, scheduler: Any,
                 batched: bool) -> None:
        self.forward = forward
        self.guidance = guidance
        self.family = family
        self.scheduler = scheduler
        self.batched = batched
        self.stats = GuidanceStats()
        self._step = -1
        self._step_sigma = float("nan")
        self._tau = float("nan")

    def _halves(self, n: int, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
        if not self.batched:
            return n, torch.arange(n, device=device), torch.arange(0, device=device)
        if n % 2:
            raise RuntimeError(f"guidekit expected a CFG batch of even size, got {n} rows")
        b = n // 2
        first, second = torch.arange(b, device=device), torch.arange(b, n, device=device)
        return (b, first, second) if self.family.cond_first else (b, second, first)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sample, timestep = _sample_and_timestep(args, kwargs)
        n = sample.shape[0]
        b, cond_idx, uncond_idx = self._halves(n, sample.device)
        state = scheduler_call(self.scheduler, timestep)
        if not state.corrector:
            self._step += 1
            self._step_sigma, self._tau = state.level.sigma, state.tau
        if self.stats.model_calls == 0:
            self.guidance.reset(b)
            self.stats.uncond_rows_per_sample = [0] * b
        ctx = GuidanceContext(x=sample[cond_idx], level=state.level, model_space=model_space(self.scheduler),
                              step=self._step, num_steps=state.num_steps, step_sigma=self._step_sigma,
                              tau=self._tau, corrector=state.corrector, rows=torch.arange(b, device=sample.device),
                              batch_size=b)
        guided = self.guidance.needs_unconditional(ctx).to(sample.device) if self.batched \
            else torch.zeros(b, dtype=torch.bool, device=sample.device)
        n_guided = int(guided.sum())
        if n_guided == b and self.batched:
            result = self.forward(*args, **kwargs)
            out = _output_tensor(result)
            cond, uncond = out[cond_idx], out[uncond_idx]
        else:
            keep = uncond_idx[guided]
            index = torch.cat([cond_idx, keep] if self.family.cond_first else [keep, cond_idx])
            result = self.forward(*_take(args, index, n), **_take(kwargs, index, n))
            out = _output_tensor(result)
            cond, uncond = (out[:b], out[b:]) if self.family.cond_first else (out[n_guided:], out[:n_guided])
        channels = min(sample.shape[1], out.shape[1])
        ctx = GuidanceContext(**{**ctx.__dict__, "x": ctx.x[:, :channels]})
        pred = apply_guidance(self.guidance, cond[:, :channels], uncond[:, :channels], guided, ctx)
        if out.shape[1] > channels:  # learned-variance channels pass through from the conditional rows
            pred = torch.cat([pred, cond[:, channels:]], dim=1)
        self._count(b, guided)
        return _with_output(result, torch.cat([pred, pred]) if self.batched else pred)

    def _count(self, b: int, guided: torch.Tensor) -> None:
        s = self.stats
        n_guided = int(guided.sum())
        s.model_calls += 1
        s.cond_rows += b
        s.uncond_rows += n_guided
        if self.batched:
            s.uncond_rows_skipped += b - n_guided
        for i in guided.nonzero().flatten().tolist():
            s.uncond_rows_per_sample[i] += 1


def _output_tensor(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result.sample


def _with_output(result: Any, sample: torch.Tensor) -> Any:
    if isinstance(result, tuple):
        return (sample, *result[1:])
    return type(result)(sample=sample)
