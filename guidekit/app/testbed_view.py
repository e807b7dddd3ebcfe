"""The Gaussian-mixture testbed tab of the demo: CFG with DDIM, CFG with DDPM, PCG and autoguidance against exact
densities and exact end points.

Bradley & Nakkiran 2024 ("Classifier-Free Guidance is a Predictor-Corrector", arXiv 2408.09000) show that CFG at
weight ``w`` does not sample the ``w``-powered distribution ``p(x | c)^w p(x)^(1 - w)`` with either sampler: with
the probability-flow ODE (DDIM) and with the reverse SDE (ancestral DDPM) it ends at two different distributions,
neither of them the powered one (section 4, worked out in closed form for two Gaussians). Their Theorem 1 says that
CFG-DDPM at ``w`` is, in the continuous limit, a conditional DDIM predictor plus one Langevin corrector step on the
tilted distribution ``p_sigma(x | c)^gamma p_sigma(x)^(1 - gamma)`` with ``gamma = 2 w - 1``: PCG with one corrector
step reproduces CFG-DDPM, and more corrector steps move it towards the tilted distributions (section 5).

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", arXiv 2406.02507, eq. 1)
guides the model's denoiser ``D`` with a weaker one: ``D_w = D_weak + w (D - D_weak)``. Here both are exact: ``D``
of ``p(x | c)``, and ``D_weak`` of ``q(x | c)``, the same mixture with every component's standard deviation
multiplied by the weak factor ``f >= 1``; the weight is the tab's ``w``, the sampler DDIM. By Tweedie's formula
(``D = x + sigma^2 grad log p_sigma``) ``D_w`` is at every noise level the denoiser of the score
``s_q + w (s_p - s_q) = grad log (p_sigma(x | c)^w q_sigma(x | c)^(1 - w))``. As with CFG, that does not make the
probability-flow ODE end at the powered target ``p(x | c)^w q(x | c)^(1 - w)``: the normalised ``p_sigma^w
q_sigma^(1 - w)`` are in general not the noised versions (Gaussian convolutions) of that target, so the ODE built
from their scores carries the start elsewhere (on "gaussian", to a variance 6 times smaller at ``w = 3``, ``f =
2``). The tab draws that target (normalised numerically, like CFG's) as the distribution autoguidance is often read
as sampling, not as its end point. What is exact is the end point of the ODE itself, the limit of the DDIM sampler:

* on the "gaussian" preset in closed form: ``p(x | c) = N(mc, sc^2)`` and ``q(x | c) = N(mc, f^2 sc^2)`` make
  ``D_w`` the CFG denoiser of :class:`~guidekit.testbed.GaussianCFGOracle` with ``N(mc, f^2 sc^2)`` in place of
  ``p(x)``, and the ODE a contraction towards ``mc``: a start ``x_S`` ends at ``mc + r (x_S - mc)``, ``r = h(0) /
  h(S)``, ``h(s) = (sc^2 + s^2)^(w/2) (f^2 sc^2 + s^2)^((1-w)/2)``, so the end point is ``N(mc (1 - r), S0^2
  r^2)``;
* on both presets, numerically: :func:`~guidekit.testbed.probability_flow` integrates ``dx/dsigma = (x - D_w(x;
  sigma)) / sigma`` from the same latents, with the mixtures' closed-form denoisers (``GaussianMixture.denoise``)
  and no scheduler, pipeline or guidance code: classic Runge-Kutta, :data:`ODE_STEPS` steps on EDM's ``rho = 7``
  noise levels, within 2.3e-5 in W1 of 1024 steps over the tab's ranges. "W1 to exact ODE" is the W1 distance
  from the pipeline's samples to these end points; both are deterministic maps of the same latents, so it holds no
  sampling noise: it is the sampler's discretisation error.

This module is the pure computation and plot behind the tab (no Gradio): :func:`run_testbed` samples one class of a
1-D mixture with the four methods on a real diffusers pipeline (:class:`~guidekit.bridge.testbed.MixturePipeline`,
SD's VP schedule, exact denoiser; autoguidance through ``set_guidance(AutoGuidance(weak, w))``) and computes the
exact densities and the exact autoguidance ODE; :func:`plot_testbed` draws sample histograms against them. Both are
thread-safe: every call builds its own pipelines and seeds its own ``torch.Generator``.

Conventions:

* All four methods start from the same ``num_samples`` unit-scale latents ``N(0, 1)`` drawn from
  ``torch.Generator().manual_seed(seed)`` (the pipeline's own start; in EDM units ``N(0, 1 + S^2)`` at SD's
  ``sigma_max = S = 14.6``, so ``S0 = sqrt(1 + S^2)``), and the ancestral/Langevin noise of DDPM and PCG continues
  that generator's stream (each method from the same state). The exact autoguidance ODE starts from the same
  latents, times ``S0``, at ``S``.
* The timesteps are DDIM's ``"trailing"`` ones with a final step to ``sigma = 0`` for all four methods.
* W1 to a target is the 1-D Wasserstein-1 distance between the empirical distribution of the samples and the
  method's powered target (CFG's ``p(x | c)^w p(x)^(1 - w)`` for CFG and PCG, ``p(x | c)^w q(x | c)^(1 - w)`` for
  autoguidance), ``int_0^1 |F_n^-1(u) - F^-1(u)| du``, by the midpoint rule in ``u``: the mean over ``i`` of
  ``|x_(i) - F^-1((i - 1/2) / n)|``, with ``F^-1`` interpolated from the target's CDF, normalised numerically on
  a fine grid. Even exact draws from the target are at a distance of order ``std / sqrt(n)``;
  :attr:`TestbedResult.w1_floor` and :attr:`TestbedResult.autoguidance_w1_floor` are that floor for ``n``
  inverse-CDF draws of each target. W1 between two sets of ``n`` samples is the mean of ``|x_(i) - y_(i)|`` over
  the sorted samples (exact for equal sizes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from guidekit.bridge.testbed import MixtureDenoiser, MixturePipeline
from guidekit.guidance.autoguidance import AutoGuidance
from guidekit.guidance.pcg import PCG
from guidekit.limits import MAX_STEPS, check_seed
from guidekit.samplers.pcg import PCGScheduler
from guidekit.testbed.mixture import UNCONDITIONAL, GaussianMixture
from guidekit.testbed.ode import probability_flow
from guidekit.testbed.oracles import GaussianCFGOracle
from guidekit.validation import check_int, check_number

#: Accepted ranges of :func:`run_testbed`'s parameters (inclusive).
WEIGHT_RANGE = (1.0, 20.0)
STEPS_RANGE = (1, MAX_STEPS)
NUM_SAMPLES_RANGE = (100, 200_000)
CORRECTOR_STEPS_RANGE = (0, 10)
#: The weak model's factor on every component's standard deviation: 1 is the model itself; wider only, so that the
#: autoguidance target ``p(x | c)^w q(x | c)^(1 - w)`` is normalisable for every ``w >= 1`` (each component's
#: precision ``(w - (w - 1) / f^2) / std^2`` is positive).
WEAK_FACTOR_RANGE = (1.0, 5.0)

#: Runge-Kutta steps of the exact autoguidance ODE (module docstring).
ODE_STEPS = 64

AUTOGUIDANCE = "Autoguidance + DDIM"
#: The methods, in plot order.
METHODS = ("CFG + DDIM", "CFG + DDPM", "PCG", AUTOGUIDANCE)

#: What the tab shows, for the page (Markdown).
EXPLANATION = (
    "One class of a 1-D Gaussian-mixture model with an exact denoiser, sampled by a real diffusers pipeline on SD's "
    "noise schedule. CFG at weight w does **not** sample the w-powered target p(x|c)^w p(x)^(1-w) (black): with "
    "DDIM it follows the probability-flow ODE, with ancestral DDPM the reverse SDE, and each ends elsewhere "
    "(Bradley & Nakkiran 2024, section 4; dashed red: their closed forms on the Gaussian data). PCG runs a "
    "conditional DDIM predictor and K Langevin corrector steps at gamma = 2w - 1; with K = 1 it is CFG-DDPM "
    "(their Theorem 1). W1 is the Wasserstein-1 distance from the samples to the target. Step counts that divide "
    "1000 keep diffusers' DDIM on its own grid.\n\n"
    "**Autoguidance** (Karras et al. 2024) at the same w, with DDIM: D_weak + w (D - D_weak), the weak model being "
    "the same mixture with every component's std multiplied by the weak factor f. Its score is that of "
    "p(x|c)^w q(x|c)^(1-w) at every noise level (q: the weak mixture), but like CFG its probability-flow ODE does "
    "**not** end at that powered target (black in its panel). What is exact is the ODE's end point: in closed form "
    "on the gaussian preset (dashed red), and on both presets an independent Runge-Kutta integration of the ODE "
    f"with the exact denoisers ({ODE_STEPS} steps, from the same latents; green). \"W1 to exact ODE\" is the "
    "pipeline's distance to it: its discretisation error, with no sampling noise."
)
#: Column names of :func:`table`.
TABLE_HEADERS = ("method", "mean", "variance", "W1 to target", "model calls", "seconds", "closed-form mean",
                 "closed-form variance", "W1 to exact ODE")

_GRID_POINTS = 6001
_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@dataclass(frozen=True)
class _Preset:
    description: str
    means: tuple[float, ...]
    stds: tuple[float, ...]
    labels: tuple[int, ...]
    weights: tuple[float, ...]
    #: ``(mc, sc, mu, su)`` when ``p(x | c)`` and ``p(x)`` are single Gaussians (closed forms apply), else None.
    gaussians: tuple[float, float, float, float] | None = None

    def mixture(self, std_factor: float = 1.0) -> GaussianMixture:
        """The preset's mixture, every component's standard deviation multiplied by ``std_factor``."""
        return GaussianMixture.isotropic([[m] for m in self.means], [std_factor * s for s in self.stds],
                                         list(self.labels), torch.tensor(self.weights, dtype=torch.float64))


_PRESETS = {
    "gaussian": _Preset(
        "Bradley & Nakkiran's worked example (section 4): p(x|c) = N(1, 0.5^2), p(x) = N(0, 1) (an "
        "unconditional-only component). Everything is Gaussian, so the end points of CFG-DDIM (probability-flow "
        "ODE) and CFG-DDPM (reverse SDE) are known in closed form and drawn dashed; the powered target is "
        "N(4w / (3w + 1), 1 / (3w + 1)): N(1.2, 0.1) at w = 3.",
        means=(1.0, 0.0), stds=(0.5, 1.0), labels=(0, UNCONDITIONAL), weights=(1.0, 1.0),
        gaussians=(1.0, 0.5, 0.0, 1.0)),
    "mixture": _Preset(
        "A class with two modes, N(-1.5, 0.4^2) and N(1.2, 0.4^2), inside a wider data distribution: the other "
        "class, N(1.0, 0.8^2) + N(-4, 0.6^2), overlaps the right mode. p(x) is the mixture of both classes "
        "(Bayes-consistent), so the powered target p(x|c) p(c|x)^(w-1) is normalisable for every w >= 1; it "
        "is bimodal and moves mass from the shared right mode to the left one. No closed forms for the samplers.",
        means=(-1.5, 1.2, 1.0, -4.0), stds=(0.4, 0.4, 0.8, 0.6), labels=(0, 0, 1, 1), weights=(1.0, 1.0, 1.5, 0.5)),
}

#: Preset name -> description.
PRESETS: dict[str, str] = {name: preset.description for name, preset in _PRESETS.items()}


@dataclass(eq=False)
class MethodResult:
    """One sampler's end point.

    Attributes:
        name: one of :data:`METHODS`.
        title: the name with its settings, for display.
        samples: ``(num_samples,)`` float64 end points.
        model_calls: forward passes of the network (a batched ``[uncond; cond]`` CFG call is one).
        evaluations_per_sample: network rows per sample (CFG: 2 per call, 1 at ``w = 1``; PCG's predictor: 1).
        seconds: wall time of the pipeline call.
        mean, var: sample mean and (unbiased) variance.
        w1: Wasserstein-1 distance from the samples to the method's powered target (see the module docstring).
        closed_form: ``(mean, var)`` of the method's exact end point when the preset allows it, else ``None``:
            the CFG probability-flow ODE for DDIM, the CFG reverse SDE for DDPM and for PCG with one corrector step
            (Theorem 1), the conditional probability-flow ODE for PCG without corrector steps, the autoguidance
            probability-flow ODE for autoguidance.
        closed_form_density: that Gaussian's density on :attr:`TestbedResult.grid`, or ``None``.
        w1_to_ode: autoguidance only (else ``None``): Wasserstein-1 distance from the samples to the exact ODE's end
            points of the same latents, :attr:`TestbedResult.autoguidance_ode`.
    """

    name: str
    title: str
    samples: np.ndarray
    model_calls: int
    evaluations_per_sample: int
    seconds: float
    mean: float
    var: float
    w1: float
    closed_form: tuple[float, float] | None = None
    closed_form_density: np.ndarray | None = None
    w1_to_ode: float | None = None


@dataclass(eq=False)
class TestbedResult:
    """Everything :func:`plot_testbed` draws: the settings, exact densities on a grid, and one
    :class:`MethodResult` per entry of :data:`METHODS`.

    Attributes:
        grid: ``(G,)`` evenly spaced points covering every component to 7 standard deviations.
        conditional, unconditional: exact ``p(x | c)`` and ``p(x)`` on the grid.
        target: the powered target ``p(x | c)^w p(x)^(1 - w)`` on the grid, normalised numerically (trapezoid rule).
        target_mean, target_var: its moments, numerically.
        w1_floor: W1 to the target of ``num_samples`` exact (inverse-CDF) draws of the target: sampling noise.
        weak_conditional: exact ``q(x | c)`` of the weak model (stds times ``weak_factor``) on the grid.
        autoguidance_target: autoguidance's powered target ``p(x | c)^w q(x | c)^(1 - w)`` on the grid, normalised
            numerically; autoguidance_target_mean, autoguidance_target_var: its moments; autoguidance_w1_floor: its
            sampling-noise floor (the same uniforms as ``w1_floor``, through its inverse CDF).
        autoguidance_ode: ``(num_samples,)`` end points of the exact autoguidance ODE from the latents
            (:func:`~guidekit.testbed.probability_flow`, :data:`ODE_STEPS` steps).
        autoguidance_ode_w1: their W1 to the autoguidance target: how far the exact end point is from it.
        latents: the shared initial unit-scale latents, ``(num_samples,)``.
        start_sigma, start_std: the EDM noise level of the first step and the std of the start there.
        notes: caveats about these settings, for display (see :func:`run_testbed`).
    """

    __test__: ClassVar[bool] = False  # not a pytest test class, whatever its name

    preset: str
    weight: float
    corrector_steps: int
    steps: int
    num_samples: int
    seed: int
    weak_factor: float
    grid: np.ndarray
    conditional: np.ndarray
    unconditional: np.ndarray
    target: np.ndarray
    target_mean: float
    target_var: float
    w1_floor: float
    weak_conditional: np.ndarray
    autoguidance_target: np.ndarray
    autoguidance_target_mean: float
    autoguidance_target_var: float
    autoguidance_w1_floor: float
    autoguidance_ode: np.ndarray
    autoguidance_ode_w1: float
    latents: np.ndarray
    start_sigma: float
    start_std: float
    methods: dict[str, MethodResult] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _log_density(mixture: GaussianMixture, grid: np.ndarray, classes: torch.Tensor | None = None) -> np.ndarray:
    """``log p(x | classes)`` (``log p(x)`` without ``classes``) on ``grid``."""
    return mixture.log_prob(torch.from_numpy(grid)[:, None], classes=classes).numpy()


def _powered(log_a: np.ndarray, log_b: np.ndarray, weight: float, grid: np.ndarray) -> np.ndarray:
    """``a^w b^(1 - w)`` on ``grid``, normalised numerically (trapezoid rule)."""
    log_t = weight * log_a + (1.0 - weight) * log_b
    density = np.exp(log_t - log_t.max())
    return density / np.trapezoid(density, grid)


def _moments(density: np.ndarray, grid: np.ndarray) -> tuple[float, float]:
    """Mean and variance of a normalised density on ``grid`` (trapezoid rule)."""
    mean = float(np.trapezoid(grid * density, grid))
    return mean, float(np.trapezoid((grid - mean) ** 2 * density, grid))


def _cdf(density: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The CDF of a density on ``grid`` (cumulative trapezoid rule), ending at exactly 1."""
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(grid))])
    return cdf / cdf[-1]


def _w1(samples: np.ndarray, grid: np.ndarray, cdf: np.ndarray) -> float:
    """Wasserstein-1 distance between the samples and the distribution of ``cdf`` (midpoint rule in ``u``)."""
    x = np.sort(samples)
    u = (np.arange(len(x)) + 0.5) / len(x)
    return float(np.mean(np.abs(x - np.interp(u, cdf, grid))))


def _w1_between(samples: np.ndarray, other: np.ndarray) -> float:
    """Wasserstein-1 distance between two empirical distributions of equal size: mean ``|x_(i) - y_(i)|``."""
    return float(np.mean(np.abs(np.sort(samples) - np.sort(other))))


def _autoguided(main: GaussianMixture, weak: GaussianMixture, weight: float
                ) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """``D(x; sigma) = D_weak + w (D_main - D_weak)`` of class 0's exact denoisers (EDM units)."""
    label = torch.tensor(0)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        d_weak = weak.denoise(x, sigma, label)
        return d_weak + weight * (main.denoise(x, sigma, label) - d_weak)

    return denoise


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(**_SCHEDULE, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")


def _gaussian_density(grid: np.ndarray, mean: float, var: float) -> np.ndarray:
    return np.exp(-0.5 * (grid - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def _closed_forms(preset: _Preset, weight: float, corrector_steps: int, weak_factor: float,
                  start: tuple[float, float]) -> dict[str, tuple[float, float]]:
    """Exact ``(mean, var)`` end points (Bradley & Nakkiran section 4) of the methods that have one."""
    if preset.gaussians is None:
        return {}
    oracle = GaussianCFGOracle(*preset.gaussians, weight)
    mc, sc = preset.gaussians[:2]
    forms = {"CFG + DDIM": oracle.ode(*start), "CFG + DDPM": oracle.sde(*start),
             # D_q + w (D_c - D_q) is CFG's denoiser with q(x | c) = N(mc, (f sc)^2) in place of p(x).
             AUTOGUIDANCE: GaussianCFGOracle(mc, sc, mc, weak_factor * sc, weight).ode(*start)}
    if corrector_steps == 1:  # Theorem 1: PCG(2w - 1) with one corrector step is CFG-DDPM at w
        forms["PCG"] = forms["CFG + DDPM"]
    elif corrector_steps == 0:  # conditional DDIM
        forms["PCG"] = GaussianCFGOracle(*preset.gaussians, 1.0).ode(*start)
    return forms


def _sample(pipe: MixturePipeline, latents: torch.Tensor, state: torch.Tensor, steps: int,
            guidance_scale: float) -> tuple[np.ndarray, int, int, float]:
    """Run ``pipe`` on class 0; return samples, forward passes, network rows per sample and seconds."""
    calls, rows = [0], [0]

    def count(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        calls[0] += 1
        rows[0] += len(args[0])

    generator = torch.Generator()
    generator.set_state(state)
    hook = pipe.transformer.register_forward_pre_hook(count)
    try:
        start = time.perf_counter()
        out = pipe([0] * len(latents), num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=generator, latents=latents.clone()).samples
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    stats = getattr(pipe, "guidance_stats", None)
    if stats is not None:  # under set_guidance the hook sees the pipeline's batch, not the rows run by each network
        calls[0], rows[0] = stats.model_calls, stats.rows
    return out[:, 0].numpy().copy(), calls[0], rows[0] // len(latents), seconds


def run_testbed(preset: str = "gaussian", weight: float = 3.0, corrector_steps: int = 1, steps: int = 50,
                num_samples: int = 20000, seed: int = 0, weak_factor: float = 2.0) -> TestbedResult:
    """Sample class 0 of ``preset`` with CFG + DDIM, CFG + DDPM, PCG and autoguidance + DDIM, and compute the exact
    densities and the exact autoguidance ODE.

    Args:
        preset: a key of :data:`PRESETS`.
        weight: CFG weight ``w`` in [1, 20] (1 = no guidance), also autoguidance's. The powered target of both
            presets is normalisable for every ``w >= 1`` ("gaussian": precision ``4 w - (w - 1) > 0``; "mixture":
            ``p(x)`` is the mixture of the classes, so the target is ``p(x | c) p(c | x)^(w - 1) / Z`` with
            ``p(c | x) <= 1``). The upper bound is practical: CFG-DDIM's end point collapses (variance ``0.25^w``
            on "gaussian") and nothing new appears beyond it.
        corrector_steps: PCG's Langevin corrector steps per step ``K``, in [0, 10]. PCG runs at
            ``gamma = 2 w - 1``, which with ``K = 1`` is CFG-DDPM at ``w`` in the continuous limit (Bradley &
            Nakkiran 2024, Theorem 1); ``K = 0`` is conditional DDIM.
        steps: sampler steps, in [1, 1000]. Prefer divisors of 1000: otherwise diffusers' ``DDIMScheduler`` steps
            from ``t`` to ``t - 1000 // steps``, off its own timestep grid (``TestbedResult.notes`` says so; its
            DDPM and PCG follow their grids). Even on divisors CFG-DDIM's variance is off its ODE limit by an
            O(1/steps) error: -31% at 50 steps and -2.3% at 1000 on "gaussian" at ``w = 3``, about half of it
            from the last step, straight from sigma 0.13 (at 50 steps) to 0.
        num_samples: samples per method, in [100, 200000].
        seed: seeds the shared initial latents and the samplers' noise, an integer in [0, 2**63 - 1].
        weak_factor: autoguidance's weak model is the preset's mixture with every component's standard deviation
            multiplied by ``f``, in [1, 5] (see :data:`WEAK_FACTOR_RANGE`); ``f = 1`` makes autoguidance the
            conditional sampler, ``D_weak + w (D - D_weak) = D``.

    Returns:
        A :class:`TestbedResult`; ``methods`` holds one :class:`MethodResult` per entry of :data:`METHODS`.

    Raises:
        ValueError: naming the parameter, its value and what is accepted.

    Speed: about 3 s at the defaults on two CPU cores, half of it the exact autoguidance ODE (:data:`ODE_STEPS`
    Runge-Kutta steps, 8 exact-denoiser calls each, on every sample). torch's intra-op thread pool stalls badly
    when another process holds a core (10-70 s seen on a 2-core machine); a server running this on a small CPU
    should call ``torch.set_num_threads(1)`` at start-up (this function leaves the process-wide setting alone).
    """
    if not isinstance(preset, str) or preset not in _PRESETS:
        raise ValueError(f"preset={preset!r} is not accepted; expected one of {', '.join(_PRESETS)}")
    weight = check_number("weight", weight, low=WEIGHT_RANGE[0], high=WEIGHT_RANGE[1])
    corrector_steps = check_int("corrector_steps", corrector_steps, low=CORRECTOR_STEPS_RANGE[0],
                                high=CORRECTOR_STEPS_RANGE[1])
    steps = check_int("steps", steps, low=STEPS_RANGE[0], high=STEPS_RANGE[1])
    num_samples = check_int("num_samples", num_samples, low=NUM_SAMPLES_RANGE[0], high=NUM_SAMPLES_RANGE[1])
    seed = check_seed("seed", seed)
    weak_factor = check_number("weak_factor", weak_factor, low=WEAK_FACTOR_RANGE[0], high=WEAK_FACTOR_RANGE[1])
    spec = _PRESETS[preset]
    mixture, weak_mixture = spec.mixture(), spec.mixture(weak_factor)

    # Exact densities on a grid covering every component to 7 standard deviations (the targets are narrower).
    means, stds = np.asarray(spec.means), np.asarray(spec.stds)
    grid = np.linspace(float((means - 7 * stds).min()), float((means + 7 * stds).max()), _GRID_POINTS)
    class0 = torch.tensor(0)
    log_c, log_u = _log_density(mixture, grid, class0), _log_density(mixture, grid)
    log_q = _log_density(weak_mixture, grid, class0)
    target, ag_target = _powered(log_c, log_u, weight, grid), _powered(log_c, log_q, weight, grid)
    cdf, ag_cdf = _cdf(target, grid), _cdf(ag_target, grid)

    # Four pipelines sharing one exact denoiser (set_guidance never replaces or mutates the model); autoguidance's
    # weak model is a second one.
    model = MixtureDenoiser.from_mixture(mixture, **_SCHEDULE)
    weak = MixtureDenoiser.from_mixture(weak_mixture, **_SCHEDULE)
    pipes = {
        "CFG + DDIM": MixturePipeline(model, _ddim()),
        "CFG + DDPM": MixturePipeline(model, DDPMScheduler(**_SCHEDULE, clip_sample=False, variance_type="fixed_large",
                                                           timestep_spacing="trailing")),
        "PCG": MixturePipeline(model, PCGScheduler(**_SCHEDULE)).set_guidance(
            PCG(2 * weight - 1, corrector_steps=corrector_steps)),
        AUTOGUIDANCE: MixturePipeline(model, _ddim()).set_guidance(AutoGuidance(weak, weight)),
    }
    # The pipeline's CFG weight; under set_guidance it only switches the unconditional rows on (PCG) or off.
    scales = {"CFG + DDIM": weight, "CFG + DDPM": weight, "PCG": weight, AUTOGUIDANCE: 1.0}
    start_sigma = model.level(_SCHEDULE["num_train_timesteps"] - 1).sigma
    start = (start_sigma, math.hypot(1.0, start_sigma))
    forms = _closed_forms(spec, weight, corrector_steps, weak_factor, start)

    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(num_samples, 1, generator=generator, dtype=torch.float64)
    state = generator.get_state()
    exact_ode = probability_flow(_autoguided(mixture, weak_mixture, weight), latents * start[1], start[0],
                                 ODE_STEPS)[:, 0].numpy()
    titles = {"CFG + DDIM": f"CFG + DDIM (w={weight:g})", "CFG + DDPM": f"CFG + DDPM (w={weight:g})",
              "PCG": f"PCG (gamma={2 * weight - 1:g}, K={corrector_steps})",
              AUTOGUIDANCE: f"{AUTOGUIDANCE} (w={weight:g}, weak stds x{weak_factor:g})"}
    methods = {}
    for name in METHODS:
        pipe = pipes[name]
        pipe.set_progress_bar_config(disable=True)
        samples, calls, rows, seconds = _sample(pipe, latents, state, steps, scales[name])
        form = forms.get(name)
        methods[name] = MethodResult(
            name=name, title=titles[name], samples=samples, model_calls=calls, evaluations_per_sample=rows,
            seconds=seconds, mean=float(samples.mean()), var=float(samples.var(ddof=1)),
            w1=_w1(samples, grid, ag_cdf if name == AUTOGUIDANCE else cdf), closed_form=form,
            closed_form_density=None if form is None else _gaussian_density(grid, *form),
            w1_to_ode=_w1_between(samples, exact_ode) if name == AUTOGUIDANCE else None)

    notes = ()
    if _SCHEDULE["num_train_timesteps"] % steps:
        notes = (f"steps={steps} does not divide 1000: diffusers' DDIMScheduler steps from t to t - "
                 f"{_SCHEDULE['num_train_timesteps'] // steps}, off its own timestep grid, so CFG + DDIM and "
                 "autoguidance carry an error beyond discretisation; a divisor of 1000 gives a clean comparison",)
    uniforms = np.random.default_rng(seed).random(num_samples)
    target_mean, target_var = _moments(target, grid)
    ag_mean, ag_var = _moments(ag_target, grid)
    return TestbedResult(
        preset=preset, weight=weight, corrector_steps=corrector_steps, steps=steps, num_samples=num_samples,
        seed=seed, weak_factor=weak_factor, grid=grid, conditional=np.exp(log_c), unconditional=np.exp(log_u),
        target=target, target_mean=target_mean, target_var=target_var,
        w1_floor=_w1(np.interp(uniforms, cdf, grid), grid, cdf), weak_conditional=np.exp(log_q),
        autoguidance_target=ag_target, autoguidance_target_mean=ag_mean, autoguidance_target_var=ag_var,
        autoguidance_w1_floor=_w1(np.interp(uniforms, ag_cdf, grid), grid, ag_cdf), autoguidance_ode=exact_ode,
        autoguidance_ode_w1=_w1(exact_ode, grid, ag_cdf), latents=latents[:, 0].numpy(), start_sigma=start[0],
        start_std=start[1], methods=methods, notes=notes)


def plot_testbed(result: TestbedResult, width: int = 1600, height: int = 400) -> PIL.Image.Image:
    """One panel per method: a density histogram of its samples, its exact powered target (solid: CFG's for CFG
    and PCG, autoguidance's for autoguidance), ``p(x | c)`` (faint), ``p(x)`` (faint, dotted; the weak ``q(x | c)``
    in autoguidance's panel) and, where known, the method's own closed-form end point (dashed); in autoguidance's
    panel also the exact ODE's end points (green outline). A caption with its mean, variance, W1 to the target (and
    to the exact ODE) and model calls. Returns an RGB image of ``width x height`` pixels.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global state), so it is safe in threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    grid = result.grid
    # x range: where the exact densities matter, widened to hold the bulk of every method's samples.
    peak = np.maximum.reduce([result.conditional, result.unconditional, result.target, result.autoguidance_target])
    inside = grid[peak > 1e-3 * peak.max()]
    lows = [inside[0]] + [np.quantile(m.samples, 0.001) for m in result.methods.values()]
    highs = [inside[-1]] + [np.quantile(m.samples, 0.999) for m in result.methods.values()]
    lo, hi = min(lows), max(highs)
    pad = 0.03 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    bins = np.linspace(lo, hi, 90)
    hists = {name: np.histogram(m.samples, bins=bins, density=True)[0] for name, m in result.methods.items()}
    # One y scale for all panels; spikes (CFG-DDIM collapses at large w) are clipped and labelled.
    exact_peak = max(result.target.max(), result.autoguidance_target.max(), result.conditional.max())
    cap = 4.0 * exact_peak
    highest = max([h.max() for h in hists.values()] + [exact_peak]
                  + [m.closed_form_density.max() for m in result.methods.values()
                     if m.closed_form_density is not None])
    top = 1.08 * min(highest, cap)

    w = result.weight
    labels = {False: f"p(x|c)^{w:g} p(x)^{1 - w:g}", True: f"p(x|c)^{w:g} q(x|c)^{1 - w:g}"}
    axes = fig.subplots(1, len(result.methods), sharey=True)
    for ax, (name, m) in zip(np.atleast_1d(axes), result.methods.items(), strict=True):
        autoguided = name == AUTOGUIDANCE
        ax.hist(bins[:-1], bins=bins, weights=hists[name], color="tab:blue", alpha=0.45, label="samples")
        if autoguided:
            ax.hist(result.autoguidance_ode, bins=bins, density=True, histtype="step", color="tab:green", lw=1.2,
                    label=f"exact ODE end points (RK4, {ODE_STEPS} steps)")
            ax.plot(grid, result.weak_conditional, color="0.6", lw=1.0, ls=":",
                    label=f"q(x|c): stds x{result.weak_factor:g}")
        else:
            ax.plot(grid, result.unconditional, color="0.6", lw=1.0, ls=":", label="p(x)")
        ax.plot(grid, result.conditional, color="0.5", lw=1.2, alpha=0.7, label="p(x|c)")
        ax.plot(grid, result.autoguidance_target if autoguided else result.target, color="black", lw=1.8,
                label=labels[autoguided])
        if m.closed_form is not None:
            mean, var = m.closed_form
            std = math.sqrt(var)
            fine = np.union1d(grid, mean + std * np.linspace(-6.0, 6.0, 241))  # resolves narrow end points
            ax.plot(fine, _gaussian_density(fine, mean, var), color="tab:red", lw=1.5, ls="--",
                    label="closed-form end point")
        if hists[name].max() > top:
            ax.annotate(f"histogram peak {hists[name].max():.3g} (clipped)", xy=(bins[np.argmax(hists[name])], top),
                        xytext=(0, -12), textcoords="offset points", ha="center", fontsize=7, color="tab:blue")
        ax.set_xlim(lo, hi)
        ax.set_ylim(0.0, top)
        ax.set_title(m.title, fontsize=10)
        caption = f"mean {m.mean:.3f}  var {m.var:.3g}  W1 {m.w1:.3f}"
        if m.w1_to_ode is not None:
            caption += f"  W1 to exact ODE {m.w1_to_ode:.4f}"
        caption += f"\n{m.model_calls} model calls ({m.evaluations_per_sample} evals/sample), {m.seconds:.2f} s"
        if m.closed_form is not None:
            caption += f"\nclosed form: mean {m.closed_form[0]:.3f}  var {m.closed_form[1]:.3g}"
        ax.set_xlabel(caption, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left", frameon=False)
    fig.suptitle(f"{result.preset}: w={w:g}, {result.steps} steps, {result.num_samples} samples; CFG target mean "
                 f"{result.target_mean:.3f} var {result.target_var:.3g}, W1 floor {result.w1_floor:.3f}; "
                 f"autoguidance target mean {result.autoguidance_target_mean:.3f} var "
                 f"{result.autoguidance_target_var:.3g}, W1 floor {result.autoguidance_w1_floor:.3f}", fontsize=10)
    for i, note in enumerate(result.notes):
        fig.text(0.5, 0.005 + 0.035 * i, note, ha="center", va="bottom", fontsize=7, color="tab:red")
    fig.subplots_adjust(left=0.03, right=0.995, top=0.86, bottom=0.27 + 0.03 * len(result.notes), wspace=0.06)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return PIL.Image.fromarray(rgba[..., :3].copy(), "RGB")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def table(result: TestbedResult) -> list[list[object]]:
    """One row per method, in the order of :data:`TABLE_HEADERS`, then the two targets' rows (their W1: the
    sampling-noise floor) and the exact autoguidance ODE's (its W1: to the autoguidance target)."""
    rows: list[list[object]] = []
    for m in result.methods.values():
        form = m.closed_form or (None, None)
        rows.append([m.title, round(m.mean, 4), round(m.var, 4), round(m.w1, 4), m.model_calls, round(m.seconds, 3),
                     _rounded(form[0]), _rounded(form[1]), _rounded(m.w1_to_ode)])
    w = result.weight
    ode_mean, ode_var = float(result.autoguidance_ode.mean()), float(result.autoguidance_ode.var(ddof=1))
    for label, mean, var, w1 in [
        (f"target p(x|c)^{w:g} p(x)^{1 - w:g}", result.target_mean, result.target_var, result.w1_floor),
        (f"autoguidance target p(x|c)^{w:g} q(x|c)^{1 - w:g}", result.autoguidance_target_mean,
         result.autoguidance_target_var, result.autoguidance_w1_floor),
        (f"exact autoguidance ODE (RK4, {ODE_STEPS} steps)", ode_mean, ode_var, result.autoguidance_ode_w1),
    ]:
        rows.append([label, round(mean, 4), round(var, 4), round(w1, 4), None, None, None, None, None])
    return rows
