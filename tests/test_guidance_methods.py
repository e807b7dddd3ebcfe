"""Guidance maths against oracles: algebraic reductions, diffusers' guiders and the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_context
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.classifier_free_zero_star_guidance import ClassifierFreeZeroStarGuidance
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from guidekit import APG, CFG, AdaptiveGuidance, CFGZeroStar, Interval, Scheduled
from guidekit.guidance import UNCOND, apply_guidance


def _pair(shape=(3, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))


def test_cfg_is_ho_salimans() -> None:
    x, c, u = _pair()
    ctx = make_context(x)
    torch.testing.assert_close(CFG(5).combine(c, u, ctx), u + 5 * (c - u))


def test_cfg_rescale_model_space_equals_diffusers() -> None:
    x, c, u = _pair()
    ctx = make_context(x)
    expected = rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=0.7)
    torch.testing.assert_close(CFG(7.5, rescale=0.7, rescale_space="model").combine(c, u, ctx), expected)


def test_cfg_rescale_v_space_is_rescale_of_v() -> None:
    """Default rescale runs on v-predictions (Lin et al.): converting the eps inputs to v first."""
    x, c, u = _pair()
    ctx = make_context(x, space="eps")
    cv, uv = ctx.to_space(c, "v"), ctx.to_space(u, "v")
    expected = ctx.from_space(rescale_noise_cfg(uv + 7.5 * (cv - uv), cv, guidance_rescale=0.7), "v")
    out = CFG(7.5, rescale=0.7).combine(c, u, ctx)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    plain = CFG(7.5, rescale=0.7, rescale_space="model").combine(c, u, ctx)
    assert (out - plain).abs().max() > 1e-3  # the space matters for a non-linear method


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float64, 0.0, 1e-12), (torch.float32, 1e-6, 1e-6)])
def test_apg_reduces_to_cfg(dtype: torch.dtype, rtol: float, atol: float) -> None:
    """eta = 1, r = 0, beta = 0 is CFG: exactly in float64, to float32 rounding (1 ulp) in float32."""
    x, c, u = (t.to(dtype) for t in _pair())
    ctx = make_context(x)
    apg = APG(4.0, eta=1.0, norm_threshold=0.0, momentum=0.0)
    torch.testing.assert_close(apg.combine(c, u, ctx, apg.init_state(len(x))), CFG(4.0).combine(c, u, ctx),
                               rtol=rtol, atol=atol)


def _apg_paper(cond: torch.Tensor, uncond: torch.Tensor, w: float, eta: float, r: float, beta: float,
               running: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sadat et al. Algorithm 1, written from the paper for this test: one evaluation, per sample."""
    out, new_running = [], []
    for i in range(cond.shape[0]):
        dc, du = cond[i].double(), uncond[i].double()
        avg = (dc - du) + beta * running[i].double()
        new_running.append(avg)
        diff = avg * min(1.0, r / avg.norm().item()) if r > 0 else avg
        unit = dc / dc.norm()
        par = (diff * unit).sum() * unit
        out.append(dc + (w - 1) * ((diff - par) + eta * par))
    return torch.stack(out), torch.stack(new_running)


def test_apg_sdxl_settings_match_paper_formula_over_steps() -> None:
    """APG(w, eta=0, r=15, beta=-0.5) in x0 space over 4 evaluations equals the formula above."""
    apg = APG(5.0, eta=0.0, norm_threshold=15.0, momentum=-0.5)
    state = apg.init_state(3)
    running = torch.zeros(3, 4, 8, 8, dtype=torch.float64)
    for step in range(4):
        x, c, u = _pair(seed=10 + step)
        c, u = 3 * c, 3 * u  # norms above r so the clamp is active
        ctx = make_context(x, space="eps", sigma=2.0 - 0.4 * step, step=step)
        got = ctx.to_space(apg.combine(c, u, ctx, state), "x0")
        ref, running = _apg_paper(ctx.to_space(c, "x0"), ctx.to_space(u, "x0"), 5.0, 0.0, 15.0, -0.5, running)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_apg_equals_diffusers_guider_original_formulation_at_w_minus_1() -> None:
    """diffusers' APG with use_original_formulation=True and scale w-1 is the paper formula in its space."""
    apg = APG(5.0, eta=0.3, norm_threshold=15.0, momentum=-0.5, space="model")
    state = apg.init_state(3)
    buffer = MomentumBuffer(-0.5)
    for step in range(3):
        x, c, u = _pair(seed=20 + step)
        c, u = 3 * c, 3 * u
        ctx = make_context(x, step=step)
        ours = apg.combine(c, u, ctx, state)
        theirs = normalized_guidance(c, u, 4.0, buffer, 0.3, 15.0, True)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_diffusers_apg_defaults_differ_from_paper() -> None:
    """diffusers' default APG (eta=1, no momentum, r=15, D_u + w P(Delta)) is not the paper's APG."""
    x, c, u = _pair(seed=30)
    c, u = 3 * c, 3 * u
    ctx = make_context(x)
    paper = APG(5.0, space="model")
    ours = paper.combine(c, u, ctx, paper.init_state(3))
    theirs = normalized_guidance(c, u, 5.0, None, 1.0, 15.0, False)
    assert (ours - theirs).abs().max() > 0.5
    # With eta=1 and no clamp hit, diffusers' default is uncond + w * diff = plain CFG; the paper's is too.
    small_c, small_u = c / 100, u / 100
    torch.testing.assert_close(normalized_guidance(small_c, small_u, 5.0, None, 1.0, 15.0, False),
                               CFG(5.0).combine(small_c, small_u, ctx), rtol=1e-5, atol=1e-6)


def test_cfg_zero_star_equals_diffusers_guider() -> None:
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)
    ours = CFGZeroStar(4.0, zero_init_steps=1)
    for step in range(3):
        x, c, u = _pair(seed=40 + step)
        ctx = make_context(x, space="flow", step=step)
        guider.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(500))
        expected = guider.forward(c, u).pred
        mask = ours.needs(ctx, None)[UNCOND]
        got = apply_guidance(ours, c, {UNCOND: u[mask]}, {UNCOND: mask}, ctx, None)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert bool(mask.any()) == (step >= 1)  # the zeroed step needs no unconditional row


def test_weighted_guidance_at_one_needs_no_unconditional() -> None:
    x, _, _ = _pair()
    for g in (CFG(1.0), APG(1.0), CFGZeroStar(1.0, zero_init_steps=0)):
        assert not g.uses_unconditional
        assert not g.needs_unconditional(make_context(x)).any()


def test_constant_cfg_weight_is_what_cfg_asks_and_weighs_at_every_call() -> None:
    """Plain CFG declares its weight constant (the bridge then skips asking at each call): at every noise level and
    step, every sample needs the unconditional pass and ``cfg_weight`` is that weight. Everything that decides per
    call, per sample or reshapes the combination declares nothing."""
    g = CFG(5.0)
    assert g.constant_cfg_weight() == 5.0
    for step, sigma in enumerate([0.0, 0.03, 1.0, 14.6, float("inf")]):
        ctx = make_context(torch.zeros(3, 4, 8, 8), sigma=sigma, step=step)
        assert g.needs(ctx, None)[UNCOND].tolist() == [True] * 3
        assert g.cfg_weight(ctx, None) == 5.0

    class PerSample(CFG):  # chooses its samples itself
        def needs_unconditional(self, ctx, state=None, scale=None):
            return torch.arange(ctx.rows.shape[0]) == 0

    for other in (CFG(1.0), CFG(5.0, rescale=0.7), PerSample(5.0), Interval(CFG(5.0), 0.0, float("inf")),
                  Scheduled(CFG(5.0), "linear"), APG(5.0), CFGZeroStar(5.0), AdaptiveGuidance(CFG(5.0))):
        assert other.constant_cfg_weight() is None, other


def test_interval_decides_on_step_sigma() -> None:
    x, c, u = _pair()
    g = Interval(CFG(3), sigma_lo=0.5, sigma_hi=2.0)
    assert g.needs_unconditional(make_context(x, sigma=2.0)).all()
    assert not g.needs_unconditional(make_context(x, sigma=0.5)).any()
    assert not g.needs_unconditional(make_context(x, sigma=2.0001)).any()
    ctx = make_context(x, sigma=1.0)
    torch.testing.assert_close(g.combine(c, u, ctx), CFG(3).combine(c, u, ctx))


def test_adaptive_switches_per_sample_and_permanently() -> None:
    g = AdaptiveGuidance(CFG(3), threshold=0.9)
    state = g.init_state(3)
    x, c, _ = _pair()
    u = c.clone()
    u[0] = -c[0]  # sample 0 disagrees (cos = -1); samples 1 and 2 agree (cos = 1)
    ctx = make_context(x, space="eps", step=0)
    assert g.needs_unconditional(ctx, state).all()
    g.combine(c, u, ctx, state)
    assert g.needs_unconditional(make_context(x, step=0, corrector=True), state).all()  # same step: still guided
    assert g.needs_unconditional(make_context(x, step=1), state).tolist() == [True, False, False]
    assert g.needs_unconditional(make_context(x, step=5), state).tolist() == [True, False, False]
    assert g.needs_unconditional(make_context(x, step=5), g.init_state(3)).all()  # a new call starts afresh


def test_adaptive_similarity_is_cosine_of_eps() -> None:
    x, c, u = _pair()
    g = AdaptiveGuidance(CFG(3))
    ctx = make_context(x, space="v")
    ce, ue = ctx.to_space(c, "eps").flatten(1), ctx.to_space(u, "eps").flatten(1)
    torch.testing.assert_close(g.similarity(c, u, ctx).float(), torch.nn.functional.cosine_similarity(ce, ue))


# Shapes of REFERENCE's table, written here independently: f(tau, w) with tau = 1 at pure noise.
_TABLE = {
    "linear": lambda tau, w: 2 * w * (1 - tau),
    "inverse_linear": lambda tau, w: 2 * w * tau,
    "cosine": lambda tau, w: w * (1 + math.cos(math.pi * tau)),
    "sine": lambda tau, w: w * (1 - math.cos(math.pi * tau)),
    "v_shape": lambda tau, w: 2 * w * abs(1 - 2 * tau),
    "lambda_shape": lambda tau, w: 2 * w * (1 - abs(1 - 2 * tau)),
}


@pytest.mark.parametrize("name", sorted(_TABLE))
def test_schedule_mean_equals_constant_weight(name: str) -> None:
    g = Scheduled(CFG(7.5), name)
    n = 2000
    mean = sum(g.weight((i + 0.5) / n) for i in range(n)) / n  # midpoint rule on a uniform grid
    assert mean == pytest.approx(7.5, abs=1e-4)


@pytest.mark.parametrize("name", sorted(_TABLE))
def test_schedule_values_match_table_on_ho_salimans_weight(name: str) -> None:
    g = Scheduled(CFG(7.5), name)
    for tau in (0.0, 0.5, 1.0):
        assert g.weight(tau) == pytest.approx(1 + _TABLE[name](tau, 6.5), abs=1e-12)


def test_parametrised_schedules() -> None:
    from scipy.integrate import quad

    clamp = Scheduled(CFG(7.5), "clamp_linear", c=2.0)
    assert clamp.weight(1.0) == pytest.approx(3.0)  # the floor c on w - 1
    assert clamp.weight(0.0) == pytest.approx(14.0)
    pcs = Scheduled(CFG(7.5), "pcs", s=2.0)
    assert pcs.weight(1.0) == pytest.approx(1.0)
    assert pcs.weight(0.0) == pytest.approx(1 + 6.5 * (1 - math.cos(math.pi)) / 2)
    n = 4000
    mean = sum(pcs.weight((i + 0.5) / n) for i in range(n)) / n
    exact = 1 + 6.5 * quad(lambda tau: (1 - math.cos(math.pi * (1 - tau) ** 2)) / 2, 0, 1)[0]
    assert mean == pytest.approx(exact, abs=1e-5)


def test_scheduled_weight_reaches_inner_and_skips_at_one() -> None:
    x, c, u = _pair()
    g = Scheduled(CFG(7.5), "linear")
    ctx = make_context(x, tau=1.0)  # linear schedule: weight 1 at pure noise
    assert not g.needs_unconditional(ctx).any()
    ctx = make_context(x, tau=0.25)
    torch.testing.assert_close(g.combine(c, u, ctx), CFG(g.weight(0.25)).combine(c, u, ctx))


def test_composition() -> None:
    x, c, u = _pair()
    g = AdaptiveGuidance(Interval(Scheduled(APG(4.0), "cosine"), 0.5, 3.0), threshold=0.999)
    state = g.init_state(3)
    ctx = make_context(x, sigma=1.0, tau=0.3)
    assert g.needs_unconditional(ctx, state).all()
    inner = APG(Scheduled(APG(4.0), "cosine").weight(0.3))
    torch.testing.assert_close(g.combine(c, u, ctx, state), inner.combine(c, u, ctx, inner.init_state(3)))
