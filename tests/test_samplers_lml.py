"""LML schedulers: the correction against a dense oracle, kappa = 0 against the diffusers base samplers over
whole sampling loops with an exact Gaussian denoiser, configuration, errors, and tiny pipelines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from pipelines import final_latents, pipeline

import guidekit
from guidekit.samplers.lml import (
    DDIMLMScheduler,
    DPMSolverMultistepLMScheduler,
    FlowMatchEulerLMScheduler,
    lml_correction,
)

SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
FLOW_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
BASE = {DDIMLMScheduler: DDIMScheduler, DPMSolverMultistepLMScheduler: DPMSolverMultistepScheduler,
        FlowMatchEulerLMScheduler: FlowMatchEulerDiscreteScheduler}
SHAPE = (3, 2, 4, 4)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dense_oracle(u: torch.Tensor, u_prev: torch.Tensor, lam: float, kappa: float) -> torch.Tensor:
    """``lambda (lambda I + ubar ubar^T)^-1 u`` by a dense solve, rescaled to ``||u||``, one sample at a time."""
    out = []
    for ui, pi in zip(u.flatten(1), u_prev.flatten(1), strict=True):
        ubar = kappa * pi + (1 - kappa) * ui
        g = lam * torch.linalg.solve(lam * torch.eye(len(ui), dtype=u.dtype) + torch.outer(ubar, ubar), ui)
        out.append(g * ui.norm() / g.norm())
    return torch.stack(out).reshape(u.shape)


def direct_formula(u: torch.Tensor, u_prev: torch.Tensor, lam: float, kappa: float) -> torch.Tensor:
    """The textbook form ``u - ubar <u, ubar> / (lambda + ||ubar||^2)``, rescaled, in ``u``'s dtype."""
    ubar = kappa * u_prev + (1 - kappa) * u
    dot = (u * ubar).flatten(1).sum(1).view(-1, *[1] * (u.ndim - 1))
    nb2 = (ubar * ubar).flatten(1).sum(1).view_as(dot)
    g = u - ubar * dot / (lam + nb2)
    return g * u.flatten(1).norm(dim=1).view_as(dot) / g.flatten(1).norm(dim=1).view_as(dot)


def gaussian_x0(x_edm: torch.Tensor, sigma: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact ``E[x0 | x]`` for data ``N(m, s^2)`` (per element) at EDM noise ``sigma``."""
    return m + s**2 / (s**2 + sigma**2) * (x_edm - m)


def vp_model(scheduler: SchedulerMixin, m: torch.Tensor, s: torch.Tensor) -> Model:
    """The exact network output of a VP scheduler (``epsilon`` or ``v_prediction``) at integer timestep ``t``."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = scheduler.alphas_cumprod[int(t)].double()
        alpha, sd = abar.sqrt(), (1 - abar).sqrt()
        x0 = gaussian_x0(x.double() / alpha, sd / alpha, m, s)
        eps = (x.double() - alpha * x0) / sd
        out = alpha * eps - sd * x0 if scheduler.config.prediction_type == "v_prediction" else eps
        return out.to(x.dtype)

    return model


def flow_model(scheduler: SchedulerMixin, m: torch.Tensor, s: torch.Tensor) -> Model:
    """The exact velocity ``eps - x0`` at flow time ``t = timestep / 1000`` (finite at ``t = 1``)."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double() / scheduler.config.num_train_timesteps
        xd = x.double()
        x0 = m + s**2 * (1 - t) * (xd - (1 - t) * m) / (s**2 * (1 - t) ** 2 + t**2)
        return ((xd - (1 - t) * x0) / t - x0).to(x.dtype)

    return model


def sample(scheduler: SchedulerMixin, steps: int = 8, seed: int = 0, **step_kwargs: Any) -> torch.Tensor:
    """A whole sampling loop from seeded noise with the exact Gaussian denoiser; one model call per step."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64)
    s = 0.1 + 1.4 * torch.rand(SHAPE[1:], generator=g, dtype=torch.float64)
    flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or scheduler.config.get("use_flow_sigmas", False)
    model = (flow_model if flow else vp_model)(scheduler, m, s)
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=g)
    noise = torch.Generator().manual_seed(seed + 1)
    extra = {"generator": noise} if step_kwargs.pop("stochastic", False) else {}
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, **extra, **step_kwargs).prev_sample
    return x


# (LM class, configuration, step() keywords)
LOOPS = {
    "ddim": (DDIMLMScheduler, SD_CONFIG, {}),
    "ddim_v_eta": (DDIMLMScheduler, {**SD_CONFIG, "prediction_type": "v_prediction"}, {"eta": 0.5, "stochastic": True}),
    "ddim_clipped": (DDIMLMScheduler, {**SD_CONFIG, "clip_sample": True, "set_alpha_to_one": True},
                     {"use_clipped_model_output": True}),
    "dpmpp_2m": (DPMSolverMultistepLMScheduler, SD_CONFIG, {}),
    "dpm_3_karras": (DPMSolverMultistepLMScheduler, {**SD_CONFIG, "algorithm_type": "dpmsolver", "solver_order": 3,
                                                     "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, {}),
    "dpmpp_2m_flow": (DPMSolverMultistepLMScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                      "flow_shift": 3.0}, {}),
    "flow_euler": (FlowMatchEulerLMScheduler, FLOW_CONFIG, {}),
    "flow_euler_stochastic": (FlowMatchEulerLMScheduler, {**FLOW_CONFIG, "stochastic_sampling": True},
                              {"stochastic": True}),
}


# --- the correction ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lam", "kappa"), [(1e-3, 0.3), (0.5, 0.5), (10.0, 1.0), (2.0, 0.0), (1e-6, 0.9)])
def test_correction_equals_dense_oracle(lam: float, kappa: float, rng: torch.Generator) -> None:
    u = torch.randn(4, 3, 5, generator=rng, dtype=torch.float64)
    u_prev = torch.randn(4, 3, 5, generator=rng, dtype=torch.float64) + 0.5 * u
    out = lml_correction(u, u_prev, lam, kappa)
    # The oracles' own rounding grows with the condition number (lambda + ||ubar||^2) / lambda of the solve.
    ubar = kappa * u_prev + (1 - kappa) * u
    tol = 1e-14 * (1 + ubar.flatten(1).square().sum(1).max().item() / lam)
    torch.testing.assert_close(out, dense_oracle(u, u_prev, lam, kappa), rtol=tol, atol=tol)
    torch.testing.assert_close(out, direct_formula(u, u_prev, lam, kappa), rtol=tol, atol=tol)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), u.flatten(1).norm(dim=1), rtol=1e-14, atol=0)


def test_correction_damping_interpolates_between_projection_and_identity(rng: torch.Generator) -> None:
    """Large lambda leaves u; lambda -> 0 removes the component along ubar (kappa = 1: along u_prev)."""
    u = torch.randn(2, 16, generator=rng, dtype=torch.float64)
    u_prev = torch.randn(2, 16, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(lml_correction(u, u_prev, 1e12, 1.0), u, rtol=1e-9, atol=1e-12)
    projected = lml_correction(u, u_prev, 1e-12, 1.0)
    assert (projected * u_prev).sum(1).abs().max() < 1e-9
    deviations = [(lml_correction(u, u_prev, lam, 0.5) - u).norm().item() for lam in (1e-3, 1.0, 10.0, 1e3)]
    assert deviations == sorted(deviations, reverse=True) and deviations[-1] > 0


def test_correction_is_identity_at_kappa_zero_first_step_and_one_dimension(rng: torch.Generator) -> None:
    u = torch.randn(2, 4, 64, 64, generator=rng)  # an SD-1.5 latent: ||u||^2 / lambda ~ 1.6e7
    u_prev = torch.randn(2, 4, 64, 64, generator=rng)
    assert torch.equal(lml_correction(u, u_prev, 1e-3, 0.0), u)
    assert torch.equal(lml_correction(u, None, 1e-3, 0.7), u)
    scalars = torch.randn(5, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(lml_correction(scalars, -scalars, 1e-3, 0.7), scalars, rtol=1e-14, atol=0)
    zero = lml_correction(torch.zeros(2, 3), torch.ones(2, 3), 1e-3, 0.5)
    assert torch.equal(zero, torch.zeros(2, 3))


def test_direct_formula_in_float32_loses_the_kappa_zero_identity(rng: torch.Generator) -> None:
    """Why the correction is not evaluated as written: at lambda << ||u||^2 the float32 direct form cancels."""
    u = torch.randn(1, 4, 64, 64, generator=rng)
    direct = direct_formula(u, u, 1e-3, 0.0)
    assert ((direct - u).norm() / u.norm()).item() > 1e-2
    assert torch.equal(lml_correction(u, u, 1e-3, 0.0), u)


def test_correction_keeps_dtype_and_rejects_bad_arguments() -> None:
    u = torch.randn(2, 3, dtype=torch.bfloat16)
    assert lml_correction(u, u, 1e-2, 0.5).dtype == torch.bfloat16
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"lam={lam!r} is not accepted; expected a finite number in \(0.0, inf\)"):
            lml_correction(u, None, lam, 0.0)
    for kappa in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"kappa={kappa!r} is not accepted; expected .* in \[0.0, 1.0\]"):
            lml_correction(u, None, 1.0, kappa)
    with pytest.raises(ValueError, match=r"u_prev of shape \(3, 3\) is not accepted; expected u's shape \(2, 3\)"):
        lml_correction(u, torch.zeros(3, 3), 1.0, 0.5)


# --- the schedulers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOOPS)
def test_kappa_zero_equals_base_sampler(name: str) -> None:
    cls, config, step_kwargs = LOOPS[name]
    base = sample(BASE[cls].from_config(config), **step_kwargs)
    lml = sample(cls.from_config(config, lml_lambda=1e-3, lml_kappa=0.0), **step_kwargs)
    assert torch.isfinite(base).all() and base.abs().max() > 0
    assert torch.equal(lml, base)


@pytest.mark.parametrize("name", LOOPS)
def test_kappa_positive_deviates_less_as_damping_grows(name: str) -> None:
    cls, config, step_kwargs = LOOPS[name]
    base = sample(BASE[cls].from_config(config), **step_kwargs)
    deviation = []
    for lam in (1e-3, 1e2, 1e4, 1e8):
        run = sample(cls.from_config(config, lml_lambda=lam, lml_kappa=0.5), **step_kwargs)
        deviation.append((run - base).abs().max().item())
    scale = base.abs().max().item()
    assert deviation[0] > 1e-2 * scale
    assert deviation == sorted(deviation, reverse=True)
    assert deviation[-1] < 1e-5 * scale


def test_set_timesteps_forgets_the_previous_direction() -> None:
    scheduler = DDIMLMScheduler.from_config(SD_CONFIG, lml_kappa=0.5)
    first = sample(scheduler)
    assert scheduler._lml_prev is not None
    assert torch.equal(sample(scheduler), first)


def test_from_config_round_trips_and_takes_overrides(tmp_path: Any) -> None:
    sd, flow = DDIMScheduler(**SD_CONFIG), FlowMatchEulerDiscreteScheduler(**FLOW_CONFIG)
    ddim = DDIMLMScheduler.from_config(sd.config)
    dpm = DPMSolverMultistepLMScheduler.from_config(sd.config, lml_lambda=5e-4, lml_kappa=0.25)  # DDIM keys ignored
    euler = FlowMatchEulerLMScheduler.from_config(flow.config)
    assert (ddim.config.lml_lambda, ddim.config.lml_kappa, ddim.config.steps_offset) == (1e-3, 0.0, 1)
    assert (dpm.config.lml_lambda, dpm.config.lml_kappa, dpm.config.beta_schedule) == (5e-4, 0.25, "scaled_linear")
    assert (euler.config.lml_lambda, euler.config.lml_kappa, euler.config.shift) == (1e-2, 0.0, 3.0)
    dpm.save_config(tmp_path)
    loaded = DPMSolverMultistepLMScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in dpm.config.items() if not k.startswith("_")}
    assert DDIMLMScheduler.from_config(dpm.config).config.lml_kappa == 0.25
    assert DDIMScheduler.from_config(ddim.config).config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("cls", list(BASE))
def test_bad_parameters_raise(cls: type) -> None:
    with pytest.raises(ValueError, match=r"lml_lambda=0 is not accepted; expected a finite number in \(0.0, inf\)"):
        cls(lml_lambda=0)
    with pytest.raises(ValueError, match=r"lml_kappa=1.5 is not accepted; expected a finite number in \[0.0, 1.0\]"):
        cls.from_config(cls().config, lml_kappa=1.5)


def test_dpm_solver_sde_variants_are_refused() -> None:
    with pytest.raises(ValueError, match=r"algorithm_type='sde-dpmsolver\+\+' is not accepted by "
                                         r"DPMSolverMultistepLMScheduler; expected one of dpmsolver\+\+, dpmsolver"):
        DPMSolverMultistepLMScheduler(algorithm_type="sde-dpmsolver++")


# --- in pipelines ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "cls"), [("sd", DDIMLMScheduler), ("sd", DPMSolverMultistepLMScheduler),
                                             ("sdxl", DDIMLMScheduler), ("sdxl", DPMSolverMultistepLMScheduler),
                                             ("dit", DDIMLMScheduler), ("dit", DPMSolverMultistepLMScheduler),
                                             ("sd3", FlowMatchEulerLMScheduler)])
def test_pipelines_native_and_guided(family: str, cls: type) -> None:
    pipe = pipeline(family)
    original = pipe.scheduler
    try:
        pipe.scheduler = BASE[cls].from_config(original.config)
        base = final_latents(pipe, family, guidance_scale=5.0, batch_size=2)
        pipe.scheduler = cls.from_config(original.config)
        assert torch.equal(final_latents(pipe, family, guidance_scale=5.0, batch_size=2), base)
        pipe.scheduler = cls.from_config(original.config, lml_kappa=0.5)
        native = final_latents(pipe, family, guidance_scale=5.0, batch_size=2)
        pipe.set_guidance(guidekit.CFG(5.0))
        guided = final_latents(pipe, family, guidance_scale=5.0, batch_size=2)
        pipe.set_guidance(guidekit.Interval(guidekit.APG(5.0), sigma_lo=0.28, sigma_hi=5.42))
        apg = final_latents(pipe, family, batch_size=2)
    finally:
        pipe.set_guidance(None)
        pipe.scheduler = original
    assert torch.isfinite(native).all() and torch.isfinite(apg).all()
    assert (native - base).abs().max() > 1e-3 * base.abs().max()
    assert (guided - native).abs().max().item() <= 1e-5
