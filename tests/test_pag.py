"""Perturbed-Attention Guidance: ``set_guidance(CFG(w) + PAG(s))`` against diffusers' own PAG pipelines.

The oracle is diffusers: ``StableDiffusionPAGPipeline`` / ``StableDiffusionXLPAGPipeline`` built from the same
components with ``pag_applied_layers=["mid"]`` compute ``u + w (c - u) + s (c - p)`` from one forward of
``[uncond; cond; cond]`` with identity self-attention on the last part. Each comparison also checks that the plain
pipeline (no PAG) is far from the oracle, so the equality is not one a no-op would pass.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_context
from diffusers import FluxPipeline
from pipelines import PAG_PIPELINES, images, pag_pair

import guidekit
from guidekit import CFG, PAG
from guidekit.bridge.perturb import resolve_layers
from guidekit.guidance.base import COND, UNCOND, GuidanceSum, IdentitySelfAttention, apply_guidance
from guidekit.guidance.spec import format_guidance, parse_guidance
from guidekit.testing.tiny import build_tiny_pipeline, tiny_call_kwargs

STEPS = 4


@pytest.fixture(scope="module", params=list(PAG_PIPELINES))
def pipes(request: pytest.FixtureRequest) -> tuple:
    return pag_pair(request.param)


def _run(pipe, family: str, **kwargs: object) -> torch.Tensor:
    return images(pipe, family, STEPS, **kwargs)


@pytest.mark.parametrize(("guidance_scale", "pag_scale", "adaptive"), [(5.0, 3.0, 0.0), (5.0, 3.0, 0.005),
                                                                      (1.0, 3.0, 0.0)])
def test_cfg_plus_pag_equals_diffusers_pag_pipeline(pipes: tuple, guidance_scale: float, pag_scale: float,
                                                    adaptive: float) -> None:
    family, pipe, native = pipes
    expected = _run(native, family, guidance_scale=guidance_scale, pag_scale=pag_scale, pag_adaptive_scale=adaptive)
    plain = _run(pipe, family, guidance_scale=guidance_scale)
    assert (plain - expected).abs().max() > 1e-2  # PAG changes the image: the oracle differs from the baseline
    guidance = PAG(pag_scale, layers="mid", adaptive_scale=adaptive)
    if guidance_scale > 1:
        guidance = CFG(guidance_scale) + guidance
    rows: list[int] = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))  # real rows
    try:
        with guidekit.guided(pipe, guidance) as run:
            ours = _run(pipe, family, guidance_scale=guidance_scale)
    finally:
        hook.remove()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    # The weight is 3 - a (1000 - t): with a = 0.005 it is 0 at the last two of the 4 DDIM steps (t = 251, 1).
    perturbed = STEPS if adaptive == 0 else 2
    cfg_rows = 2 if guidance_scale > 1 else 1
    assert rows == [cfg_rows + 1] * perturbed + [cfg_rows] * (STEPS - perturbed)  # one forward per step
    assert run.stats.computed == {"cond": STEPS, "uncond": STEPS if guidance_scale > 1 else 0, "pag:mid": perturbed}
    assert run.stats.skipped["pag:mid"] == STEPS - perturbed


def test_the_attention_processors_come_back_after_a_call_and_after_an_error(pipes: tuple) -> None:
    family, pipe, _ = pipes
    before = dict(pipe.unet.attn_processors)
    seen: list[dict] = []

    def fail_inside(_module: object, _args: object) -> None:  # at the second forward, processors installed
        seen.append(dict(pipe.unet.attn_processors))
        if len(seen) == 2:
            raise RuntimeError("a failure inside the network")

    with guidekit.guided(pipe, CFG(5) + PAG(3)):
        _run(pipe, family, guidance_scale=5.0)
        assert pipe.unet.attn_processors == before
        hook = pipe.unet.conv_in.register_forward_pre_hook(fail_inside)
        try:
            with pytest.raises(RuntimeError, match="inside the network"):
                _run(pipe, family, guidance_scale=5.0)
        finally:
            hook.remove()
    assert seen[0] != before  # during the call the mid block's self-attention has guidekit's processor
    assert pipe.unet.attn_processors == before


def test_the_sum_is_cfg_plus_the_pag_difference_on_tensors() -> None:
    ctx = make_context(torch.randn(3, 4, 8, 8))
    c, u, p = (torch.randn(3, 4, 8, 8, dtype=torch.float64) for _ in range(3))
    guidance = CFG(5) + PAG(3, layers=["mid", "up_blocks.0"])
    perturbed = guidance.terms[1].perturbed
    state = guidance.init_state(3)
    masks = guidance.needs(ctx, state)
    assert set(masks) == {UNCOND, perturbed} and all(bool(m.all()) for m in masks.values())
    out = apply_guidance(guidance, c, {UNCOND: u, perturbed: p}, masks, ctx, state)
    torch.testing.assert_close(out, u + 5 * (c - u) + 3 * (c - p), rtol=1e-12, atol=1e-12)
    # Without the perturbed pass for the last sample, its PAG term adds nothing: plain CFG for it.
    masks[perturbed] = state.masks[1][perturbed] = torch.tensor([True, True, False])
    out = apply_guidance(guidance, c, {UNCOND: u, perturbed: p[:2]}, masks, ctx, state)
    torch.testing.assert_close(out[2], u[2] + 5 * (c[2] - u[2]), rtol=1e-12, atol=1e-12)
    assert COND not in masks


def test_text_form_and_values() -> None:
    guidance = CFG(5) + PAG(3, layers="mid", adaptive_scale=0.01)
    text = format_guidance(guidance)
    assert text == ("cfg(scale=5.0, rescale=0.0, rescale_space='v') + pag(scale=3.0, layers=['mid'], "
                    "adaptive_scale=0.01)")
    assert parse_guidance(text) == guidance and hash(parse_guidance(text)) == hash(guidance)
    assert parse_guidance("cfg(5) + pag(2) + pag(1, layers='up_blocks.0')").terms[2].layers == ("up_blocks.0",)
    assert isinstance(CFG(2) + (PAG(1) + PAG(2)), GuidanceSum) and len((CFG(2) + (PAG(1) + PAG(2))).terms) == 3
    assert PAG(0).passes() == frozenset()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: PAG(-1), r"^scale=-1 is not accepted"),
    (lambda: PAG(3, layers=[]), r"^layers=\[\] is not accepted"),
    (lambda: PAG(3, adaptive_scale=float("nan")), r"^adaptive_scale=nan is not accepted"),
    (lambda: parse_guidance("cfg(5) + pcg(gamma=2)"), "does not add to others"),
])
def test_bad_values_are_refused_by_name(make, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_layer_patterns_are_anchored_and_an_unknown_layer_lists_the_blocks(pipes: tuple) -> None:
    _, pipe, _ = pipes
    names = set(resolve_layers(pipe.unet, ("mid",)))
    assert names and all(n.startswith("mid_block.") and n.endswith("attn1") for n in names)
    assert not set(resolve_layers(pipe.unet, ("down_blocks.1",))) & set(resolve_layers(pipe.unet, ("mid",)))
    with pytest.raises(ValueError, match=r"'down_block' matches no self-attention layer .* mid_block") as info:
        pipe.set_guidance(PAG(3, layers="down_block"))
    assert "\n" not in str(info.value)
    pipe.set_guidance(None)


def test_a_digit_pattern_does_not_match_a_longer_number() -> None:
    class Blocks(torch.nn.Module):
        def __init__(self) -> None:
            from diffusers.models.attention_processor import Attention

            super().__init__()
            self.blocks = torch.nn.ModuleList([Attention(8, heads=1, dim_head=8) for _ in range(12)])

    chosen = resolve_layers(Blocks(), ("blocks.1",))
    assert list(chosen) == ["blocks.1"]  # not blocks.10 or blocks.11, which diffusers' regex also matches


def test_flux_refuses_attention_and_block_perturbations_by_name() -> None:
    pipe = build_tiny_pipeline("flux")
    assert isinstance(pipe, FluxPipeline)
    with pytest.raises(ValueError, match=r"^layers=\['transformer_blocks.0'\] is not accepted for "
                                         "FluxTransformer2DModel, which has no self-attention layer"):
        pipe.set_guidance(PAG(3, layers="transformer_blocks.0"))
    with pytest.raises(ValueError, match=r"^layers=\[0\] is not accepted for FluxTransformer2DModel: its "
                                         "FluxTransformerBlock returns two streams"):
        pipe.set_guidance(guidekit.SLG(2.8, layers=[0]))


def _step_sigmas(pipe) -> torch.Tensor:
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    alphas = scheduler.alphas_cumprod[scheduler.timesteps.round().long()]
    return ((1 - alphas) / alphas).sqrt()  # the EDM sigma of each step's timestep (Euler's own sigmas too)


def _rows_per_forward(pipe, family: str, guidance: object) -> tuple[torch.Tensor, list[int], object]:
    rows: list[int] = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        with guidekit.guided(pipe, guidance) as run:
            images = _run(pipe, family, guidance_scale=5.0)
    finally:
        hook.remove()
    return images, rows, run.stats


def test_interval_pag_computes_perturbed_rows_inside_only_and_equals_diffusers_with_pag_stopped(
        pipes: tuple) -> None:
    family, pipe, native = pipes
    sigmas = _step_sigmas(pipe)
    lo = float(sigmas[1] + sigmas[2]) / 2  # steps 0 and 1 lie in (lo, inf], steps 2 and 3 below

    def stop_pag_after_step_1(p, i: int, t: object, kwargs: dict) -> dict:
        if i == 1:
            # diffusers' PAG weight for the remaining steps (PAGMixin._get_pag_scale); not 0, which would make the
            # pipeline drop the perturbed rows from its batch mid-call and fail; 1e-30 adds nothing in float32
            p._pag_scale = 1e-30
        return kwargs

    expected = _run(native, family, guidance_scale=5.0, pag_scale=3.0, callback_on_step_end=stop_pag_after_step_1)
    native._pag_scale = 3.0
    full = _run(native, family, guidance_scale=5.0, pag_scale=3.0)
    assert (full - expected).abs().max() > 1e-3  # stopping PAG after step 1 changes the image
    images, rows, stats = _rows_per_forward(pipe, family, CFG(5) + guidekit.Interval(PAG(3), lo, float("inf")))
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert rows == [3, 3, 2, 2]  # 3 rows per sample inside the interval, 2 outside
    assert stats.computed["pag:mid"] == 2 and stats.skipped["pag:mid"] == 2
    outside, rows, _ = _rows_per_forward(pipe, family, CFG(5) + guidekit.Interval(PAG(3), 1e6, float("inf")))
    assert rows == [2] * STEPS
    assert torch.equal(outside, _run(pipe, family, guidance_scale=5.0))  # the pipeline's own CFG, bitwise
    around, _, _ = _rows_per_forward(pipe, family, guidekit.Interval(CFG(5) + PAG(3), lo, float("inf")))
    assert rows == [2] * STEPS and (around - images).abs().max() > 1e-3  # around the sum, CFG stops too


def test_adaptive_guidance_over_cfg_plus_pag_drops_both_extra_passes_of_a_switched_sample(pipes: tuple) -> None:
    family, pipe, _ = pipes
    sigmas = _step_sigmas(pipe)
    # A tiny threshold: the predictions align at once, so each sample is guided at step 0 only.
    images, rows, stats = _rows_per_forward(pipe, family, guidekit.AdaptiveGuidance(CFG(5) + PAG(3), threshold=1e-6))
    assert rows == [3, 1, 1, 1]  # then the conditional row alone: neither the unconditional nor the perturbed one
    assert stats.computed == {"cond": STEPS, "uncond": 1, "pag:mid": 1}
    lo = float(sigmas[0] + sigmas[1]) / 2
    first_step_only, _, _ = _rows_per_forward(pipe, family, guidekit.Interval(CFG(5) + PAG(3), lo, float("inf")))
    assert torch.equal(images, first_step_only)


def test_the_row_processor_equals_diffusers_pag_processor_on_a_group_norm_residual_attention() -> None:
    # The embedded model's mid-block attention: 4-D input, group norm, residual connection, output rescaling.
    from diffusers.models.attention_processor import AttnProcessor2_0, PAGCFGIdentitySelfAttnProcessor2_0

    from guidekit.bridge.loading import load_pipeline
    from guidekit.bridge.perturb import RowPerturbedAttention

    pipe, _ = load_pipeline("default")
    (attn,) = resolve_layers(pipe.unet, ("mid",)).values()
    assert attn.group_norm is not None and attn.residual_connection
    h = torch.randn(3, attn.to_q.in_features, 2, 2, generator=torch.Generator().manual_seed(0))
    expected = PAGCFGIdentitySelfAttnProcessor2_0()(attn, h)  # [uncond; cond; cond]: identity on the last third
    processor = RowPerturbedAttention(AttnProcessor2_0(), IdentitySelfAttention(("mid",)))
    processor.perturbed_rows = 1
    ours = processor(attn, h)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    unperturbed = AttnProcessor2_0()(attn, h)
    assert torch.equal(ours[:2], unperturbed[:2]) and (ours[2] - unperturbed[2]).abs().max() > 1e-3
    processor.perturbed_rows = 0
    assert torch.equal(processor(attn, h), unperturbed)


def test_scheduled_sum_equals_diffusers_pag_with_both_weights_changed_per_step(pipes: tuple) -> None:
    """``Scheduled(CFG(5) + PAG(3), "linear")`` schedules each term: CFG's ``w - 1`` and PAG's ``s`` both follow
    ``2 x (1 - tau)`` (Wang et al.'s linear shape, ``tau = t / 1000``). The oracle is diffusers' PAG pipeline whose
    ``guidance_scale`` and ``pag_scale`` a step callback sets for the next step from the same formula, written here."""
    family, pipe, native = pipes
    pipe.scheduler.set_timesteps(STEPS)
    taus = [float(t) / 1000 for t in pipe.scheduler.timesteps]
    cfg_w = [1 + 2 * 4.0 * (1 - tau) for tau in taus]
    pag_s = [2 * 3.0 * (1 - tau) for tau in taus]

    def next_weights(p, i: int, t: object, kwargs: dict) -> dict:
        if i + 1 < STEPS:
            p._guidance_scale, p._pag_scale = cfg_w[i + 1], pag_s[i + 1]
        return kwargs

    expected = _run(native, family, guidance_scale=cfg_w[0], pag_scale=pag_s[0], callback_on_step_end=next_weights)
    guidance = guidekit.Scheduled(CFG(5) + PAG(3), "linear")
    assert guidance == guidekit.Scheduled(CFG(5), "linear") + guidekit.Scheduled(PAG(3), "linear")
    with guidekit.guided(pipe, guidance) as run:
        ours = _run(pipe, family, guidance_scale=5.0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert run.stats.computed["pag:mid"] == STEPS
    with guidekit.guided(pipe, CFG(5) + PAG(3)):
        assert (_run(pipe, family, guidance_scale=5.0) - expected).abs().max() > 1e-3  # the schedule matters


@pytest.mark.parametrize(("family", "native_class", "native_layer", "output_type", "rtol"), [
    # PixArt's transformer blocks have plain self-attention.
    ("pixart", "PixArtSigmaPAGPipeline", "blocks.1", "latent", 2e-5),
    # SD3's joint text-image attention: the perturbed image tokens attend to themselves alone among the image tokens
    # (diffusers' PAGCFGJointAttnProcessor2_0); tiny SD3 has no query-key norm, which diffusers' processor omits.
    ("sd3", "StableDiffusion3PAGPipeline", "blocks.1", "pt", 0.0),
    # Sana's linear attention: the perturbed rows get to_out(to_v(h)) (PAGCFGSanaLinearAttnProcessor2_0).
    ("sana", "SanaPAGPipeline", "transformer_blocks.1", "latent", 2e-5),
])
def test_pag_on_transformers_equals_diffusers_pag_pipelines(family: str, native_class: str, native_layer: str,
                                                              output_type: str, rtol: float) -> None:
    """CFG + PAG on tiny PixArt-Sigma, SD3 and Sana equals diffusers' own PAG pipeline of the family with the same
    components and layer. Latents (PixArt, Sana) are of size about 20, not images in [0, 1]: float32 rounding of the
    two ways of adding up the terms (diffusers u + w (c - u) + s (c - p), guidekit's sum of the terms' differences)
    reaches 1e-4 after 4 steps, hence the relative tolerance there."""
    import inspect

    import diffusers

    cls = getattr(diffusers, native_class)
    pipe = build_tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    accepted = inspect.signature(cls).parameters
    native = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, pag_applied_layers=[native_layer])
    native.set_progress_bar_config(disable=True)
    call = {**tiny_call_kwargs(family), "num_inference_steps": STEPS, "output_type": output_type,
            "guidance_scale": 5.0}
    expected = native(**call, pag_scale=3.0, generator=torch.Generator().manual_seed(0)).images
    with guidekit.guided(pipe, CFG(5) + PAG(3, layers="transformer_blocks.1")) as run:
        ours = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours, expected, rtol=rtol, atol=1e-5)
    assert run.stats.computed["pag:transformer_blocks.1"] == STEPS and run.stats.model_calls == STEPS
    assert (pipe(**call, generator=torch.Generator().manual_seed(0)).images - expected).abs().max() > 1e-3


@pytest.mark.parametrize(("family", "guidance", "processor"), [
    ("sd3", guidekit.SEG(3, layers="transformer_blocks.0"), "JointAttnProcessor2_0"),
    ("sana", guidekit.SEG(3, layers="transformer_blocks.0"), "SanaLinearAttnProcessor2_0"),
])
def test_joint_and_linear_attention_are_refused_by_name(family: str, guidance: object, processor: str) -> None:
    pipe = build_tiny_pipeline(family)
    with pytest.raises(ValueError, match=rf"^layers=\['transformer_blocks.0'\] is not accepted for .*{processor}"):
        pipe.set_guidance(CFG(5) + guidance)
