"""``guidekit lab``: the papers' claims measured on the exact Gaussian-mixture testbed and on the embedded digits
model, with error bars from three seed ranges.

Each preset (:data:`PRESETS`) names a claim, a mixture in 1-D or 2-D and a grid of methods x weights x step counts,
and most add a grid on the embedded model (:class:`ModelGrid`).
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

On the embedded model each cell of the grid is a ``guidekit eval`` run (resumable, shard by shard) of the model's
classes in turn, scored with the digits network (``feature_network="digits"``) against the model's 360 held-out
digits: ``fd`` (Frechet distance of the digit features), ``precision``, ``recall``, ``saturation`` and ``nfe``. The
runs live in ``<root>/cells`` and are shared by the presets (CFG at a weight is one run for all of them). Outputs:
``model_results.csv``, ``model_results.md`` and the plots ``model_metric_vs_weight.png``,
``model_precision_recall.png``, ``model_metric_vs_nfe.png``. The ``interval`` and ``precision_recall`` presets add
``fd_inception.md``: Inception FID of the first seed range's images beside their digit FD, and the Spearman
correlation of the two over the grid's points. Every table
reports the floor: the digit FD of the training digits (one colouring) against the held-out ones.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guidekit.evaluation.runner import write_text_atomic
from guidekit.testbed import GaussianMixture

METRICS = ("w1_target", "w1_data", "mode_tv", "precision", "recall", "nfe")
MODEL_METRICS = ("fd", "precision", "recall", "saturation", "nfe")


def _two_classes_1d() -> GaussianMixture:
    """1-D: class 0 is two unequal modes, class 1 one mode between them (Bradley & Nakkiran's kind of example)."""
    return GaussianMixture.isotropic([[-2.0], [1.5], [0.5]], [0.5, 0.4, 0.6], [0, 0, 1], [0.7, 0.3, 1.0])


def _three_modes_2d() -> GaussianMixture:
    """2-D: class 0 has a major, a middle and a minor mode; class 1 overlaps its middle mode."""
    return GaussianMixture.isotropic([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0], [0.5, 1.0]], [0.5, 0.4, 0.35, 0.8],
                                     [0, 0, 0, 1], [0.6, 0.3, 0.1, 1.0])


@dataclass(frozen=True)
class ModelGrid:
    """A grid on the embedded model: methods (``name: guidance text with {w}``), weights, step counts, images per
    seed range, and a scheduler name for every method (``None``: the model's DDIM)."""

    methods: dict[str, str]
    weights: tuple[float, ...]
    steps: tuple[int, ...] = (20,)
    images: int = 300
    scheduler: str | None = None


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
    model: ModelGrid | None = None
    inception: bool = False


PRESETS: dict[str, Preset] = {
    "interval": Preset(
        "Kynkaanniemi et al. 2024: guidance in a limited noise interval keeps the modes that guidance at high noise "
        "drops, at a given strength", _three_modes_2d,
        {"CFG": ("cfg(scale={w})", None),
         "Interval(CFG)": ("interval(cfg(scale={w}), sigma_lo=0.28, sigma_hi=5.42)", None)},
        (1.0, 2.0, 3.0, 4.0), (32,),
        model=ModelGrid({"CFG": "cfg(scale={w})",
                         "Interval(CFG)": "interval(cfg(scale={w}), sigma_lo=0.28, sigma_hi=5.42)"},
                        (1.0, 2.0, 3.0, 4.0)), inception=True),
    "schedules": Preset(
        "Wang et al. 2024: increasing weight schedules (linear, cosine) beat a constant weight at the same mean "
        "weight", _three_modes_2d,
        {"constant": ("cfg(scale={w})", None),
         "linear": ("scheduled(cfg(scale={w}), schedule='linear')", None),
         "cosine": ("scheduled(cfg(scale={w}), schedule='cosine')", None)},
        (1.0, 2.0, 3.0, 4.0), (32,),
        model=ModelGrid({"constant": "cfg(scale={w})", "linear": "scheduled(cfg(scale={w}), schedule='linear')",
                         "cosine": "scheduled(cfg(scale={w}), schedule='cosine')"}, (1.0, 2.0, 3.0, 4.0))),
    "adaptive": Preset(
        "Castillo et al. 2024: adaptive guidance saves about 25% of the network evaluations at equal quality",
        _three_modes_2d,
        {"CFG": ("cfg(scale={w})", None),
         "AG 0.99": ("adaptive(cfg(scale={w}), threshold=0.99)", None),
         "AG 0.999": ("adaptive(cfg(scale={w}), threshold=0.999)", None)},
        (2.0, 3.0), (16, 32, 64),
        model=ModelGrid({"CFG": "cfg(scale={w})", "AG 0.99": "adaptive(cfg(scale={w}), threshold=0.99)",
                         "AG 0.999": "adaptive(cfg(scale={w}), threshold=0.999)"}, (3.0,), (10, 20, 40))),
    "pcg": Preset(
        "Bradley & Nakkiran 2024: CFG-DDIM and CFG-DDPM sample different distributions, neither the powered one",
        _two_classes_1d,
        {"CFG + DDIM": ("cfg(scale={w})", "ddim"), "CFG + DDPM": ("cfg(scale={w})", "ddpm"),
         "PCG(gamma=w, K=4)": ("pcg(gamma={w}, corrector_steps=4)", None)},
        (1.0, 2.0, 3.0), (64,)),
    "precision_recall": Preset(
        "Kynkaanniemi et al. 2019, Nichol & Dhariwal 2021: guidance trades recall for precision", _three_modes_2d,
        {"CFG": ("cfg(scale={w})", None), "APG": ("apg(scale={w}, momentum=0, norm_threshold=0)", None)},
        (1.0, 1.5, 2.0, 3.0, 5.0), (32,),
        model=ModelGrid({"CFG": "cfg(scale={w})", "APG": "apg(scale={w})"}, (1.0, 1.5, 2.0, 3.0, 5.0)),
        inception=True),
    "apg": Preset(
        "Sadat et al. 2024: APG allows high guidance scales without oversaturation, at equal or better FID",
        _three_modes_2d,
        {"CFG": ("cfg(scale={w})", None), "APG": ("apg(scale={w}, momentum=0, norm_threshold=0)", None)},
        (3.0, 5.0, 8.0), (32,),
        model=ModelGrid({"CFG": "cfg(scale={w})", "APG": "apg(scale={w})"}, (1.0, 3.0, 5.0, 8.0))),
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


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def run_testbed_grid(preset: Preset, out: Path, *, tiny: bool, seeds: tuple[int, ...], title: str
                     ) -> list[dict[str, Any]]:
    """The preset's testbed grid: rows (one per run), ``results.*``, the plots and ``samples.png`` in ``out``."""
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
    _write_csv(out / "results.csv", rows)
    summary = summarize(rows, METRICS)
    write_text_atomic(out / "results.md", f"# {title}: the exact testbed\n\n{preset.claim}\n\n"
                                          f"{markdown(summary, METRICS)}\n")
    plot_lab(summary, out, title, "", ("w1_data", "w1_target"))
    if mixture.dim == 2:
        plot_samples(mixture, kept, preset, out / "samples.png", max(weights))
    return rows


def digit_floor(n: int, draws: int = 3) -> str:
    """The digit FD of the training digits (one colouring, seed 0) against the embedded model's held-out digits: with
    all of them, and with ``n`` of them (a run's sample count; FD's bias grows as the count falls) as mean and
    standard deviation over ``draws`` seeded draws without replacement. One line for the tables."""
    from guidekit.app.digits import coloured_digits
    from guidekit.evaluation.digit_features import DigitFeatures
    from guidekit.evaluation.frechet import frechet_distance, gaussian_statistics
    from guidekit.evaluation.reference import reference_from_source

    network = DigitFeatures()
    reference = reference_from_source("default", network)
    train = network(coloured_digits("train", torch.Generator().manual_seed(0))[0]).features.double().numpy()

    def fd(x: np.ndarray) -> float:
        return frechet_distance(*gaussian_statistics(x), reference.mu, reference.sigma)

    line = f"FD {fd(train):.3f} with all {len(train)}"
    if n < len(train):
        rng = np.random.default_rng(0)
        at_n = [fd(train[rng.choice(len(train), n, replace=False)]) for _ in range(draws)]
        line += f"; {np.mean(at_n):.3f} ± {np.std(at_n, ddof=1):.3f} with {n} of them, a run's count ({draws} draws)"
    return line


def _model_reference(root: Path) -> Path:
    """The digit-feature statistics of the held-out digits, written once into ``root``."""
    from guidekit.evaluation.digit_features import DigitFeatures
    from guidekit.evaluation.reference import reference_from_source, save_reference

    path = root / "digits_reference.npz"
    if not path.exists():
        save_reference(path, reference_from_source("default", DigitFeatures()))
    return path


def _cell_name(guidance: str, scheduler: str | None, steps: int, seed: int, n: int, keep: bool) -> str:
    """A folder name per run: readable, and unique by a hash of everything the run depends on."""
    import hashlib

    key = f"{guidance}|{scheduler}|{steps}|{seed}|{n}|{keep}"
    readable = "".join(c if c.isalnum() or c in "-.=" else "_" for c in guidance)[:48]
    return f"{readable}-s{steps}-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def run_model_grid(grid: ModelGrid, root: Path, out: Path, *, tiny: bool, seeds: tuple[int, ...], title: str,
                   keep_images: bool = False) -> list[dict[str, Any]]:
    """The preset's grid on the embedded model: one ``guidekit eval`` run per (method, weight, steps, seed range)
    under ``root/cells`` (shared by presets, resumed), rows and ``model_results.*`` and plots in ``out``. With
    ``keep_images`` the first seed range's images are kept (npz) for :func:`inception_check`."""
    from guidekit.evaluation.config import EvalConfig
    from guidekit.evaluation.runner import run_eval

    reference = _model_reference(root)
    n = 20 if tiny else grid.images
    weights = grid.weights[:2] if tiny else grid.weights
    steps_list = (4,) if tiny else grid.steps
    rows = []
    for method, template in grid.methods.items():
        for weight in weights:
            for steps in steps_list:
                for seed in seeds:
                    guidance = template.replace("{w}", repr(float(weight)))
                    keep = keep_images and seed == seeds[0]
                    folder = root / "cells" / _cell_name(guidance, grid.scheduler, steps, seed, n, keep)
                    config = EvalConfig(model="default", output_dir=str(folder), guidance=guidance,
                                        scheduler=grid.scheduler, steps=steps, seeds=f"{seed}-{seed + n - 1}",
                                        batch_size=64, metrics=["fid", "precision", "recall", "saturation"],
                                        feature_network="digits", reference=str(reference),
                                        save_images="npz" if keep else "none", shard_size=n)
                    result = run_eval(config, progress=False)
                    if result is None:
                        raise RuntimeError("the lab runs in one process; run it without accelerate launch")
                    metrics = result["metrics"]
                    rows.append({"method": method, "weight": weight, "steps": steps, "seed": seed,
                                 "guidance": guidance, "fd": metrics["fid"], "precision": metrics["precision"],
                                 "recall": metrics["recall"], "saturation": metrics["saturation"],
                                 "nfe": result["nfe_per_image"], "run": str(folder)})
    _write_csv(out / "model_results.csv", rows)
    summary = summarize(rows, MODEL_METRICS)
    write_text_atomic(out / "model_results.md", f"# {title}: the embedded digits model\n\n"
                                                f"{markdown(summary, MODEL_METRICS)}\n\nFloor (training digits "
                                                f"against the held-out ones): {digit_floor(n)}.\n")
    plot_lab(summary, out, title, "model_", ("fd", "saturation"))
    return rows


def inception_check(rows: list[dict[str, Any]], out: Path, images: int | None = None,
                    reference_images: int | None = None) -> float:
    """Inception FID of the first ``images`` (``None``: all) kept images of each point (the runs that kept them)
    against the held-out digits (the first ``reference_images``; ``None``: all 360), beside their digit FD; write
    ``fd_inception.md`` and return Spearman's rank correlation."""
    from guidekit.evaluation.features import InceptionFeatures
    from guidekit.evaluation.frechet import frechet_distance
    from guidekit.evaluation.reference import reference_from_npz_images, reference_from_source

    network = InceptionFeatures()
    reference = reference_from_source("default", network, limit=reference_images)
    points = []
    for row in rows:
        files = sorted((Path(row["run"]) / "images").glob("*.npz"))
        if not files:
            continue
        stats = reference_from_npz_images(files[0], network, limit=images)
        points.append((row, frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)))
    digit_fd = [float(r["fd"]) for r, _ in points]
    inception = [fid for _, fid in points]
    rho = _spearman(digit_fd, inception)
    lines = [f"# Digit FD against Inception FID ({len(points)} points, the first seed range, "
             f"{images or 'all its'} images each for Inception)", "", f"Spearman's rank correlation: {rho:.3f}", "",
             "| method | w | steps | digit FD | Inception FID |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['weight']:g} | {r['steps']} | {float(r['fd']):.3f} | {fid:.2f} |"
              for r, fid in points]
    write_text_atomic(out / "fd_inception.md", "\n".join(lines) + "\n")
    return rho


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x: list[float]) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        values = np.asarray(x)
        for v in set(x):  # ties share their mean rank
            r[values == v] = r[values == v].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def run_lab(name: str, root: str | Path, *, tiny: bool = False, seeds: tuple[int, ...] = SEED_RANGES,
            model: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Run preset ``name`` into ``root/name`` (its model runs under ``root/cells``, shared by the presets) and return
    its rows: ``testbed`` and, where the preset has a model grid and ``model`` is set, ``model``. ``tiny``: 200
    testbed samples, 20 model images per seed range, the first two weights, 8 testbed and 4 model steps."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not accepted; expected one of {', '.join(PRESETS)}")
    preset, root = PRESETS[name], Path(root)
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    result = {"testbed": run_testbed_grid(preset, out, tiny=tiny, seeds=seeds, title=name)}
    if model and preset.model is not None:
        check = preset.inception
        result["model"] = run_model_grid(preset.model, root, out, tiny=tiny, seeds=seeds, title=name,
                                         keep_images=check)
        if check:
            inception_check(result["model"], out, images=4 if tiny else None, reference_images=8 if tiny else None)
    return result


def summarize(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seed ranges of each (method, weight, steps) cell."""
    cells: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["method"], row["weight"], row["steps"]), []).append(row)
    out = []
    for (method, weight, steps), runs in cells.items():
        cell: dict[str, Any] = {"method": method, "weight": weight, "steps": steps, "runs": len(runs)}
        for metric in metrics:
            values = [float(r[metric]) for r in runs]
            cell[metric] = statistics.fmean(values)
            cell[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(cell)
    return out


def markdown(summary: list[dict[str, Any]], metrics: tuple[str, ...]) -> str:
    """The summary as a markdown table, mean ± standard deviation over the seed ranges."""
    lines = ["| method | w | steps | " + " | ".join(metrics) + " |", "|---|---:|---:|" + "---:|" * len(metrics)]
    for cell in summary:
        values = " | ".join(f"{cell[m]:.3f} ± {cell[f'{m}_std']:.3f}" for m in metrics)
        lines.append(f"| {cell['method']} | {cell['weight']:g} | {cell['steps']} | {values} |")
    return "\n".join(lines)


def plot_lab(summary: list[dict[str, Any]], out: Path, title: str, prefix: str, against_weight: tuple[str, str]
             ) -> None:
    """Two metrics against weight, precision against recall (each method's Pareto front), the first metric
    against NFE; files ``{prefix}metric_vs_weight.png``, ``{prefix}precision_recall.png``,
    ``{prefix}metric_vs_nfe.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(c["method"] for c in summary))
    main = against_weight[0]
    figures = {"metric_vs_weight.png": ("weight", against_weight), "precision_recall.png": ("recall", ("precision",)),
               "metric_vs_nfe.png": ("nfe", (main,))}
    for file, (x, ys) in figures.items():
        fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4), squeeze=False)
        for ax, metric in zip(axes[0], ys, strict=True):
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
        fig.savefig(out / f"{prefix}{file}", dpi=100)
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


__all__ = ["METRICS", "MODEL_METRICS", "PRESETS", "ModelGrid", "Preset", "measure", "run_lab", "sample", "summarize"]
