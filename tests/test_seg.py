"""Smoothed Energy Guidance against the official SEG-SDXL rule, written independently in the test.

The oracle: diffusers' own PAG pipelines (``StableDiffusionPAGPipeline`` / ``StableDiffusionXLPAGPipeline``) compute
``u + w (c - u) + s (c - p)`` from one forward of ``[uncond; cond; cond]`` and accept the attention processors of the
perturbed layers (``set_pag_applied_layers(..., pag_attn_processors=...)``), which is how the official SEG-SDXL
pipeline is built. Here those processors are the official SEG rule written in the test: queries blurred per head
channel by a separable Gaussian (kernel side ``ceil(6 sigma)`` made odd, clipped to the grid side plus one, reflect
padding), or replaced by their mean for the infinite blur, on the last third (CFG) or last half (no CFG) of the
batch. Each comparison also checks that the oracle is far from CFG alone and from PAG.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pipelines import PAG_PIPELINES, images, pag_pair

import guidekit
from guidekit import CFG, PAG, SEG
from guidekit.bridge.perturb import blur_queries, resolve_layers
from guidekit.guidance.base import BlurredQueries
from guidekit.guidance.spec import format_guidance, parse_guidance
from guidekit.testing.tiny import build_tiny_pipeline

STEPS = 4


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)``: rows, then columns, each with reflect padding."""
    side = min(image.shape[-2:])
    size = math.ceil(6 * sigma)
    size += 1 - size % 2
    size = min(size, side + 1 if side % 2 == 0 else side)
    taps = torch.tensor([math.exp(-0.5 * (i / sigma) ** 2) for i in torch.linspace(-(size - 1) / 2, (size - 1) / 2,
                                                                                    size).tolist()])
    taps = (taps / taps.sum()).to(image.dtype)
    c = image.shape[1]
    out = F.conv2d(F.pad(image, [size // 2, size // 2, 0, 0], mode="reflect"), taps.view(1, 1, 1, -1).expand(c, 1, 1,
                   size), groups=c)
    return F.conv2d(F.pad(out, [0, 0, size // 2, size // 2], mode="reflect"), taps.view(1, 1, -1, 1).expand(c, 1,
                    size, 1), groups=c)


def _seg_queries(query: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """The official SEG query perturbation on ``(B, heads, N, d)`` queries."""
    if sigma > 9999.0:
        return query.mean(dim=2, keepdim=True).expand_as(query)
    b, heads, n, d = query.shape
    image = query.transpose(2, 3).reshape(b, heads * d, *grid)
    return _gaussian_blur(image, sigma).reshape(b, heads, d, n).transpose(2, 3)


class SEGProcessor:
    """The official SEG-SDXL self-attention processor's rule: plain attention, with the queries of the last
    ``1 / parts`` of the batch perturbed (``parts`` 3 with CFG, 2 without)."""

    def __init__(self, sigma: float, parts: int) -> None:
        self.sigma, self.parts = sigma, parts

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):  # type: ignore[no-untyped-def]
        b, n, _ = hidden_states.shape
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                   for t in (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)))
        side = math.isqrt(n)
        keep = b - b // self.parts
        q = torch.cat([q[:keep], _seg_queries(q[keep:], (side, side), self.sigma)])
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture(scope="module", params=list(PAG_PIPELINES))
def pipes(request: pytest.FixtureRequest) -> tuple:
    return pag_pair(request.param)


def _run(pipe, family: str, **kwargs: object) -> torch.Tensor:
    return images(pipe, family, STEPS, **kwargs)


def _official(native, family: str, sigma: float, *, guidance_scale: float) -> torch.Tensor:
    native.set_pag_applied_layers(["mid"], pag_attn_processors=(SEGProcessor(sigma, 3), SEGProcessor(sigma, 2)))
    return _run(native, family, guidance_scale=guidance_scale, pag_scale=3.0)


@pytest.mark.parametrize("sigma", [1.0, 2.0, math.inf])
def test_cfg_plus_seg_equals_official_rule(pipes: tuple, sigma: float) -> None:
    family, pipe, native = pipes
    expected = _official(native, family, sigma, guidance_scale=5.0)
    with guidekit.guided(pipe, CFG(5.0) + SEG(3.0, blur_sigma=sigma)) as run:
        ours = _run(pipe, family, guidance_scale=5.0)
    assert (ours - expected).abs().max() < 1e-5
    name = SEG(3.0, blur_sigma=sigma).perturbed.name
    assert run.stats.computed[name] == STEPS and run.stats.model_calls == STEPS  # one [u; c; c] forward per step
    assert (_run(pipe, family, guidance_scale=5.0) - expected).abs().max() > 1e-3  # CFG alone is far
    with guidekit.guided(pipe, CFG(5.0) + PAG(3.0)):
        assert (_run(pipe, family, guidance_scale=5.0) - expected).abs().max() > 1e-3  # and so is PAG


def test_seg_alone_equals_official_rule_without_cfg(pipes: tuple) -> None:
    family, pipe, native = pipes
    expected = _official(native, family, 4.0, guidance_scale=1.0)
    with guidekit.guided(pipe, SEG(3.0, blur_sigma=4.0)):
        ours = _run(pipe, family, guidance_scale=1.0)
    assert (ours - expected).abs().max() < 1e-5
    assert (_run(pipe, family, guidance_scale=1.0) - expected).abs().max() > 1e-3


def test_blur_on_a_grid_that_is_not_square() -> None:
    query = torch.randn(2, 3, 6 * 10, 4, generator=torch.Generator().manual_seed(0))
    for sigma in (0.7, 1.5, 50.0):
        ours = blur_queries(query, (6, 10), sigma, infinite=False)
        assert torch.allclose(ours, _seg_queries(query, (6, 10), sigma), atol=1e-6)
        assert (ours - query).abs().max() > 0.1


def test_infinite_blur_is_uniform_attention() -> None:
    """Closed form: with every query the mean query ``q``, every token's attention output is ``softmax(q K^T /
    sqrt(d)) V``, the same for all tokens."""
    pipe = build_tiny_pipeline("sdxl")
    (attn,) = resolve_layers(pipe.unet, ("mid",)).values()
    from diffusers.models.attention_processor import AttnProcessor2_0

    from guidekit.bridge.perturb import RowPerturbedAttention

    h = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    processor = RowPerturbedAttention(AttnProcessor2_0(), BlurredQueries(("mid",), math.inf))
    processor.perturbed_rows, processor.latent_size = 1, (16, 16)
    out = processor(attn, h)
    with torch.no_grad():
        d = attn.to_q.out_features // attn.heads
        q = attn.to_q(h[1]).view(64, attn.heads, d).mean(0)  # (heads, d): the mean query
        k, v = (f(h[1]).view(64, attn.heads, d) for f in (attn.to_k, attn.to_v))
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / math.sqrt(d), dim=-1)
        expected = attn.to_out[0](torch.einsum("hn,nhd->hd", weights, v).reshape(-1))
    assert torch.allclose(out[1], expected.expand(64, -1), atol=1e-5)
    assert torch.equal(out[0], AttnProcessor2_0()(attn, h[:1])[0])


def test_bad_arguments_name_the_parameter() -> None:
    for make, name in [(lambda: SEG(-1.0), "scale"), (lambda: SEG(3.0, blur_sigma=0.0), "blur_sigma"),
                       (lambda: SEG(3.0, blur_sigma=-math.inf), "blur_sigma"), (lambda: SEG(3.0, layers=[]), "layers")]:
        with pytest.raises(ValueError, match=f"^{name}="):
            make()
    pipe = build_tiny_pipeline("sd")
    with pytest.raises(ValueError, match=r"^layers=\['up_blocks.7'\] is not accepted; .* mid_block"):
        pipe.set_guidance(SEG(3.0, layers=["up_blocks.7"]))


def test_text_form_round_trips() -> None:
    for g in (SEG(), SEG(3.0, blur_sigma=10.0, layers=["mid", "up_blocks.0"]), CFG(5.0) + SEG(2.0)):
        assert parse_guidance(format_guidance(g)) == g
    assert parse_guidance("seg(scale=3, blur_sigma=inf)") == SEG(3.0)
