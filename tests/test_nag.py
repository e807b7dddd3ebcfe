"""Normalized Attention Guidance against the official rule, written independently in the test.

The oracle: the plain diffusers pipeline, its cross-attention processors replaced by one written here that follows
the official ``NAGAttnProcessor2_0`` (ChenDarYen/Normalized-Attention-Guidance): for the rows conditioned on the
prompt, ``Z+`` and ``Z-`` are attention outputs with the same queries against the prompt's and the negative prompt's
keys and values, ``Z~ = s Z+ - (s - 1) Z-`` is capped at ``tau`` times ``Z+`` in per-token L1 norm, and blended by
``alpha``; the other rows (CFG's negative prompt) are left alone. Attention here is an explicit softmax, not SDPA.
Each comparison checks that the oracle is far from the pipeline without NAG.
"""

from __future__ import annotations

import math

import pytest
import torch

import guidekit
from guidekit import CFG, NAG, PAG
from guidekit.guidance.nag import nag_attention
from guidekit.guidance.spec import format_guidance, parse_guidance
from guidekit.testing.tiny import build_tiny_pipeline, tiny_call_kwargs

STEPS = 3
NEGATIVE = "a blurry photo"


def _attention(attn, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Multi-head attention output before the projection, ``(B, N, heads * d)``, by an explicit softmax."""
    q, k, v = attn.to_q(hidden), attn.to_k(text), attn.to_v(text)
    d = q.shape[-1] // attn.heads
    q, k, v = (t.unflatten(-1, (attn.heads, d)) for t in (q, k, v))
    weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d), dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", weights, v).flatten(2)


class OfficialNAG:
    """The official NAG rule on the last ``guided`` rows of each cross-attention call."""

    def __init__(self, negative: torch.Tensor, scale: float, tau: float, alpha: float, guided_fraction: float) -> None:
        self.negative, self.scale, self.tau, self.alpha, self.fraction = negative, scale, tau, alpha, guided_fraction

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):  # type: ignore[no-untyped-def]
        z = _attention(attn, hidden_states, encoder_hidden_states)
        first = int(len(z) * (1 - self.fraction))
        pos = z[first:]
        neg = _attention(attn, hidden_states[first:], self.negative.expand(len(pos), -1, -1))
        guided = pos * self.scale - neg * (self.scale - 1)
        scale = torch.norm(guided, p=1, dim=-1, keepdim=True) / torch.norm(pos, p=1, dim=-1, keepdim=True)
        guided = guided * torch.minimum(scale, torch.full_like(scale, self.tau)) / scale
        z = torch.cat([z[:first], guided * self.alpha + pos * (1 - self.alpha)])
        return attn.to_out[1](attn.to_out[0](z))


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request: pytest.FixtureRequest) -> tuple:
    pipe = build_tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def _run(pipe, family: str, **kwargs: object) -> torch.Tensor:
    call = {**tiny_call_kwargs(family, batch_size=2), "num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    return pipe(**call, generator=torch.Generator().manual_seed(0)).images


def _official(pipe, family: str, scale: float, tau: float, alpha: float, guidance_scale: float) -> torch.Tensor:
    negative = pipe.encode_prompt(prompt=NEGATIVE, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]
    saved = pipe.unet.attn_processors
    fraction = 0.5 if guidance_scale > 1 else 1.0
    pipe.unet.set_attn_processor({name: OfficialNAG(negative, scale, tau, alpha, fraction) if "attn2" in name else p
                                  for name, p in saved.items()})
    try:
        return _run(pipe, family, guidance_scale=guidance_scale)
    finally:
        pipe.unet.set_attn_processor(saved)


@pytest.mark.parametrize(("scale", "tau", "alpha"), [(4.0, 2.5, 0.5), (8.0, 1.2, 0.25)])
def test_cfg_plus_nag_equals_official_rule(pipe: tuple, scale: float, tau: float, alpha: float) -> None:
    family, p = pipe
    expected = _official(p, family, scale, tau, alpha, guidance_scale=5.0)
    with guidekit.guided(p, CFG(5.0) + NAG(scale, negative_prompt=NEGATIVE, tau=tau, alpha=alpha)) as run:
        ours = _run(p, family, guidance_scale=5.0)
    assert (ours - expected).abs().max() < 1e-5
    assert run.stats.computed == {"cond": 2 * STEPS, "uncond": 2 * STEPS}  # no extra network rows
    assert (_run(p, family, guidance_scale=5.0) - expected).abs().max() > 1e-3


def test_nag_alone_equals_official_rule_without_cfg(pipe: tuple) -> None:
    family, p = pipe
    expected = _official(p, family, 5.0, 2.5, 0.5, guidance_scale=1.0)
    with guidekit.guided(p, NAG(5.0, negative_prompt=NEGATIVE)) as run:
        ours = _run(p, family, guidance_scale=5.0)  # the pipeline's CFG batch is cut to the conditional rows
    assert (ours - expected).abs().max() < 1e-5 and run.stats.computed["uncond"] == 0
    assert (_run(p, family, guidance_scale=1.0) - expected).abs().max() > 1e-3


def test_nag_with_pag_guides_the_perturbed_rows_too(pipe: tuple) -> None:
    """PAG's perturbed rows repeat the conditional ones, so they run with NAG as well: in a sub-batch forward
    ``[cond; perturbed]`` (no unconditional rows) every row is guided, and the result is finite and differs from
    CFG + PAG without NAG."""
    family, p = pipe
    with guidekit.guided(p, PAG(3.0) + NAG(4.0, negative_prompt=NEGATIVE)) as run:
        ours = _run(p, family, guidance_scale=5.0)
    with guidekit.guided(p, PAG(3.0)):
        plain = _run(p, family, guidance_scale=5.0)
    assert torch.isfinite(ours).all() and (ours - plain).abs().max() > 1e-3
    assert run.stats.computed == {"cond": 2 * STEPS, "uncond": 0, "pag:mid": 2 * STEPS}


def test_nag_rule_reduces() -> None:
    pos, neg = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    assert torch.allclose(nag_attention(pos, neg, 4.0, 2.5, 0.0), pos)  # alpha 0: the prompt's output
    big = nag_attention(pos, neg, 1e3, 1e9, 1.0)  # no cap reached: plain extrapolation
    assert torch.allclose(big, pos * 1e3 - neg * (1e3 - 1))
    capped = nag_attention(pos, neg, 50.0, 1.5, 1.0)  # the cap: L1 norm ratio exactly tau
    assert torch.allclose(capped.norm(p=1, dim=-1) / pos.norm(p=1, dim=-1), torch.full((2, 5), 1.5,
                                                                                      dtype=torch.float64))


def test_bad_input_is_refused_by_name() -> None:
    for make, name in [(lambda: NAG(5.0), "negative_prompt"),
                       (lambda: NAG(5.0, negative_prompt="  "), "negative_prompt"),
                       (lambda: NAG(1.0, negative_prompt="x"), "scale"),
                       (lambda: NAG(-2.0, negative_prompt="x"), "scale"),
                       (lambda: NAG(5.0, negative_prompt="x", tau=0.0), "tau"),
                       (lambda: NAG(5.0, negative_prompt="x", alpha=1.5), "alpha"),
                       (lambda: NAG(5.0, negative_prompt="x", p=3), "p")]:
        with pytest.raises(ValueError, match=f"^{name}="):
            make()
    with pytest.raises(TypeError, match=r"^inner=.* changes the conditional prediction"):
        guidekit.Interval(NAG(5.0, negative_prompt="x"), 0.1, 1.0)
    with pytest.raises(TypeError, match="at most one term that changes the conditional prediction"):
        NAG(5.0, negative_prompt="x") + NAG(3.0, negative_prompt="y")
    dit = build_tiny_pipeline("dit")
    with pytest.raises(ValueError, match=r"^guidance NAG is not accepted for DiTPipeline"):
        dit.set_guidance(NAG(5.0, negative_prompt="x"))


def test_text_form_round_trips() -> None:
    for g in (NAG(5.0, negative_prompt=NEGATIVE), CFG(5.0) + NAG(3.0, negative_prompt="low quality", alpha=0.25, p=2)):
        assert parse_guidance(format_guidance(g)) == g
