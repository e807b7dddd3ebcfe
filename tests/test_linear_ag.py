"""LinearAG: least-squares recovery of a known linear law, CFG reduction, and the rows it evaluates."""

from __future__ import annotations

import pytest
import torch
from pipelines import count_rows, pipeline

import guidekit
from guidekit import LinearAG, LinearAGFit, PredictionRecorder, fit_linear_ag

CALL = {"prompt": ["a red cat", "a blue dog", "green", "7"], "num_inference_steps": 6, "guidance_scale": 5.0,
        "output_type": "latent"}


def test_fit_recovers_an_exact_linear_law() -> None:
    """If eps_u(k) = 0.3 eps_c(k) - 0.2 eps_c(k-1) + 0.5 eps_u(k-1) exactly, least squares returns those weights."""
    g = torch.Generator().manual_seed(0)
    cond = [torch.randn(50, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    uncond = [torch.randn(50, 4, 8, 8, generator=g, dtype=torch.float64)]
    uncond.append(0.3 * cond[1] - 0.2 * cond[0] + 0.5 * uncond[0])
    uncond.append(torch.randn(50, 4, 8, 8, generator=g, dtype=torch.float64))
    fit = fit_linear_ag(cond, uncond, ("cfg", "linear", "cond"))
    # regressors at step 1: eps_c(0), eps_c(1), eps_u(0)
    assert fit.coefficients[1] == pytest.approx((-0.2, 0.3, 0.5), abs=1e-10)


def test_modes_are_validated() -> None:
    with pytest.raises(ValueError, match=r"modes\[1\]='skip' is not accepted; expected one of cfg, linear, cond"):
        LinearAGFit(("cfg", "skip"))
    with pytest.raises(ValueError, match=r"modes\[1\]='linear' has no coefficients"):
        LinearAGFit(("cfg", "linear"))
    assert LinearAGFit.default_modes(6) == ("cfg", "linear", "cfg", "cond", "cond", "cond")


def _run(pipe, guidance):
    pipe.set_guidance(guidance)
    try:
        out = pipe(**CALL, generator=torch.Generator().manual_seed(0)).images
        return out, pipe.guidance_stats
    finally:
        pipe.set_guidance(None)


def _record(pipe):
    recorder = PredictionRecorder(guidekit.CFG(5.0))
    for seed in range(3):
        pipe.set_guidance(recorder)
        try:
            pipe(**CALL, generator=torch.Generator().manual_seed(seed))
        finally:
            pipe.set_guidance(None)
    return recorder


def test_all_cfg_modes_are_cfg() -> None:
    pipe = pipeline("sd")
    cfg, _ = _run(pipe, guidekit.CFG(5.0))
    same, stats = _run(pipe, LinearAG(guidekit.CFG(5.0), LinearAGFit(("cfg",) * 6)))
    assert torch.equal(same, cfg) and stats.uncond_rows == 24


def test_linear_steps_skip_the_network_and_beat_the_naive_estimate() -> None:
    pipe = pipeline("sd")
    recorder = _record(pipe)
    assert len(recorder.cond) == 6 and recorder.cond[0].shape[0] == 12
    modes = LinearAGFit.default_modes(6)
    fit = fit_linear_ag(recorder.cond, recorder.uncond, modes)
    for k in (1,):  # in-sample, least squares is at least as good as "uncond = cond" (one of its candidates)
        columns = [*recorder.cond[:k + 1], recorder.uncond[0]]
        estimate = sum(w * r.double() for w, r in zip(fit.coefficients[k], columns, strict=True))
        residual = (estimate - recorder.uncond[k].double()).norm()
        assert residual < (recorder.cond[k] - recorder.uncond[k]).double().norm()
    rows, handle = count_rows(pipe, "unet")
    try:
        out, stats = _run(pipe, LinearAG(guidekit.CFG(5.0), fit))
    finally:
        handle.remove()
    assert rows == [8, 4, 8, 4, 4, 4]  # cfg, linear, cfg, cond, cond, cond
    assert stats.uncond_rows_per_sample == [2, 2, 2, 2]
    assert torch.isfinite(out).all()
    cfg, _ = _run(pipe, guidekit.CFG(5.0))
    same_cost = LinearAG(guidekit.CFG(5.0), LinearAGFit(("cfg", "cond", "cfg", "cond", "cond", "cond")))
    dropped, _ = _run(pipe, same_cost)
    # at the same number of evaluations, the regressed branch stays closer to CFG than dropping guidance
    assert (out - cfg).norm() < (dropped - cfg).norm()
