"""The guidance engine: values and per-call state, threads, guided(), passes, compile, the light import."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from pipelines import final_latents
from torch._dynamo.utils import counters

import guidekit
from guidekit.guidance import COND, UNCOND, Pass, TwoPassGuidance
from guidekit.testing.tiny import build_tiny_pipeline, tiny_call_kwargs

_FIT = guidekit.LinearAGFit(("cfg", "linear", "cond"), {1: (0.5, 0.25, 0.125)})
VALUES = [
    guidekit.CFG(5.0, rescale=0.7),
    guidekit.APG(5.0, momentum=-0.5),
    guidekit.CFGZeroStar(4.0),
    guidekit.Interval(guidekit.APG(3.0), sigma_lo=0.28, sigma_hi=5.42),
    guidekit.Scheduled(guidekit.CFG(7.5), "pcs", s=2.0),
    guidekit.AdaptiveGuidance(guidekit.Scheduled(guidekit.CFG(7.5), "cosine"), threshold=0.99),
    guidekit.PCG(5.0, corrector_steps=2),
    guidekit.CFGPP(0.6, solver="dpmpp_2m"),
    guidekit.LinearAG(guidekit.CFG(5.0), _FIT),
]


@pytest.mark.parametrize("g", VALUES, ids=lambda g: type(g).__name__)
def test_guidance_is_a_value(g: guidekit.Guidance) -> None:
    """Hashable, comparable, picklable, immutable, and its text form reads back to an equal object."""
    copy = pickle.loads(pickle.dumps(g))
    assert copy == g and hash(copy) == hash(g)
    assert guidekit.parse_guidance(guidekit.format_guidance(g)) == g
    assert len({g, copy}) == 1
    with pytest.raises(AttributeError):
        g.scale = 2.0  # type: ignore[misc]


def test_linear_ag_reads_a_saved_fit(tmp_path: Path) -> None:
    path = tmp_path / "fit.json"
    _FIT.save(path)
    g = guidekit.parse_guidance(f"linear_ag(cfg(scale=5), fit={str(path)!r})")
    assert g == guidekit.LinearAG(guidekit.CFG(5.0), _FIT)
    with pytest.raises(ValueError, match="coefficients\\[1\\] has 2 values"):
        guidekit.LinearAGFit(("cfg", "linear"), {1: (0.5, 0.5)})  # eps_c(0), eps_c(1), eps_u(0): 3 values
    with pytest.raises(ValueError, match=r"fit='.*missing\.json' is not accepted"):
        guidekit.LinearAG(guidekit.CFG(5.0), str(tmp_path / "missing.json"))  # type: ignore[arg-type]


def _pipes() -> tuple:
    return build_tiny_pipeline("sd"), build_tiny_pipeline("sd")


SHARED = [
    guidekit.APG(5.0, momentum=-0.5),
    guidekit.AdaptiveGuidance(guidekit.CFG(5.0), threshold=0.5),
    guidekit.Interval(guidekit.APG(5.0, momentum=-0.5), sigma_lo=0.5, sigma_hi=20.0),
]


@pytest.mark.parametrize("g", SHARED, ids=lambda g: type(g).__name__)
def test_one_object_in_two_threads_gives_the_sequential_results(g: guidekit.Guidance) -> None:
    """Two pipelines share one guidance object and step in lock-step in two threads (a barrier after every step):
    each result equals the same call made alone, bitwise."""
    pipes = _pipes()
    seeds = (0, 1)
    sequential = []
    for pipe, seed in zip(pipes, seeds, strict=True):
        with guidekit.guided(pipe, g):
            sequential.append(final_latents(pipe, "sd", seed=seed, batch_size=2, guidance_scale=5.0, steps=6))
    barrier = threading.Barrier(2, timeout=60)

    def step_end(pipe, i, t, kwargs):
        barrier.wait()
        return kwargs

    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with guidekit.guided(pipes[k], g):
                results[k] = final_latents(pipes[k], "sd", seed=seeds[k], batch_size=2, guidance_scale=5.0,
                                           steps=6, callback_on_step_end=step_end)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        assert torch.equal(results[k], sequential[k])
    # The oracle can tell: per-call state matters, so a run with state written by another call would differ.
    with guidekit.guided(pipes[0], guidekit.CFG(5.0)):
        plain = final_latents(pipes[0], "sd", seed=0, batch_size=2, guidance_scale=5.0, steps=6)
    assert (plain - sequential[0]).abs().max() > 1e-3


def test_a_denoiser_shared_by_two_pipelines_serves_one_guided_call_at_a_time() -> None:
    """Two pipelines built on one UNet (their own schedulers): while one makes a guided call in a thread, the other's
    guided call is refused by name before it changes anything; the first call's result is its sequential one, and
    the UNet has its own forward again."""
    import diffusers

    first = build_tiny_pipeline("sd")
    first.set_progress_bar_config(disable=True)
    scheduler = type(first.scheduler).from_config(first.scheduler.config)
    second = diffusers.StableDiffusionPipeline(**{**first.components, "scheduler": scheduler})
    second.set_progress_bar_config(disable=True)
    g = guidekit.APG(5.0, momentum=-0.5)
    run = {"batch_size": 2, "guidance_scale": 5.0, "steps": 6}
    with guidekit.guided(first, g):
        expected = final_latents(first, "sd", **run)
    started, release = threading.Event(), threading.Event()

    def hold(pipe, i, t, kwargs):  # type: ignore[no-untyped-def]
        if i == 0:
            started.set()
            release.wait(60)
        return kwargs

    results: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: results.append(
        final_latents(first, "sd", **run, callback_on_step_end=hold)))
    with guidekit.guided(first, g), guidekit.guided(second, g):
        thread.start()
        try:
            assert started.wait(60)
            with pytest.raises(RuntimeError, match="unet=UNet2DConditionModel of StableDiffusionPipeline is serving "
                                                   "another guided call"):
                final_latents(second, "sd", **run)
        finally:
            release.set()
            thread.join()
        assert torch.equal(results[0], expected)
        assert "forward" not in vars(first.unet)
        assert torch.equal(final_latents(second, "sd", **run), expected)  # one after the other: both served


def test_state_shared_between_calls_would_differ() -> None:
    """What the threads test guards against: call B writing call A's APG momentum buffer between A's steps."""
    from conftest import make_context

    g = guidekit.APG(5.0, momentum=-0.5, space="model")
    gen = torch.Generator().manual_seed(0)
    x, c, u, other = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(4))
    ctx = make_context(x)
    own, shared = g.init_state(2), g.init_state(2)
    g.combine(c, u, ctx, own)
    g.combine(c, u, ctx, shared)
    g.combine(c, other, ctx, shared)  # call B's step lands in A's buffer
    assert (g.combine(c, u, ctx, own) - g.combine(c, u, ctx, shared)).abs().max() > 1e-3


def test_guided_restores_the_pipeline_also_when_the_call_raises() -> None:
    pipe = build_tiny_pipeline("sd")
    native = final_latents(pipe, "sd", guidance_scale=5.0, steps=2)
    cls, attrs, scheduler = type(pipe), set(pipe.__dict__), pipe.scheduler
    with guidekit.guided(pipe, guidekit.PCG(5.0)) as run:
        assert run.stats is None
        final_latents(pipe, "sd", guidance_scale=5.0, steps=2)
        assert type(pipe.scheduler).__name__ == "PCGScheduler"
    assert run.stats is not None and run.stats.uncond_rows > 0
    assert type(pipe) is cls and set(pipe.__dict__) == attrs and pipe.scheduler is scheduler
    with pytest.raises(ValueError, match="guidance_scale"), guidekit.guided(pipe, "cfg(scale=5)"):
        final_latents(pipe, "sd", guidance_scale=1.0, steps=2)  # refused: the pipeline would batch no uncond rows
    assert type(pipe) is cls and set(pipe.__dict__) == attrs and pipe.scheduler is scheduler
    with pytest.raises(RuntimeError, match="boom"), guidekit.guided(pipe, "apg(scale=5)"):
        raise RuntimeError("boom")
    assert type(pipe) is cls and set(pipe.__dict__) == attrs
    assert torch.equal(final_latents(pipe, "sd", guidance_scale=5.0, steps=2), native)


def test_guided_nests_and_gives_back_the_outer_guidance() -> None:
    pipe = build_tiny_pipeline("sd")
    outer = guidekit.CFG(3.0)
    pipe.set_guidance(outer)
    try:
        with guidekit.guided(pipe, guidekit.APG(5.0)):
            assert pipe.__dict__["_guidekit_guidance"] == guidekit.APG(5.0)
        assert pipe.__dict__["_guidekit_guidance"] is outer
    finally:
        pipe.set_guidance(None)


class _Perturbed(TwoPassGuidance):
    """A guidance asking for a pass the bridge does not evaluate."""

    def passes(self) -> frozenset[Pass]:
        return frozenset({UNCOND, Pass("perturbed")})


def test_passes_the_bridge_cannot_evaluate_are_refused_by_name() -> None:
    pipe = build_tiny_pipeline("sd")
    with pytest.raises(ValueError, match="asks for the passes perturbed"):
        pipe.set_guidance(_Perturbed())
    assert COND not in guidekit.CFG(5.0).passes() and guidekit.CFG(1.0).passes() == frozenset()


@pytest.mark.parametrize("style", ["wrapped", "in_place", "regional"])
def test_compiled_denoiser_does_not_recompile_when_rows_change(style: str) -> None:
    """One graph for every row count: CFG (2B rows), Interval (B rows outside it) and AdaptiveGuidance (rows drop
    as samples switch), at batch 2 and 1, after the first pipeline call; with the UNet wrapped by ``torch.compile``,
    compiled in place, and with its transformer blocks compiled in place (``compile_repeated_blocks``, whose blocks
    recompile at the first change of rows without guidekit's marks: 3 graphs over these calls)."""
    torch._dynamo.reset()
    pipe = build_tiny_pipeline("sd")
    unet = pipe.unet
    eager = {}
    methods = [guidekit.CFG(5.0), guidekit.Interval(guidekit.CFG(5.0), sigma_lo=0.5, sigma_hi=3.0),
               guidekit.AdaptiveGuidance(guidekit.CFG(5.0), threshold=1e-6)]
    runs = [(g, b) for b in (2, 1) for g in methods]
    for g, b in runs:
        with guidekit.guided(pipe, g):
            eager[(g, b)] = final_latents(pipe, "sd", batch_size=b, guidance_scale=5.0, steps=4)
    if style == "in_place":
        unet.compile(backend="eager")
    elif style == "regional":
        unet.compile_repeated_blocks(backend="eager")
    else:
        pipe.unet = torch.compile(unet, backend="eager")
    compiled = {m: vars(m).get("_compiled_call_impl") for m in pipe.unet.modules()}
    counters.clear()
    try:
        rows, graphs = set(), []
        for g, b in runs:
            with guidekit.guided(pipe, g) as run:
                out = final_latents(pipe, "sd", batch_size=b, guidance_scale=5.0, steps=4)
            torch.testing.assert_close(out, eager[(g, b)], rtol=1e-5, atol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
            rows.add(run.stats.rows)
        assert graphs == [1] * len(runs), graphs
        assert len(rows) >= 4  # the calls really changed their row counts
        assert {m: vars(m).get("_compiled_call_impl") for m in pipe.unet.modules()} == compiled
        assert "forward" not in vars(unet)
    finally:
        pipe.unet = unet
        for module in unet.modules():
            module._compiled_call_impl = None
        torch._dynamo.reset()


def test_regionally_compiled_flux_keeps_its_graphs() -> None:
    """Flux's blocks compiled in place, under CFG, Interval and CFG at batch 1: the outputs of the eager transformer
    and no graph after the first call. Its negative prompt has one row for a batch of two (the blocks broadcast it),
    so the blocks are compiled with the marks but not size-obliviously."""
    torch._dynamo.reset()
    pipe = build_tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    runs = [(guidekit.CFG(5.0), 2), (guidekit.Interval(guidekit.CFG(5.0), sigma_lo=0.5, sigma_hi=3.0), 2),
            (guidekit.CFG(5.0), 1)]
    call = {"true_cfg_scale": 5.0, "negative_prompt": "blurry", "steps": 4}
    eager = []
    for g, b in runs:
        with guidekit.guided(pipe, g):
            eager.append(final_latents(pipe, "flux", batch_size=b, **call))
    pipe.transformer.compile_repeated_blocks(backend="eager")
    counters.clear()
    try:
        graphs = []
        for (g, b), expected in zip(runs, eager, strict=True):
            with guidekit.guided(pipe, g):
                out = final_latents(pipe, "flux", batch_size=b, **call)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs == graphs[:1] * len(runs), graphs
    finally:
        for module in pipe.transformer.modules():
            module._compiled_call_impl = None
        torch._dynamo.reset()


def test_compiled_denoiser_recompiles_without_the_marks() -> None:
    """The baseline the test above beats: the same compiled UNet called with 4 rows and then 2 recompiles."""
    torch._dynamo.reset()
    pipe = build_tiny_pipeline("sd")
    unet = torch.compile(pipe.unet, backend="eager")
    counters.clear()
    try:
        for n in (4, 2):
            width = pipe.unet.config.cross_attention_dim
            unet(torch.randn(n, 4, 8, 8), 500, encoder_hidden_states=torch.randn(n, 77, width))
        assert counters["stats"]["unique_graphs"] > 1
    finally:
        torch._dynamo.reset()


def test_import_guidance_and_testbed_without_diffusers() -> None:
    code = "import guidekit.guidance, guidekit.testbed, guidekit, sys; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    after = "import guidekit; from diffusers import DiffusionPipeline as P; assert hasattr(P, 'set_guidance')"
    subprocess.run([sys.executable, "-c", after], check=True)


class _RecordsSteps:
    """Mixin of test instruments: notes the solver step of every call."""

    def needs_unconditional(self, ctx, state=None, scale=None):
        self.seen.append(ctx.step)
        return super().needs_unconditional(ctx, state, scale)


@dataclasses.dataclass(frozen=True)
class _CFGSteps(_RecordsSteps, guidekit.CFG):
    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)


@dataclasses.dataclass(frozen=True)
class _PCGSteps(_RecordsSteps, guidekit.PCG):
    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "heun", "dpmpp_2m", "pcg"])
def test_img2img_steps_are_numbered_in_the_whole_plan(scheduler: str) -> None:
    """strength 0.5 of 4 steps runs steps 2 and 3, and the guidance sees them under those numbers (it saw 0 and 1)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from guidekit.bridge.schedulers import make_scheduler

    pipe = StableDiffusionImg2ImgPipeline(**build_tiny_pipeline("sd").components)
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "pcg":
        g = _PCGSteps(5.0)
    else:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        g = _CFGSteps(5.0)
    with guidekit.guided(pipe, g):
        pipe(prompt=tiny_call_kwargs("sd")["prompt"], image=torch.rand(1, 3, 16, 16), strength=0.5,
             num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    assert g.seen == ([2, 2, 3] if scheduler in ("heun", "pcg") else [2, 3]), g.seen


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on the CPU needs a C++ compiler")
def test_inductor_compiles_once_for_one_row_and_two() -> None:
    """Inductor guards its graph on the batch (a convolution layout choice, ``2 <= B <= 15`` on this CPU): a forward
    of one row would compile a second graph. The proxy hands it that row twice, so CFG (2 rows) and Interval (1 row
    outside its interval) share one graph, and the results match the uncompiled UNet."""
    torch._dynamo.reset()
    pipe = build_tiny_pipeline("sd")
    methods = [guidekit.CFG(5.0), guidekit.Interval(guidekit.CFG(5.0), sigma_lo=0.5, sigma_hi=3.0)]
    eager = []
    for g in methods:
        with guidekit.guided(pipe, g):
            eager.append(final_latents(pipe, "sd", batch_size=1, guidance_scale=5.0, steps=3))
    compiled = torch.compile(pipe.unet)
    pipe.unet = compiled
    counters.clear()
    try:
        rows = set()
        for g, reference in zip(methods, eager, strict=True):
            with guidekit.guided(pipe, g) as run:
                out = final_latents(pipe, "sd", batch_size=1, guidance_scale=5.0, steps=3)
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
            rows.add(run.stats.computed["uncond"])
        assert rows == {3, 2}  # Interval ran one of its three steps on the conditional row alone
        assert counters["stats"]["unique_graphs"] == 1
        # The baseline this beats: the same compiled UNet called directly with one row compiles a second graph.
        width = compiled._orig_mod.config.cross_attention_dim
        compiled(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=torch.randn(1, 77, width))
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        pipe.unet = compiled._orig_mod
        torch._dynamo.reset()
