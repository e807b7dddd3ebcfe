"""The Gaussian-mixture testbed tab of the demo: CFG with DDIM, CFG with DDPM and PCG against exact densities.

Bradley & Nakkiran 2024 ("Classifier-Free Guidance is a Predictor-Corrector", arXiv 2408.09000) show that CFG at
weight ``w`` does not sample the ``w``-powered distribution ``p(x | c)^w p(x)^(1 - w)`` with either sampler: with
the probability-flow ODE (DDIM) and with the reverse SDE (ancestral DDPM) it ends at two different distributions,
neither of them the powered one (section 4, worked out in closed form for two Gaussians). Their Theorem 1 says that
CFG-DDPM at ``w`` is, in the continuous limit, a conditional DDIM predictor plus one Langevin corrector step on the
tilted distribution ``p_sigma(x | c)^gamma p_sigma(x)^(1 - gamma)`` with ``gamma = 2 w - 1``: PCG with one corrector
step reproduces CFG-DDPM, and more corrector steps move it towards the tilted distributions (section 5).

This module is the pure computation and plot behind the tab (no Gradio): :func:`run_testbed` samples one class of a
1-D mixture with the three methods on a real diffusers pipeline (:class:`~guidekit.bridge.testbed.MixturePipeline`,
SD's VP schedule, exact denoiser) and computes the exact densities; :func:`plot_testbed` draws sample histograms
against them. Both are thread-safe: every call builds its own pipelines and seeds its own ``torch.Generator``.

Conventions:

* All three methods start from the same ``num_samples`` unit-scale latents ``N(0, 1)`` drawn from
  ``torch.Generator().manual_seed(seed)`` (the pipeline's own start; in EDM units ``N(0, 1 + S^2)`` at SD's
  ``sigma_max = S = 14.6``), and the ancestral/Langevin noise of DDPM and PCG continues that generator's stream
  (each method from the same state).
* The timesteps are DDIM's ``"trailing"`` ones with a final step to ``sigma = 0`` for all three methods.
* W1 is the 1-D Wasserstein-1 distance between the empirical distribution of the samples and the powered target,
  ``int_0^1 |F_n^-1(u) - F^-1(u)| du``, by the midpoint rule in ``u``: the mean over ``i`` of
  ``|x_(i) - F^-1((i - 1/2) / n)|``, with ``F^-1`` interpolated from the target's CDF, normalised numerically on
  a fine grid. Even exact draws from the target are at a distance of order ``std / sqrt(n)``;
  :attr:`TestbedResult.w1_floor` is that floor for ``n`` inverse-CDF draws of the target.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from guidekit.bridge.testbed import MixtureDenoiser, MixturePipeline
from guidekit.guidance.pcg import PCG
from guidekit.limits import MAX_STEPS, check_seed
from guidekit.samplers.pcg import PCGScheduler
from guidekit.testbed.mixture import UNCONDITIONAL, GaussianMixture
from guidekit.testbed.oracles import GaussianCFGOracle
from guidekit.validation import check_int, check_number

#: Accepted ranges of :func:`run_testbed`'s parameters (inclusive).
WEIGHT_RANGE = (1.0, 20.0)
STEPS_RANGE = (1, MAX_STEPS)
NUM_SAMPLES_RANGE = (100, 200_000)
CORRECTOR_STEPS_RANGE = (0, 10)

#: The methods, in plot order.
METHODS = ("CFG + DDIM", "CFG + DDPM", "PCG")

#: What the tab shows, for the page (Markdown).
EXPLANATION = (
    "One class of a 1-D Gaussian-mixture model with an exact denoiser, sampled by a real diffusers pipeline on SD's "
    "noise schedule. CFG at weight w does **not** sample the w-powered target p(x|c)^w p(x)^(1-w) (black): with "
    "DDIM it follows the probability-flow ODE, with ancestral DDPM the reverse SDE, and each ends elsewhere "
    "(Bradley & Nakkiran 2024, section 4; dashed red: their closed forms on the Gaussian data). PCG runs a "
    "conditional DDIM predictor and K Langevin corrector steps at gamma = 2w - 1; with K = 1 it is CFG-DDPM "
    "(their Theorem 1). W1 is the Wasserstein-1 distance from the samples to the target. Step counts that divide "
    "1000 keep diffusers' DDIM on its own grid."
)
#: Column names of :func:`table`.
TABLE_HEADERS = ("method", "mean", "variance", "W1 to target", "model calls", "seconds", "closed-form mean",
                 "closed-form variance")

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

    def mixture(self) -> GaussianMixture:
        return GaussianMixture.isotropic([[m] for m in self.means], list(self.stds), list(self.labels),
                                         torch.tensor(self.weights, dtype=torch.float64))


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
        w1: Wasserstein-1 distance from the samples to the powered target (see the module docstring).
        closed_form: ``(mean, var)`` of the method's exact end point when the preset allows it, else ``None``:
            the CFG probability-flow ODE for DDIM, the CFG reverse SDE for DDPM and for PCG with one corrector step
            (Theorem 1), the conditional probability-flow ODE for PCG without corrector steps.
        closed_form_density: that Gaussian's density on :attr:`TestbedResult.grid`, or ``None``.
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
    grid: np.ndarray
    conditional: np.ndarray
    unconditional: np.ndarray
    target: np.ndarray
    target_mean: float
    target_var: float
    w1_floor: float
    latents: np.ndarray
    start_sigma: float
    start_std: float
    methods: dict[str, MethodResult] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _densities(mixture: GaussianMixture, weight: float, grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """``p(x | 0)``, ``p(x)`` and the normalised powered target on ``grid``."""
    x = torch.from_numpy(grid)[:, None]
    log_c = mixture.log_prob(x, classes=torch.tensor(0)).numpy()
    log_u = mixture.log_prob(x).numpy()
    log_t = weight * log_c + (1.0 - weight) * log_u
    target = np.exp(log_t - log_t.max())
    target /= np.trapezoid(target, grid)
    return np.exp(log_c), np.exp(log_u), target


def _cdf(density: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The CDF of a density on ``grid`` (cumulative trapezoid rule), ending at exactly 1."""
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(grid))])
    return cdf / cdf[-1]


def _w1(samples: np.ndarray, grid: np.ndarray, cdf: np.ndarray) -> float:
    """Wasserstein-1 distance between the samples and the distribution of ``cdf`` (midpoint rule in ``u``)."""
    x = np.sort(samples)
    u = (np.arange(len(x)) + 0.5) / len(x)
    return float(np.mean(np.abs(x - np.interp(u, cdf, grid))))


def _gaussian_density(grid: np.ndarray, mean: float, var: float) -> np.ndarray:
    return np.exp(-0.5 * (grid - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def _closed_forms(preset: _Preset, weight: float, corrector_steps: int, start: tuple[float, float]
                  ) -> dict[str, tuple[float, float]]:
    """Exact ``(mean, var)`` end points (Bradley & Nakkiran section 4) of the methods that have one."""
    if preset.gaussians is None:
        return {}
    oracle = GaussianCFGOracle(*preset.gaussians, weight)
    forms = {"CFG + DDIM": oracle.ode(*start), "CFG + DDPM": oracle.sde(*start)}
    if corrector_steps == 1:  # Theorem 1: PCG(2w - 1) with one corrector step is CFG-DDPM at w
        forms["PCG"] = forms["CFG + DDPM"]
    elif corrector_steps == 0:  # conditional DDIM
        forms["PCG"] = GaussianCFGOracle(*preset.gaussians, 1.0).ode(*start)
    return forms


def _sample(pipe: MixturePipeline, latents: torch.Tensor, state: torch.Tensor, steps: int,
            weight: float) -> tuple[np.ndarray, int, int, float]:
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
        out = pipe([0] * len(latents), num_inference_steps=steps, guidance_scale=weight, generator=generator,
                   latents=latents.clone()).samples
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    stats = getattr(pipe, "guidance_stats", None)
    if stats is not None:  # under set_guidance the hook sees the pipeline's [uncond; cond] batch, not the rows run
        calls[0], rows[0] = stats.model_calls, stats.rows
    return out[:, 0].numpy().copy(), calls[0], rows[0] // len(latents), seconds


def run_testbed(preset: str = "gaussian", weight: float = 3.0, corrector_steps: int = 1, steps: int = 50,
                num_samples: int = 20000, seed: int = 0) -> TestbedResult:
    """Sample class 0 of ``preset`` with CFG + DDIM, CFG + DDPM and PCG, and compute the exact densities.

    Args:
        preset: a key of :data:`PRESETS`.
        weight: CFG weight ``w`` in [1, 20] (1 = no guidance). The powered target of both presets is normalisable
            for every ``w >= 1`` ("gaussian": precision ``4 w - (w - 1) > 0``; "mixture": ``p(x)`` is the mixture
            of the classes, so the target is ``p(x | c) p(c | x)^(w - 1) / Z`` with ``p(c | x) <= 1``). The upper
            bound is practical: CFG-DDIM's end point collapses (variance ``0.25^w`` on "gaussian") and nothing
            new appears beyond it.
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

    Returns:
        A :class:`TestbedResult`; ``methods`` holds one :class:`MethodResult` per entry of :data:`METHODS`.

    Raises:
        ValueError: naming the parameter, its value and what is accepted.

    Speed: about 1 s at the defaults on two CPU cores. torch's intra-op thread pool stalls badly when another
    process holds a core (10-70 s seen on a 2-core machine); a server running this on a small CPU should call
    ``torch.set_num_threads(1)`` at start-up (this function leaves the process-wide setting alone).
    """
    if not isinstance(preset, str) or preset not in _PRESETS:
        raise ValueError(f"preset={preset!r} is not accepted; expected one of {', '.join(_PRESETS)}")
    weight = check_number("weight", weight, low=WEIGHT_RANGE[0], high=WEIGHT_RANGE[1])
    corrector_steps = check_int("corrector_steps", corrector_steps, low=CORRECTOR_STEPS_RANGE[0],
                                high=CORRECTOR_STEPS_RANGE[1])
    steps = check_int("steps", steps, low=STEPS_RANGE[0], high=STEPS_RANGE[1])
    num_samples = check_int("num_samples", num_samples, low=NUM_SAMPLES_RANGE[0], high=NUM_SAMPLES_RANGE[1])
    seed = check_seed("seed", seed)
    spec = _PRESETS[preset]
    mixture = spec.mixture()

    # Exact densities on a grid covering every component to 7 standard deviations.
    means, stds = np.asarray(spec.means), np.asarray(spec.stds)
    grid = np.linspace(float((means - 7 * stds).min()), float((means + 7 * stds).max()), _GRID_POINTS)
    conditional, unconditional, target = _densities(mixture, weight, grid)
    target_mean = float(np.trapezoid(grid * target, grid))
    target_var = float(np.trapezoid((grid - target_mean) ** 2 * target, grid))
    cdf = _cdf(target, grid)

    # Three pipelines sharing one exact denoiser (set_guidance never replaces or mutates the model).
    model = MixtureDenoiser.from_mixture(mixture, **_SCHEDULE)
    pipes = {
        "CFG + DDIM": MixturePipeline(model, DDIMScheduler(**_SCHEDULE, clip_sample=False, set_alpha_to_one=True,
                                                           timestep_spacing="trailing")),
        "CFG + DDPM": MixturePipeline(model, DDPMScheduler(**_SCHEDULE, clip_sample=False, variance_type="fixed_large",
                                                           timestep_spacing="trailing")),
        "PCG": MixturePipeline(model, PCGScheduler(**_SCHEDULE)).set_guidance(
            PCG(2 * weight - 1, corrector_steps=corrector_steps)),
    }
    start_sigma = model.level(_SCHEDULE["num_train_timesteps"] - 1).sigma
    start = (start_sigma, math.hypot(1.0, start_sigma))
    forms = _closed_forms(spec, weight, corrector_steps, start)

    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(num_samples, 1, generator=generator, dtype=torch.float64)
    state = generator.get_state()
    titles = {"CFG + DDIM": f"CFG + DDIM (w={weight:g})", "CFG + DDPM": f"CFG + DDPM (w={weight:g})",
              "PCG": f"PCG (gamma={2 * weight - 1:g}, K={corrector_steps})"}
    methods = {}
    for name in METHODS:
        pipe = pipes[name]
        pipe.set_progress_bar_config(disable=True)
        samples, calls, rows, seconds = _sample(pipe, latents, state, steps, weight)
        form = forms.get(name)
        methods[name] = MethodResult(
            name=name, title=titles[name], samples=samples, model_calls=calls, evaluations_per_sample=rows,
            seconds=seconds, mean=float(samples.mean()), var=float(samples.var(ddof=1)), w1=_w1(samples, grid, cdf),
            closed_form=form, closed_form_density=None if form is None else _gaussian_density(grid, *form))

    notes = ()
    if _SCHEDULE["num_train_timesteps"] % steps:
        notes = (f"steps={steps} does not divide 1000: diffusers' DDIMScheduler steps from t to t - "
                 f"{_SCHEDULE['num_train_timesteps'] // steps}, off its own timestep grid, so CFG + DDIM carries an "
                 "error beyond discretisation; a divisor of 1000 gives a clean comparison",)
    floor_draws = np.interp(np.random.default_rng(seed).random(num_samples), cdf, grid)
    return TestbedResult(
        preset=preset, weight=weight, corrector_steps=corrector_steps, steps=steps, num_samples=num_samples,
        seed=seed, grid=grid, conditional=conditional, unconditional=unconditional, target=target,
        target_mean=target_mean, target_var=target_var, w1_floor=_w1(floor_draws, grid, cdf),
        latents=latents[:, 0].numpy(), start_sigma=start[0], start_std=start[1], methods=methods, notes=notes)


def plot_testbed(result: TestbedResult, width: int = 1200, height: int = 400) -> PIL.Image.Image:
    """One panel per method: a density histogram of its samples, the exact powered target (solid), ``p(x | c)``
    (faint), ``p(x)`` (faint, dotted) and, where known, the method's own closed-form end point (dashed); a caption
    with its mean, variance, W1 to the target and model calls. Returns an RGB image of ``width x height`` pixels.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global state), so it is safe in threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    grid = result.grid
    # x range: where the exact densities matter, widened to hold the bulk of every method's samples.
    peak = np.maximum(np.maximum(result.conditional, result.unconditional), result.target)
    inside = grid[peak > 1e-3 * peak.max()]
    lows = [inside[0]] + [np.quantile(m.samples, 0.001) for m in result.methods.values()]
    highs = [inside[-1]] + [np.quantile(m.samples, 0.999) for m in result.methods.values()]
    lo, hi = min(lows), max(highs)
    pad = 0.03 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    bins = np.linspace(lo, hi, 90)
    hists = {name: np.histogram(m.samples, bins=bins, density=True)[0] for name, m in result.methods.items()}
    # One y scale for all panels; spikes (CFG-DDIM collapses at large w) are clipped and labelled.
    cap = 4.0 * max(result.target.max(), result.conditional.max())
    highest = max([h.max() for h in hists.values()] + [result.target.max(), result.conditional.max()]
                  + [m.closed_form_density.max() for m in result.methods.values()
                     if m.closed_form_density is not None])
    top = 1.08 * min(highest, cap)

    target_label = f"p(x|c)^{result.weight:g} p(x)^{1 - result.weight:g}"
    axes = fig.subplots(1, len(result.methods), sharey=True)
    for ax, (name, m) in zip(np.atleast_1d(axes), result.methods.items(), strict=True):
        ax.hist(bins[:-1], bins=bins, weights=hists[name], color="tab:blue", alpha=0.45, label="samples")
        ax.plot(grid, result.unconditional, color="0.6", lw=1.0, ls=":", label="p(x)")
        ax.plot(grid, result.conditional, color="0.5", lw=1.2, alpha=0.7, label="p(x|c)")
        ax.plot(grid, result.target, color="black", lw=1.8, label=target_label)
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
        caption = (f"mean {m.mean:.3f}  var {m.var:.3g}  W1 {m.w1:.3f}\n"
                   f"{m.model_calls} model calls ({m.evaluations_per_sample} evals/sample), {m.seconds:.2f} s")
        if m.closed_form is not None:
            caption += f"\nclosed form: mean {m.closed_form[0]:.3f}  var {m.closed_form[1]:.3g}"
        ax.set_xlabel(caption, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left", frameon=False)
    fig.suptitle(f"{result.preset}: w={result.weight:g}, {result.steps} steps, {result.num_samples} samples; "
                 f"target mean {result.target_mean:.3f} var {result.target_var:.3g}, W1 floor {result.w1_floor:.3f}",
                 fontsize=10)
    for i, note in enumerate(result.notes):
        fig.text(0.5, 0.005 + 0.035 * i, note, ha="center", va="bottom", fontsize=7, color="tab:red")
    fig.subplots_adjust(left=0.04, right=0.99, top=0.86, bottom=0.27 + 0.03 * len(result.notes), wspace=0.06)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return PIL.Image.fromarray(rgba[..., :3].copy(), "RGB")


def table(result: TestbedResult) -> list[list[object]]:
    """One row per method, in the order of :data:`TABLE_HEADERS`, then the target's own row."""
    rows: list[list[object]] = []
    for m in result.methods.values():
        form = m.closed_form or (None, None)
        rows.append([m.title, round(m.mean, 4), round(m.var, 4), round(m.w1, 4), m.model_calls, round(m.seconds, 3),
                     None if form[0] is None else round(form[0], 4), None if form[1] is None else round(form[1], 4)])
    rows.append([f"target p(x|c)^{result.weight:g} p(x)^{1 - result.weight:g}", round(result.target_mean, 4),
                 round(result.target_var, 4), round(result.w1_floor, 4), None, None, None, None])
    return rows
