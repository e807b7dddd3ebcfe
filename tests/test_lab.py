"""`guidekit lab`: every preset in its tiny size writes its table and plots, with finite metrics ordered as the
theory says (each check can fail: they compare runs at different weights or methods)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from guidekit.cli import main
from guidekit.evaluation.lab import METRICS, MODEL_METRICS, PRESETS


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab")
    assert main(["lab", "--preset", "all", "--output-dir", str(out), "--tiny"]) == 0
    return out


def _rows(lab_dir: Path, preset: str, file: str = "results.csv") -> list[dict[str, str]]:
    with open(lab_dir / preset / file) as f:
        return list(csv.DictReader(f))


def _mean(rows: list[dict[str, str]], metric: str, **where: object) -> float:
    values = [float(r[metric]) for r in rows if all(r[k] == str(v) for k, v in where.items())]
    assert len(values) == 3, (where, len(values))  # three seed ranges
    return sum(values) / len(values)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_writes_its_outputs_with_finite_metrics(lab_dir: Path, preset: str) -> None:
    folder = lab_dir / preset
    for name in ("results.csv", "results.md", "metric_vs_weight.png", "precision_recall.png", "metric_vs_nfe.png"):
        assert (folder / name).stat().st_size > 0, name
    assert (folder / "samples.png").exists() == (PRESETS[preset].mixture().dim == 2)
    rows = _rows(lab_dir, preset)
    assert len(rows) == len(PRESETS[preset].methods) * 2 * 3  # methods x 2 weights x 3 seed ranges (tiny)
    assert all(math.isfinite(float(r[m])) for r in rows for m in METRICS)
    assert "±" in (folder / "results.md").read_text()
    grid = PRESETS[preset].model
    if grid is None:
        assert not (folder / "model_results.csv").exists()
        return
    for name in ("model_results.md", "model_metric_vs_weight.png", "model_precision_recall.png",
                 "model_metric_vs_nfe.png"):
        assert (folder / name).stat().st_size > 0, name
    model_rows = _rows(lab_dir, preset, "model_results.csv")
    assert len(model_rows) == len(grid.methods) * min(2, len(grid.weights)) * 3
    assert all(math.isfinite(float(r[m])) for r in model_rows for m in MODEL_METRICS)
    floor = (folder / "model_results.md").read_text().split("Floor (training digits against the held-out ones): FD ")[1]
    assert "with all 1437; " in floor and "with 20 of them, a run's count (3 draws)" in floor  # tiny runs: 20 images
    assert (folder / "fd_inception.md").exists() == PRESETS[preset].inception


def test_the_model_runs_are_shared_by_the_presets(lab_dir: Path) -> None:
    # CFG at w = 1 and 1.5 appears in several presets (under other names): one eval run each, per seed range.
    presets = ("interval", "schedules", "precision_recall", "apg")
    runs = [r["run"] for preset in presets for r in _rows(lab_dir, preset, "model_results.csv")
            if r["guidance"] == "cfg(scale=1.0)" and r["seed"] == "100000"]
    assert len(runs) == 4 and len(set(runs)) == 1, runs
    # A guided run evaluates twice the rows of the unguided one; its digit FD differs from the unguided run's.
    rows = _rows(lab_dir, "precision_recall", "model_results.csv")
    one = next(r for r in rows if r["method"] == "CFG" and r["weight"] == "1.0" and r["seed"] == "0")
    guided = next(r for r in rows if r["method"] == "CFG" and r["weight"] == "1.5" and r["seed"] == "0")
    assert float(guided["nfe"]) == 2 * float(one["nfe"])
    assert float(guided["fd"]) != float(one["fd"])


def test_digit_fd_is_checked_against_inception(lab_dir: Path) -> None:
    text = (lab_dir / "precision_recall" / "fd_inception.md").read_text()
    rho = float(text.split("Spearman's rank correlation: ")[1].split()[0])
    assert -1.0 <= rho <= 1.0
    assert text.count("\n| CFG |") == 2 and text.count("\n| APG |") == 2  # the first seed range's four points


def test_unguided_runs_reduce_to_the_data_distribution(lab_dir: Path) -> None:
    # At w = 1 the powered target is p(x | c) itself, and every method is the unguided sampler.
    rows = _rows(lab_dir, "interval")
    for r in rows:
        if r["weight"] == "1.0":
            assert float(r["w1_target"]) == pytest.approx(float(r["w1_data"]), rel=1e-9)
    assert _mean(rows, "w1_data", method="CFG", weight=1.0) == _mean(rows, "w1_data", method="Interval(CFG)",
                                                                     weight=1.0)


def test_guidance_trades_recall_for_precision(lab_dir: Path) -> None:
    rows = _rows(lab_dir, "precision_recall")
    assert _mean(rows, "precision", method="CFG", weight=1.5) > _mean(rows, "precision", method="CFG", weight=1.0)
    assert _mean(rows, "recall", method="CFG", weight=1.5) < _mean(rows, "recall", method="CFG", weight=1.0)


def test_skipping_methods_compute_fewer_rows(lab_dir: Path) -> None:
    rows = _rows(lab_dir, "interval")
    assert _mean(rows, "nfe", method="Interval(CFG)", weight=2.0) < _mean(rows, "nfe", method="CFG", weight=2.0)
    rows = _rows(lab_dir, "adaptive")
    assert _mean(rows, "nfe", method="AG 0.99", weight=2.0) < _mean(rows, "nfe", method="CFG", weight=2.0) == 16


def test_an_unknown_preset_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "--preset", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "preset='nope' is not accepted" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
