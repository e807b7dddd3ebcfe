"""``guidekit lab``: the papers' claims measured on the exact Gaussian-mixture testbed, with error bars.

Each preset (:data:`PRESETS`) names a claim, a mixture in 1-D or 2-D and a grid of methods x weights x step counts.
Every cell samples class 0 of the mixture through a real diffusers pipeline (:class:`MixturePipeline`, SD's VP
schedule, the exact denoiser, the method attached with :func:`guidekit.guided`), once per seed range (three by
default), from exact draws of ``x_t`` at the first step. Metrics per run, against exact quantities:

* ``w1_target``: Wasserstein-1 (1-D, exact) or sliced Wasserstein-1 (2-D, 64 directions) to the ``w``-powered
  target ``p(x | c)^w p(x)^(1 - w)`` on a fine grid (:mod:`guidekit.testbed.metrics`);
* ``w1_data``: the same distance to ``p(x | c)`` itself (what FID measures for a perfect model);
* ``mode_tv``: total variation between the samples' shares of the class's components and ``p(x | c)``'s (0: every
  mode kept at its mass; mode dropping raises it);
* ``precision`` / ``recall``: the harness's improved precision and recall (k = 3) of the samples against as many
  exact samples of ``p(x | c)``;
* ``nfe``: network rows per sample (``guidance_stats``).

Outputs in the output directory: ``results.csv`` (one row per run), ``results.md`` (mean ± standard deviation over
the seed ranges), ``metric_vs_weight.png``, ``precision_recall.png``, ``metric_vs_nfe.png`` and, for 2-D presets,
``samples.png`` (each method's samples at the largest weight over the class's density).
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guidekit.evaluation.runner import write_text_atomic
from guidekit.testbed import GaussianMixture

METRICS = ("w1_target", "w1_data", "mode_tv", "precision", "recall", "nfe")


def _two_classes_1d() -> GaussianMixture:
    """1-D: class 0 is two unequal modes, class 1 one mode between them (Bradley & Nakkiran's kind of example)."""
    return GaussianMixture.isotropic([[-2.0], [1.5], [0.5]], [0.5, 0.4, 0.6], [0, 0, 1], [0.7, 0.3, 1.0])


def _three_modes_2d() -> GaussianMixture:
    """2-D: class 0 has a major, a middle and a minor mode; class 1 overlaps its middle mode."""
    return GaussianMixture.isotropic([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0], [0.5, 1.0]], [0.5, 0.4, 0.35, 0.8],
                                     [0, 0, 0, 1], [0.6, 0.3, 0.1, 1.0])


@dataclass(frozen=True)
class Preset:
    """One claim: a mixture, methods (``name: (guidance text with {w}, scheduler or None)``), weights, steps."""

    claim: str
    mixture: Callable[[], GaussianMixture]
    methods: dict[str, tuple[str, str | None]]
    weights: tuple[float, ...]
    steps: tuple[int, ...]
    samples: int = 2000
    low: float = -6.0
    high: float = 6.0


PRESETS: dict[str, Preset] = {
    "interval": Preset(
        "Kynkaanniemi et al. 2024: guidance in a limited noise interval keeps the modes that guidance at high noise "
        "drops, at a given strength", _three_modes_2d,
        {"CFG": ("cfg(scale={w})", None),
         "Interval(CFG)": ("interval(cfg(scale={w}), sigma_lo=0.28, sigma_hi=5.42)", None)},
        (1.0, 2.0, 3.0, 4.0), (32,)),
    "schedules": Preset(
        "Wang et al. 2024: increasing weight schedules (linear, cosine) beat a constant weight at the same mean "
        "weight", _three_modes_2d,
        {"constant": ("cfg(scale={w})", None),
         "linear": ("scheduled(cfg(scale={w}), schedule='linear')", None),
         "cosine": ("scheduled(cfg(scale={w}), schedule='cosine')", None)},
        (1.0, 2.0, 3.0, 4.0), (32,)),
    "adaptive": Preset(
        "Castillo et al. 2024: adaptive guidance saves about 25% of the network evaluations at equal quality",
        _three_modes_2d,
        {"CFG": ("cfg(scale={w})", None),
         "AG 0.99": ("adaptive(cfg(scale={w}), threshold=0.99)", None),
         "AG 0.999": ("adaptive(cfg(scale={w}), threshold=0.999)", None)},
        (2.0, 3.0), (16, 32, 64)),
    "pcg": Preset(
        "Bradley & Nakkiran 2024: CFG-DDIM and CFG-DDPM sample different distributions, neither the powered one",
        _two_classes_1d,
        {"CFG + DDIM": ("cfg(scale={w})", "ddim"), "CFG + DDPM": ("cfg(scale={w})", "ddpm"),
         "PCG(gamma=w, K=4)": ("pcg(gamma={w}, corrector_steps=4)", None)},
        (1.0, 2.0, 3.0), (64,)),
    "precision_recall": Preset(
        "Kynkaanniemi et al. 2019, Nichol & Dhariwal 2021: guidance trades recall for precision", _three_modes_2d,
        {"CFG": ("cfg(scale={w})", None), "APG": ("apg(scale={w}, momentum=0, norm_threshold=0)", None)},
        (1.0, 1.5, 2.0, 3.0, 5.0), (32,)),
}

#: Seed ranges of a run: the first seed of each (the samples of a run use consecutive draws of one generator).
SEED_RANGES = (0, 100_000, 200_000)


def _pipeline(mixture: GaussianMixture, scheduler: str | None) -> Any:
    from guidekit.bridge.schedulers import make_scheduler
    from guidekit.bridge.testbed import MixturePipeline

    pipe = MixturePipeline.from_mixture(mixture)
    if scheduler is not None:
        overrides = {"variance_type": "fixed_large"} if scheduler == "ddpm" else {}
        pipe.scheduler = make_scheduler(scheduler, {**pipe.scheduler.config, **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(mixture: GaussianMixture, guidance: str, scheduler: str | None, steps: int, n: int, seed: int
           ) -> tuple[torch.Tensor, float]:
    """``n`` samples of class 0 under ``guidance`` (text form) and the network rows per sample."""
    import guidekit

    pipe = _pipeline(mixture, scheduler)
    pipe.scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = pipe.noisy_latents([0] * n, float(pipe.scheduler.timesteps[0]), generator)
    with guidekit.guided(pipe, guidance) as run:
        out = pipe([0] * n, num_inference_steps=steps, guidance_scale=2.0, generator=generator, latents=latents)
    return out.samples.detach(), run.stats.rows / n


def measure(mixture: GaussianMixture, samples: torch.Tensor, weight: float, preset: Preset, seed: int
            ) -> dict[str, float]:
    """The metrics of the module docstring for ``samples`` of class 0 at weight ``weight``."""
    from guidekit.evaluation.manifold import precision_recall
    from guidekit.testbed.metrics import grid, mode_coverage, powered_density, wasserstein

    points, volume = grid(preset.low, preset.high, 2000 if mixture.dim == 1 else 160, mixture.dim)
    target = powered_density(mixture, 0, weight, points, volume)
    data = powered_density(mixture, 0, 1.0, points, volume)
    shares = mode_coverage(mixture, samples, points, data, volume)
    own = [i for i, label in enumerate(mixture.labels.tolist()) if label == 0]
    exact = mixture.sample(len(samples), torch.zeros(len(samples), dtype=torch.long),
                           generator=torch.Generator().manual_seed(seed + 1))
    precision, recall = precision_recall(exact, samples)
    return {"w1_target": wasserstein(samples, points, target, volume),
            "w1_data": wasserstein(samples, points, data, volume),
            "mode_tv": 0.5 * sum(abs(shares[i][0] - shares[i][1]) for i in own)
            + 0.5 * sum(shares[i][0] for i in range(len(shares)) if i not in own),
            "precision": precision, "recall": recall}


def run_lab(name: str, output_dir: str | Path, *, tiny: bool = False, seeds: tuple[int, ...] = SEED_RANGES
            ) -> list[dict[str, Any]]:
    """Run preset ``name`` (``tiny``: 200 samples, the first two weights, 8 steps), write the outputs and return
    the rows (one per run)."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not accepted; expected one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    mixture = preset.mixture()
    n = 200 if tiny else preset.samples
    weights = preset.weights[:2] if tiny else preset.weights
    steps_list = (8,) if tiny else preset.steps
    rows, kept = [], {}
    for method, (template, scheduler) in preset.methods.items():
        for weight in weights:
            for steps in steps_list:
                for seed in seeds:
                    guidance = template.replace("{w}", repr(float(weight)))
                    samples, nfe = sample(mixture, guidance, scheduler, steps, n, seed)
                    if not bool(torch.isfinite(samples).all()):
                        raise RuntimeError(f"{method} at w={weight} gave non-finite samples")
                    rows.append({"method": method, "weight": weight, "steps": steps, "seed": seed,
                                 "guidance": guidance, "scheduler": scheduler or "ddim", "nfe": nfe,
                                 **measure(mixture, samples, weight, preset, seed)})
                    kept[method] = samples
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    summary = summarize(rows)
    write_text_atomic(out / "results.md", f"# {name}\n\n{preset.claim}\n\n{markdown(summary)}\n")
    plot_lab(summary, out, name)
    if mixture.dim == 2:
        plot_samples(mixture, kept, preset, out / "samples.png", max(weights))
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seed ranges of each (method, weight, steps) cell."""
    cells: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["method"], row["weight"], row["steps"]), []).append(row)
    out = []
    for (method, weight, steps), runs in cells.items():
        cell: dict[str, Any] = {"method": method, "weight": weight, "steps": steps, "runs": len(runs)}
        for metric in METRICS:
            values = [float(r[metric]) for r in runs]
            cell[metric] = statistics.fmean(values)
            cell[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(cell)
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    """The summary as a markdown table, mean ± standard deviation over the seed ranges."""
    lines = ["| method | w | steps | " + " | ".join(METRICS) + " |", "|---|---:|---:|" + "---:|" * len(METRICS)]
    for cell in summary:
        values = " | ".join(f"{cell[m]:.3f} ± {cell[f'{m}_std']:.3f}" for m in METRICS)
        lines.append(f"| {cell['method']} | {cell['weight']:g} | {cell['steps']} | {values} |")
    return "\n".join(lines)


def plot_lab(summary: list[dict[str, Any]], out: Path, title: str) -> None:
    """Metric against weight, precision against recall (each method's Pareto front), metric against NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(c["method"] for c in summary))
    figures = {"metric_vs_weight.png": ("weight", "w1_data"), "precision_recall.png": ("recall", "precision"),
               "metric_vs_nfe.png": ("nfe", "w1_data")}
    for file, (x, y) in figures.items():
        fig, axes = plt.subplots(1, 2 if x == "weight" else 1, figsize=(10 if x == "weight" else 5, 4), squeeze=False)
        for ax, metric in zip(axes[0], (y, "w1_target") if x == "weight" else (y,), strict=True):
            for method in methods:
                cells = sorted((c for c in summary if c["method"] == method), key=lambda c: (c[x], c["weight"]))
                ax.errorbar([c[x] for c in cells], [c[metric] for c in cells], yerr=[c[f"{metric}_std"] for c in cells],
                            xerr=None if x == "weight" else [c[f"{x}_std"] for c in cells], marker="o", capsize=3,
                            label=method)
            ax.set_xlabel(x)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / file, dpi=100)
        plt.close(fig)


def plot_samples(mixture: GaussianMixture, samples: dict[str, torch.Tensor], preset: Preset, path: Path,
                 weight: float) -> None:
    """Each method's samples (its last run) over the density of ``p(x | c)`` and the class's mode centres."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guidekit.testbed.metrics import grid, powered_density

    points, volume = grid(preset.low, preset.high, 160, 2)
    density = powered_density(mixture, 0, 1.0, points, volume).reshape(160, 160).numpy()
    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4), squeeze=False)
    own = mixture.means[mixture.labels == 0].numpy()
    for ax, (method, xs) in zip(axes[0], samples.items(), strict=True):
        ax.imshow(density, origin="lower", extent=(preset.low, preset.high, preset.low, preset.high), cmap="Greys")
        ax.scatter(xs[:, 1].numpy(), xs[:, 0].numpy(), s=2, alpha=0.4, color="tab:blue")
        ax.scatter(own[:, 1], own[:, 0], marker="x", color="tab:red", s=60)
        ax.set_title(f"{method}, w={weight:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["PRESETS", "Preset", "measure", "run_lab", "sample", "summarize"]
