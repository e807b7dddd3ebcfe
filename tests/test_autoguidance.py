"""Autoguidance: a weaker network guides the pipeline's own, ``D_weak + w (D - D_weak)`` (EDM2's rule).

The exact oracle is the Gaussian-mixture testbed: the weak model is the same mixture with wider components, both
exact denoisers. The test builds, independently of guidekit's guidance code, a denoiser module that returns
``D_weak + w (D - D_weak)`` of the two exact denoisers, and samples with it unguided. ``set_guidance(
AutoGuidance(weak, w))`` on the plain pipeline must give the same samples. On tiny SD a second, smaller UNet runs
and both networks' rows are counted.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from pipelines import forward_replaced

import guidekit
from guidekit import CFG, AutoGuidance
from guidekit.bridge.testbed import MixtureDenoiser, MixtureDenoiserOutput, MixturePipeline
from guidekit.guidance.spec import format_guidance, parse_guidance
from guidekit.testbed import GaussianMixture
from guidekit.testing.tiny import build_tiny_pipeline, tiny_call_kwargs

MEANS, LABELS = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], [0, 0, 1]


def lerp_denoiser(mixture: GaussianMixture, main: MixtureDenoiser, weak: MixtureDenoiser, w: float
                  ) -> MixtureDenoiser:
    """A denoiser answering ``weak + w (main - weak)`` of the two exact denoisers: the oracle, written here."""
    oracle = MixtureDenoiser.from_mixture(mixture)

    def forward(sample, timestep, class_labels, return_dict=True):
        d1 = main(sample, timestep, class_labels, return_dict=False)[0]
        d0 = weak(sample, timestep, class_labels, return_dict=False)[0]
        out = d0 + w * (d1 - d0)
        return MixtureDenoiserOutput(sample=out) if return_dict else (out,)

    oracle.forward = forward
    return oracle


@pytest.mark.parametrize("w", [2.0, 0.5])
def test_autoguidance_on_the_testbed_equals_the_lerp_of_the_exact_denoisers(w: float) -> None:
    pipe = MixturePipeline.from_mixture(GaussianMixture.isotropic(MEANS, [0.5, 0.5, 0.7], LABELS))
    weak = MixtureDenoiser.from_mixture(GaussianMixture.isotropic(MEANS, [1.0, 1.0, 1.2], LABELS))
    labels, steps = [0, 1, 0, 1], 20

    def draw(p: MixturePipeline) -> torch.Tensor:
        return p(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).samples

    plain = draw(pipe)
    with guidekit.guided(pipe, AutoGuidance(weak, w)) as run:
        ours = draw(pipe)
    oracle_pipe = MixturePipeline(lerp_denoiser(pipe.transformer.mixture, pipe.transformer, weak, w), pipe.scheduler)
    expected = draw(oracle_pipe)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert (plain - expected).abs().max() > 1e-2  # the weak model moves the samples
    assert run.stats.computed == {"cond": 4 * steps, "uncond": 0, "weak": 4 * steps}
    assert run.stats.model_calls == 2 * steps  # one call of each network per step


def _weak_unet(pipe) -> UNet2DConditionModel:
    torch.manual_seed(1)
    return UNet2DConditionModel.from_config({**pipe.unet.config, "block_out_channels": [16, 32],
                                             "norm_num_groups": 8})


def test_a_smaller_unet_guides_tiny_sd_with_cfg_and_both_networks_rows_are_counted() -> None:
    pipe = build_tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    weak = _weak_unet(pipe)
    weak_rows: list[int] = []
    weak.conv_in.register_forward_pre_hook(lambda _m, args: weak_rows.append(args[0].shape[0]))
    call = {**tiny_call_kwargs("sd", batch_size=2), "num_inference_steps": 4, "output_type": "pt"}
    cfg_only = pipe(**call, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
    with guidekit.guided(pipe, CFG(5) + AutoGuidance(weak, 2.0)) as run:
        both = pipe(**call, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
    assert weak_rows == [2] * 4  # the weak network sees the conditional rows of both samples, once per step
    assert run.stats.computed == {"cond": 8, "uncond": 8, "weak": 8} and run.stats.model_calls == 8
    assert torch.isfinite(both).all() and (both - cfg_only).abs().max() > 1e-3
    with guidekit.guided(pipe, CFG(5) + AutoGuidance(weak, 1.0)) as run:  # w = 1: the weak network is not run
        same = pipe(**call, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(same, cfg_only) and "weak" not in run.stats.computed and len(weak_rows) == 4


def test_bad_weak_networks_are_refused_by_name() -> None:
    pipe = build_tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(TypeError, match=r"^weak of type int is not accepted"):
        AutoGuidance(3, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^weak='' is not accepted"):
        AutoGuidance("", 2.0)
    with pytest.raises(ValueError, match=r"^weak='/nonexistent/unet' is not accepted; expected a saved "
                                         r"UNet2DConditionModel"):
        pipe.set_guidance("autoguidance(weak='/nonexistent/unet', scale=2)")
    with pytest.raises(ValueError, match=r"^scale=-1 is not accepted"):
        AutoGuidance(pipe.unet, -1)
    with pytest.raises(ValueError, match=r"^weak=UNet2DConditionModel is not accepted; it is the pipeline's own"):
        pipe.set_guidance(AutoGuidance(pipe.unet, 2.0))
    other = UNet2DConditionModel.from_config({**pipe.unet.config, "out_channels": 8})
    call = {**tiny_call_kwargs("sd"), "num_inference_steps": 2, "output_type": "pt"}
    with pytest.raises(ValueError, match=r"^weak=UNet2DConditionModel is not accepted; its output has shape "
                                         r"\(1, 8, .*expected a network of the same family and latent size$"), \
            guidekit.guided(pipe, AutoGuidance(other, 2.0)):
        pipe(**call, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"^weak=UNet2DConditionModel\(...\) has no text form"):
        format_guidance(AutoGuidance(other, 2.0))


def test_a_weak_network_given_by_path_is_loaded_at_attachment_and_equals_the_module(tmp_path) -> None:
    """The text form names a saved denoiser; the bridge loads it with the denoiser's class, dtype and device when
    the guidance is attached, and drops it when the guidance goes."""
    pipe = build_tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    weak = _weak_unet(pipe)
    weak.save_pretrained(tmp_path / "weak")
    call = {**tiny_call_kwargs("sd"), "num_inference_steps": 3, "output_type": "pt"}
    with guidekit.guided(pipe, CFG(5) + AutoGuidance(weak, 2.0)):
        expected = pipe(**call, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
    text = f"cfg(scale=5) + autoguidance(weak={str(tmp_path / 'weak')!r}, scale=2)"
    guidance = parse_guidance(text)
    assert format_guidance(guidance) == text.replace("cfg(scale=5)", "cfg(scale=5.0, rescale=0.0, rescale_space='v')"
                                                     ).replace("scale=2)", "scale=2.0)")
    with guidekit.guided(pipe, text) as run:
        ours = pipe(**call, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
        assert set(pipe.__dict__["_guidekit_weak"]) == {str(tmp_path / "weak")}
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert run.stats.computed["weak"] == 3 and "_guidekit_weak" not in pipe.__dict__


def test_autoguidance_beside_flux_true_cfg_in_separate_calls() -> None:
    """Flux's true CFG makes a conditional and an unconditional call per step; the weak network runs beside the
    conditional call. The oracle: the plain pipeline whose transformer, written here, returns on each conditional call
    ``c' = c + (a - 1) / w (c - weak)``, so that its own ``u + w (c' - u)`` is ``u + w (c - u) + (a - 1) (c - weak)``,
    the sum ``CFG(w) + AutoGuidance(weak, a)``."""
    from diffusers import FluxTransformer2DModel

    pipe = build_tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(3)
    weak = FluxTransformer2DModel.from_config(pipe.transformer.config)
    call = {**tiny_call_kwargs("flux"), "num_inference_steps": 3, "output_type": "latent", "true_cfg_scale": 4.0}
    original, calls = pipe.transformer.forward, []

    def oracle(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) % 2:  # the conditional call of a step
            c = out[0]
            return (c + (2.0 - 1.0) / 4.0 * (c - weak(*args, **kwargs)[0]),)
        return out

    with forward_replaced(pipe.transformer, oracle):
        expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with guidekit.guided(pipe, CFG(4) + AutoGuidance(weak, 2.0)) as run:
        ours = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert run.stats.computed == {"cond": 3, "uncond": 3, "weak": 3} and run.stats.model_calls == 9
    assert (plain - expected).abs().max() > 1e-3


def test_cfg_plus_pag_plus_autoguidance_on_tiny_sd() -> None:
    """Two perturbed passes at once: PAG's rows share the main forward ``[u; c; c_pag]``, the weak network runs a
    forward of its own. The oracle is diffusers' ``StableDiffusionPAGPipeline`` (``u + w (c - u) + s (c - p)``) whose
    UNet, wrapped here, returns ``c' = c + (a - 1) / (w + s) (c - D_weak)`` in place of its conditional rows: the
    result gains exactly ``(a - 1) (c - D_weak)``, the autoguidance term."""
    from diffusers import StableDiffusionPAGPipeline

    from guidekit import PAG

    pipe = build_tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    weak = _weak_unet(pipe)
    native = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    native.set_progress_bar_config(disable=True)
    call = {**tiny_call_kwargs("sd"), "num_inference_steps": 3, "output_type": "pt", "guidance_scale": 5.0}
    original = native.unet.forward

    def oracle(sample, timestep, encoder_hidden_states, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(sample, timestep, encoder_hidden_states, *args, **kwargs)
        b = len(sample) // 3
        cond = slice(b, 2 * b)
        d_weak = weak(sample[cond], timestep, encoder_hidden_states[cond], return_dict=False)[0]
        c = out[0][cond]
        pred = out[0].clone()
        pred[cond] = c + (2.0 - 1.0) / (5.0 + 3.0) * (c - d_weak)
        return (pred,)

    with forward_replaced(native.unet, oracle):
        expected = native(**call, pag_scale=3.0, generator=torch.Generator().manual_seed(0)).images
    with guidekit.guided(pipe, CFG(5) + PAG(3) + AutoGuidance(weak, 2.0)) as run:
        ours = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert run.stats.computed == {"cond": 3, "uncond": 3, "pag:mid": 3, "weak": 3} and run.stats.model_calls == 6
    with guidekit.guided(pipe, CFG(5) + PAG(3)):
        assert (pipe(**call, generator=torch.Generator().manual_seed(0)).images - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"at most one pass with a changed self-attention"):
        pipe.set_guidance(CFG(5) + PAG(3) + guidekit.SEG(3))
