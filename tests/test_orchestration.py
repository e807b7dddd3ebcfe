"""One orchestration: ``guidekit sample``, ``guidekit eval``'s image source and the demo's comparison run a guided
call through :func:`~guidekit.bridge.sampling.sample_guided`, so the same settings give the same pixels in all
three, and the three refuse the same settings with the same message, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guidekit import cli
from guidekit.app.compare import Comparer
from guidekit.bridge.loading import load_pipeline
from guidekit.bridge.sampling import SampleSettings, sample_guided
from guidekit.evaluation.config import EvalConfig
from guidekit.evaluation.runner import ImageSource
from guidekit.guidance.spec import parse_guidance

LABEL, SEED, NUM_IMAGES, STEPS = 3, 0, 2, 4


@pytest.fixture(scope="module")
def comparer() -> Comparer:
    return Comparer(device="cpu")


def _from_cli(guidance: str, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[np.ndarray, dict]:
    assert cli.main(["sample", "--model", "default", "--guidance", guidance, "--class-label", str(LABEL),
                     "--seed", str(SEED), "--num-images", str(NUM_IMAGES), "--steps", str(STEPS),
                     "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in summary["files"]]), summary


def _eval_config(out: Path, **changes: object) -> EvalConfig:
    return EvalConfig.from_dict({"model": "default", "output_dir": str(out), "steps": STEPS,
                                 "seeds": f"{SEED}-{SEED + NUM_IMAGES - 1}", "class_labels": [LABEL],
                                 "metrics": ["saturation"], **changes})


def _from_eval(guidance: str, out: Path) -> tuple[np.ndarray, int]:
    source = ImageSource(_eval_config(out, guidance=guidance), torch.device("cpu"))
    images = source(list(range(NUM_IMAGES)), list(range(SEED, SEED + NUM_IMAGES)))
    return images, source.rows


@pytest.mark.parametrize("guidance", ["cfg(scale=3)", "pcg(gamma=5)"])
def test_cli_eval_and_demo_give_the_same_pixels(guidance: str, comparer: Comparer, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cli_pixels, summary = _from_cli(guidance, tmp_path / "cli", capsys)
    eval_pixels, eval_rows = _from_eval(guidance, tmp_path / "eval")
    comparer.compare(["apg(scale=3, eta=0)"], class_label=5, seed=9, steps=3)  # an earlier request leaves no trace
    (result,) = comparer.compare([guidance], class_label=LABEL, seed=SEED, steps=STEPS, num_images=NUM_IMAGES)
    demo_pixels = np.stack([np.asarray(image.convert("RGB")) for image in result.images])
    assert cli_pixels.dtype == eval_pixels.dtype == demo_pixels.dtype == np.uint8
    assert cli_pixels.shape == (NUM_IMAGES, 8, 8, 3)
    np.testing.assert_array_equal(eval_pixels, cli_pixels)
    np.testing.assert_array_equal(demo_pixels, cli_pixels)
    assert not np.array_equal(cli_pixels[0], cli_pixels[1])  # one seed per image
    assert result.scheduler == summary["scheduler"] == ("PCGScheduler" if guidance.startswith("pcg") else
                                                        "DDIMScheduler")
    assert result.model_calls == summary["model_calls"]
    assert eval_rows == summary["cond_rows"] + summary["uncond_rows"]


def test_cli_eval_and_demo_refuse_a_scheduler_with_a_guidance_that_brings_its_sampler(
        comparer: Comparer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the settings were checked")

    for module in ("guidekit.bridge.loading", "guidekit.app.compare"):
        monkeypatch.setattr(f"{module}.load_pipeline", no_loading)
    with pytest.raises(ValueError, match="scheduler='ddim' is not accepted") as direct:
        SampleSettings(guidance=parse_guidance("pcg(gamma=5)"), scheduler="ddim")
    message = str(direct.value)
    assert cli.main(["sample", "--model", "default", "--guidance", "pcg(gamma=5)", "--scheduler", "ddim",
                     "--steps", str(STEPS), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"guidekit: error: {message}"
    with pytest.raises(ValueError) as from_eval:
        ImageSource(_eval_config(tmp_path / "eval", guidance="pcg(gamma=5)", scheduler="ddim"), torch.device("cpu"))
    with pytest.raises(ValueError) as from_demo:
        Comparer(device="cpu").compare(["cfg(scale=3)", "pcg(gamma=5)"], scheduler="ddim", steps=STEPS)
    assert str(from_eval.value) == str(from_demo.value) == message
    assert "(the pipeline's own)" in message


def test_the_pipeline_comes_back_as_it_was_and_native_cfg_is_counted() -> None:
    pipe, defaults = load_pipeline("default")
    scheduler = pipe.scheduler
    for settings in (SampleSettings(guidance=parse_guidance("pcg(gamma=5)"), steps=STEPS, seeds=[0, 1]),
                     SampleSettings(guidance=parse_guidance("cfg(scale=3)"), scheduler="euler", steps=STEPS),
                     SampleSettings(guidance_scale=3.0, scheduler="heun", steps=STEPS, seeds=[0, 1])):
        run = sample_guided(pipe, settings, defaults=defaults)
        assert pipe.scheduler is scheduler and type(pipe).__name__ == "ClassConditionalPipeline"
        assert not hasattr(pipe, "guidance_stats") and run.scheduler != "DDIMScheduler"
    assert run.stats.model_calls == 2 * STEPS - 1  # Heun: two calls per step but the last
    assert run.stats.cond_rows == run.stats.uncond_rows == 2 * run.stats.model_calls  # [uncond; cond] of 2 images
    native = sample_guided(pipe, SampleSettings(guidance_scale=3.0, steps=STEPS, seeds=[4], output_type="np"),
                           defaults=defaults)
    guided = sample_guided(pipe, SampleSettings(guidance=parse_guidance("cfg(scale=3)"), steps=STEPS, seeds=[4],
                                                output_type="np"), defaults=defaults)
    np.testing.assert_array_equal(native.images, guided.images)
    assert native.stats.rows == guided.stats.rows == 2 * STEPS


@pytest.mark.parametrize(("changes", "match"), [
    ({"guidance": parse_guidance("cfg(scale=3)"), "guidance_scale": 3.0}, "guidance_scale=3.0 is not accepted"),
    ({"scheduler": "nope"}, "scheduler='nope' is not accepted; expected one of ddim"),
    ({"steps": 0}, "steps=0 is not accepted"),
    ({"seeds": []}, r"seeds=\(\) is not accepted"),
    ({"seeds": [0, -1]}, "seeds=-1 is not accepted"),
    ({"seeds": [0, 1], "class_label": [3]}, "class_label has 1 entries"),
    ({"output_type": "pt"}, "output_type='pt' is not accepted"),
])
def test_bad_settings_are_refused_with_their_name(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SampleSettings(**changes)


def test_size_is_refused_by_a_pipeline_of_fixed_size() -> None:
    pipe, defaults = load_pipeline("default")
    with pytest.raises(ValueError, match="height=16 is not accepted by ClassConditionalPipeline"):
        sample_guided(pipe, SampleSettings(height=16, steps=1), defaults=defaults)
