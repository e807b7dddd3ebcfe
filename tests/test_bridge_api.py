"""The set_guidance API: errors, exact restoration, saving, hooks, compile, dtype and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, LCMScheduler, UNet2DModel
from pipelines import final_latents, guided_latents, pipeline

import guidekit
from guidekit import cli
from guidekit.testing.tiny import build_tiny_pipeline


def test_set_guidance_none_restores_everything() -> None:
    pipe = pipeline("sd")
    final_latents(pipe, "sd", guidance_scale=5.0, steps=2)  # the pipeline's own call adds its _guidance_scale etc.
    cls, attrs, unet_attrs = type(pipe), set(pipe.__dict__), set(pipe.unet.__dict__)
    guidekit.set_guidance(pipe, "apg(scale=5)")
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    final_latents(pipe, "sd", guidance_scale=5.0, steps=2)
    assert "forward" not in pipe.unet.__dict__  # the denoiser is only wrapped during a call
    pipe.set_guidance(None)
    assert type(pipe) is cls and set(pipe.__dict__) == attrs and set(pipe.unet.__dict__) == unet_attrs


def test_text_form_and_objects_agree() -> None:
    pipe = pipeline("sd")
    by_text, _ = _run(pipe, "interval(apg(scale=4, eta=0), sigma_lo=0.3, sigma_hi=5)")
    by_object, _ = _run(pipe, guidekit.Interval(guidekit.APG(4.0, eta=0.0), sigma_lo=0.3, sigma_hi=5.0))
    assert torch.equal(by_text, by_object)


def _run(pipe, guidance, **kwargs):
    return guided_latents(pipe, "sd", guidance, guidance_scale=5.0, **kwargs)


def test_save_pretrained_while_guided(tmp_path: Path) -> None:
    pipe = pipeline("sd")
    native = final_latents(pipe, "sd", guidance_scale=5.0)
    pipe.set_guidance(guidekit.CFG(5.0))
    try:
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.set_guidance(None)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "unet" in index
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(final_latents(loaded, "sd", guidance_scale=5.0), native)


def test_accelerate_forward_hook_survives_and_runs() -> None:
    class Counter(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counter.calls += 1
            return args, kwargs

    pipe = pipeline("sd")
    native = final_latents(pipe, "sd", guidance_scale=5.0, steps=3)
    add_hook_to_module(pipe.unet, Counter())
    hooked_forward = pipe.unet.forward
    try:
        guided, _ = _run(pipe, guidekit.Interval(guidekit.CFG(5.0), 0.0, 1e9), steps=3)
        assert Counter.calls == 3
        assert pipe.unet.forward is hooked_forward
    finally:
        remove_hook_from_module(pipe.unet)
    assert (guided - native).abs().max().item() <= 1e-5


def test_torch_compile_wrapped_denoiser() -> None:
    pipe = build_tiny_pipeline("sd")
    native = final_latents(pipe, "sd", guidance_scale=5.0, steps=2)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    guided, stats = _run(pipe, guidekit.CFG(5.0), steps=2)
    assert stats.model_calls == 2
    assert (guided - native).abs().max().item() <= 1e-5


def test_bfloat16_pipeline_keeps_dtype() -> None:
    pipe = build_tiny_pipeline("sd", dtype=torch.bfloat16)
    native = final_latents(pipe, "sd", guidance_scale=5.0, steps=3)
    guided, _ = _run(pipe, guidekit.CFG(5.0), steps=3)
    assert guided.dtype == native.dtype == torch.bfloat16
    assert torch.equal(guided, native)  # CFG runs in the pipeline's own dtype and space
    apg, _ = _run(pipe, guidekit.APG(5.0), steps=3)
    assert apg.dtype == torch.bfloat16 and torch.isfinite(apg.float()).all()


def test_unsupported_pipeline_lists_supported() -> None:
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match=r"pipeline=DDPMPipeline is not supported.*StableDiffusionPipeline"):
        pipe.set_guidance(guidekit.CFG(3.0))


def test_call_time_errors_name_the_argument() -> None:
    pipe = pipeline("sd")
    pipe.set_guidance(guidekit.CFG(5.0))
    try:
        with pytest.raises(ValueError, match=r"guidance_scale=1\.0 is not accepted.*> 1"):
            final_latents(pipe, "sd", guidance_scale=1.0, steps=2)
        with pytest.raises(ValueError, match=r"guidance_rescale=0\.7 is not accepted"):
            final_latents(pipe, "sd", guidance_scale=5.0, guidance_rescale=0.7, steps=2)
        original = pipe.scheduler
        pipe.scheduler = LCMScheduler.from_config(original.config)
        try:
            with pytest.raises(ValueError, match=r"scheduler=LCMScheduler is not supported.*EulerDiscreteScheduler"):
                final_latents(pipe, "sd", guidance_scale=5.0, steps=2)
        finally:
            pipe.scheduler = original
    finally:
        pipe.set_guidance(None)


def test_conditional_only_guidance_runs_at_scale_one() -> None:
    """A guidance that never needs the unconditional branch accepts guidance_scale <= 1."""
    pipe = pipeline("sd")
    native = final_latents(pipe, "sd", guidance_scale=1.0)
    out, stats = _run(pipe, guidekit.CFG(1.0))
    assert stats.uncond_rows == 0
    assert (out - native).abs().max().item() <= 1e-5


def test_sd3_skip_layer_guidance_is_rejected() -> None:
    pipe = pipeline("sd3")
    pipe.set_guidance(guidekit.CFG(4.0))
    try:
        with pytest.raises(ValueError, match="skip_guidance_layers"):
            final_latents(pipe, "sd3", guidance_scale=4.0, skip_guidance_layers=[0], steps=2)
    finally:
        pipe.set_guidance(None)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scale": -1.0}, r"scale=-1\.0 is not accepted"),
    ({"scale": 2.0, "rescale": 1.5}, r"rescale=1\.5 is not accepted"),
    ({"scale": 2.0, "rescale": 0.5, "rescale_space": "latent"}, r"rescale_space='latent' is not a prediction space"),
])
def test_cfg_parameter_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        guidekit.CFG(**kwargs)


def test_wrapper_parameter_errors() -> None:
    with pytest.raises(ValueError, match=r"sigma_lo=2\.0, sigma_hi=1\.0 are not accepted; expected 0 <= sigma_lo"):
        guidekit.Interval(guidekit.CFG(2.0), 2.0, 1.0)
    with pytest.raises(ValueError, match=r"schedule='cubic' is not accepted; expected one of constant, linear"):
        guidekit.Scheduled(guidekit.CFG(2.0), "cubic")
    with pytest.raises(ValueError, match=r"schedule 'pcs' takes parameters \(s\)"):
        guidekit.Scheduled(guidekit.CFG(2.0), "pcs")
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"threshold={bad!r} is not accepted; expected a finite number in \(0"):
            guidekit.AdaptiveGuidance(guidekit.CFG(2.0), threshold=bad)
    with pytest.raises(ValueError, match=r"momentum=-1\.0 is not accepted"):
        guidekit.APG(2.0, momentum=-1.0)
    with pytest.raises(TypeError, match=r"inner=3 is not accepted"):
        guidekit.Interval(3, 0.1, 1.0)


@pytest.mark.parametrize("text", ["cfg(", "cfg(scale=)", "wobble(2)", "cfg(2) - cfg(3)", "cfg(scale=x)", "7.5",
                                  "__import__('os').system('true')"])
def test_guidance_text_that_does_not_parse(text: str) -> None:
    with pytest.raises(guidekit.GuidanceSyntaxError, match=r"guidance=.* does not parse: .*expected a call such as"):
        guidekit.parse_guidance(text)


@pytest.mark.parametrize("text", [
    "cfg(scale=7.5, rescale=0.7)",
    "interval(apg(scale=2, eta=0), sigma_lo=0.28, sigma_hi=5.42)",
    "adaptive(scheduled(cfg(7.5), 'cosine'), threshold=0.994)",
    "scheduled(cfg(7.5), 'clamp_linear', c=2)",
    "cfg_zero_star(scale=4, zero_init_steps=2)",
    "interval(cfg(3), sigma_lo=0, sigma_hi=inf)",
])
def test_text_round_trip(text: str) -> None:
    g = guidekit.parse_guidance(text)
    assert guidekit.parse_guidance(guidekit.format_guidance(g)) == g


def test_cli_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["sample", "--model", "tiny:sd", "--guidance", "interval(cfg(5), sigma_lo=0.5, sigma_hi=20)",
                   "--scheduler", "euler", "--steps", "4", "--num-images", "2", "--seed", "7", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_calls"] == 4 and summary["cond_rows"] == 8
    assert 0 < summary["uncond_rows"] < 8
    assert [Path(f).name for f in summary["files"]] == ["seed000007.png", "seed000008.png"]
    assert all(Path(f).stat().st_size > 0 for f in summary["files"])


def test_cli_sample_flux_true_cfg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["sample", "--model", "tiny:flux", "--guidance", "cfg(3)", "--steps", "2", "--num-images", "2",
                   "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pipeline"] == "FluxPipeline" and summary["uncond_rows"] == 4 and len(summary["files"]) == 2


def test_cli_sample_with_guidekit_samplers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sample", "--model", "tiny:dit", "--guidance", "pcg(gamma=3)", "--steps", "3",
                     "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scheduler"] == "PCGScheduler" and summary["model_calls"] == 5 and summary["uncond_rows"] == 2
    assert cli.main(["sample", "--model", "tiny:sd", "--guidance", "cfg(3)", "--scheduler", "edm_heun", "--steps", "3",
                     "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["scheduler"] == "EDMHeunScheduler"
    assert cli.main(["sample", "--model", "tiny:sd", "--guidance", "pcg(gamma=3)", "--scheduler", "euler",
                     "--steps", "2", "--out", str(tmp_path)]) == 2
    assert "installs its own sampler" in capsys.readouterr().err


def test_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sample", "--model", "tiny:nope", "--steps", "2"]) == 2
    assert "model='tiny:nope' is not accepted" in capsys.readouterr().err
    assert cli.main(["sample", "--model", "tiny:sd", "--guidance", "cfg(", "--steps", "2"]) == 2
    assert "does not parse" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", "tiny:sd", "--steps", "0"])
