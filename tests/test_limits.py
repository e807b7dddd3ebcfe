"""Resource limits (:mod:`guidekit.limits`) and the scheduler-kind check: every over-limit input is refused with a
one-line ``ValueError`` naming the parameter and the limit, before anything is allocated, through
:class:`~guidekit.bridge.sampling.SampleSettings`, ``guidekit sample`` and the served demo; the demo answers a normal
request afterwards and the process stays under 2 GB. Large requests are drawn in pipeline calls of at most
:data:`~guidekit.limits.MAX_BATCH` images."""

from __future__ import annotations

import json
import re
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from guidekit import cli, limits
from guidekit.app.compare import Comparer
from guidekit.bridge.loading import load_pipeline
from guidekit.bridge.sampling import SampleSettings, sample_guided
from guidekit.evaluation.config import EvalConfig
from guidekit.evaluation.runner import ImageSource
from guidekit.guidance.pcg import PCG
from guidekit.guidance.spec import parse_guidance
from guidekit.samplers.pcg import PCGScheduler

MAX_RSS_BYTES = 2 * 1024**3
HUGE_SEED = 1180591620717411303424
LONG_TEXT = "cfg(scale=3)" + "x" * 200_000
DEEP_TEXT = "cfg(scale=" + "-" * 3000 + "1)"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "demo.md"


def _peak_rss_bytes() -> int:
    """The peak resident memory of this process (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _one_line(message: str, *names: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert len(message) < 1000, f"{len(message)} characters"  # a long input is echoed shortened
    for name in names:
        assert name in message, message


@pytest.fixture(scope="module")
def default_pipe() -> tuple:
    pipe, defaults = load_pipeline("default")
    pipe.set_progress_bar_config(disable=True)
    return pipe, defaults


@pytest.mark.parametrize(("settings", "names"), [
    ({"steps": 10**9}, ["steps=1000000000", "MAX_STEPS"]),
    ({"seeds": range(100_000)}, ["num_images=100000", "MAX_IMAGES_PER_REQUEST"]),
    ({"seeds": range(10**30)}, ["num_images=" + str(10**30), "MAX_IMAGES_PER_REQUEST"]),
    ({"seeds": [HUGE_SEED]}, [f"seeds={HUGE_SEED}", "MAX_SEED"]),
    ({"seeds": range(limits.MAX_SEED, limits.MAX_SEED + 2)}, [f"seeds={2**63}", "MAX_SEED"]),
    ({"seeds": [-1]}, ["seeds=-1", "MAX_SEED"]),
    ({"height": 12}, ["height=12", "IMAGE_SIDE_MULTIPLE"]),
    ({"width": 4096}, ["width=4096", "MAX_IMAGE_SIDE"]),
    ({"prompt": "a cat " * 5000}, ["prompt=", "(30000 characters)", "MAX_PROMPT_CHARS"]),
    ({"negative_prompt": "x" * 20_000}, ["negative_prompt=", "MAX_PROMPT_CHARS"]),
])
def test_settings_over_a_limit_are_refused_by_name(settings: dict, names: list[str]) -> None:
    with pytest.raises(ValueError) as caught:
        SampleSettings(**settings)
    _one_line(str(caught.value), *names)


def test_settings_at_the_limits_are_accepted() -> None:
    settings = SampleSettings(steps=limits.MAX_STEPS, seeds=range(limits.MAX_SEED - limits.MAX_IMAGES_PER_REQUEST + 1,
                                                                  limits.MAX_SEED + 1),
                              height=limits.MAX_IMAGE_SIDE, width=8, prompt="x" * limits.MAX_PROMPT_CHARS)
    assert settings.num_images == limits.MAX_IMAGES_PER_REQUEST


@pytest.mark.parametrize(("text", "names"), [
    ("pcg(gamma=5, corrector_steps=1000000000)", ["corrector_steps=1000000000", "MAX_CORRECTOR_STEPS"]),
    (LONG_TEXT, ["guidance=", "(200012 characters)", "MAX_GUIDANCE_CHARS"]),
    (DEEP_TEXT, ["guidance=", "(3012 characters)", "MAX_GUIDANCE_DEPTH"]),
    ("cfg(scale=" + "[" * 30 + "]" * 30 + ")", ["guidance=", "MAX_GUIDANCE_DEPTH"]),
    ("nosuch" + "x" * 5000 + "(scale=3)", ["guidance=", "unknown method", "(5015 characters)"]),
])
def test_guidance_texts_over_a_limit_are_refused_shortened(text: str, names: list[str]) -> None:
    with pytest.raises(ValueError) as caught:
        parse_guidance(text)
    _one_line(str(caught.value), *names)


def test_a_deep_but_real_guidance_text_parses() -> None:
    text = ("scheduled(interval(adaptive(linear_ag(cfg(scale=5), fit=linear_ag_fit(modes=['cfg', 'linear'], "
            "coefficients={1: [-0.4, 0.5, 0.1]})), threshold=0.99), sigma_lo=0.28, sigma_hi=5.42), 'linear')")
    assert parse_guidance(text).inner.inner.inner.fit.coefficients == {1: (-0.4, 0.5, 0.1)}


def test_pcg_corrector_steps_are_capped_in_the_guidance_and_the_sampler() -> None:
    assert PCG(5.0, corrector_steps=limits.MAX_CORRECTOR_STEPS).corrector_steps == limits.MAX_CORRECTOR_STEPS
    for make in (lambda: PCG(5.0, corrector_steps=limits.MAX_CORRECTOR_STEPS + 1),
                 lambda: PCGScheduler(corrector_steps=10**9),
                 lambda: PCGScheduler.from_config(PCGScheduler().config, corrector_steps=10**9)):
        with pytest.raises(ValueError) as caught:
            make()
        _one_line(str(caught.value), "corrector_steps=", "MAX_CORRECTOR_STEPS")


@pytest.mark.parametrize(("model", "scheduler", "accepted"), [
    ("default", "flow_euler", "expected one of ddim, ddpm"),
    ("default", "flow_euler_lml", "expected one of ddim, ddpm"),
    ("tiny:sd3", "ddim", "expected one of flow_euler, flow_euler_lml, or none"),
    ("tiny:sana", "euler", "expected one of dpmpp_2m,"),  # flow sigmas on a VP solver class that takes them
])
def test_a_scheduler_for_the_other_kind_of_model_is_refused_by_name(model: str, scheduler: str,
                                                                    accepted: str) -> None:
    pipe, defaults = load_pipeline(model)
    own = pipe.scheduler
    with pytest.raises(ValueError) as caught:
        sample_guided(pipe, SampleSettings(scheduler=scheduler, steps=1), defaults=defaults)
    _one_line(str(caught.value), f"scheduler={scheduler!r} is not accepted for {type(pipe).__name__}", accepted)
    assert pipe.scheduler is own and not hasattr(pipe, "guidance_stats")


def test_sana_takes_a_vp_solver_class_with_its_flow_sigmas() -> None:
    pipe, defaults = load_pipeline("tiny:sana")
    run = sample_guided(pipe, SampleSettings(scheduler="dpmpp_2m", steps=1, output_type="np"), defaults=defaults)
    assert run.scheduler == "DPMSolverMultistepScheduler" and np.isfinite(run.images).all()


def test_eval_refuses_a_flow_scheduler_on_a_vp_model(tmp_path: Path) -> None:
    config = EvalConfig.from_dict({"model": "default", "output_dir": str(tmp_path), "steps": 2, "seeds": "0-1",
                                   "class_labels": [3], "scheduler": "flow_euler", "metrics": ["saturation"]})
    source = ImageSource(config, torch.device("cpu"))
    with pytest.raises(ValueError, match="scheduler='flow_euler' is not accepted for ClassConditionalPipeline"):
        source([0, 1], [0, 1])


@pytest.mark.parametrize("guidance", ["cfg(scale=3)", "pcg(gamma=5)", None])
def test_a_request_is_drawn_in_calls_of_at_most_max_batch_seeds(guidance: str | None, default_pipe: tuple,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Five seeds with ``MAX_BATCH = 2`` give bitwise the images and the added stats of three requests of 2, 2 and 1
    seeds. One call of five seeds agrees to float rounding only: the network's CPU kernels, and so the last bits of
    each image, depend on the batch size (per-image generators make the noise the same)."""
    pipe, defaults = default_pipe
    method = {"guidance": parse_guidance(guidance)} if guidance else {"guidance_scale": 3.0}
    labels = (1, 2, 3, 4, 5)

    def draw(seeds: list[int], labels: tuple[int, ...]) -> object:
        settings = SampleSettings(**method, steps=3, seeds=seeds, class_label=labels, output_type="np")
        return sample_guided(pipe, settings, defaults=defaults)

    whole = draw([0, 1, 2, 3, 4], labels)
    monkeypatch.setattr(limits, "MAX_BATCH", 2)
    chunked = draw([0, 1, 2, 3, 4], labels)
    monkeypatch.undo()
    parts = [draw([0, 1], labels[:2]), draw([2, 3], labels[2:4]), draw([4], labels[4:])]
    np.testing.assert_array_equal(chunked.images, np.concatenate([p.images for p in parts]))
    np.testing.assert_allclose(chunked.images, whole.images, atol=1e-5)
    assert chunked.stats.model_calls == sum(p.stats.model_calls for p in parts) == 3 * whole.stats.model_calls
    assert chunked.stats.computed == whole.stats.computed and chunked.stats.skipped == whole.stats.skipped
    assert chunked.stats.uncond_rows_per_sample == whole.stats.uncond_rows_per_sample
    assert chunked.scheduler == whole.scheduler and pipe.scheduler.__class__.__name__ == "DDIMScheduler"


def test_a_chunked_request_keeps_per_image_prompts_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe, defaults = load_pipeline("tiny:sd")
    pipe.set_progress_bar_config(disable=True)
    prompts = ("a red cat", "a blue dog", "a green bird")
    monkeypatch.setattr(limits, "MAX_BATCH", 2)
    run = sample_guided(pipe, SampleSettings(guidance=parse_guidance("cfg(scale=3)"), steps=2, seeds=[7, 8, 9],
                                             prompt=prompts), defaults=defaults)
    monkeypatch.undo()
    alone = sample_guided(pipe, SampleSettings(guidance=parse_guidance("cfg(scale=3)"), steps=2, seeds=[9],
                                               prompt=prompts[2]), defaults=defaults)
    assert len(run.images) == 3
    assert np.array_equal(np.asarray(run.images[2]), np.asarray(alone.images[0]))


CLI_CASES = [
    (["--guidance", "pcg(gamma=5,corrector_steps=1000000000)"], ["corrector_steps=1000000000"]),
    (["--num-images", "100000", "--steps", "1"], ["num_images=100000", "MAX_IMAGES_PER_REQUEST"]),
    (["--seed", str(HUGE_SEED)], [f"seeds={HUGE_SEED}", "MAX_SEED"]),
    (["--seed", "-1"], ["seeds=-1"]),
    (["--steps", "1000000000"], ["steps=1000000000", "MAX_STEPS"]),
    (["--height", "12"], ["height=12"]),
    (["--guidance", LONG_TEXT], ["guidance=", "MAX_GUIDANCE_CHARS"]),
    (["--guidance", DEEP_TEXT], ["guidance=", "MAX_GUIDANCE_DEPTH"]),
    (["--scheduler", "flow_euler"], ["scheduler='flow_euler' is not accepted for ClassConditionalPipeline"]),
    (["--scheduler", "flow_euler_lml"], ["scheduler='flow_euler_lml' is not accepted"]),
]


@pytest.mark.parametrize(("flags", "names"), CLI_CASES)
def test_the_cli_refuses_each_over_limit_input_in_one_line(flags: list[str], names: list[str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sample", "--model", "default", "--device", "cpu", "--out", str(tmp_path / "out"), *flags]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    last = captured.err.strip().splitlines()[-1]  # earlier lines: the loader's progress bar, if it loaded
    assert last.startswith("guidekit: error: ")
    _one_line(last, *names)
    assert not (tmp_path / "out").exists()
    assert _peak_rss_bytes() < MAX_RSS_BYTES


def test_the_cli_draws_more_than_max_batch_images(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_BATCH", 2)
    assert cli.main(["sample", "--model", "default", "--device", "cpu", "--num-images", "5", "--steps", "2",
                     "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["files"]) == 5 and summary["model_calls"] == 3 * 2


DEMO_DEFAULTS = {"model": "default", "scheduler": "pipeline's own", "class_label": 3, "prompt": "",
                 "negative_prompt": "", "seed": 0, "steps": 2, "num_images": 1}
DEMO_CASES = [
    ({}, ["pcg(gamma=5, corrector_steps=1000000000)"], ["corrector_steps=1000000000", "MAX_CORRECTOR_STEPS"]),
    ({"steps": 10**9}, ["cfg(scale=3)"], ["steps=1000000000", "DEMO_MAX_STEPS"]),
    ({"num_images": 10**9}, ["cfg(scale=3)"], ["1000000000"]),  # the page's slider refuses it first
    ({"seed": HUGE_SEED}, ["cfg(scale=3)"], [f"seed={HUGE_SEED}", "MAX_SEED"]),
    ({}, [LONG_TEXT], ["guidance=", "MAX_GUIDANCE_CHARS"]),
    ({}, [DEEP_TEXT], ["guidance=", "MAX_GUIDANCE_DEPTH"]),
    ({"prompt": "x" * 20_000}, ["cfg(scale=3)"], ["prompt=", "MAX_PROMPT_CHARS"]),
    ({"scheduler": "flow_euler"}, ["cfg(scale=3)"], ["scheduler='flow_euler' is not accepted for "
                                                     "ClassConditionalPipeline", "expected one of ddim"]),
    ({"scheduler": "flow_euler_lml"}, ["cfg(scale=3)"], ["scheduler='flow_euler_lml' is not accepted"]),
]


@pytest.fixture(scope="module")
def client(demo_url: str) -> Client:
    return Client(demo_url, verbose=False)


def _compare(client: Client, methods: list[str], **changes: object) -> tuple:
    values = {**DEMO_DEFAULTS, **changes}
    return client.predict(*values.values(), *methods, *[""] * (limits.DEMO_MAX_METHODS - len(methods)),
                          api_name="/compare")


@pytest.mark.parametrize(("changes", "methods", "names"), DEMO_CASES)
def test_the_demo_refuses_each_over_limit_input_and_keeps_serving(client: Client, changes: dict,
                                                                  methods: list[str], names: list[str]) -> None:
    with pytest.raises(AppError) as caught:
        _compare(client, methods, **changes)
    _one_line(str(caught.value), *names)
    gallery, table, _ = _compare(client, ["cfg(scale=2)"])
    assert len(gallery) == 1 and table["data"][0][2] == 2  # two model calls: the server answers normally
    assert _peak_rss_bytes() < MAX_RSS_BYTES  # the demo serves in this process


def test_docs_list_every_limit() -> None:
    section = DOCS.read_text().split("## Limits", 1)[1].split("\n## ", 1)[0]
    names = [n for n in vars(limits) if re.fullmatch(r"[A-Z][A-Z_]+", n)]
    missing = [n for n in names if f"`{n}`" not in section]
    assert not missing, f"docs/demo.md's Limits section misses {missing}"


@pytest.mark.parametrize(("changes", "names"), [
    ({"num_images": 10**9}, ["num_images=1000000000", "DEMO_MAX_IMAGES"]),
    ({"steps": 501}, ["steps=501", "DEMO_MAX_STEPS"]),
    ({"seed": limits.MAX_SEED, "num_images": 2}, [f"seeds={2**63}", "MAX_SEED"]),
])
def test_the_comparer_refuses_before_loading_a_model(changes: dict, names: list[str]) -> None:
    comparer = Comparer(device="cpu")
    with pytest.raises(ValueError) as caught:
        comparer.compare(["cfg(scale=3)"], **changes)
    _one_line(str(caught.value), *names)
    assert not comparer._pipes
