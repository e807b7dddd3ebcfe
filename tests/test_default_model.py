"""The embedded default model: it loads offline, fits the size budget, and follows its class under CFG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from guidekit import cli
from guidekit.app.digits import DigitClassifier
from guidekit.bridge.loading import DEFAULT_MODEL_DIR, load_pipeline
from guidekit.evaluation.image_metrics import saturation


def test_default_model_is_small_and_in_diffusers_format() -> None:
    files = {p.relative_to(DEFAULT_MODEL_DIR).as_posix() for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "README.md", "training.json"} <= files
    assert sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()) <= 25 * 2**20


def test_default_model_follows_its_class_under_cfg() -> None:
    """At CFG weight 3 (DDIM, 20 steps), 90% or more of 100 samples are classified as their class."""
    pipe, _ = load_pipeline("default")
    labels = [c for c in range(10) for _ in range(10)]
    images = pipe(labels, num_inference_steps=20, guidance_scale=3.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(len(labels))]).images
    accuracy = DigitClassifier().accuracy((images * 255).round().to(torch.uint8), np.array(labels))
    assert accuracy >= 0.9, accuracy


def test_cli_samples_the_default_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sample", "--model", "default", "--guidance", "interval(apg(scale=3), sigma_lo=0.5, "
                     "sigma_hi=20)", "--class-label", "7", "--steps", "10", "--num-images", "2",
                     "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pipeline"] == "ClassConditionalPipeline" and len(summary["files"]) == 2


@pytest.mark.parametrize("guidance", ["pcg(gamma=5)", "cfgpp(lam=0.6)"])
def test_guidekits_own_samplers_follow_the_class_on_the_cosine_schedule(guidance: str) -> None:
    """PCG and CFG++ install their samplers from the model's DDIM config ("leading" spacing, cosine schedule). They
    start where DDIM starts (sigma 13 at 20 steps), not at the top of the table (sigma 2e4, where an eps model's x0
    estimate is its error times 2e4), and PCG's last corrector is not at "leading"'s tiny last level: 90% or more of
    50 samples are classified as their class, and their saturation stays near CFG's (0.53 at w = 3), not noise's
    (0.8 and more)."""
    pipe, _ = load_pipeline("default")
    pipe.set_guidance(guidance)
    labels = [c for c in range(10) for _ in range(5)]
    images = pipe(labels, num_inference_steps=20, guidance_scale=2.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(len(labels))]).images
    assert pipe.scheduler.sigmas[0] < 20
    pixels = (images * 255).round().to(torch.uint8)
    accuracy = DigitClassifier().accuracy(pixels, np.array(labels))
    assert accuracy >= 0.9, accuracy
    assert saturation(pixels).mean() < 0.65
