"""FDG and its Laplacian pyramid against oracles: diffusers' FrequencyDecoupledGuidance (kornia's pyramid), a
pyramid written here as 1-D matrices from index formulas, diffusers' Flux packing, and CFG."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_context
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from guidekit.guidance import CFG, COND, UNCOND, Scheduled
from guidekit.guidance.fdg import FDG
from guidekit.guidance.layout import pack_tokens, unpack_tokens
from guidekit.guidance.pyramid import laplacian_pyramid, reconstruct
from guidekit.guidance.spec import NAMES, format_guidance, parse_guidance


def _triple(shape: tuple[int, ...], dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``x``, ``c`` and ``u``; ``c`` is ``u`` plus a smaller difference, as predictions are."""
    g = torch.Generator().manual_seed(seed)
    x, u, d = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    return x.to(dtype), (u + 0.3 * d).to(dtype), u.to(dtype)


# --- The oracle: the pyramid as per-axis matrices ----------------------------------------------------------------
# Every step of the pyramid is separable, y -> A_h y A_w^T: the binomial blur (1-D [1, 4, 6, 4, 1] / 16 twice), the
# reflected border, halving (bilinear at scale 1/2 averages pixel pairs) and doubling (bilinear weights 3/4, 1/4,
# edge clamped). The matrices below are built from those index formulas, not from convolutions or interpolation.

def _source(j: int, n: int) -> int:
    """The pixel a blur tap at ``j`` reads: reflected about the edge pixel, or replicated on a side too short to
    reflect a 2-pixel border."""
    if n <= 2:
        return min(max(j, 0), n - 1)
    return -j if j < 0 else 2 * (n - 1) - j if j >= n else j


def _blur_matrix(n: int) -> np.ndarray:
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    m = np.zeros((n, n))
    for i in range(n):
        for t in range(-2, 3):
            m[i, _source(i + t, n)] += taps[t + 2]
    return m


def _down_matrix(n: int) -> np.ndarray:
    m = np.zeros((n // 2, n))
    for i in range(n // 2):
        m[i, 2 * i] = m[i, 2 * i + 1] = 0.5
    return m


def _up_matrix(n: int) -> np.ndarray:
    m = np.zeros((2 * n, n))
    for o in range(2 * n):
        src = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = math.floor(src)
        lam = src - i0
        m[o, i0] += 1 - lam
        m[o, min(i0 + 1, n - 1)] += lam
    return m


def _axis(n: int, levels: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per level ``i`` of one axis of length ``n``: ``M_i`` (input -> Gaussian level), ``E_i`` (input -> the
    expanded next level, subtracted from level ``i``) and ``R_i`` (level ``i`` -> the reconstruction, cropped)."""
    stride = 2 ** (levels - 1)
    padded = -(-n // stride) * stride
    assert padded - n < n
    pad = np.zeros((padded, n))
    for r in range(padded):
        pad[r, r if r < n else 2 * (n - 1) - r] = 1.0
    gauss, crop = [pad], np.eye(padded)[:n]
    for _ in range(levels - 1):
        size = gauss[-1].shape[0]
        gauss.append(_down_matrix(size) @ _blur_matrix(size) @ gauss[-1])
    expand = [_blur_matrix(2 * g.shape[0]) @ _up_matrix(g.shape[0]) @ g for g in gauss[1:]]
    recon = [crop]
    for g in gauss[1:]:
        recon.append(recon[-1] @ _blur_matrix(2 * g.shape[0]) @ _up_matrix(g.shape[0]))
    return gauss, expand, recon


def _oracle_fdg(cond: torch.Tensor, uncond: torch.Tensor, scales: tuple[float, ...],
                parallel: tuple[float, ...] | None = None) -> torch.Tensor:
    """FDG from the paper's Algorithm 2 on ``(B, ..., H, W)`` float64 arrays, the pyramid acting on the last two
    axes and the projection over each sample's other axes."""
    c, u = cond.double().numpy(), uncond.double().numpy()
    levels = len(scales)
    (mh, eh, rh), (mw, ew, rw) = _axis(c.shape[-2], levels), _axis(c.shape[-1], levels)

    def band(y: np.ndarray, i: int) -> np.ndarray:
        out = mh[i] @ y @ mw[i].T
        return out - eh[i] @ y @ ew[i].T if i < levels - 1 else out

    out = np.zeros_like(c)
    for i, w in enumerate(scales):
        pc, pu = band(c, i), band(u, i)
        shift = pc - pu
        eta = 1.0 if parallel is None else parallel[i]
        if eta != 1.0:
            axes = tuple(range(1, c.ndim))
            coef = (shift * pc).sum(axis=axes, keepdims=True) / (pc * pc).sum(axis=axes, keepdims=True)
            shift = eta * coef * pc + (shift - coef * pc)
        guided = pc if w == 1.0 else pu + w * shift
        out += rh[i] @ guided @ rw[i].T
    return torch.from_numpy(out)


# --- diffusers' FrequencyDecoupledGuidance (kornia's pyramid) ----------------------------------------------------

@pytest.mark.parametrize(("shape", "scales", "parallel"), [
    ((2, 4, 32, 32), (10.0, 5.0), None),
    ((2, 4, 32, 32), (12.0, 6.0, 2.0), None),
    ((2, 4, 32, 32), (10.0, 5.0), (0.5, 0.0)),
    ((2, 4, 64, 48), (9.0, 4.0, 1.5), (0.3, 1.0, 0.7)),  # one side a power of two: kornia pads nothing
])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fdg_equals_diffusers(shape: tuple[int, ...], scales: tuple[float, ...], parallel: tuple[float, ...] | None,
                              dtype: torch.dtype, tol: float) -> None:
    pytest.importorskip("kornia")
    from diffusers.guiders.frequency_decoupled_guidance import FrequencyDecoupledGuidance

    x, c, u = _triple(shape, dtype)
    guider = FrequencyDecoupledGuidance(guidance_scales=list(scales),
                                        parallel_weights=None if parallel is None else list(parallel))
    expected = guider.forward(c, u).pred
    out = FDG(scales, parallel, space="model").combine(c, u, make_context(x))
    assert out.dtype == dtype and out.shape == c.shape
    torch.testing.assert_close(out, expected, rtol=0.0, atol=tol)
    for w in scales:  # the oracle is not plain CFG at any of the weights
        assert (expected - CFG(w).combine(c, u, make_context(x))).abs().max() > 0.1


# --- The matrix oracle: any size, video, packed tokens -----------------------------------------------------------

@pytest.mark.parametrize(("shape", "scales", "parallel"), [
    ((2, 3, 20, 12), (10.0, 5.0, 2.0), None),
    ((2, 3, 13, 9), (10.0, 5.0), None),  # padded to 14 x 10
    ((1, 2, 13, 9), (7.0, 4.0, 3.0, 1.5), (0.0, 0.5, 1.0, 0.2)),  # padded to 16 x 16; coarsest levels 2 and 1 px
    ((2, 2, 9, 8), (6.0, 3.0, 2.0, 1.0), None),  # a level at weight 1 keeps the conditional band
    ((2, 2, 12, 10), (1.0, 4.0), (0.5, 0.5)),  # ... also when it would project
])
def test_fdg_equals_matrix_oracle(shape: tuple[int, ...], scales: tuple[float, ...],
                                  parallel: tuple[float, ...] | None) -> None:
    x, c, u = _triple(shape)
    out = FDG(scales, parallel, space="model").combine(c, u, make_context(x))
    expected = _oracle_fdg(c, u, scales, parallel)
    assert out.shape == c.shape
    torch.testing.assert_close(out, expected, rtol=0.0, atol=1e-10)
    assert (expected - _oracle_fdg(c, u, scales[::-1], parallel)).abs().max() > 0.1  # the oracle sees the weights


def test_fdg_video_is_per_frame_with_projection_per_sample() -> None:
    x, c, u = _triple((2, 3, 4, 12, 16))  # (B, C, T, H, W)
    fdg = FDG((8.0, 3.0, 2.0), (0.2, 0.6, 1.0), space="model")
    out = fdg.combine(c, u, make_context(x))
    torch.testing.assert_close(out, _oracle_fdg(c, u, fdg.scales, fdg.parallel_weights), rtol=0.0, atol=1e-10)
    frame = fdg.combine(c[:, :, 1], u[:, :, 1], make_context(x[:, :, 1]))  # projecting one frame alone differs
    assert (out[:, :, 1] - frame).abs().max() > 1e-3
    plain = FDG(fdg.scales)
    torch.testing.assert_close(plain.combine(c, u, make_context(x))[:, :, 1],
                               plain.combine(c[:, :, 1], u[:, :, 1], make_context(x[:, :, 1])), rtol=0.0, atol=1e-12)


def test_fdg_packed_tokens_match_flux_unpacking() -> None:
    b, ch, h, w = 2, 4, 12, 20
    x, c, u = _triple((b, ch, h, w))
    pack = FluxPipeline._pack_latents
    xp, cp, up = (pack(t, b, ch, h, w) for t in (x, c, u))  # (2, 60, 16)
    ctx = replace(make_context(xp), grid=(h, w))
    fdg = FDG((10.0, 5.0, 2.0), (0.5, 0.0, 1.0), space="model")
    out = fdg.combine(cp, up, ctx)
    assert out.shape == cp.shape
    unpacked = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # the pixel size at Flux's VAE factor 8
    torch.testing.assert_close(unpacked, _oracle_fdg(c, u, fdg.scales, fdg.parallel_weights), rtol=0.0, atol=1e-10)
    with pytest.raises(ValueError, match=r"^cond\.shape=\(2, 60, 16\) is not accepted with ctx\.grid=None"):
        fdg.combine(cp, up, make_context(xp))


def test_layout_equals_flux_pack_and_unpack() -> None:
    latent = torch.randn(3, 16, 6, 10)
    packed = FluxPipeline._pack_latents(latent, 3, 16, 6, 10)
    assert torch.equal(pack_tokens(latent), packed)
    assert torch.equal(unpack_tokens(packed, (6, 10)), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    assert torch.equal(unpack_tokens(pack_tokens(latent), (6, 10)), latent)
    assert not torch.equal(unpack_tokens(packed, (10, 6)), latent)  # the grid's order matters


def test_projection_space_is_converted_by_hand() -> None:
    """space='x0' on an eps model: the rule on x0 = (x - s eps) / alpha, mapped back by eps = (x - alpha x0) / s."""
    x, c, u = _triple((2, 4, 16, 16))
    ctx = make_context(x, sigma=1.5, space="eps")
    alpha, s = 1 / math.sqrt(1 + 1.5**2), 1.5 / math.sqrt(1 + 1.5**2)
    fdg = FDG((10.0, 5.0), (0.0, 0.5), space="x0")
    x0 = _oracle_fdg((x - s * c) / alpha, (x - s * u) / alpha, fdg.scales, fdg.parallel_weights)
    out = fdg.combine(c, u, ctx)
    torch.testing.assert_close(out, (x - alpha * x0) / s, rtol=0.0, atol=1e-10)
    assert (out - replace(fdg, space="model").combine(c, u, ctx)).abs().max() > 1e-3  # the projection's space matters


# --- Closed forms --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape", [(2, 4, 32, 32), (2, 3, 13, 9), (2, 2, 3, 10, 14)])
def test_equal_scales_are_cfg(shape: tuple[int, ...], dtype: torch.dtype, tol: float) -> None:
    x, c, u = _triple(shape, dtype)
    ctx = make_context(x)
    out = FDG((7.0, 7.0, 7.0)).combine(c, u, ctx)
    torch.testing.assert_close(out, u + 7.0 * (c - u), rtol=0.0, atol=tol)
    assert out.dtype == dtype
    # the baseline: unequal weights are neither of the CFGs they lie between
    split = FDG((10.0, 5.0)).combine(c, u, ctx)
    for w in (5.0, 10.0):
        assert (split - CFG(w).combine(c, u, ctx)).abs().max() > 0.1


def test_without_projection_the_space_does_not_matter() -> None:
    x, c, u = _triple((2, 4, 16, 16))
    ctx = make_context(x, space="eps")
    torch.testing.assert_close(FDG((10.0, 5.0), space="x0").combine(c, u, ctx),
                               FDG((10.0, 5.0), space="model").combine(c, u, ctx), rtol=0.0, atol=0.0)


@pytest.mark.parametrize(("shape", "levels"), [((2, 4, 32, 32), 3), ((1, 3, 13, 9), 4), ((1, 2, 128, 128), 8),
                                                ((2, 1, 5, 7), 1)])
def test_reconstruct_inverts_the_pyramid(shape: tuple[int, ...], levels: int) -> None:
    x = torch.randn(*shape, dtype=torch.float64)
    pyramid = laplacian_pyramid(x, levels)
    assert len(pyramid) == levels
    out = reconstruct(pyramid)
    torch.testing.assert_close(out[..., :shape[-2], :shape[-1]], x, rtol=0.0, atol=1e-12)
    if levels > 1:
        assert (pyramid[0][..., :shape[-2], :shape[-1]] - x).abs().max() > 0.1  # the bands are not the input


def test_passes_and_needs() -> None:
    x, c, u = _triple((3, 4, 8, 8))
    ctx = make_context(x)
    assert FDG().passes() == frozenset({UNCOND})
    assert FDG((1.0, 5.0)).needs(ctx, None)[UNCOND].tolist() == [True] * 3
    off = FDG((1.0, 1.0, 1.0), (0.0, 0.5, 1.0))
    assert off.passes() == frozenset() and off.needs(ctx, None)[UNCOND].tolist() == [False] * 3
    assert torch.equal(off.guide({COND: c}, ctx, None), c)
    torch.testing.assert_close(off.combine(c, u, ctx), c, rtol=0.0, atol=1e-12)  # weight 1 keeps every cond band
    assert torch.equal(FDG().guide({COND: c, UNCOND: u}, ctx, None), FDG().combine(c, u, ctx))


def test_fields_are_normalised() -> None:
    fdg = FDG([10, 5], [0.5, 1])  # lists, as the text form gives them
    assert fdg == FDG((10.0, 5.0), (0.5, 1.0)) and hash(fdg) == hash(FDG((10.0, 5.0), (0.5, 1.0)))
    assert fdg.scales == (10.0, 5.0) and fdg.parallel_weights == (0.5, 1.0)
    assert FDG((3, 2, 1)).parallel_weights == (1.0, 1.0, 1.0) and FDG() == FDG(parallel_weights=[1, 1])


def test_text_form_round_trips() -> None:
    if FDG not in NAMES:
        pytest.skip("FDG is not in guidekit.guidance.spec.NAMES yet")
    for fdg in (FDG(), FDG((10.0, 5.0, 2.0), (0.5, 1.0, 0.0), space="model")):
        assert parse_guidance(format_guidance(fdg)) == fdg


def test_half_precision_stays_in_its_dtype() -> None:
    x, c, u = _triple((1, 4, 16, 16), torch.bfloat16)
    ctx = make_context(x)
    assert FDG().combine(c, u, ctx).dtype == torch.bfloat16
    assert FDG(parallel_weights=(0.5, 0.5)).combine(c, u, ctx).dtype == torch.bfloat16


# --- Bad inputs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scales": (10.0, -1.0)}, r"^scales\[1\]=-1\.0 is not accepted; expected a finite number in \[0\.0, inf\)"),
    ({"scales": (5.0,)}, r"^scales=\(5\.0,\) is not accepted; expected 2 to 8 weights"),
    ({"scales": (2.0,) * 9}, r"^scales=\(2\.0, .*\) is not accepted; expected 2 to 8 weights"),
    ({"scales": 5.0}, r"^scales=5\.0 is not accepted"),
    ({"scales": (10.0, 5.0), "parallel_weights": (0.5,)}, r"^parallel_weights=\(0\.5,\) is not accepted; expected "
                                                          r"None or 2 numbers"),
    ({"parallel_weights": (0.5, math.nan)}, r"^parallel_weights\[1\]=nan is not accepted"),
    ({"space": "pixels"}, r"^space='pixels' is not a prediction space"),
])
def test_bad_fields(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FDG(**kwargs)


def test_bad_calls() -> None:
    x, c, u = _triple((1, 4, 3, 5))
    ctx = make_context(x)
    with pytest.raises(ValueError, match=r"^scales=\(10\.0, 5\.0, 2\.0\) is not accepted for a latent of height 3 and "
                                         r"width 5; expected at most 2 levels"):
        FDG((10.0, 5.0, 2.0)).combine(c, u, ctx)
    assert FDG((10.0, 5.0)).combine(c, u, ctx).shape == c.shape  # 3 x 5 holds two levels
    with pytest.raises(ValueError, match=r"^scale=3\.0 is not accepted; expected None: FDG weighs each"):
        FDG().combine(c, u, ctx, scale=3.0)
    with pytest.raises(ValueError, match=r"^scale=3\.0 is not accepted"):
        FDG().needs_unconditional(ctx, None, 3.0)
    with pytest.raises(TypeError, match=r"expected a guidance with a scale"):
        Scheduled(FDG(), "linear")


def test_bad_pyramid_and_layout_inputs() -> None:
    with pytest.raises(ValueError, match=r"^x\.shape=\(1, 1, 3, 9\) is not accepted; expected height and width >= "
                                         r"2\*\*\(levels - 1\) = 4 for levels=3"):
        laplacian_pyramid(torch.zeros(1, 1, 3, 9), 3)
    with pytest.raises(ValueError, match=r"^levels=0 is not accepted"):
        laplacian_pyramid(torch.zeros(1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match=r"^pyramid shapes=\[\(1, 1, 8, 8\), \(1, 1, 8, 8\)\] are not accepted"):
        reconstruct([torch.zeros(1, 1, 8, 8)] * 2)
    with pytest.raises(ValueError, match=r"^grid=\(5, 4\) is not accepted; expected \(height, width\)"):
        unpack_tokens(torch.zeros(1, 4, 4), (5, 4))
    with pytest.raises(ValueError, match=r"^x\.shape=\(1, 5, 4\) is not accepted; expected \(batch, 4, "):
        unpack_tokens(torch.zeros(1, 5, 4), (4, 4))
    with pytest.raises(ValueError, match=r"^x\.shape=\(1, 4, 3, 4\) is not accepted"):
        pack_tokens(torch.zeros(1, 4, 3, 4))


def test_fdg_in_pipelines_sd_and_packed_flux() -> None:
    """In a real pipeline call: on tiny SD (the [uncond; cond] batch) and on tiny Flux (packed tokens, unpacked
    with the grid the bridge reads from img_ids), equal weights are the pipeline's own CFG and (10, 5) differs."""
    from pipelines import final_latents, guided_latents, pipeline

    for family, scale_arg in (("sd", "guidance_scale"), ("flux", "true_cfg_scale")):
        pipe = pipeline(family)
        native = final_latents(pipe, family, **{scale_arg: 5.0})
        equal, stats = guided_latents(pipe, family, FDG((5.0, 5.0)), **{scale_arg: 5.0})
        assert (equal - native).abs().max() < 1e-5 and stats.uncond_rows_per_sample == [4]
        split, _ = guided_latents(pipe, family, FDG((10.0, 5.0)), **{scale_arg: 5.0})
        assert torch.isfinite(split).all() and (split - native).abs().max() > 1e-3
