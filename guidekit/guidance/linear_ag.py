"""LinearAG (Castillo et al., arXiv 2312.12487, Sec. 5): unconditional predictions from a linear regression.

On some solver steps the unconditional noise prediction is not evaluated but estimated as a linear
combination of predictions the sampler already has:

    eps_u(k) ~ sum_{j <= k} a_kj eps_c(j) + sum_{j < k, j a CFG step} b_kj eps_u(j)

with scalar coefficients fitted per step by ordinary least squares on recorded CFG trajectories
(the paper uses about 200). Each step has a mode: ``"cfg"`` (both branches evaluated), ``"linear"``
(the regression replaces the unconditional branch; one evaluation) or ``"cond"`` (conditional only).

UNVERIFIED: the paper's text could not be read when this was written; the regressor set (every earlier
prediction) and the default step modes (:meth:`LinearAGFit.default_modes`: alternate ``cfg`` and
``linear`` over the first half, ``cond`` after it) follow secondary summaries. Both are parameters:
``fit_linear_ag`` takes any modes, and the regression over every earlier prediction contains any
smaller regressor set as a special case of its coefficients.

A fit is a value with a text form (``linear_ag_fit(modes=[...], coefficients={1: [...]})``) and a JSON file form
(:meth:`LinearAGFit.save`, :meth:`LinearAGFit.load`); ``linear_ag(cfg(scale=5), fit='fit.json')`` reads a saved fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guidekit.guidance.base import GuidanceContext, GuidanceWrapper, TwoPassGuidance, WrappedState, set_field

MODES = ("cfg", "linear", "cond")


@dataclass(frozen=True)
class LinearAGFit:
    """Step modes and fitted coefficients of LinearAG.

    Attributes:
        modes: one of ``MODES`` per solver step; steps past the end are ``"cond"``.
        coefficients: for each ``"linear"`` step ``k``, the weights of ``eps_c(0..k)`` followed by the
            weights of ``eps_u(j)`` for the ``"cfg"`` steps ``j < k``.
    """

    modes: tuple[str, ...]
    coefficients: dict[int, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.modes, str) or not all(isinstance(m, str) for m in self.modes):
            raise ValueError(f"modes={self.modes!r} is not accepted; expected a sequence of {', '.join(MODES)}")
        set_field(self, "modes", tuple(self.modes))
        try:
            coefficients = {int(k): tuple(float(c) for c in v) for k, v in dict(self.coefficients).items()}
        except (TypeError, ValueError):
            raise ValueError(f"coefficients={self.coefficients!r} is not accepted; expected a mapping from step "
                             "to a sequence of numbers") from None
        set_field(self, "coefficients", coefficients)
        for k, mode in enumerate(self.modes):
            if mode not in MODES:
                raise ValueError(f"modes[{k}]={mode!r} is not accepted; expected one of {', '.join(MODES)}")
            if mode == "linear":
                if k not in coefficients:
                    raise ValueError(f"modes[{k}]='linear' has no coefficients; fit them with fit_linear_ag")
                expected = k + 1 + len(_cfg_steps_before(self.modes, k))
                if len(coefficients[k]) != expected:
                    raise ValueError(f"coefficients[{k}] has {len(coefficients[k])} values, which is not "
                                     f"accepted; expected {expected} (eps_c of steps 0..{k}, then eps_u of the "
                                     "earlier cfg steps)")

    def __hash__(self) -> int:
        return hash((self.modes, tuple(sorted(self.coefficients.items()))))

    @staticmethod
    def default_modes(num_steps: int) -> tuple[str, ...]:
        """Alternate ``cfg`` and ``linear`` over the first half of the steps, then ``cond`` (see module note)."""
        half = (num_steps + 1) // 2
        return tuple(("cfg" if k % 2 == 0 else "linear") if k < half else "cond" for k in range(num_steps))

    def mode(self, step: int) -> str:
        return self.modes[step] if step < len(self.modes) else "cond"

    def save(self, path: str | Path) -> None:
        """Write the fit as JSON (``{"modes": [...], "coefficients": {"k": [...]}}``; floats round-trip exactly)."""
        data = {"modes": list(self.modes), "coefficients": {str(k): list(v) for k, v in self.coefficients.items()}}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LinearAGFit:
        """Read a fit written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(tuple(data["modes"]), data["coefficients"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"fit={str(path)!r} is not accepted; expected a LinearAG fit saved by "
                             f"LinearAGFit.save ({type(exc).__name__}: {exc})") from None


def _cfg_steps_before(modes: tuple[str, ...], step: int) -> list[int]:
    return [j for j in range(step) if modes[j] == "cfg"]


def _regressors(cond: list[torch.Tensor], uncond: dict[int, torch.Tensor], modes: tuple[str, ...],
                step: int) -> list[torch.Tensor]:
    """``eps_c(0..step)`` (``cond`` holds them in order) then ``eps_u`` of the CFG steps before ``step``."""
    return [*cond, *(uncond[j] for j in _cfg_steps_before(modes, step))]


def fit_linear_ag(cond: list[torch.Tensor], uncond: list[torch.Tensor], modes: tuple[str, ...]) -> LinearAGFit:
    """Fit LinearAG's coefficients by least squares (normal equations, float64) from recorded CFG trajectories.

    Args:
        cond, uncond: per solver step, the conditional and unconditional eps predictions of every
            recorded trajectory, shaped ``(N, ...)`` (see :class:`PredictionRecorder`).
        modes: the step modes the coefficients are for.
    """
    if len(cond) != len(uncond) or len(cond) < len(modes):
        raise ValueError(f"cond/uncond hold {len(cond)}/{len(uncond)} steps; expected at least {len(modes)} each")
    unconds = dict(enumerate(uncond))
    coefficients = {}
    for k, mode in enumerate(modes):
        if mode == "linear":
            design = torch.stack([r.double().flatten() for r in _regressors(cond[:k + 1], unconds, modes, k)], dim=1)
            normal = design.T @ design
            solution = torch.linalg.solve(normal, design.T @ uncond[k].double().flatten())
            coefficients[k] = tuple(solution.tolist())
    return LinearAGFit(tuple(modes), coefficients)


@dataclass(eq=False)
class PredictionRecorder(GuidanceWrapper):
    """Runs ``inner`` and records every step's conditional and unconditional eps predictions.

    A recording tool, not a value: it appends to ``cond`` and ``uncond`` (per solver step, concatenated along the
    batch axis over successive pipeline calls), so use one recorder per pipeline and thread. Use it with full
    guidance (every sample guided at every step) over the trajectories to fit; then
    ``fit_linear_ag(recorder.cond, recorder.uncond, modes)``.
    """

    inner: TwoPassGuidance
    cond: list[torch.Tensor] = field(default_factory=list, init=False)
    uncond: list[torch.Tensor] = field(default_factory=list, init=False)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        if len(ctx.rows) != ctx.batch_size:
            raise ValueError("PredictionRecorder needs every sample guided at every step")
        if not ctx.corrector:
            c = ctx.to_space(cond, "eps").detach().to("cpu", copy=True)
            u = ctx.to_space(uncond, "eps").detach().to("cpu", copy=True)
            if ctx.step < len(self.cond):
                self.cond[ctx.step] = torch.cat([self.cond[ctx.step], c])
                self.uncond[ctx.step] = torch.cat([self.uncond[ctx.step], u])
            else:
                self.cond.append(c)
                self.uncond.append(u)
        return self.inner.combine(cond, uncond, ctx, state, scale)


@dataclass
class LinearAGHistory:
    """LinearAG's state in one pipeline call: per solver step, the eps predictions of every sample so far."""

    cond: dict[int, torch.Tensor] = field(default_factory=dict)
    uncond: dict[int, torch.Tensor] = field(default_factory=dict)

    def store(self, which: dict[int, torch.Tensor], ctx: GuidanceContext, eps: torch.Tensor) -> None:
        """Keep a predictor call's eps (corrector calls of a Heun step reuse the step's history)."""
        if ctx.corrector:
            return
        if ctx.step not in which:
            which[ctx.step] = eps.new_zeros((ctx.batch_size, *eps.shape[1:]))
        which[ctx.step][ctx.rows.to(eps.device)] = eps


@dataclass(frozen=True)
class LinearAG(GuidanceWrapper):
    """Guide with ``inner``, estimating the unconditional prediction on ``"linear"`` steps (see module doc).

    Args:
        inner: the guidance (CFG in the paper) applied with the true or the estimated unconditional branch.
        fit: step modes and coefficients from :func:`fit_linear_ag`, or the path of one saved with
            :meth:`LinearAGFit.save`.
    """

    inner: TwoPassGuidance
    fit: LinearAGFit

    def __post_init__(self) -> None:
        self._check_inner()
        if isinstance(self.fit, (str, Path)):
            set_field(self, "fit", LinearAGFit.load(self.fit))
        if not isinstance(self.fit, LinearAGFit):
            raise TypeError(f"fit={self.fit!r} is not accepted; expected a LinearAGFit or the path of a saved fit")

    def init_state(self, batch_size: int) -> WrappedState:
        return WrappedState(LinearAGHistory(), self.inner.init_state(batch_size))

    def needs_unconditional(self, ctx: GuidanceContext, state: Any = None, scale: float | None = None
                            ) -> torch.Tensor:
        mask = self.inner.needs_unconditional(ctx, state.inner, scale)
        return mask if self.fit.mode(ctx.step) == "cfg" else torch.zeros_like(mask)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext, state: Any = None,
                scale: float | None = None) -> torch.Tensor:
        history: LinearAGHistory = state.own
        history.store(history.cond, ctx, ctx.to_space(cond, "eps").double())
        history.store(history.uncond, ctx, ctx.to_space(uncond, "eps").double())
        return self.inner.combine(cond, uncond, ctx, state.inner, scale)

    def conditional_only(self, cond: torch.Tensor, ctx: GuidanceContext, state: Any = None) -> torch.Tensor:
        history: LinearAGHistory = state.own
        eps_c = ctx.to_space(cond, "eps").double()
        history.store(history.cond, ctx, eps_c)
        if self.fit.mode(ctx.step) != "linear":
            return self.inner.conditional_only(cond, ctx, state.inner)
        rows = ctx.rows.to(cond.device)
        earlier = [history.cond[j][rows] for j in range(ctx.step)]
        uncond = {j: u[rows] for j, u in history.uncond.items()}
        regressors = _regressors([*earlier, eps_c], uncond, self.fit.modes, ctx.step)
        estimate = sum(w * r for w, r in zip(self.fit.coefficients[ctx.step], regressors, strict=True))
        return self.inner.combine(cond, ctx.from_space(estimate.to(cond.dtype), "eps"), ctx, state.inner)
