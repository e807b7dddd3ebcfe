"""The demo's comparison (no UI): each column is what the pipeline itself gives, from the same seeds, with honest
figures; every bad input is refused before sampling with a message naming it."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from guidekit.app.compare import DISPLAY_SIZE, MAX_METHODS, Comparer
from guidekit.bridge.loading import load_pipeline


@pytest.fixture(scope="module")
def comparer() -> Comparer:
    return Comparer(device="cpu")


def _pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def _native(model: str, steps: int, scale: float, seed: int, n: int, **conditioning: object) -> np.ndarray:
    """The pipeline's own CFG, without guidekit, from a fresh load."""
    pipe, defaults = load_pipeline(model)
    kwargs = {**defaults, **conditioning}
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return _pixels(pipe(**kwargs, num_inference_steps=steps, guidance_scale=scale, generator=gens).images)


def test_columns_equal_the_pipelines_own_cfg_from_the_same_seeds(comparer: Comparer) -> None:
    results = comparer.compare(["cfg(scale=3)", "cfg(scale=1)", "apg(scale=3, eta=0)"], class_label=7, seed=5,
                               steps=10, num_images=3)
    assert [r.guidance.split("(")[0] for r in results] == ["cfg", "cfg", "apg"]
    np.testing.assert_array_equal(_pixels(results[0].images), _native("default", 10, 3.0, 5, 3, class_labels=[7] * 3))
    np.testing.assert_array_equal(_pixels(results[1].images), _native("default", 10, 1.0, 5, 3, class_labels=[7] * 3))
    assert not np.array_equal(_pixels(results[2].images), _pixels(results[0].images))
    assert [r.model_calls for r in results] == [10, 10, 10]
    assert all(r.scheduler == "DDIMScheduler" and r.seconds > 0 for r in results)


def test_text_to_image_pipeline_uses_the_prompt(comparer: Comparer) -> None:
    results = comparer.compare(["cfg(scale=4)"], model="tiny:sd", prompt="a blue dog", seed=2, steps=4, num_images=2)
    expected = _native("tiny:sd", 4, 4.0, 2, 2, prompt=["a blue dog"] * 2)
    np.testing.assert_array_equal(_pixels(results[0].images), expected)
    other = comparer.compare(["cfg(scale=4)"], model="tiny:sd", prompt="a red cat", seed=2, steps=4, num_images=2)
    assert not np.array_equal(_pixels(other[0].images), expected)


def test_saturation_is_hsv_saturation_and_figures_follow_the_method(comparer: Comparer) -> None:
    cfg, interval = comparer.compare(["cfg(scale=5)", "interval(cfg(scale=5), sigma_lo=0.28, sigma_hi=5.42)"],
                                     class_label=2, steps=10, num_images=2, scheduler="heun")
    (pcg,) = comparer.compare(["pcg(gamma=5)"], class_label=2, steps=10, num_images=2)
    for r in (cfg, pcg, interval):  # colorsys: the HSV definition, pixel by pixel
        hsv = [colorsys.rgb_to_hsv(*(p / 255.0))[1] for p in _pixels(r.images).reshape(-1, 3)]
        assert r.saturation == pytest.approx(np.mean(hsv), abs=1e-12)
    assert (cfg.scheduler, cfg.model_calls) == ("HeunDiscreteScheduler", 19)  # Heun: 2 calls per step, 1 at the end
    assert (pcg.scheduler, pcg.model_calls) == ("PCGScheduler", 10 + 9)  # its own sampler: predictor + corrector
    assert interval.model_calls == 19 and interval.uncond_rows_skipped > 0
    assert f"{cfg.model_calls} model calls" in cfg.caption() and f"saturation {cfg.saturation:.3f}" in cfg.caption()
    strip = cfg.strip()
    assert strip.size == (2 * strip.size[1], strip.size[1]) and strip.size[1] >= DISPLAY_SIZE


def test_schedulers_do_not_leak_between_methods_or_requests(comparer: Comparer) -> None:
    first = comparer.compare(["cfg(scale=3)"], class_label=4, steps=8)
    comparer.compare(["pcg(gamma=3)", "cfgpp(lam=0.6)", "cfg(scale=3)"], class_label=4, steps=8)
    comparer.compare(["cfg(scale=3)", "apg(scale=3)"], class_label=4, steps=8, scheduler="euler")
    again = comparer.compare(["cfg(scale=3)"], class_label=4, steps=8)
    np.testing.assert_array_equal(_pixels(first[0].images), _pixels(again[0].images))
    pipe = comparer._pipes["default"][0]
    assert type(pipe.scheduler) is DDIMScheduler and not hasattr(pipe, "guidance_stats")
    assert comparer.describe(" default ") == comparer.describe("") == comparer.describe()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 0}, "steps=0 is not accepted"),
    ({"steps": 501}, r"steps=501 is not accepted; expected an integer in \[1, 500\]"),
    ({"steps": 2.5}, "steps=2.5 is not accepted"),
    ({"num_images": 0}, "num_images=0"),
    ({"seed": -1}, "seed=-1"),
    ({"class_label": -2}, "class_label=-2"),
    ({"class_label": 11}, "class_labels"),
    ({"scheduler": "foo"}, "scheduler='foo' is not accepted"),
    ({"methods": ["cfg(scale=-1)"]}, "scale=-1"),
    ({"methods": ["cfg(scale=3"]}, "does not parse"),
    ({"methods": ["", "  "]}, "expected 1 to 4 guidance texts"),
    ({"methods": ["cfg(scale=2)"] * (MAX_METHODS + 1)}, "at most 4"),
    ({"model": "/no/such/model"}, "model='/no/such/model' could not be loaded"),
    ({"model": "tiny:sd3", "methods": ["pcg(gamma=3)"]}, "flow-matching"),
    ({"methods": ["cfg(scale=3)", "pcg(gamma=5)"], "scheduler": "ddim"},
     r"scheduler='ddim' is not accepted with guidance PCG\(.*own sampler; expected no scheduler"),
])
def test_bad_input_is_refused_with_its_name(comparer: Comparer, kwargs: dict, match: str) -> None:
    kwargs = {"methods": ["cfg(scale=3)"], "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        comparer.compare(kwargs.pop("methods"), **kwargs)
    assert comparer.compare(["cfg(scale=3)"], steps=2)[0].model_calls == 2  # still serving
