"""The denoiser proxy: runs only the rows a guidance needs and returns the guided prediction.

During a guided pipeline call the denoiser's ``forward`` is replaced by a :class:`GuidedDenoiser`, made for
that call: it holds the guidance's per-call state, so a guidance object shared by several pipelines is never
written. For each denoiser call it reads the scheduler's state, asks the guidance which passes each sample needs,
runs the wrapped forward on the conditional rows plus the unconditional rows that are needed only, combines
them, and hands the pipeline ``[g; g]``. The pipeline's own CFG, ``u + s (c - u)``, then returns exactly ``g``
whatever its ``guidance_scale``. A guidance that is plain CFG at every call, at the pipeline's own weight, is asked
at the first call only: every later call passes the pipeline's batch through (:meth:`GuidedDenoiser._steady_call`).

When the denoiser is compiled, every forward is handed to it with the batch dimension of its tensors marked
dynamic and compiled size-obliviously (see :func:`mark_batch_dynamic`), so one graph serves every number of rows
and a change of the number does not recompile. Inductor still specialises on a batch of one row (its convolution
layouts and reshapes guard on it), so a forward of one row runs that row twice and keeps the first output: the graph
of two or more rows serves it (docs/benchmarks.md). Where only the denoiser's repeated blocks are compiled
(``compile_repeated_blocks``), their inputs are marked the same way (:meth:`GuidedDenoiser.compiled_block_call`).

Where diffusers' cache hooks are on, a forward of the pipeline's own rows runs in the cache context the pipeline
opened, and every other forward in one of its own, named after its rows (:meth:`GuidedDenoiser._cache_scope`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from guidekit.bridge.families import Family
from guidekit.bridge.nag import NAGRunner
from guidekit.bridge.perturb import skipped_blocks
from guidekit.bridge.schedulers import SchedulerCall, SchedulerReader, model_space
from guidekit.guidance.base import (
    COND,
    UNCOND,
    Guidance,
    GuidanceContext,
    OtherDenoiser,
    Pass,
    PassMasks,
    SkipLayers,
    apply_guidance,
    constant_mask,
)
from guidekit.guidance.spec import format_guidance
from guidekit.parameterization import NoiseLevel
from guidekit.samplers.protocols import TakesUnconditional, conforms


class StepRows(NamedTuple):
    """The rows of one guided prediction: ``expert`` 0 is the pipeline's main denoiser, 1 its first expert (Wan
    2.2's ``transformer_2``); ``computed`` maps pass names to rows."""

    expert: int
    computed: dict[str, int]


@dataclass
class GuidanceStats:
    """Network work of the last guided pipeline call.

    Attributes:
        model_calls: forward passes of the network (a batched CFG call is one; Flux's true CFG makes two
            per step unless no sample needs the unconditional branch).
        computed: per pass name (``"cond"``, ``"uncond"``), rows evaluated by the network.
        skipped: per pass name, rows that native CFG would have evaluated and the guidance did not need (the
            conditional pass is always evaluated).
        uncond_rows_per_sample: unconditional rows evaluated for each sample of the batch.
        steps: per guided prediction (one per solver call), the denoiser that ran it and the rows it computed.
    """

    model_calls: int = 0
    computed: dict[str, int] = field(default_factory=lambda: {COND.name: 0, UNCOND.name: 0})
    skipped: dict[str, int] = field(default_factory=lambda: {COND.name: 0, UNCOND.name: 0})
    uncond_rows_per_sample: list[int] = field(default_factory=list)
    steps: list[StepRows] = field(default_factory=list)

    @property
    def cond_rows(self) -> int:
        """Conditional rows evaluated."""
        return self.computed[COND.name]

    @property
    def uncond_rows(self) -> int:
        """Unconditional rows evaluated."""
        return self.computed[UNCOND.name]

    @property
    def cond_rows_skipped(self) -> int:
        """Conditional rows skipped (0: the conditional pass is always evaluated)."""
        return self.skipped[COND.name]

    @property
    def uncond_rows_skipped(self) -> int:
        """Unconditional rows native CFG would have evaluated and the guidance did not need."""
        return self.skipped[UNCOND.name]

    @property
    def rows(self) -> int:
        """All rows evaluated by the network."""
        return sum(self.computed.values())


def mark_batch_dynamic(value: Any, n: int) -> None:
    """Mark dimension 0 of every tensor in ``value`` with ``n`` rows as dynamic for ``torch.compile``.

    The mark (:func:`torch._dynamo.maybe_mark_dynamic`) is a hint, not a constraint: a denoiser that needs a
    static batch still compiles. Compiled inside :func:`_size_oblivious`, the graph does not specialise on a
    batch of 1 either.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim and value.shape[0] == n:
            torch._dynamo.maybe_mark_dynamic(value, 0)
    elif isinstance(value, dict):
        for v in value.values():
            mark_batch_dynamic(v, n)
    elif isinstance(value, (list, tuple)):
        for v in value:
            mark_batch_dynamic(v, n)


def _take(value: Any, index: slice | torch.Tensor, n: int) -> Any:
    """Select ``index`` along the batch axis of every tensor in ``value`` whose batch is ``n``."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != n:
            return value
        return value[index] if isinstance(index, slice) else value[index.to(value.device)]
    if isinstance(value, dict):
        return {k: _take(v, index, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, index, n) for v in value)
    return value


def is_compiled(denoiser: torch.nn.Module) -> bool:
    """Whether ``denoiser`` runs under ``torch.compile``: ``torch.compile(module)`` or ``module.compile()``."""
    return isinstance(denoiser, torch._dynamo.eval_frame.OptimizedModule) \
        or getattr(denoiser, "_compiled_call_impl", None) is not None


def _size_oblivious() -> Any:
    """A context in which torch.compile treats dynamic sizes as size-oblivious (no specialisation on 0 or 1); a
    no-op on a torch without the setting."""
    config = torch.fx.experimental._config
    if not hasattr(config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return config.patch(backed_size_oblivious=True)


def _sample_and_timestep(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    if isinstance(sample, list) and sample and isinstance(sample[0], torch.Tensor):  # one tensor per row (Z-Image)
        sample = torch.stack(sample)
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("timesteps"))
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
        batched: whether the pipeline evaluates the unconditional branch at all (its scale ``> 1``).
        pipeline_scale: the pipeline's own guidance scale (needed for separate-call pipelines).
        compiled: whether the denoiser is compiled (:func:`is_compiled`): its forwards get dynamic batch marks.

    Pipelines that switch denoisers (Wan 2.2) get one stand-in per further expert from :meth:`expert`; they share
    the call's state, and each call knows which expert runs it (``GuidanceContext.expert``).
    """

    def __init__(self, forward: Callable[..., Any], guidance: Guidance, family: Family, scheduler: Any,
                 batched: bool, pipeline_scale: float = 1.0, compiled: bool = False) -> None:
        self.forwards = [forward]
        self.scales = [pipeline_scale]
        self._expert = 0
        self.compiled = compiled
        self.guidance = guidance
        self.family = family
        self.scheduler = scheduler
        self.batched = batched
        self.stats = GuidanceStats()
        self.state: Any = None  # the guidance's per-call state, made at the first denoiser call
        # (step, noise level, sum in at least float32) of every guided prediction, read once after the call
        self._finite: list[tuple[int, NoiseLevel, torch.Tensor]] = []
        self._reader: SchedulerReader | None = None
        self._rows = torch.arange(0)
        # The guided part of the channel dimension (``_dim``: the family's, or 1 for condition tokens), known after
        # the first call: the channels a learned variance or a concatenated condition follows, or the latent's tokens
        # ahead of appended condition tokens.
        self._channels: int | None = None
        self._dim = 1 if family.condition_tokens else family.channel_dim
        self._space = model_space(scheduler)
        self._step_sigma = float("nan")
        self._latent_grid: tuple[int, int] | None = None  # packed latents: the unpacked (height, width)
        self._tau = float("nan")
        # A separate-call step between its two calls: the conditional call's context, masks, prediction and output,
        # and the predictions of the passes computed with it.
        self._pending: tuple[GuidanceContext, PassMasks, torch.Tensor, Any, dict[Pass, torch.Tensor]] | None = None
        # A sampler that renoises with the unconditional prediction (CFG++) receives it at every call.
        self._receiver = scheduler if conforms(scheduler, TakesUnconditional) else None
        # Set at the first call for a guidance that is plain CFG at every call (``constant_cfg_weight``) where the
        # pipeline's batch needs nothing else: its weight, and the number of samples. Between the two calls of a
        # separate-call step on that path: the conditional call's state and its output's sum.
        self._steady: tuple[float, int] | None = None
        self._held: tuple[SchedulerCall, torch.Tensor] | None = None
        #: The perturbed passes the guidance may ask for (set by the bridge for the pipeline call; see
        #: :mod:`guidekit.bridge.perturb`): at most one changes attention and shares the main forward, its rows last,
        #: run by ``processors``; the others (skipped layers, another network) run as forwards of their own.
        self.shared: Pass | None = None
        self.own: tuple[Pass, ...] = ()
        self.processors: list[Any] = []
        #: For skipped layers: the denoiser of each expert, and whether its forward skips them itself
        #: (``skip_layers``) or hooks do.
        self.denoisers: list[torch.nn.Module] = []
        self.skips_itself = True
        #: Weak networks (autoguidance) given by path, loaded by the bridge: path -> network.
        self.weak_networks: dict[str, torch.nn.Module] = {}
        #: NAG's runner for the pipeline call (see :mod:`guidekit.bridge.nag`), given the prompt's rows per forward.
        self.nag: NAGRunner | None = None
        #: Per expert, where diffusers' cache hooks are on, the denoiser's own ``cache_context`` (set by the bridge;
        #: see :meth:`recording_cache_context`), and the context the pipeline has opened around this call: its name
        #: and fields.
        self.cache_contexts: list[Callable[..., AbstractContextManager[Any]] | None] = []
        self._cache_context: tuple[str, dict[str, Any]] | None = None
        #: Whether blocks of the denoiser are compiled in place (set by the bridge; :meth:`compiled_block_call`), and
        #: the rows of the forward being made.
        self.regional = False
        self._rows_now = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(0, args, kwargs)

    def expert(self, forward: Callable[..., Any], pipeline_scale: float) -> Callable[..., Any]:
        """The stand-in for the ``forward`` of the pipeline's next expert, whose own scale is ``pipeline_scale``."""
        self.forwards.append(forward)
        self.scales.append(pipeline_scale)
        return functools.partial(_call_expert, self, len(self.forwards) - 1)

    def call(self, expert: int, args: tuple, kwargs: dict) -> Any:
        """One call of the pipeline to its denoiser ``expert``."""
        if (self._pending is not None or self._held is not None) and expert != self._expert:
            raise RuntimeError(f"guidekit expected the unconditional call of denoiser {self._expert}, got a call "
                               f"of denoiser {expert}")
        self._expert = expert
        if self._steady is not None and self._pending is None and self._steady[0] == self.scales[expert]:
            return self._steady_call(args, kwargs)
        if self.family.separate_calls and self.batched:
            return self._separate_call(args, kwargs)
        return self._batched_call(args, kwargs)

    def _begin(self, sample: torch.Tensor, timestep: Any, b: int, kwargs: dict) -> tuple[GuidanceContext, PassMasks]:
        """Read the scheduler, advance the solver step, and ask which samples need which passes (unconditional rows
        only when the pipeline evaluates them at all)."""
        if self._reader is None:  # first call: the pipeline has set its timesteps
            self._reader = SchedulerReader(self.scheduler)
            self._rows = torch.arange(b)
            self.state = self.guidance.init_state(b)
            self._latent_grid = self._grid(kwargs)
            if self.family.condition_tokens:  # guided: the latent's tokens, the first ones, one per 2 x 2 patch
                height, width = self._latent_grid
                self._channels = height * width // 4
            self.stats.uncond_rows_per_sample = [0] * b
            self._steady = self._steady_plan(b)
        state = self._read(timestep)
        if self._channels is not None and sample.shape[self._dim] != self._channels:
            sample = sample.narrow(self._dim, 0, self._channels)
        ctx = GuidanceContext(x=sample, level=state.level, model_space=self._space, step=state.step,
                              num_steps=state.num_steps, step_sigma=self._step_sigma, tau=self._tau,
                              corrector=state.corrector, rows=self._rows, batch_size=b,
                              grid=self._latent_grid, expert=self._expert)
        masks = dict(self.guidance.needs(ctx, self.state))
        if not self.batched or UNCOND not in masks:
            masks[UNCOND] = constant_mask(b, False)
        return ctx, masks

    def _read(self, timestep: Any) -> SchedulerCall:
        """The scheduler's state at this call; a predictor call also sets the step's sigma and time."""
        state = self._reader(timestep)  # type: ignore[misc]
        if not state.corrector:
            self._step_sigma, self._tau = state.level.sigma, state.tau
        return state

    def _steady_plan(self, b: int) -> tuple[float, int] | None:
        """The weight of every call, and the ``b`` samples, where the guidance is plain CFG at every call
        (:meth:`~guidekit.guidance.base.Guidance.constant_cfg_weight`) and nothing else joins the pipeline's own
        batch: no sampler that takes the unconditional prediction, no perturbed pass or NAG."""
        weight = self.guidance.constant_cfg_weight()
        if weight is None or abs(weight) > _MAX_PIPELINE_WEIGHT or not self.batched or self._receiver is not None \
                or self.nag is not None or self.shared is not None or self.own:
            return None
        return weight, b

    def _steady_call(self, args: tuple, kwargs: dict) -> Any:
        """A call whose guided prediction is the pipeline's own CFG at its own weight (:meth:`_steady_plan`): the
        pipeline's batch (or, with separate calls, each of its two calls) goes to the network and its output back
        unchanged; only the stats and the finite check record it."""
        sample, timestep = _sample_and_timestep(args, kwargs)
        separate = self.family.separate_calls
        if not separate and sample.shape[0] % 2:
            raise RuntimeError(f"guidekit expected a CFG batch of even size, got {sample.shape[0]} rows")
        held, self._held = self._held, None
        state = self._read(timestep) if held is None else held[0]  # the unconditional call shares the step's
        result = self._forward(*args, **kwargs)
        out = _output_tensor(result)
        total = _finite_sum(out)
        if separate and held is None:  # the conditional call: the step is recorded at the unconditional one
            self._held = state, total
            return result
        b = self._steady[1]  # type: ignore[index]
        self._add_step(b, {COND.name: b, UNCOND.name: b}, None)
        self._finite.append((state.step, state.level, total if held is None else total + held[1]))
        return result

    def recording_cache_context(self, original: Callable[..., AbstractContextManager[Any]]
                                ) -> Callable[..., AbstractContextManager[None]]:
        """A stand-in for a denoiser's ``cache_context`` (diffusers' ``CacheMixin``), through which the pipeline
        opens its context around a denoiser call: it opens ``original`` and records the context for
        :meth:`_cache_scope`."""
        @contextlib.contextmanager
        def cache_context(name: str, **fields: Any) -> Iterator[None]:
            self._cache_context = (name, fields)
            try:
                with original(name, **fields):
                    yield
            finally:
                self._cache_context = None

        return cache_context

    def compiled_block_call(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """A stand-in for the compiled call of a block compiled in place inside the denoiser (regional compilation:
        ``compile_repeated_blocks``), whose inputs the proxy does not hand over itself: it marks the batch dimension
        of those with the forward's rows dynamic (:func:`mark_batch_dynamic`), so that the block keeps one graph while
        the rows change. Not size-obliviously: a block's input of one row may broadcast against the others (Flux's
        negative prompt of one row for a batch of two); a forward of one row is handed over twice, as to a compiled
        denoiser (:meth:`_network`)."""
        def call(*args: Any, **kwargs: Any) -> Any:
            mark_batch_dynamic((args, kwargs), self._rows_now)
            return original(*args, **kwargs)

        return call

    def _cache_scope(self, rows: _Rows | None) -> AbstractContextManager[Any]:
        """The cache context a forward runs in where diffusers' cache hooks are on (they keep their state per context
        name, and compare and reuse it from call to call): the pipeline's own for a forward of the pipeline's rows
        (``rows`` None), else one named after the pipeline's and ``rows``, which says which rows the forward
        computes, so that no hook compares or reuses the state of other rows."""
        opener = self.cache_contexts[self._expert] if self.cache_contexts else None
        if opener is None or self._cache_context is None:
            return _NO_SCOPE
        name, fields = self._cache_context
        return opener(name if rows is None else f"{name}, guidekit {rows.name()}", **fields)

    def _grid(self, kwargs: dict) -> tuple[int, int] | None:
        """The unpacked latent's ``(height, width)`` for a denoiser of packed 2 x 2 tokens, from their positions."""
        shapes = self.family.token_shapes
        if shapes is not None and kwargs.get(shapes):
            _, rows, columns = kwargs[shapes][0][0]
            return 2 * int(rows), 2 * int(columns)
        name = self.family.token_positions
        if name is None or kwargs.get(name) is None:
            return None
        positions = kwargs[name]
        positions = positions[positions[..., 0] == 0]  # the latent's tokens (condition tokens have another first)
        return 2 * (int(positions[..., 1].max()) + 1), 2 * (int(positions[..., 2].max()) + 1)

    def _combine(self, ctx: GuidanceContext, cond: torch.Tensor, extra: dict[Pass, torch.Tensor],
                 masks: PassMasks) -> torch.Tensor:
        """Guided prediction of the guided channels (the first ``x`` channels; any further output channels are
        learned variance, which the caller passes through from the conditional rows). ``extra`` holds, per pass
        of ``masks``, the rows of the samples whose mask is set."""
        guided = masks[UNCOND]
        n_guided = extra[UNCOND].shape[0]
        for p, v in extra.items():
            if isinstance(p.perturbation, OtherDenoiser) and v.shape[1:] != cond.shape[1:]:
                weak = p.perturbation.module
                raise ValueError(f"weak={weak if isinstance(weak, str) else type(weak).__name__} is not accepted; "
                                 f"its output has shape {tuple(v.shape)}, the pipeline's denoiser "
                                 f"{tuple(cond.shape)}: expected a network of the same family and latent size")
        self._count(masks)
        d = self._dim
        if self._channels is None:
            self._channels = min(ctx.x.shape[d], cond.shape[d])
        c = self._channels
        if ctx.x.shape[d] != c:
            ctx = replace(ctx, x=ctx.x.narrow(d, 0, c))
        if cond.shape[d] != c:
            cond, extra = cond.narrow(d, 0, c), {p: v.narrow(d, 0, c) for p, v in extra.items()}
        uncond = extra[UNCOND]
        if self.family.negated_output:  # the guidance sees the scheduler's prediction; the result goes back negated
            pred = -apply_guidance(self.guidance, -cond, {p: -v for p, v in extra.items()}, masks, ctx, self.state)
        else:
            pred = apply_guidance(self.guidance, cond, extra, masks, ctx, self.state)
        # Read once, after the call: the sum is finite when every element is, and costs one reduction.
        self._finite.append((ctx.step, ctx.level, _finite_sum(pred)))
        if self._receiver is not None:  # samples without an unconditional row pass their conditional one
            if n_guided != guided.shape[0]:
                full = cond.clone()
                full[guided.nonzero().flatten().to(cond.device)] = uncond
                uncond = full
            self._receiver.receive_unconditional(uncond)
        return pred

    def _full(self, pred: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``pred`` with the conditional rows' learned-variance channels appended, if the model has any."""
        d, n = self._dim, pred.shape[self._dim]
        return pred if n == cond.shape[d] else torch.cat([pred, cond.narrow(d, n, cond.shape[d] - n)], dim=d)

    def _select(self, args: tuple, kwargs: dict, index: slice | torch.Tensor, n: int) -> tuple[tuple, dict]:
        family = self.family
        special = (*family.unbatched_args, *family.per_sample_lists, *family.second_dim_batched)
        kept = {k: v for k, v in kwargs.items() if k not in special}
        lists = {k: _take_list(kwargs[k], index) for k in family.per_sample_lists if kwargs.get(k) is not None}
        second = {k: kwargs[k][:, index] for k in family.second_dim_batched if kwargs.get(k) is not None}
        if not family.list_rows:
            return _take(args, index, n), {**kwargs, **_take(kept, index, n), **lists, **second}
        rows = {k: v for k, v in kept.items() if isinstance(v, list) and len(v) == n}
        kept = {k: v for k, v in kept.items() if k not in rows}
        taken = tuple(_take_list(a, index) if isinstance(a, list) and len(a) == n else _take(a, index, n) for a in args)
        return taken, {**kwargs, **_take(kept, index, n), **lists, **second,
                       **{k: _take_list(v, index) for k, v in rows.items()}}

    def _batched_call(self, args: tuple, kwargs: dict) -> Any:
        """One call holding both branches (or only the conditional one when not batched)."""
        sample, timestep = _sample_and_timestep(args, kwargs)
        n = sample.shape[0]
        if self.batched and n % 2:
            raise RuntimeError(f"guidekit expected a CFG batch of even size, got {n} rows")
        b = n // 2 if self.batched else n
        first, second = slice(0, b), slice(b, n)
        cond_rows, uncond_rows = (first, second) if self.family.cond_first or not self.batched else (second, first)
        ctx, masks = self._begin(sample[cond_rows], timestep, b, kwargs)
        done = self._own_forwards(args, kwargs, masks, cond_rows.start, n)
        perturbed = masks.get(self.shared) if self.shared is not None else None
        n_perturbed = 0 if perturbed is None else sum(perturbed.tolist())
        return self._main_call(args, kwargs, n, ctx, masks, cond_rows, uncond_rows, perturbed if n_perturbed else None,
                               done)

    def _own_forwards(self, args: tuple, kwargs: dict, masks: PassMasks, first_cond: int, n: int
                      ) -> dict[Pass, torch.Tensor]:
        """The predictions of the passes that run as forwards of their own, on the conditional rows (from row
        ``first_cond`` of the call's ``n``) of the samples that need them."""
        done: dict[Pass, torch.Tensor] = {}
        for p in self.own:
            mask = masks.get(p)
            if mask is not None and bool(mask.any()):
                index = mask.nonzero().flatten() + first_cond
                p_args, p_kwargs = self._select(args, kwargs, index, n)
                done[p] = self._perturbed_forward(p.perturbation, p_args, p_kwargs,  # type: ignore[arg-type]
                                                  _Rows(index, p.name))
        return done

    def _perturbed_forward(self, perturbation: SkipLayers | OtherDenoiser, args: tuple, kwargs: dict, rows: _Rows
                           ) -> torch.Tensor:
        """The perturbed rows' prediction from a forward of their own: the denoiser with ``skip_layers`` (or, where
        its forward takes none, with the blocks skipped by hooks), or the other network called with the same inputs
        (its output is checked against the denoiser's in :meth:`_combine`). ``rows`` names them for
        :meth:`_cache_scope`."""
        if isinstance(perturbation, SkipLayers):
            n = _sample_and_timestep(args, kwargs)[0].shape[0]
            positive = torch.arange(n) if self.nag is not None else None
            if self.skips_itself:
                return _output_tensor(self._forward(*args, **kwargs, skip_layers=list(perturbation.layers),
                                                    positive=positive, rows=rows))
            with skipped_blocks(self.denoisers[self._expert], perturbation.layers):
                return _output_tensor(self._forward(*args, **kwargs, positive=positive, rows=rows))
        self.stats.model_calls += 1
        module = perturbation.module
        return _output_tensor((self.weak_networks[module] if isinstance(module, str) else module)(*args, **kwargs))

    def _main_call(self, args: tuple, kwargs: dict, n: int, ctx: GuidanceContext, masks: PassMasks,
                   cond_rows: slice, uncond_rows: slice, perturbed: torch.Tensor | None,
                   done: dict[Pass, torch.Tensor]) -> Any:
        """The forward of the call's ``n`` rows cut to the conditional ones, the unconditional ones some sample
        needs and, where ``perturbed`` (a mask over the samples) is given, those samples' conditional rows again,
        appended to run perturbed; then the guided prediction, with the predictions of passes ``done`` elsewhere."""
        b = cond_rows.stop - cond_rows.start
        guided = masks[UNCOND]
        n_guided = sum(guided.tolist())  # cheaper than a tensor reduction for a small CPU mask
        n_perturbed = 0 if perturbed is None else sum(perturbed.tolist())
        if n_guided == b and self.batched and n_perturbed == 0:  # the pipeline's own batch: native arithmetic
            positive = torch.arange(cond_rows.start, cond_rows.stop) if self.nag is not None else None
            result = self._forward(*args, **kwargs, positive=positive)
            if self._cfg_weight(ctx, masks, done) == self.scales[self._expert]:  # the pipeline's own CFG
                return self._pipeline_combines(ctx, masks, result, None, None, self.scales[self._expert])
            first_half, second_half = _output_tensor(result).chunk(2)
            cond, uncond = (first_half, second_half) if cond_rows.start == 0 else (second_half, first_half)
            pred = self._full(self._combine(ctx, cond, {UNCOND: uncond, **done}, masks), cond)
            return _with_output(result, torch.cat([pred, pred]))  # never written into the network's buffer
        cond_idx = torch.arange(cond_rows.start, cond_rows.stop)
        keep = guided.nonzero().flatten() + uncond_rows.start
        parts = [cond_idx, keep] if self.family.cond_first else [keep, cond_idx]
        if perturbed is not None:  # [.. ; perturbed]: the conditional rows again, the last ones run perturbed
            parts.append(perturbed.nonzero().flatten() + cond_rows.start)
        index: slice | torch.Tensor = cond_rows if n_guided == 0 and n_perturbed == 0 else torch.cat(parts)
        sub_args, sub_kwargs = self._select(args, kwargs, index, n)
        positive = None
        if self.nag is not None:  # the conditional rows, and the perturbed rows that repeat them
            first_cond = 0 if self.family.cond_first else n_guided
            positive = torch.cat([torch.arange(first_cond, first_cond + b),
                                  torch.arange(b + n_guided, b + n_guided + n_perturbed)])
        whole = isinstance(index, slice) and index.stop - index.start == n  # not batched: the pipeline's own rows
        rows = None if whole else _Rows(index, perturbed=n_perturbed)
        result = self._forward(*sub_args, **sub_kwargs, perturbed_rows=n_perturbed, positive=positive, rows=rows)
        out = _output_tensor(result)
        main = out[:len(out) - n_perturbed]
        cond, uncond = (main[:b], main[b:]) if self.family.cond_first else (main[n_guided:], main[:n_guided])
        extra = {UNCOND: uncond, **done}
        if n_perturbed:
            extra[self.shared] = out[len(out) - n_perturbed:]  # type: ignore[index]
        pred = self._full(self._combine(ctx, cond, extra, masks), cond)
        return _with_output(result, torch.cat([pred, pred]) if self.batched else pred)

    def _separate_call(self, args: tuple, kwargs: dict) -> Any:
        """Flux-style true CFG: a conditional call, then an unconditional call, per step.

        The conditional call passes through and is kept. At the unconditional call only the guided
        samples are evaluated, and the proxy returns ``u' = c + (c - d) / (s - 1)`` so that the
        pipeline's ``u' + s (c - u')`` equals the desired prediction ``d`` (``u' = c`` for a sample
        that is not guided).
        """
        sample, timestep = _sample_and_timestep(args, kwargs)
        b = sample.shape[0]
        if self._pending is None:
            ctx, masks = self._begin(sample, timestep, b, kwargs)
            result = self._forward(*args, **kwargs, positive=torch.arange(b) if self.nag is not None else None)
            done = self._own_forwards(args, kwargs, masks, 0, b)
            self._pending = (ctx, masks, _output_tensor(result), result, done)
            return result
        ctx, masks, cond, result, done = self._pending
        self._pending = None
        guided = masks[UNCOND]
        n_guided = sum(guided.tolist())
        if n_guided == b:
            uncond_result = self._forward(*args, **kwargs)
            uncond = _output_tensor(uncond_result)
            weight = self._cfg_weight(ctx, masks, done)
            if weight is not None:
                return self._pipeline_combines(ctx, masks, uncond_result, cond, uncond, weight)
        elif n_guided:
            index = guided.nonzero().flatten()
            sub_args, sub_kwargs = self._select(args, kwargs, index, b)
            uncond = _output_tensor(self._forward(*sub_args, **sub_kwargs, rows=_Rows(index)))
        else:
            uncond = cond[:0]
        pred = self._full(self._combine(ctx, cond, {UNCOND: uncond, **done}, masks), cond)
        return _with_output(result, cond + (cond - pred) / (self.scales[self._expert] - 1.0))

    def _cfg_weight(self, ctx: GuidanceContext, masks: PassMasks, done: dict[Pass, torch.Tensor]) -> float | None:
        """The guidance's CFG weight at this call (:meth:`~guidekit.guidance.base.Guidance.cfg_weight`) where the
        pipeline's own combination can give its result: every sample has both predictions and nothing else, no
        sampler takes the unconditional prediction, and the weight is at most :data:`_MAX_PIPELINE_WEIGHT` (so that
        finite predictions give a finite combination, which the finite check of the predictions then vouches for;
        larger weights are combined here and their result checked)."""
        if done or self._receiver is not None or any(p is not UNCOND and any(m.tolist()) for p, m in masks.items()):
            return None
        weight = self.guidance.cfg_weight(ctx, self.state)
        return weight if weight is not None and abs(weight) <= _MAX_PIPELINE_WEIGHT else None

    def _pipeline_combines(self, ctx: GuidanceContext, masks: PassMasks, result: Any, cond: torch.Tensor | None,
                           uncond: torch.Tensor | None, weight: float) -> Any:
        """The network's output for a call whose guided prediction is the pipeline's own ``u + s (c - u)`` with
        ``s`` replaced by ``weight``: unchanged where ``weight`` is ``s`` (the pipeline's arithmetic, bit for bit;
        ``cond`` and ``uncond`` are then not needed); else (separate calls, where ``result`` is the unconditional
        call's) ``u' = c + (w - 1) / (s - 1) (u - c)`` in the guided channels, so that ``u' + s (c - u') = u + w (c -
        u)``."""
        self._count(masks)
        out = _output_tensor(result)
        d = self._dim
        if self._channels is None:
            self._channels = min(ctx.x.shape[d], out.shape[d])
        scale = self.scales[self._expert]
        if weight != scale:
            assert cond is not None and uncond is not None
            c = self._channels
            moved = torch.lerp(cond.narrow(d, 0, c), uncond.narrow(d, 0, c), (weight - 1.0) / (scale - 1.0))
            out = moved if c == out.shape[d] else torch.cat([moved, out.narrow(d, c, out.shape[d] - c)], dim=d)
            result = _with_output(result, out)
        # The pipeline's combination of finite predictions with a finite weight is finite (barring overflow).
        total = _finite_sum(out)
        if cond is not None:  # separate calls: the conditional rows came with the first call
            total = total + _finite_sum(cond)
        self._finite.append((ctx.step, ctx.level, total))
        return result

    def check_finite(self) -> None:
        """Raise a ``ValueError`` naming the guidance and the first step whose guided prediction was not finite.

        Each prediction's sum (in float32 for half precision, so that finite values do not overflow it) stays on the
        device during the call and is read here once, so the check costs one reduction and no host synchronisation
        per step. A float32 prediction whose elements sum beyond float32's range (about 3e38) is reported too.
        """
        if not self._finite:
            return
        flags = torch.isfinite(torch.stack([f for *_, f in self._finite])).cpu()
        if bool(flags.all()):
            return
        step, level, _ = self._finite[int((~flags).nonzero()[0])]
        sigma = level.sigma
        try:
            method = format_guidance(self.guidance)
        except TypeError:  # a guidance without a text form
            method = repr(self.guidance)
        advice = ("a zero-terminal-SNR step, where an eps-space prediction does not determine the model's: give the "
                  "method space='v' or 'x0'" if math.isinf(sigma) else
                  "lower the weight, or check the model's own predictions")
        raise ValueError(f"guidance {method} gave a guided prediction that is not finite at step {step} "
                         f"(sigma {sigma:.4g}); expected finite values: {advice}")

    def _forward(self, *args: Any, perturbed_rows: int = 0, positive: torch.Tensor | None = None,
                 rows: _Rows | None = None, **kwargs: Any) -> Any:
        """One forward of the network; its last ``perturbed_rows`` rows run with the perturbed pass's change, and
        the rows at ``positive`` (those conditioned on the prompt) with NAG's, if it is set. ``rows`` names the rows
        of a forward that are not the pipeline's own (:meth:`_cache_scope`)."""
        self.stats.model_calls += 1
        if perturbed_rows:
            latent_size = tuple(_sample_and_timestep(args, kwargs)[0].shape[-2:])
            for processor in self.processors:
                processor.perturbed_rows, processor.latent_size = perturbed_rows, latent_size
        try:
            with self._cache_scope(rows):
                if self.nag is not None and positive is not None:
                    return self.nag.run(self._network, args, kwargs, positive)
                return self._network(args, kwargs)
        finally:
            for processor in self.processors:
                processor.perturbed_rows = 0

    def _network(self, args: tuple, kwargs: dict) -> Any:
        """The network's own forward (with dynamic batch marks when it or its blocks are compiled)."""
        forward = self.forwards[self._expert]
        if not self.compiled and not self.regional:
            return forward(*args, **kwargs)
        sample, _ = _sample_and_timestep(args, kwargs)
        single = sample.shape[0] == 1 and not self.family.list_rows
        if single:  # inductor specialises its graphs on a batch of 1: hand it the row twice, keep the first output
            args, kwargs = _take((args, kwargs), torch.zeros(2, dtype=torch.long), 1)
        self._rows_now = sample.shape[0] * (1 + single)
        mark_batch_dynamic((args, kwargs), self._rows_now)
        with _size_oblivious() if self.compiled else _NO_SCOPE:
            result = forward(*args, **kwargs)
        return _with_output(result, _output_tensor(result)[:1]) if single else result

    def _count(self, masks: PassMasks) -> None:
        """Rows computed and skipped per pass at this call (:meth:`_add_step`)."""
        flags = masks[UNCOND].tolist()
        b = len(flags)
        step = {COND.name: b, UNCOND.name: sum(flags)}
        for p in self.own if self.shared is None else (self.shared, *self.own):
            mask = masks.get(p)
            step[p.name] = 0 if mask is None else sum(mask.tolist())
        self._add_step(b, step, flags)

    def _add_step(self, b: int, step: dict[str, int], guided: list[bool] | None) -> None:
        """Record the rows ``step`` computed per pass for a guided prediction of ``b`` samples, ``guided`` those
        with an unconditional row (``None``: every sample). Skipped: unconditional rows when the pipeline batches
        them, and perturbed rows the guidance may ask for (native PAG computes them at every call)."""
        s = self.stats
        for name, rows in step.items():
            s.computed[name] = s.computed.get(name, 0) + rows
            if name != COND.name and (name != UNCOND.name or self.batched):
                s.skipped[name] = s.skipped.get(name, 0) + b - rows
        s.steps.append(StepRows(self._expert, step))
        if guided is None or step[UNCOND.name] == b:
            s.uncond_rows_per_sample = [n + 1 for n in s.uncond_rows_per_sample]
        elif step[UNCOND.name]:
            s.uncond_rows_per_sample = [n + g for n, g in zip(s.uncond_rows_per_sample, guided, strict=True)]


class _Rows(NamedTuple):
    """The rows of a forward that are not the pipeline's own: ``index`` into the pipeline's call, and the pass they
    run (``None``: the main forward, whose last ``perturbed`` rows run the shared perturbed pass). Named for a cache
    context (:meth:`GuidedDenoiser._cache_scope`) only where a cache is on."""

    index: slice | torch.Tensor
    pass_name: str | None = None
    perturbed: int = 0

    def name(self) -> str:
        """``rows 0,2,3``, ``slg:1 of rows 0,1`` or ``rows 0,1,1, the last 1 perturbed``."""
        index = self.index
        listed = ",".join(map(str, range(index.start, index.stop) if isinstance(index, slice) else index.tolist()))
        rows = f"rows {listed}" if self.pass_name is None else f"{self.pass_name} of rows {listed}"
        return f"{rows}, the last {self.perturbed} perturbed" if self.perturbed else rows


def _take_list(value: list, index: slice | torch.Tensor) -> list:
    """The entries of a per-sample list at ``index``."""
    return value[index] if isinstance(index, slice) else [value[i] for i in index.tolist()]


def _call_expert(proxy: GuidedDenoiser, expert: int, *args: Any, **kwargs: Any) -> Any:
    return proxy.call(expert, args, kwargs)


#: The scope of a forward where no cache hooks are on (:meth:`GuidedDenoiser._cache_scope`).
_NO_SCOPE = contextlib.nullcontext()

#: The largest CFG weight left to the pipeline's own arithmetic (:meth:`GuidedDenoiser._cfg_weight`).
_MAX_PIPELINE_WEIGHT = 1e3

#: The dtype a prediction is summed in for the finite check (``None``: its own).
_SUM_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _finite_sum(prediction: torch.Tensor) -> torch.Tensor:
    """The sum the finite check reads (:meth:`GuidedDenoiser.check_finite`): finite when every element is; half
    precision is summed in float32, so that finite values do not overflow it."""
    return prediction.sum(dtype=_SUM_DTYPES.get(prediction.dtype))


def _output_tensor(result: Any) -> torch.Tensor:
    output = result[0] if isinstance(result, tuple) else result.sample
    return torch.stack(output) if isinstance(output, list) else output  # one tensor per row (Z-Image)


def _with_output(result: Any, sample: torch.Tensor) -> Any:
    """The network's output with ``sample`` in place of its prediction (a tuple is rebuilt; an output object,
    made fresh by each forward, gets the new ``sample``)."""
    if isinstance(result, tuple):
        return (list(sample.unbind(0)) if isinstance(result[0], list) else sample, *result[1:])
    result.sample = sample
    return result
