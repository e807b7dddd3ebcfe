"""STG-R on Wan's video transformer against the official rule written in the test.

The official LTX-Video and CogVideoX STG pipelines compute ``u + w (c - u) + s (c - p)`` with ``p`` the conditional
prediction whose chosen blocks are skipped (the block returns its input: residual only). The oracle runs Wan's own
pipeline (two calls per step, combined ``u + w (c' - u)``) with the transformer's forward replaced, for the
prompt's call, by ``c' = c + (s / w)(c - p)``, ``p`` from a forward with a hook that returns each skipped block's
input; so the pipeline's result is the STG rule.
"""

from __future__ import annotations

import torch
from pipelines import final_latents, forward_replaced, guided_latents, pipeline

from guidekit import CFG, STG, Interval

STEPS = 4


def _official(pipe, w: float, s: float, layers: tuple[int, ...]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    transformer = pipe.transformer
    plain = transformer.forward
    prompt = pipe.encode_prompt(prompt=["a red cat"] * 2, do_classifier_free_guidance=False, max_sequence_length=16,
                                device="cpu")[0]

    def forward(**kwargs):  # type: ignore[no-untyped-def]
        c = plain(**kwargs)[0]
        if not torch.allclose(kwargs["encoder_hidden_states"], prompt, atol=1e-4):
            return (c,)
        hooks = [transformer.blocks[i].register_forward_hook(lambda m, args, out: args[0]) for i in layers]
        try:
            p = plain(**kwargs)[0]
        finally:
            for h in hooks:
                h.remove()
        return (c + (s / w) * (c - p),)

    with forward_replaced(transformer, forward):
        return final_latents(pipe, "wan", steps=STEPS, guidance_scale=w, batch_size=2)


def test_cfg_plus_stg_equals_the_official_rule() -> None:
    pipe = pipeline("wan")
    expected = _official(pipe, 5.0, 2.0, (1,))
    ours, stats = guided_latents(pipe, "wan", CFG(5.0) + STG(2.0, layers=1), steps=STEPS, guidance_scale=5.0,
                                 batch_size=2)
    assert (ours - expected).abs().max().item() <= 1e-5
    assert stats.computed == {"cond": 2 * STEPS, "uncond": 2 * STEPS, "slg:1": 2 * STEPS}
    assert stats.model_calls == 3 * STEPS
    cfg = final_latents(pipe, "wan", steps=STEPS, guidance_scale=5.0, batch_size=2)
    assert (cfg - expected).abs().max().item() > 1e-3


def test_interval_stg_computes_skipped_rows_only_inside() -> None:
    """EDM sigma at the steps: inf, 6.04, 1.51, 0.009; STG only in (1, inf]."""
    pipe = pipeline("wan")
    _, stats = guided_latents(pipe, "wan", CFG(5.0) + Interval(STG(2.0, layers=[0, 1]), 1.0, float("inf")),
                              steps=STEPS, guidance_scale=5.0, batch_size=2)
    assert [s.computed["slg:0,1"] for s in stats.steps] == [2, 2, 2, 0]
