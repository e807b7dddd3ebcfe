"""TCFG, MAMBO-G and the CFG normalisations: reshapings of the CFG difference, against oracles nobody here wrote.

Oracles: diffusers' own guider functions (TCFG's ``normalized_guidance``, MAMBO-G's ``mambo_guidance``), a float64
SVD written in the test (TCFG), and the pipelines' and tools' lines written out in the test (Qwen-Image's per-token
rescale on diffusers' packed layout, the official Lumina-Image 2.0 clamp, ComfyUI's CFGNorm). Each comparison also
checks that the oracle is far from plain CFG, so a method that forgot its reshaping fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_context
from diffusers import FluxPipeline
from diffusers.guiders.magnitude_aware_guidance import mambo_guidance
from diffusers.guiders.tangential_classifier_free_guidance import normalized_guidance as tcfg_guidance

import guidekit
from guidekit import CFG, MAMBOG, TCFG, CFGNorm
from guidekit.guidance.spec import format_guidance, parse_guidance
from guidekit.testing.tiny import build_tiny_pipeline, tiny_call_kwargs

SIGMA = 1.5


def _pair(shape: tuple[int, ...] = (3, 4, 8, 8), seed: int = 0, dtype: torch.dtype = torch.float64
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
    u = 0.7 * c + 0.5 * torch.randn(shape, generator=g, dtype=dtype)  # correlated, as real predictions are
    return x, c, u


def _combine(guidance: object, c: torch.Tensor, u: torch.Tensor, x: torch.Tensor, space: str = "eps"
             ) -> torch.Tensor:
    return guidance.combine(c, u, make_context(x, sigma=SIGMA, space=space))  # type: ignore[attr-defined]


def _cfg(c: torch.Tensor, u: torch.Tensor, w: float) -> torch.Tensor:
    return u + w * (c - u)


def _vp(sigma: float) -> tuple[float, float]:
    """``(alpha, s)`` of the VP level with EDM sigma ``sigma``: ``x_t = alpha x0 + s eps``."""
    alpha = 1 / math.sqrt(1 + sigma**2)
    return alpha, sigma * alpha


# --- TCFG ---------------------------------------------------------------------------------------------------------

def _tcfg_svd(c: torch.Tensor, u: torch.Tensor, w: float) -> torch.Tensor:
    """The TCFG rule through a float64 SVD of [c; u]: keep u's component on the first right singular vector."""
    a = torch.stack([c.flatten(1), u.flatten(1)], 1).double()
    v1 = torch.linalg.svd(a, full_matrices=False).Vh[:, 0]
    damped = ((u.flatten(1).double() * v1).sum(1, keepdim=True) * v1).view(u.shape)
    return damped + w * (c.double() - damped)


def test_tcfg_equals_svd_rule_and_diffusers() -> None:
    x, c, u = _pair()
    ours = _combine(TCFG(5.0), c, u, x)
    assert torch.allclose(ours, _tcfg_svd(c, u, 5.0), atol=1e-11)
    theirs = tcfg_guidance(c.float(), u.float(), 5.0).double()  # diffusers' SVD runs in float32
    assert (ours - theirs).abs().max() < 1e-4 * ours.abs().max()
    assert (ours - _cfg(c, u, 5.0)).abs().max() > 0.1  # the damping changes the result


def test_tcfg_space_eps_on_a_v_model_filters_eps() -> None:
    x, c_v, u_v = _pair(seed=1)
    alpha, s = _vp(SIGMA)
    eps_c, eps_u = s * x + alpha * c_v, s * x + alpha * u_v  # eps = s x_t + alpha v
    oracle = (_tcfg_svd(eps_c, eps_u, 4.0) - s * x) / alpha
    ours = _combine(TCFG(4.0), c_v, u_v, x, space="v")
    assert torch.allclose(ours, oracle, atol=1e-10)
    model = _combine(TCFG(4.0, space="model"), c_v, u_v, x, space="v")
    assert torch.allclose(model, tcfg_guidance(c_v.float(), u_v.float(), 4.0).double(), atol=1e-4)
    assert (model - ours).abs().max() > 0.01  # diffusers' space and the paper's differ on v models


def test_tcfg_keeps_parallel_predictions_and_zero() -> None:
    c = torch.ones(1, 3, 2, 2, dtype=torch.float64)
    assert torch.equal(_combine(TCFG(3.0), c, 0.5 * c, c), _cfg(c, 0.5 * c, 3.0))  # u already on v_1
    zero = torch.zeros_like(c)
    assert torch.equal(_combine(TCFG(3.0), zero, zero, c), zero)


# --- MAMBO-G ------------------------------------------------------------------------------------------------------

def _mambo_diffusers(c: torch.Tensor, u: torch.Tensor, w: float, alpha: float) -> torch.Tensor:
    """diffusers' ``mambo_guidance`` on flattened samples: its ``torch.norm(dim=[1, 2, 3])`` raises under torch 2.13
    ("linalg.matrix_norm: dim must be a 2-tuple"), and its norms are per sample over every non-batch dimension."""
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):
        mambo_guidance(c, u, w, alpha=alpha)
    return mambo_guidance(c.flatten(1), u.flatten(1), w, alpha=alpha).view(c.shape)


@pytest.mark.parametrize("alpha", [8.0, 0.5])
def test_mambo_equals_diffusers(alpha: float) -> None:
    x, c, u = _pair(seed=2)
    ours = _combine(MAMBOG(10.0, alpha=alpha, space="model"), c, u, x)
    assert torch.allclose(ours, _mambo_diffusers(c, u, 10.0, alpha), atol=1e-12)
    assert (ours - _cfg(c, u, 10.0)).abs().max() > 1.0


def test_mambo_alpha_zero_is_cfg_and_default_space_is_flow() -> None:
    x, c, u = _pair(seed=3)
    assert torch.allclose(_combine(MAMBOG(6.0, alpha=0.0), c, u, x), _cfg(c, u, 6.0), atol=1e-12)
    # On an eps model the default space converts to flow velocity v = (eps - x0) / sqrt(...) in the VP scale:
    # the flow model with the same x0 has x_f = x0 + sigma eps scaled; compare with the rule run on velocities.
    alpha, s = _vp(SIGMA)
    x0 = lambda eps: (x - s * eps) / alpha  # noqa: E731
    t = s / (alpha + s)  # flow time of the VP level (x_t / (alpha + s) = (1 - t) x0 + t eps)
    vel = lambda eps: (x / (alpha + s) - x0(eps)) / t  # noqa: E731  (v = (x_f - x0) / t)
    oracle_v = _mambo_diffusers(vel(c), vel(u), 6.0, 8.0)
    oracle = (x - alpha * (x / (alpha + s) - t * oracle_v)) / s  # back to eps through x0 = x_f - t v
    ours = _combine(MAMBOG(6.0), c, u, x)
    assert torch.allclose(ours, oracle, atol=1e-10)
    assert (ours - _combine(MAMBOG(6.0, space="model"), c, u, x)).abs().max() > 0.01


def test_mambo_zero_unconditional_is_conditional() -> None:
    c = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    assert torch.equal(_combine(MAMBOG(10.0), c, torch.zeros_like(c), c, space="flow"), c)


# --- CFG normalisation --------------------------------------------------------------------------------------------

def test_cfg_norm_per_token_equals_qwen_image_rescale() -> None:
    """QwenImagePipeline: ``comb = neg + s (pos - neg)``, then ``comb * ||pos|| / ||comb||`` over dim -1 of the
    packed latent; on an unpacked latent the tokens are the 2 x 2 patches of diffusers' ``_pack_latents``."""
    x, c, u = _pair((2, 16, 6, 4), seed=4)
    pack = lambda y: FluxPipeline._pack_latents(y, 2, 16, 6, 4)  # noqa: E731
    comb = pack(u) + 4.0 * (pack(c) - pack(u))
    oracle = comb * (torch.norm(pack(c), dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    packed = _combine(CFGNorm(4.0, variant="per_token"), pack(c), pack(u), pack(x), space="flow")
    assert torch.allclose(packed, oracle, atol=1e-12)
    grid = _combine(CFGNorm(4.0, variant="per_token"), c, u, x, space="flow")
    assert torch.allclose(pack(grid), oracle, atol=1e-12)
    assert (oracle - comb).abs().max() > 0.5


def test_cfg_norm_per_sample_equals_lumina_clamp() -> None:
    """Lumina-Image 2.0's ``forward_with_cfg``: per sample, if ``||g|| >= r ||c||`` then ``g *= r ||c|| / ||g||``."""
    x, c, u = _pair(seed=5)
    for limit in (1.0, 1.6):
        oracle = []
        for ci, ui in zip(c, u, strict=True):
            g = ui + 3.0 * (ci - ui)
            cap = limit * torch.linalg.vector_norm(ci)
            oracle.append(g * cap / torch.linalg.vector_norm(g) if torch.linalg.vector_norm(g) >= cap else g)
        ours = _combine(CFGNorm(3.0, limit=limit), c, u, x, space="flow")
        assert torch.allclose(ours, torch.stack(oracle), atol=1e-12)
    assert (ours - _cfg(c, u, 3.0)).abs().max() > 0.1  # clamped at 1.6 too
    # a prediction inside the limit is left alone
    assert torch.allclose(_combine(CFGNorm(1.0), c, u, x, space="flow"), c, atol=1e-12)


def test_cfg_norm_per_pixel_equals_comfyui_cfgnorm_in_x0() -> None:
    """ComfyUI's CFGNorm on the denoised predictions: per latent pixel, ``g * clamp(||c|| / (||g|| + 1e-8), 0, 1)``
    over the channels; here on an eps model, converted with ``x0 = (x_t - s eps) / alpha``."""
    x, c, u = _pair(seed=6)
    alpha, s = _vp(SIGMA)
    c0, u0 = (x - s * c) / alpha, (x - s * u) / alpha
    g0 = u0 + 5.0 * (c0 - u0)
    out0 = g0 * (torch.norm(c0, dim=1, keepdim=True) / (torch.norm(g0, dim=1, keepdim=True) + 1e-8)).clamp(0, 1)
    oracle = (x - alpha * out0) / s
    ours = _combine(CFGNorm(5.0, variant="per_pixel"), c, u, x)
    assert torch.allclose(ours, oracle, atol=1e-10)
    assert (ours - _cfg(c, u, 5.0)).abs().max() > 0.1


def test_bad_arguments_name_the_parameter() -> None:
    for make, name in [(lambda: TCFG(-1.0), "scale"), (lambda: TCFG(2.0, space="score"), "space"),
                       (lambda: MAMBOG(5.0, alpha=-1.0), "alpha"), (lambda: CFGNorm(5.0, variant="tokens"), "variant"),
                       (lambda: CFGNorm(5.0, limit=0.0), "limit"), (lambda: MAMBOG(math.inf), "scale")]:
        with pytest.raises(ValueError, match=f"^{name}="):
            make()
    x, c, u = _pair((1, 4, 5, 4))
    with pytest.raises(ValueError, match=r"^variant='per_token' is not accepted for a latent of shape"):
        _combine(CFGNorm(5.0, variant="per_token"), c, u, x)


def test_text_forms_round_trip() -> None:
    for g in (TCFG(5.0), TCFG(3.0, space="model"), MAMBOG(10.0), MAMBOG(4.0, alpha=2.0, space="model"),
              CFGNorm(4.0, variant="per_token"), CFGNorm(4.0, variant="per_pixel", limit=0.5), CFG(5.0) + TCFG(1.0)):
        assert parse_guidance(format_guidance(g)) == g
    assert parse_guidance("mambo(scale=10)") == MAMBOG(10.0)
    assert CFGNorm(4.0).space == "model" and CFGNorm(4.0, variant="per_pixel").space == "x0"


@pytest.mark.parametrize("guidance", [TCFG(5.0), MAMBOG(5.0, alpha=1.0), CFGNorm(5.0, variant="per_sample"),
                                      CFGNorm(5.0, variant="per_token"), CFGNorm(5.0, variant="per_pixel")])
def test_runs_in_a_pipeline_with_two_rows_per_sample(guidance: guidekit.Guidance) -> None:
    """On tiny SD each reshaping runs in the pipeline's own [uncond; cond] batch, and changes the image."""
    pipe = build_tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    call = {**tiny_call_kwargs("sd"), "num_inference_steps": 3, "output_type": "pt"}
    with guidekit.guided(pipe, CFG(5.0)):
        plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with guidekit.guided(pipe, guidance) as run:
        image = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(image).all()
    assert run.stats.uncond_rows_per_sample == [3]
    assert (image - plain).abs().max() > 1e-4
