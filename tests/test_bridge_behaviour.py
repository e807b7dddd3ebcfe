"""What the bridge computes and skips: Interval, Adaptive Guidance, row counts seen by the real network."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pipelines import (
    FLOW_FAMILIES,
    VP_FAMILIES,
    FirstSampleOnly,
    count_rows,
    final_latents,
    guided_latents,
    pipeline,
    scheduler,
)

import guidekit
from guidekit.bridge.families import family_of_class
from guidekit.bridge.proxy import GuidedDenoiser
from guidekit.bridge.schedulers import make_scheduler


def _guided(pipe, guidance, family="sd", **kwargs):
    return guided_latents(pipe, family, guidance, **kwargs)


@pytest.mark.parametrize("family", ["sd", "dit", "sd3"])
def test_empty_interval_is_conditional_only_sampling(family: str) -> None:
    pipe = pipeline(family)
    denoiser = "unet" if family == "sd" else "transformer"
    conditional_only = final_latents(pipe, family, guidance_scale=1.0, batch_size=2)
    rows, handle = count_rows(pipe, denoiser)
    try:
        out, stats = _guided(pipe, guidekit.Interval(guidekit.CFG(5.0), 1e4, 2e4), family, guidance_scale=5.0,
                             batch_size=2)
    finally:
        handle.remove()
    assert rows == [2] * 4  # the network never saw an unconditional row
    assert stats.uncond_rows == 0 and stats.uncond_rows_skipped == 8
    assert (out - conditional_only).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["sd", "dit", "sd3"])
def test_covering_interval_is_cfg(family: str) -> None:
    pipe = pipeline(family)
    native = final_latents(pipe, family, guidance_scale=5.0, batch_size=2)
    out, stats = _guided(pipe, guidekit.Interval(guidekit.CFG(5.0), 0.0, float("inf")), family, guidance_scale=5.0,
                         batch_size=2)
    assert stats.uncond_rows == stats.cond_rows
    assert (out - native).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("family", "scheduler_name"), [("sd", None), ("sd", "heun"), ("dit", None), ("sd3", None),
                                                     ("flux", None), ("cogview4", None), ("wan22", None)])
def test_cfg_hands_the_pipeline_batch_through_as_the_per_call_path_would(family: str, scheduler_name: str | None,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain CFG at the pipeline's weight is planned once: after the first step the proxy hands the pipeline's batch
    (or, on Flux, CogView4 and Wan, each of its two calls) to the network and back without asking the guidance.
    Interval(CFG) over every sigma asks at each call and comes to the same plan. Both leave the combination to the
    pipeline: the native latents bitwise, the same stats. On Wan 2.2 the second expert's own weight differs, so its
    calls take the per-call path and combine at the guidance's weight."""
    steady: list[int] = []
    original = GuidedDenoiser._steady_call
    monkeypatch.setattr(GuidedDenoiser, "_steady_call", lambda self, a, k: steady.append(1) or original(self, a, k))
    pipe = pipeline(family)
    scale = {family_of_class(type(pipe)).scale_arg: 5.0, "steps": 4}
    if family == "wan22":  # enough steps for two on the first expert
        scale.update(guidance_scale_2=3.0, steps=8)
    saved = pipe.scheduler
    if scheduler_name is not None:
        pipe.scheduler = scheduler(pipe, scheduler_name)
    try:
        out, stats = _guided(pipe, guidekit.CFG(5.0), family, batch_size=2, **scale)
        calls = len(steady)
        per_call, per_call_stats = _guided(pipe, guidekit.Interval(guidekit.CFG(5.0), 0.0, float("inf")), family,
                                           batch_size=2, **scale)
        native = final_latents(pipe, family, batch_size=2, **{**scale, "guidance_scale_2": 5.0}
                               if family == "wan22" else scale)
    finally:
        pipe.scheduler = saved
    separate = family_of_class(type(pipe)).separate_calls
    steps = [e for e, _ in stats.steps]
    assert calls == (1 + separate) * (steps.count(0) - 1) > 0 and len(steady) == calls  # never for Interval
    assert (family == "wan22") == (1 in steps)
    assert torch.equal(out, per_call)
    if family == "wan22":  # the second expert's calls move the unconditional output to the guidance's weight
        torch.testing.assert_close(out, native, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, native)
    assert dataclasses.asdict(stats) == dataclasses.asdict(per_call_stats)
    assert stats.uncond_rows_per_sample == [len(stats.steps)] * 2


def test_interval_under_heun_follows_the_per_step_rule() -> None:
    """Both calls of a Heun step follow the decision at the step's starting sigma (guidance-interval code)."""
    pipe = pipeline("sd")
    original = pipe.scheduler
    pipe.scheduler = make_scheduler("heun", original.config)
    try:
        pipe.scheduler.set_timesteps(6)
        sigmas = [float(s) for s in pipe.scheduler.sigmas[::2]]  # step starts s_0..s_5 (the rest duplicated) and 0
        lo, hi = (sigmas[2] + sigmas[3]) / 2, sigmas[1]  # guide steps 1 and 2; step 2's corrector is below lo
        rows, handle = count_rows(pipe, "unet")
        try:
            _guided(pipe, guidekit.Interval(guidekit.CFG(5.0), lo, hi), steps=6, guidance_scale=5.0)
        finally:
            handle.remove()
    finally:
        pipe.scheduler = original
    # Written out by hand: steps 0..5, two calls each except the last; steps 1 and 2 guided.
    expected = [1, 1,  2, 2,  2, 2,  1, 1,  1, 1,  1]
    assert rows == expected


class _RecordingAG(guidekit.AdaptiveGuidance):
    """Adaptive guidance that records gamma_t of every call (test instrument)."""

    def similarity(self, cond, uncond, ctx):
        gamma = super().similarity(cond, uncond, ctx)
        self.record.append(gamma.tolist())
        return gamma


def test_rows_follow_partial_guidance_per_sample() -> None:
    """Samples switch at different steps; the switch steps follow the paper's rule applied by hand to gamma_t
    recorded in a never-switching run, and the network sees exactly the rows still guided."""
    pipe = pipeline("sd")
    call = {"prompt": ["a red cat", "a blue dog", "green"], "num_inference_steps": 5, "guidance_scale": 5.0,
            "output_type": "latent"}
    probe = _RecordingAG(guidekit.CFG(5.0), threshold=1.0)
    probe.record = []
    pipe.set_guidance(probe)
    try:
        pipe(**call, generator=torch.Generator().manual_seed(0))
    finally:
        pipe.set_guidance(None)
    gammas = probe.record  # gammas[step][sample]

    def rows_per_sample(threshold: float) -> list[int]:
        # guided up to and including the first step with gamma >= threshold
        return [next((k + 1 for k, g in enumerate(gammas) if g[i] >= threshold), len(gammas)) for i in range(3)]

    threshold = max(sorted({g for step in gammas for g in step}), key=lambda t: len(set(rows_per_sample(t))))
    expected = rows_per_sample(threshold)
    assert len(set(expected)) > 1, "the tiny model should let samples switch at different steps"
    rows, handle = count_rows(pipe, "unet")
    pipe.set_guidance(guidekit.AdaptiveGuidance(guidekit.CFG(5.0), threshold=threshold))
    try:
        pipe(**call, generator=torch.Generator().manual_seed(0))
        stats = pipe.guidance_stats
    finally:
        pipe.set_guidance(None)
        handle.remove()
    assert stats.uncond_rows_per_sample == expected
    assert rows == [3 + sum(n > step for n in expected) for step in range(5)]
    assert stats.rows == sum(rows)


def test_adaptive_guidance_threshold_one_is_cfg_and_paper_threshold_saves_rows() -> None:
    pipe = pipeline("sd")
    native = final_latents(pipe, "sd", guidance_scale=5.0, batch_size=3, steps=8)
    same, stats_one = _guided(pipe, guidekit.AdaptiveGuidance(guidekit.CFG(5.0), threshold=1.0), guidance_scale=5.0,
                              batch_size=3, steps=8)
    assert (same - native).abs().max().item() <= 1e-5
    assert stats_one.uncond_rows_per_sample == [8, 8, 8]
    _, stats = _guided(pipe, guidekit.AdaptiveGuidance(guidekit.CFG(5.0), threshold=0.991), guidance_scale=5.0,
                       batch_size=3, steps=8)
    assert all(n < 8 for n in stats.uncond_rows_per_sample)
    assert stats.uncond_rows_skipped == 24 - sum(stats.uncond_rows_per_sample)


def test_adaptive_switch_equals_guiding_the_first_steps_only() -> None:
    """AG that switches every sample after step 0 equals an interval holding only step 0."""
    pipe = pipeline("sd")
    ag, stats = _guided(pipe, guidekit.AdaptiveGuidance(guidekit.CFG(5.0), threshold=0.991), guidance_scale=5.0,
                        batch_size=2, steps=6)
    assert stats.uncond_rows_per_sample == [1, 1]
    pipe.scheduler.set_timesteps(6)
    t0, t1 = (int(t) for t in pipe.scheduler.timesteps[:2])
    abar = pipe.scheduler.alphas_cumprod
    sigma = [float(((1 - abar[t]) / abar[t]) ** 0.5) for t in (t0, t1)]
    first_only, _ = _guided(pipe, guidekit.Interval(guidekit.CFG(5.0), (sigma[0] + sigma[1]) / 2, float("inf")),
                            guidance_scale=5.0, batch_size=2, steps=6)
    assert (ag - first_only).abs().max().item() <= 1e-5


def test_stats_per_call_and_cfg_zero_star_skips_zeroed_step() -> None:
    pipe = pipeline("sd3")
    _, stats = _guided(pipe, guidekit.CFGZeroStar(4.0, zero_init_steps=1), "sd3", guidance_scale=4.0, batch_size=2,
                       steps=5)
    assert stats.model_calls == 5 and stats.cond_rows == 10
    assert stats.uncond_rows == 8 and stats.uncond_rows_skipped == 2
    assert stats.uncond_rows_per_sample == [4, 4]


def test_guidance_state_resets_between_calls() -> None:
    """APG's momentum is per call: two identical calls give identical results."""
    pipe = pipeline("sd")
    g = guidekit.APG(5.0)
    first, _ = _guided(pipe, g, guidance_scale=5.0)
    second, _ = _guided(pipe, g, guidance_scale=5.0)
    assert torch.equal(first, second)


@pytest.mark.parametrize("family", VP_FAMILIES + FLOW_FAMILIES)
def test_per_sample_rows_give_per_sample_results(family: str) -> None:
    """Guiding only sample 0: it matches native CFG, sample 1 matches native conditional-only sampling."""
    pipe = pipeline(family)
    cfg = final_latents(pipe, family, guidance_scale=5.0, batch_size=2)
    conditional_only = final_latents(pipe, family, guidance_scale=1.0, batch_size=2)
    out, stats = _guided(pipe, FirstSampleOnly(5.0), family, guidance_scale=5.0, batch_size=2)
    assert stats.uncond_rows_per_sample == [4, 0]
    # A 3-row batch rounds differently from a 4-row one: 1e-5 relative to the latents (float32 rounding,
    # while guided and conditional-only results differ by O(1)); the unguided sample's rows are unchanged.
    assert (out[0] - cfg[0]).abs().max().item() <= 1e-5 * cfg[0].abs().max().item()
    assert (cfg[0] - conditional_only[0]).abs().max().item() > 0.1
    assert torch.equal(out[1], conditional_only[1])
