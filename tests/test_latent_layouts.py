"""Every combination rule on video latents ``(B, C, T, H, W)`` and packed token latents ``(B, N, D)``.

Oracles: for the rules built from elementwise arithmetic and per-sample reductions over all non-batch dimensions
(CFG, CFG-rescale, APG, CFG-Zero*, TCFG, MAMBO-G, the per-sample CFG normalisation), any rearrangement of a sample's
elements commutes with the rule. So the result on a video latent must equal the result on the same numbers laid out
as a 4-D latent, and the result on a packed latent must equal the result on the unpacked latent packed with diffusers'
own ``FluxPipeline._pack_latents``. A rule that reduced over one axis only (the channels, say) or over the whole batch
would fail both. Every rule must also treat samples independently: sample 0 alone gives sample 0 of the batch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_context
from diffusers import FluxPipeline

from guidekit import APG, CFG, FDG, MAMBOG, TCFG, AdaptiveGuidance, CFGNorm, CFGZeroStar, Interval
from guidekit.guidance.base import GuidanceContext

PERMUTATION_INVARIANT = {
    "cfg": CFG(5.0),
    "cfg_rescale": CFG(5.0, rescale=0.7),
    "apg": APG(5.0, momentum=0.0),
    "cfg_zero_star": CFGZeroStar(5.0, zero_init_steps=0),
    "tcfg": TCFG(5.0),
    "mambo_g": MAMBOG(5.0, alpha=2.0),
    "cfg_norm_per_sample": CFGNorm(5.0, limit=0.8),
    "interval": Interval(CFG(5.0), 0.1, 10.0),
}


def _predictions(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    return x, c, 0.6 * c + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)


def _combine(guidance: object, c: torch.Tensor, u: torch.Tensor, ctx: GuidanceContext) -> torch.Tensor:
    return guidance.combine(c, u, ctx, guidance.init_state(len(c)))  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(PERMUTATION_INVARIANT))
def test_video_latents_equal_the_same_numbers_as_images(name: str) -> None:
    guidance = PERMUTATION_INVARIANT[name]
    x, c, u = _predictions((2, 4, 3, 6, 5))
    video = _combine(guidance, c, u, make_context(x))
    flat = lambda t: t.reshape(2, 12, 6, 5)  # noqa: E731
    image = _combine(guidance, flat(c), flat(u), make_context(flat(x)))
    assert video.shape == c.shape and torch.allclose(video, image.reshape(c.shape), atol=1e-10)
    assert (video - c).abs().max() > 0.1


@pytest.mark.parametrize("name", list(PERMUTATION_INVARIANT))
def test_packed_latents_equal_the_unpacked_ones_packed(name: str) -> None:
    guidance = PERMUTATION_INVARIANT[name]
    x, c, u = _predictions((2, 16, 6, 4), seed=1)
    pack = lambda t: FluxPipeline._pack_latents(t, 2, 16, 6, 4)  # noqa: E731
    packed = _combine(guidance, pack(c), pack(u), make_context(pack(x)))
    unpacked = _combine(guidance, c, u, make_context(x))
    assert packed.shape == (2, 6, 64) and torch.allclose(packed, pack(unpacked), atol=1e-10)


@pytest.mark.parametrize("guidance", [*PERMUTATION_INVARIANT.values(), CFGNorm(5.0, variant="per_pixel"),
                                      CFGNorm(5.0, variant="per_token"), FDG((8.0, 3.0))],
                         ids=[*PERMUTATION_INVARIANT, "cfg_norm_per_pixel", "cfg_norm_per_token", "fdg"])
@pytest.mark.parametrize("shape", [(3, 4, 2, 8, 6), (3, 6, 64)], ids=["video", "packed"])
def test_samples_are_independent(guidance: object, shape: tuple[int, ...]) -> None:
    if len(shape) == 5 and isinstance(guidance, CFGNorm) and guidance.variant == "per_token":
        pytest.skip("per-token normalisation is Qwen-Image's, on images")
    x, c, u = _predictions(shape, seed=2)
    grid = (4, 6) if len(shape) == 3 else None
    ctx = make_context(x)
    ctx = GuidanceContext(**{**ctx.__dict__, "grid": grid})
    batch = _combine(guidance, c, u, ctx)
    alone = _combine(guidance, c[:1], u[:1], ctx.subset(torch.tensor([0])))
    assert batch.shape == c.shape and torch.isfinite(batch).all()
    assert torch.allclose(batch[:1], alone, atol=1e-10)


def test_per_pixel_normalisation_on_video_is_per_frame_pixel() -> None:
    """ComfyUI's CFGNorm on a video latent: the channel norm at each (frame, row, column), computed here frame by
    frame on the denoised predictions of an eps model (``x0 = (x - s eps) / alpha`` at the context's noise level)."""
    x, c, u = _predictions((2, 4, 3, 5, 5), seed=3)
    ctx = make_context(x)
    alpha, s = ctx.level.alpha, ctx.level.s
    c0, u0 = (x - s * c) / alpha, (x - s * u) / alpha
    g0 = u0 + 5.0 * (c0 - u0)
    frames = []
    for t in range(3):
        cn = torch.linalg.vector_norm(c0[:, :, t], dim=1, keepdim=True)
        gn = torch.linalg.vector_norm(g0[:, :, t], dim=1, keepdim=True)
        frames.append(g0[:, :, t] * (cn / (gn + 1e-8)).clamp(max=1.0))
    oracle = (x - alpha * torch.stack(frames, dim=2)) / s
    assert torch.allclose(_combine(CFGNorm(5.0, variant="per_pixel"), c, u, ctx), oracle, atol=1e-10)


def test_adaptive_guidance_on_packed_latents_switches_per_sample() -> None:
    x, c, u = _predictions((2, 6, 64), seed=4)
    u[1] = c[1]  # sample 1's predictions agree: cosine 1, it switches off
    guidance = AdaptiveGuidance(CFG(5.0), threshold=0.99)
    state = guidance.init_state(2)
    mask = guidance.needs_unconditional(make_context(x), state)
    guidance.combine(c, u, make_context(x), state)
    assert mask.tolist() == [True, True]
    assert guidance.needs_unconditional(make_context(x, step=1), state).tolist() == [True, False]
