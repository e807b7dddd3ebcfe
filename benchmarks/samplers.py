"""Error against NFE of each sampler on the exact Gaussian-mixture testbed.

    python benchmarks/samplers.py                       # tables on stdout, plot to docs/samplers_error_vs_nfe.png

Three measurements, all on :class:`guidekit.bridge.testbed.MixturePipeline` with SD's VP schedule:

1. unguided: Frechet distance between 10k class-conditional samples (a third per class) of a 2-D, 3-class
   mixture and the exact mean and covariance of that equal-class mixture; every sampler starts from the exact
   noisy marginal at t = 999 (``noisy_latents``). The floor is the distance of 10k exact draws;
2. guided, w = 3: end-point error of the deterministic samplers on the 1-D example of REFERENCE
   (p(x | c) = N(1, 0.5^2), p(x) = N(0, 1)) against the closed form: the CFG probability-flow ODE from the
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
        self.pipe, self.calls, self.first, self.last_sigma = pipe, 0, None, math.nan
        pipe.transformer.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        level = module.level(float(torch.as_tensor(t).reshape(-1)[0]))
        if self.calls == 0:
            self.first = (level.sigma, sample[: len(sample) // 2 if len(sample) > 1 else 1].double() / level.alpha)
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


def unguided_fd(table: dict, n: int) -> dict[str, list[tuple[int, float]]]:
    mixture = GaussianMixture.random(3, 2, 2, generator=torch.Generator().manual_seed(0))
    pipe = MixturePipeline.from_mixture(mixture)
    pipe.set_progress_bar_config(disable=True)
    recorder = CallRecorder(pipe)
    config = pipe.scheduler.config
    labels = [i % 3 for i in range(n)]
    gen = torch.Generator().manual_seed(1)
    x_vp = pipe.noisy_latents(labels, 999, generator=gen)
    reference = equal_class_moments(mixture)
    floor = frechet_distance(*gaussian_statistics(mixture.sample(n, torch.tensor(labels), generator=gen)), *reference)
    results: dict[str, list[tuple[int, float]]] = {"exact draws (floor)": [(0, floor)]}
    sigma_start = pipe.transformer.level(999).sigma
    for name, (factory, _, steps) in table.items():
        results[name] = []
        for s in steps:
            pipe.scheduler = factory(config)
            recorder.reset()
            out = pipe(labels, num_inference_steps=s, latents=unit_latents(x_vp, pipe.scheduler, sigma_start),
                       generator=torch.Generator().manual_seed(2)).samples
            results[name].append((recorder.calls, frechet_distance(*gaussian_statistics(out), *reference)))
    return results


def guided_end_point(table: dict, w: float) -> dict[str, list[tuple[int, float]]]:
    oracle = GaussianCFGOracle(1.0, 0.5, 0.0, 1.0, w)
    pipe = MixturePipeline.from_mixture(GaussianMixture.isotropic([[1.0], [0.0]], [0.5, 1.0], [0, UNCONDITIONAL]))
    pipe.set_progress_bar_config(disable=True)
    recorder = CallRecorder(pipe)
    config = pipe.scheduler.config
    x_vp = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)[:, None]
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


def plot(fd: dict, end: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = [(m, ls) for ls in ("-", "--") for m in ("o", "s", "^", "v", "D", "x")]  # overlapping curves stay visible
    for i, (name, points) in enumerate(fd.items()):
        if name.startswith("exact"):
            axes[0].axhline(points[0][1], color="grey", linestyle=":", label=name)
            continue
        marker, line = styles[i % len(styles)]
        axes[0].loglog(*zip(*points, strict=True), marker=marker, linestyle=line, label=name, fillstyle="none")
    for i, (name, points) in enumerate(end.items()):
        marker, line = styles[(i + 1) % len(styles)]
        axes[1].loglog(*zip(*points, strict=True), marker=marker, linestyle=line, label=name, fillstyle="none")
    axes[0].set(xlabel="NFE (denoiser calls)", ylabel="Frechet distance to the exact moments",
                title="Unguided, 2-D 3-class mixture, 10k samples")
    axes[1].set(xlabel="NFE (denoiser calls)", ylabel="max |x_end - exact|",
                title="CFG w=3, 1-D Gaussians: end-point error")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--particles", type=int, default=100_000)
    parser.add_argument("--plot", default=str(Path(__file__).parents[1] / "docs" / "samplers_error_vs_nfe.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}\n")
    table = samplers()
    fd = unguided_fd(table, args.samples)
    print("Unguided Frechet distance to the exact moments (NFE: distance):\n")
    print("| sampler | " + " | ".join(["NFE, FD"] * 5) + " |\n|---|" + "---|" * 5)
    for name, points in fd.items():
        print(f"| {name} | " + " | ".join(f"{c}: {d:.2e}" for c, d in points) + " |")
    end = guided_end_point(table, 3.0)
    print("\nGuided (w = 3) end-point error on the 1-D example (NFE: max |error|):\n")
    print("| sampler | " + " | ".join(["NFE, error"] * 5) + " |\n|---|" + "---|" * 5)
    for name, points in end.items():
        print(f"| {name} | " + " | ".join(f"{c}: {e:.2e}" for c, e in points) + " |")
    oracle = GaussianCFGOracle(1.0, 0.5, 0.0, 1.0, 3.0)
    start = MixturePipeline.from_mixture(GaussianMixture.isotropic([[0.0]], [1.0], [0])).transformer.level(999).sigma
    ode, sde = oracle.ode(start, math.hypot(1.0, start)), oracle.sde(start, math.hypot(1.0, start))
    print(f"\nPCG against CFG samplers, w = 3, {args.particles} particles. Closed forms from sigma {start:.2f}: "
          f"ODE mean {ode[0]:.4f} var {ode[1]:.4f}; SDE mean {sde[0]:.4f} var {sde[1]:.4f}; "
          f"target p(x|c)^3 p(x)^-2: mean 1.2 var 0.1\n")
    print("| sampler | steps | NFE | mean | variance |\n|---|---|---|---|---|")
    for name, steps, calls, mean, var in pcg_table(args.particles, 3.0):
        print(f"| {name} | {steps} | {calls} | {mean:.4f} | {var:.4f} |")
    plot(fd, end, Path(args.plot))
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
