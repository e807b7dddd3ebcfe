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
    """The sweep file's JSON object; a one-line ``ValueError`` if a key is missing, if ``methods``, ``weights`` or a
    given ``schedulers`` or ``steps`` is empty or not a list (an object for ``methods``), or if a method lacks
    ``{w}``."""
    sweep = read_json_object(path, "sweep")
    for key in ("output_dir", "base", "methods", "weights"):
        if key not in sweep:
            raise ValueError(f"sweep={str(path)!r} is not accepted; it lacks {key!r} (expected output_dir, base, "
                             "methods, weights, and optionally schedulers and steps)")
    for key in ("methods", "weights", "schedulers", "steps"):
        value = sweep.get(key)
        if value is None and key in ("schedulers", "steps"):
            continue  # optional: the base run's
        if not isinstance(value, dict if key == "methods" else list) or not value:
            kind = "object of name: guidance text" if key == "methods" else "list"
            raise ValueError(f"{key}={value!r} is not accepted; expected a non-empty JSON {kind} (an empty one makes "
                             "no runs)")
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


#: The plots: file name -> (x key, y key, x label, y label, the keys of a row that make its line, the key whose
#: order the points of a line follow, the key each point is labelled with or None).
PLOTS: dict[str, tuple[str, str, str, str, tuple[str, ...], str, str | None]] = {
    "fid_vs_weight.png": ("weight", "fid", "guidance weight w", "FID", ("method", "scheduler", "steps"), "weight",
                          None),
    "precision_vs_recall.png": ("recall", "precision", "recall", "precision", ("method", "scheduler", "steps"),
                                "weight", "weight"),
    "fid_vs_nfe.png": ("nfe_per_image", "fid", "NFE per image", "FID", ("method", "weight", "scheduler"),
                       "nfe_per_image", "steps"),
}


def _describe(row: dict[str, Any], key: str) -> str:
    return {"weight": f"w={row['weight']:g}", "steps": f"{row['steps']} steps"}.get(key, str(row[key]))


def sweep_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float, str]]]]:
    """What each plot draws: ``{plot file: {line label: [(x, y, note), ...]}}``, for the plots whose metrics the
    rows have.

    A line holds the rows that agree on the plot's line keys (:data:`PLOTS`): FID against weight and precision
    against recall draw one line per method, scheduler and step count, precision-recall points in order of weight
    and each labelled with it; FID against NFE draws one line per method, weight and scheduler, its points in order
    of NFE and labelled with their steps (one line per method alone would join the weights at one NFE into vertical
    segments)."""
    out: dict[str, dict[str, list[tuple[float, float, str]]]] = {}
    for name, (x, y, _, _, keys, order, note) in PLOTS.items():
        lines: dict[str, list[tuple[float, float, float, str]]] = {}
        for r in rows:
            if x in r and y in r:
                label = " / ".join(_describe(r, k) for k in keys)
                lines.setdefault(label, []).append((float(r[order]), float(r[x]), float(r[y]),
                                                    "" if note is None else _describe(r, note)))
        if lines:
            out[name] = {label: [(px, py, text) for _, px, py, text in sorted(points)]
                         for label, points in lines.items()}
    return out


def plot_sweep(rows: list[dict[str, Any]], out: Path) -> None:
    """Write the plots of :func:`sweep_series` (where their metrics exist) into ``out``, each point labelled with its
    note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, lines in sweep_series(rows).items():
        _, _, xlabel, ylabel, *_ = PLOTS[name]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for label, points in lines.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            for px, py, note in points:
                if note:
                    ax.annotate(note, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out / name)
