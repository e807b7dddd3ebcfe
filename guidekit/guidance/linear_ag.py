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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from guidekit.guidance.base import Guidance, GuidanceContext, GuidanceWrapper

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
        for k, mode in enumerate(self.modes):
            if mode not in MODES:
                raise ValueError(f"modes[{k}]={mode!r} is not accepted; expected one of {', '.join(MODES)}")
            if mode == "linear" and k not in self.coefficients:
                raise ValueError(f"modes[{k}]='linear' has no coefficients; fit them with fit_linear_ag")

    @staticmethod
    def default_modes(num_steps: int) -> tuple[str, ...]:
        """Alternate ``cfg`` and ``linear`` over the first half of the steps, then ``cond`` (see module note)."""
        half = (num_steps + 1) // 2
        return tuple(("cfg" if k % 2 == 0 else "linear") if k < half else "cond" for k in range(num_steps))

    def mode(self, step: int) -> str:
        return self.modes[step] if step < len(self.modes) else "cond"


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

    Use it with full guidance (every step guided) over the trajectories to fit; then
    ``fit_linear_ag(recorder.cond, recorder.uncond, modes)``. Trajectories of successive pipeline calls
    are concatenated along the batch axis.
    """

    inner: Guidance
    cond: list[torch.Tensor] = field(default_factory=list, init=False)
    uncond: list[torch.Tensor] = field(default_factory=list, init=False)
    _current: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False)

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self._flush()

    def _flush(self) -> None:
        for k in sorted(self._current):
            c, u = self._current[k]
            if k < len(self.cond):
                self.cond[k], self.uncond[k] = torch.cat([self.cond[k], c]), torch.cat([self.uncond[k], u])
            else:
                self.cond.append(c)
                self.uncond.append(u)
        self._current = {}

    def finish(self) -> None:
        """Move the last pipeline call's predictions into ``cond`` and ``uncond``."""
        self._flush()

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext,
                scale: float | None = None) -> torch.Tensor:
        if len(ctx.rows) != ctx.batch_size:
            raise ValueError("PredictionRecorder needs every sample guided at every step")
        if not ctx.corrector:
            self._current[ctx.step] = (ctx.to_space(cond, "eps").detach().to("cpu", copy=True),
                                       ctx.to_space(uncond, "eps").detach().to("cpu", copy=True))
        return self.inner.combine(cond, uncond, ctx, scale)


@dataclass(eq=False)
class LinearAG(GuidanceWrapper):
    """Guide with ``inner``, estimating the unconditional prediction on ``"linear"`` steps (see module doc).

    Args:
        inner: the guidance (CFG in the paper) applied with the true or the estimated unconditional branch.
        fit: step modes and coefficients from :func:`fit_linear_ag`.
    """

    inner: Guidance
    fit: LinearAGFit
    _cond: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _uncond: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_inner()

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self._cond, self._uncond = {}, {}

    def _store(self, store: dict[int, torch.Tensor], ctx: GuidanceContext, eps: torch.Tensor) -> None:
        """Keep a predictor call's eps (corrector calls of a Heun step reuse the step's history)."""
        if ctx.corrector:
            return
        if ctx.step not in store:
            store[ctx.step] = eps.new_zeros((ctx.batch_size, *eps.shape[1:]))
        store[ctx.step][ctx.rows.to(eps.device)] = eps

    def needs_unconditional(self, ctx: GuidanceContext, scale: float | None = None) -> torch.Tensor:
        mask = self.inner.needs_unconditional(ctx, scale)
        return mask if self.fit.mode(ctx.step) == "cfg" else torch.zeros_like(mask)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext,
                scale: float | None = None) -> torch.Tensor:
        self._store(self._cond, ctx, ctx.to_space(cond, "eps").double())
        self._store(self._uncond, ctx, ctx.to_space(uncond, "eps").double())
        return self.inner.combine(cond, uncond, ctx, scale)

    def conditional_only(self, cond: torch.Tensor, ctx: GuidanceContext) -> torch.Tensor:
        eps_c = ctx.to_space(cond, "eps").double()
        self._store(self._cond, ctx, eps_c)
        if self.fit.mode(ctx.step) != "linear":
            return self.inner.conditional_only(cond, ctx)
        rows = ctx.rows.to(cond.device)
        earlier = [self._cond[j][rows] for j in range(ctx.step)]
        uncond = {j: u[rows] for j, u in self._uncond.items()}
        regressors = _regressors([*earlier, eps_c], uncond, self.fit.modes, ctx.step)
        estimate = sum(w * r for w, r in zip(self.fit.coefficients[ctx.step], regressors, strict=True))
        return self.inner.combine(cond, ctx.from_space(estimate.to(cond.dtype), "eps"), ctx)
