"""``guidekit sweep``: a grid of evaluation runs (methods x guidance weights x schedulers x step counts) into one
results table and three plots (FID against weight, precision against recall, FID against NFE).

The sweep file is JSON::

    {"output_dir": "sweeps/dit",
     "base": {"model": "facebook/DiT-XL-2-256", "seeds": "0-9999", "reference": "ref.npz", "metrics": ["fid", ...]},
     "methods": {"cfg": "cfg(scale={w})", "interval": "interval(cfg(scale={w}), sigma_lo=0.28, sigma_hi=5.42)"},
     "weights": [1.5, 2.0, 3.0],
     "schedulers": ["ddim", "heun"],
     "steps": [32]}

Each cell is a normal ``guidekit eval`` run in its own sub-directory, so a sweep resumes cell by cell and
shard by shard. ``{w}`` in a method is replaced by each weight.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from guidekit.evaluation.config import EvalConfig, read_json_object
from guidekit.evaluation.runner import run_eval, write_text_atomic

COLUMNS = ("method", "weight", "scheduler", "steps", "guidance", "nfe_per_image", "images")


def load_sweep(path: str | Path) -> dict[str, Any]:
    sweep = read_json_object(path, "sweep")
    for key in ("output_dir", "base", "methods", "weights"):
        if key not in sweep:
            raise ValueError(f"sweep={str(path)!r} is not accepted; it lacks {key!r} (expected output_dir, base, "
                             "methods, weights, and optionally schedulers and steps)")
    bad = [name for name, text in sweep["methods"].items() if "{w}" not in text]
    if bad:
        raise ValueError(f"methods {bad} are not accepted; each guidance text needs a '{{w}}' for the weight")
    return sweep


def cells(sweep: dict[str, Any]) -> list[tuple[dict[str, Any], EvalConfig]]:
    """Every run of the grid: its coordinates and its config."""
    base = dict(sweep["base"])
    out = []
    for name, template in sweep["methods"].items():
        for weight in sweep["weights"]:
            for scheduler in sweep.get("schedulers") or [base.get("scheduler")]:
                for steps in sweep.get("steps") or [base.get("steps", 50)]:
                    guidance = template.replace("{w}", repr(float(weight)))
                    tag = f"{name}-w{weight:g}-{scheduler or 'default'}-s{steps}"
                    config = EvalConfig.from_dict({**base, "guidance": guidance, "scheduler": scheduler,
                                                   "steps": steps, "output_dir": str(Path(sweep["output_dir"]) / tag)})
                    out.append(({"method": name, "weight": weight, "scheduler": scheduler or "default",
                                 "steps": steps, "guidance": guidance}, config))
    return out


def run_sweep(path: str | Path, *, progress: bool = True) -> list[dict[str, Any]] | None:
    """Run every cell (resuming finished work), then write ``results.csv``, ``results.md`` and the plots."""
    sweep = load_sweep(path)
    rows = []
    for coords, config in cells(sweep):
        result = run_eval(config, progress=progress)
        if result is not None:
            rows.append({**coords, "nfe_per_image": result["nfe_per_image"], "images": result["images"],
                         **result["metrics"]})
    if not rows:
        return None  # not the main process
    out = Path(sweep["output_dir"])
    metrics = [k for k in rows[0] if k not in COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *metrics])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    header = "| " + " | ".join([*COLUMNS, *metrics]) + " |\n|" + "---|" * (len(COLUMNS) + len(metrics)) + "\n"
    body = "".join("| " + " | ".join(_cell(r[c]) for c in (*COLUMNS, *metrics)) + " |\n" for r in rows)
    write_text_atomic(out / "results.md", header + body)
    plot_sweep(rows, out)
    return rows


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_sweep(rows: list[dict[str, Any]], out: Path) -> None:
    """FID against weight, precision against recall, FID against NFE (where those metrics exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key_x: str, key_y: str) -> dict[str, list[tuple[float, float]]]:
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if key_x in r and key_y in r:
                groups.setdefault(f"{r['method']} / {r['scheduler']}", []).append((r[key_x], r[key_y]))
        return {k: sorted(v) for k, v in groups.items()}

    for name, (x, y, xlabel, ylabel) in {"fid_vs_weight.png": ("weight", "fid", "guidance weight w", "FID"),
                                         "precision_vs_recall.png": ("recall", "precision", "recall", "precision"),
                                         "fid_vs_nfe.png": ("nfe_per_image", "fid", "NFE per image", "FID")}.items():
        groups = series(x, y)
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for label, points in groups.items():
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out / name)
