"""Conversions between eps, v, x0 and flow velocity against the schedulers' own formulas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from guidekit.parameterization import SPACES, NoiseLevel


@pytest.mark.parametrize("level", [NoiseLevel.from_sigma(0.05), NoiseLevel.from_sigma(3.0),
                                   NoiseLevel.from_flow_time(0.3), NoiseLevel.from_flow_time(0.97)])
@pytest.mark.parametrize("src", SPACES)
@pytest.mark.parametrize("dst", SPACES)
def test_round_trip(level: NoiseLevel, src: str, dst: str) -> None:
    g = torch.Generator().manual_seed(0)
    x_t, y = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g,
                                                                                   dtype=torch.float64)
    back = level.convert(level.convert(y, x_t, src, dst), x_t, dst, src)
    torch.testing.assert_close(back, y, rtol=1e-10, atol=1e-10)


def test_definitions_from_x0_and_eps() -> None:
    """x_t = alpha x0 + s eps; v = alpha eps - s x0 (VP); flow velocity = eps - x0."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    for level in (NoiseLevel.from_sigma(0.7), NoiseLevel.from_flow_time(0.4)):
        x_t = level.alpha * x0 + level.s * eps
        torch.testing.assert_close(level.to_x0(eps, x_t, "eps"), x0)
        torch.testing.assert_close(level.from_x0(x0, x_t, "eps"), eps)
    vp = NoiseLevel.from_sigma(0.7)
    x_t = vp.alpha * x0 + vp.s * eps
    torch.testing.assert_close(vp.from_x0(x0, x_t, "v"), vp.alpha * eps - vp.s * x0)
    flow = NoiseLevel.from_flow_time(0.4)
    x_t = flow.alpha * x0 + flow.s * eps
    torch.testing.assert_close(flow.from_x0(x0, x_t, "flow"), eps - x0)
    assert flow.sigma == pytest.approx(0.4 / 0.6)
    assert vp.sigma == pytest.approx(0.7)


def test_vp_matches_diffusers_ddim_x0() -> None:
    """DDIM's own pred_original_sample for eps and v models equals to_x0 at alphas_cumprod[t]."""
    g = torch.Generator().manual_seed(2)
    x_t, out = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6, generator=g)
    for prediction, space in (("epsilon", "eps"), ("v_prediction", "v")):
        sched = DDIMScheduler(prediction_type=prediction, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False)
        sched.set_timesteps(10)
        t = int(sched.timesteps[3])
        expected = sched.step(out, t, x_t).pred_original_sample
        level = NoiseLevel.from_alphas_cumprod(float(sched.alphas_cumprod[t]))
        torch.testing.assert_close(level.to_x0(out, x_t, space), expected, rtol=1e-5, atol=1e-5)


def test_flow_matches_diffusers_flow_euler() -> None:
    """A flow-Euler step equals x_t + (t' - t) v with v recovered from x0 through the conversions."""
    g = torch.Generator().manual_seed(3)
    x_t, v = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    t, t_next = float(sched.sigmas[2]), float(sched.sigmas[3])
    sched._step_index = 2
    expected = sched.step(v, sched.timesteps[2], x_t).prev_sample
    level = NoiseLevel.from_flow_time(t)
    x0 = level.to_x0(v, x_t, "flow")
    eps = level.from_x0(x0, x_t, "eps")
    torch.testing.assert_close((1 - t_next) * x0 + t_next * eps, expected, rtol=1e-5, atol=1e-5)


def test_pure_noise_flow_is_finite() -> None:
    level = NoiseLevel.from_flow_time(1.0)
    assert math.isinf(level.sigma)
    x_t, v = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.isfinite(level.to_x0(v, x_t, "flow")).all()
    assert torch.isfinite(level.from_x0(level.to_x0(v, x_t, "flow"), x_t, "v")).all()
