"""Error against NFE of each sampler on the exact Gaussian-mixture testbed.

    python benchmarks/samplers.py                       # tables on stdout, plot to docs/samplers_error_vs_nfe.png

Three measurements, all on :class:`guidekit.bridge.testbed.MixturePipeline` with SD's VP schedule:

1. Frechet distance on 10k class-conditional samples (a third per class) of a 2-D, 3-class mixture, every
   sampler started from the exact noisy marginal at t = 999 (``noisy_latents``). Unguided: to the exact mean
   and covariance (the floor is the distance of 10k exact draws). Guided, w = 3: to a converged run from the
   same starts (DPM-Solver++(2M) at 500 steps for deterministic samplers, DDPM at 1000 for stochastic ones);
2. end-point error of the deterministic samplers on the 1-D example of REFERENCE (p(x | c) = N(1, 0.5^2),
   p(x) = N(0, 1)), unguided and at w = 3, against the closed form: the CFG probability-flow ODE from the
   sampler's first noise level to its last, then the sampler's own final denoising step;
3. PCG against CFG-DDPM and CFG-DDIM at equal network evaluations on the same example: end mean and
   variance (100k particles) against the closed forms.

NFE counts denoiser calls; a CFG call evaluates two rows per sample. LML's samplers are measured against their
base samplers by ``benchmarks/lml_effect.py`` (with its default ``kappa = 0`` LML is the base sampler).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from _common import machine

import guidekit
from guidekit.bridge.testbed import MixturePipeline
from guidekit.evaluation import frechet_distance, gaussian_statistics
from guidekit.samplers import EDMHeunScheduler
from guidekit.testbed import GaussianCFGOracle, GaussianMixture
from guidekit.testbed.mixture import UNCONDITIONAL

Factory = Callable[[Any], Any]


def samplers() -> dict[str, tuple[Factory, bool, tuple[int, ...]]]:
    """Name -> (scheduler from a config, deterministic, steps to try).

    Step counts divide 1000: diffusers' DDIM and DDPM step to ``t - 1000 // N``, which misses the next
    ``"trailing"`` timestep when N does not divide 1000 (the model is then called off the sampler's noise level).
    Two-call samplers get about the same NFE.
    """
    one, two = (5, 10, 20, 40, 100), (3, 6, 11, 21, 51)
    table: dict[str, tuple[Factory, bool, tuple[int, ...]]] = {
        "DDIM": (lambda c: diffusers.DDIMScheduler.from_config(c), True, one),
        "Euler, Karras": (lambda c: diffusers.EulerDiscreteScheduler.from_config(
            c, use_karras_sigmas=True, timestep_spacing="linspace"), True, one),
        "Heun, Karras": (lambda c: diffusers.HeunDiscreteScheduler.from_config(
            c, use_karras_sigmas=True, timestep_spacing="linspace"), True, two),
        "DPM-Solver++(2M)": (lambda c: diffusers.DPMSolverMultistepScheduler.from_config(
            c, algorithm_type="dpmsolver++", solver_order=2), True, one),
        "UniPC": (lambda c: diffusers.UniPCMultistepScheduler.from_config(c), True, one),
        "EDM Heun (guidekit)": (lambda c: EDMHeunScheduler.from_config(c), True, two),
        "EDM Heun, churn 10 (guidekit)": (lambda c: EDMHeunScheduler.from_config(
            c, s_churn=10.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003), False, two),
        "DDPM": (lambda c: diffusers.DDPMScheduler.from_config(c), False, one),
        "Euler ancestral": (lambda c: diffusers.EulerAncestralDiscreteScheduler.from_config(
            c, timestep_spacing="trailing"), False, one),
    }
    return table


class CallRecorder:
    """Counts the model's calls and keeps the first call's EDM input and the last call's noise level."""

    def __init__(self, pipe: MixturePipeline) -> None:
        self.pipe, self.calls, self.first, self.last_sigma, self.batch = pipe, 0, None, math.nan, 1
        pipe.transformer.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        level = module.level(float(torch.as_tensor(t).reshape(-1)[0]))
        if self.calls == 0:  # the last rows are the conditional ones in a [uncond; cond] batch
            self.first = (level.sigma, sample[-self.batch:].double() / level.alpha)
        self.calls += 1
        self.last_sigma = level.sigma

    def reset(self) -> None:
        self.calls, self.first, self.last_sigma = 0, None, math.nan


def unit_latents(x_vp: torch.Tensor, scheduler: Any, sigma_start: float) -> torch.Tensor:
    """VP latents as the ``latents`` a scheduler multiplies by its ``init_noise_sigma``."""
    init = float(scheduler.init_noise_sigma)
    return x_vp if init == 1.0 else x_vp * math.hypot(1.0, sigma_start) / init


def equal_class_moments(mixture: GaussianMixture) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and covariance of the mixture of its classes in equal proportions."""
    moments = [mixture.moments(c) for c in range(mixture.num_classes)]
    mean = sum(m for m, _ in moments) / len(moments)
    second = sum(c + torch.outer(m, m) for m, c in moments) / len(moments)
    return mean.numpy(), (second - torch.outer(mean, mean)).numpy()


def mixture_fd(table: dict, n: int, w: float) -> dict[str, list[tuple[int, float]]]:
    """Frechet distance on the 2-D mixture.

    Unguided (``w = 1``): to the exact moments, with the distance of ``n`` exact draws as the floor. Guided: to
    converged runs from the same starts (deterministic samplers: DPM-Solver++(2M) at 500 steps, the ODE's end
    point; stochastic ones: DDPM with ``fixed_large`` at 1000 steps, the SDE's).
    """
    mixture = GaussianMixture.random(3, 2, 2, generator=torch.Generator().manual_seed(0))
    pipe = MixturePipeline.from_mixture(mixture)
    pipe.set_progress_bar_config(disable=True)
    recorder = CallRecorder(pipe)
    config = pipe.scheduler.config
    labels = [i % 3 for i in range(n)]
    gen = torch.Generator().manual_seed(1)
    x_vp = pipe.noisy_latents(labels, 999, generator=gen)
    sigma_start = pipe.transformer.level(999).sigma

    def run(scheduler: Any, steps: int) -> torch.Tensor:
        pipe.scheduler = scheduler
        recorder.reset()
        return pipe(labels, num_inference_steps=steps, guidance_scale=w, generator=torch.Generator().manual_seed(2),
                    latents=unit_latents(x_vp, scheduler, sigma_start)).samples

    if w == 1.0:
        exact = equal_class_moments(mixture)
        references = {True: exact, False: exact}
        floor = frechet_distance(*gaussian_statistics(mixture.sample(n, torch.tensor(labels), generator=gen)), *exact)
        results: dict[str, list[tuple[int, float]]] = {"exact draws (floor)": [(0, floor)]}
    else:
        references = {
            True: gaussian_statistics(run(diffusers.DPMSolverMultistepScheduler.from_config(
                config, algorithm_type="dpmsolver++", solver_order=2), 500)),
            False: gaussian_statistics(run(diffusers.DDPMScheduler.from_config(config, variance_type="fixed_large"),
                                           1000)),
        }
        results = {}
    for name, (factory, deterministic, steps) in table.items():
        results[name] = []
        for s in steps:
            out = run(factory(config), s)
            results[name].append((recorder.calls, frechet_distance(*gaussian_statistics(out),
                                                                   *references[deterministic])))
    return results


def end_point(table: dict, w: float) -> dict[str, list[tuple[int, float]]]:
    """End-point error of the deterministic samplers on two 1-D Gaussians (conditional N(1, 0.5^2), unconditional
    N(0, 1)) at weight ``w``, against the closed-form ODE map and the sampler's own final denoising step."""
    oracle = GaussianCFGOracle(1.0, 0.5, 0.0, 1.0, w)
    pipe = MixturePipeline.from_mixture(GaussianMixture.isotropic([[1.0], [0.0]], [0.5, 1.0], [0, UNCONDITIONAL]))
    pipe.set_progress_bar_config(disable=True)
    recorder = CallRecorder(pipe)
    config = pipe.scheduler.config
    x_vp = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)[:, None]
    recorder.batch = len(x_vp)
    results: dict[str, list[tuple[int, float]]] = {}
    for name, (factory, deterministic, steps) in table.items():
        if not deterministic:
            continue
        results[name] = []
        for s in steps:
            pipe.scheduler = factory(config)
            recorder.reset()
            out = pipe([0] * 7, num_inference_steps=s, guidance_scale=w,
                       latents=unit_latents(x_vp, pipe.scheduler, pipe.transformer.level(999).sigma)).samples
            sigma_first, x_first = recorder.first
            a, b = oracle.ode_map(sigma_first, recorder.last_sigma)
            exact = oracle.denoise(a * x_first.numpy() + b, recorder.last_sigma)
            results[name].append((recorder.calls, float(np.abs(out.numpy() - exact).max())))
    return results


def pcg_table(n: int, w: float) -> list[tuple[str, int, int, float, float]]:
    mixture = GaussianMixture.isotropic([[1.0], [0.0]], [0.5, 1.0], [0, UNCONDITIONAL])
    pipe = MixturePipeline.from_mixture(mixture)
    pipe.set_progress_bar_config(disable=True)
    recorder = CallRecorder(pipe)
    config = pipe.scheduler.config
    rows = []
    for steps in (25, 50, 100, 200):  # divide 1000 (see samplers()); PCG runs half as many steps
        for name in ("CFG-DDIM", "CFG-DDPM", "CFG-DDPM (fixed_large)", f"PCG(gamma={2 * w - 1:g})"):
            pcg = name.startswith("PCG")
            if pcg:
                pipe.set_guidance(guidekit.PCG(2 * w - 1))
            else:
                pipe.scheduler = {"CFG-DDIM": diffusers.DDIMScheduler.from_config(config),
                                  "CFG-DDPM": diffusers.DDPMScheduler.from_config(config),
                                  "CFG-DDPM (fixed_large)": diffusers.DDPMScheduler.from_config(
                                      config, variance_type="fixed_large")}[name]
            recorder.reset()
            run_steps = (steps + 1) // 2 if pcg else steps  # equal NFE: PCG makes 2 calls per step
            out = pipe([0] * n, num_inference_steps=run_steps, guidance_scale=w,
                       generator=torch.Generator().manual_seed(3)).samples
            if pcg:
                pipe.set_guidance(None)
            rows.append((name, run_steps, recorder.calls, out.mean().item(), out.var().item()))
    return rows


def plot(panels: list[tuple[str, str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    styles = [(m, ls) for ls in ("-", "--") for m in ("o", "s", "^", "v", "D", "x")]  # overlapping curves stay visible
    for ax, (title, ylabel, results) in zip(axes.flat, panels, strict=True):
        for i, (name, points) in enumerate(results.items()):
            if name.startswith("exact"):
                ax.axhline(points[0][1], color="grey", linestyle=":", label=name)
                continue
            marker, line = styles[i % len(styles)]
            ax.loglog(*zip(*points, strict=True), marker=marker, linestyle=line, label=name, fillstyle="none")
        ax.set(xlabel="NFE (denoiser calls)", ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _print_table(title: str, results: dict, what: str) -> None:
    print(f"{title} (NFE: {what}):\n")
    print("| sampler | " + " | ".join([f"NFE: {what}"] * 5) + " |\n|---|" + "---|" * 5)
    for name, points in results.items():
        print(f"| {name} | " + " | ".join(f"{c}: {d:.2e}" for c, d in points) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--particles", type=int, default=100_000)
    parser.add_argument("--plot", default=str(Path(__file__).parents[1] / "docs" / "samplers_error_vs_nfe.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}\n")
    table = samplers()
    fd1, fd3 = mixture_fd(table, args.samples, 1.0), mixture_fd(table, args.samples, 3.0)
    end1, end3 = end_point(table, 1.0), end_point(table, 3.0)
    _print_table("Unguided: Frechet distance to the exact moments", fd1, "distance")
    _print_table("Guided, w = 3: Frechet distance to the converged run (ODE or SDE)", fd3, "distance")
    _print_table("Unguided: end-point error on the 1-D Gaussian N(1, 0.5^2)", end1, "max error")
    _print_table("Guided, w = 3: end-point error on the 1-D example", end3, "max error")
    oracle = GaussianCFGOracle(1.0, 0.5, 0.0, 1.0, 3.0)
    start = MixturePipeline.from_mixture(GaussianMixture.isotropic([[0.0]], [1.0], [0])).transformer.level(999).sigma
    ode, sde = oracle.ode(start, math.hypot(1.0, start)), oracle.sde(start, math.hypot(1.0, start))
    print(f"\nPCG against CFG samplers, w = 3, {args.particles} particles. Closed forms from sigma {start:.2f}: "
          f"ODE mean {ode[0]:.4f} var {ode[1]:.4f}; SDE mean {sde[0]:.4f} var {sde[1]:.4f}; "
          f"target p(x|c)^3 p(x)^-2: mean 1.2 var 0.1\n")
    print("| sampler | steps | NFE | mean | variance |\n|---|---|---|---|---|")
    for name, steps, calls, mean, var in pcg_table(args.particles, 3.0):
        print(f"| {name} | {steps} | {calls} | {mean:.4f} | {var:.4f} |")
    plot([("Unguided: 2-D 3-class mixture", "Frechet distance to the exact moments", fd1),
          ("CFG w=3: 2-D 3-class mixture", "Frechet distance to the converged run", fd3),
          ("Unguided: 1-D Gaussian end point", "max |x_end - exact|", end1),
          ("CFG w=3: 1-D Gaussians end point", "max |x_end - exact|", end3)], Path(args.plot))
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
