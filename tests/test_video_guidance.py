"""APG, CFG-Zero* and AdaptiveGuidance on Wan's 5-D video latents ``(B, C, T, H, W)`` against the papers' rules
written in the test.

The oracle runs Wan's own pipeline with its transformer's forward replaced: the prompt's call computes the
conditional and unconditional velocities itself (the second with the negative prompt's embeddings, as the
pipeline's own second call would) and returns the rule's guided velocity ``d``; the pipeline's second call returns
``d`` too, so its ``u + w (c - u)`` is ``d``. Space conversions of a flow model at time ``t``: ``x0 = x - t v``,
``eps = x + (1 - t) v``. Norms, dot products and cosines are per sample over all of its elements.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from pipelines import final_latents, forward_replaced, guided_latents, pipeline

from guidekit import APG, CFG, AdaptiveGuidance, CFGZeroStar

STEPS = 4
W = 5.0


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1).view(-1, *[1] * (a.ndim - 1))


def _oracle(pipe, rule: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, int], torch.Tensor]  # type: ignore[no-untyped-def]
            ) -> torch.Tensor:
    transformer = pipe.transformer
    plain = transformer.forward
    encode = lambda text: pipe.encode_prompt(prompt=[text] * 2, do_classifier_free_guidance=False,  # noqa: E731
                                             max_sequence_length=16, device="cpu")[0]
    prompt, negative = encode("a red cat"), encode("")
    steps: list[torch.Tensor] = []

    def forward(hidden_states, timestep, encoder_hidden_states, **kwargs):  # type: ignore[no-untyped-def]
        if not torch.allclose(encoder_hidden_states, prompt, atol=1e-4):
            return (steps[-1],)
        c = plain(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                  **kwargs)[0].double()
        u = plain(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=negative, **kwargs)[0].double()
        d = rule(hidden_states.double(), c, u, float(timestep[0]) / 1000, len(steps))
        steps.append(d.float())
        return (steps[-1],)

    with forward_replaced(transformer, forward):
        return final_latents(pipe, "wan", steps=STEPS, guidance_scale=W, batch_size=2)


def _apg(eta: float, r: float, beta: float):  # type: ignore[no-untyped-def]
    """Sadat et al. (ICLR 2025), Algorithm 1 and the official normalized_guidance, in x0 space."""
    running: list[torch.Tensor] = []

    def rule(x, c, u, t, step):  # type: ignore[no-untyped-def]
        c0, u0 = x - t * c, x - t * u
        diff = c0 - u0
        diff = diff + beta * running[-1] if running else diff
        running.append(diff)
        diff = diff * torch.clamp(r / _dot(diff, diff).sqrt(), max=1.0) if r > 0 else diff
        v1 = c0 / _dot(c0, c0).sqrt()
        parallel = _dot(diff, v1) * v1
        d0 = c0 + (W - 1) * (diff - parallel + eta * parallel)
        return (x - d0) / t

    return rule


def _cfg_zero_star(zero_steps: int):  # type: ignore[no-untyped-def]
    """Fan et al. (2025), CFG-Zero*: ``s* = <c, u> / ||u||^2``, ``u s* + w (c - u s*)``; zero velocity in the first
    ``zero_steps`` steps."""
    def rule(x, c, u, t, step):  # type: ignore[no-untyped-def]
        if step < zero_steps:
            return torch.zeros_like(c)
        s = _dot(c, u) / (_dot(u, u) + 1e-8)
        return u * s + W * (c - u * s)

    return rule


def _adaptive(threshold: float, cosines: list[list[float]], space: str):  # type: ignore[no-untyped-def]
    """Castillo et al., Adaptive Guidance: CFG while ``cos(c, u) < gamma_bar`` (in ``space``: ``eps`` as the paper,
    or the velocities); from the step after the first step at which it is reached, the conditional prediction only
    (per sample)."""
    off = [False, False]

    def rule(x, c, u, t, step):  # type: ignore[no-untyped-def]
        e_c, e_u = (x + (1 - t) * c, x + (1 - t) * u) if space == "eps" else (c, u)
        cos = (_dot(e_c, e_u) / (_dot(e_c, e_c) * _dot(e_u, e_u)).sqrt()).flatten().tolist()
        cosines.append(cos)
        out = torch.stack([c[i] if off[i] else u[i] + W * (c[i] - u[i]) for i in range(len(c))])
        for i, value in enumerate(cos):
            off[i] = off[i] or value >= threshold
        return out

    return rule


@pytest.mark.parametrize(("guidance", "rule"), [
    (APG(W, eta=0.0, norm_threshold=1.0, momentum=-0.5), _apg(0.0, 1.0, -0.5)),
    (APG(W, eta=0.5, norm_threshold=0.0, momentum=0.0), _apg(0.5, 0.0, 0.0)),
    (CFGZeroStar(W, zero_init_steps=1), _cfg_zero_star(1)),
    (CFGZeroStar(W, zero_init_steps=0), _cfg_zero_star(0)),
], ids=["apg-momentum-threshold", "apg-eta", "cfg-zero-star", "cfg-zero-star-no-zero-init"])
def test_rule_equals_the_paper_on_video_latents(guidance: object, rule: object) -> None:
    pipe = pipeline("wan")
    expected = _oracle(pipe, rule)  # type: ignore[arg-type]
    ours, _ = guided_latents(pipe, "wan", guidance, steps=STEPS, guidance_scale=W, batch_size=2)
    cfg = final_latents(pipe, "wan", steps=STEPS, guidance_scale=W, batch_size=2)
    assert ours.ndim == 5 and (ours - expected).abs().max().item() <= 1e-5
    assert (cfg - expected).abs().max().item() > 1e-3


def test_adaptive_guidance_equals_the_paper_on_video_latents() -> None:
    """In velocity space, with the threshold between the two samples' cosines at step 1: one sample stops after
    step 1, the other later or never."""
    pipe = pipeline("wan")
    cosines: list[list[float]] = []
    _oracle(pipe, _adaptive(2.0, cosines, "flow"))  # never switches: read the cosines
    threshold = (cosines[1][0] + cosines[1][1]) / 2
    expected = _oracle(pipe, _adaptive(threshold, [], "flow"))
    ours, stats = guided_latents(pipe, "wan", AdaptiveGuidance(CFG(W), threshold=threshold, space="flow"),
                                 steps=STEPS, guidance_scale=W, batch_size=2)
    assert (ours - expected).abs().max().item() <= 1e-5
    assert sorted(stats.uncond_rows_per_sample)[0] == 2 and max(stats.uncond_rows_per_sample) > 2


def test_adaptive_guidance_in_eps_space_stops_after_the_first_flow_step() -> None:
    """At flow time 1 (Wan's first step) ``eps = x`` for both predictions: their cosine is 1, so the paper's rule in
    eps space switches every sample off after the first step, as the oracle does."""
    pipe = pipeline("wan")
    expected = _oracle(pipe, _adaptive(0.999, [], "eps"))
    ours, stats = guided_latents(pipe, "wan", AdaptiveGuidance(CFG(W), threshold=0.999), steps=STEPS,
                                 guidance_scale=W, batch_size=2)
    assert (ours - expected).abs().max().item() <= 1e-5 and stats.uncond_rows_per_sample == [1, 1]
