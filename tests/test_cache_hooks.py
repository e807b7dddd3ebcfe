"""diffusers' cache hooks (``transformer.enable_cache(...)``) under guidance.

The hooks keep their state per cache context, the name the pipeline opens around each denoiser call (``"cond"``,
``"uncond"``), and compare and reuse that state from one call to the next. guidekit runs every forward that is not
the pipeline's own (a perturbed pass, a subset of the unconditional rows) in a context of its own, named after the
pipeline's and the rows.

Oracles:

* First Block Cache at threshold 0 runs every block at every call (it skips when a relative difference is ``<=``
  the threshold, and consecutive calls of one context differ), so a guided call with it equals the same call
  without it, bitwise. A perturbed forward run in the prompt's context instead finds the prompt's first-block
  residual equal to its own (the first block is not skipped) and reuses the prompt's tail: CFG + STG would give plain
  CFG, which the test shows to be different.
* The pipeline's own forwards keep the pipeline's contexts: native CFG with a cache that skips blocks equals
  ``set_guidance(CFG(w))`` with the same cache, bitwise.
* Unconditional rows that change from step to step: every context sees one number of rows (a spy on the first
  block), so no state of two rows is reused for one; with the rows in the pipeline's context, Wan's call fails on
  that mismatch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig
from pipelines import final_latents, guided_latents, pipeline

import guidekit
from guidekit import CFG, STG

STEPS = 6


@dataclasses.dataclass(frozen=True)
class Alternating(guidekit.CFG):
    """CFG with sample 0's unconditional row at every step and the others' at even steps only (a test instrument)."""

    def needs_unconditional(self, ctx: Any, state: Any = None, scale: float | None = None) -> torch.Tensor:
        return (ctx.rows == 0) | (ctx.step % 2 == 0)


@contextmanager
def cached(pipe: Any, threshold: float) -> Iterator[None]:
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        yield
    finally:
        pipe.transformer.disable_cache()


@contextmanager
def contexts_seen(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str | None, set[int]]]:
    """Per cache context the pipeline's or guidekit's forwards ran in, the numbers of rows its first block saw."""
    transformer = pipe.transformer
    opened: list[str | None] = [None]
    seen: dict[str | None, set[int]] = {}
    cache_context = type(transformer).cache_context

    @contextmanager
    def spy(self: Any, name: str, **fields: Any) -> Iterator[None]:
        opened[0] = name
        with cache_context(self, name, **fields):
            yield

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        seen.setdefault(opened[0], set()).add((args[0] if args else kwargs["hidden_states"]).shape[0])

    monkeypatch.setattr(type(transformer), "cache_context", spy)
    blocks = getattr(transformer, "transformer_blocks", None) or transformer.blocks
    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _call(family: str) -> dict[str, Any]:
    if family == "flux":
        return {"true_cfg_scale": 5.0, "negative_prompt": "blurry"}
    return {"guidance_scale": 5.0}


def test_a_skipped_layer_forward_does_not_reuse_the_prompts_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = pipeline("wan")
    guidance = CFG(5.0) + STG(2.0, layers=1)
    expected, _ = guided_latents(pipe, "wan", guidance, steps=STEPS, batch_size=2, **_call("wan"))
    with contexts_seen(pipe, monkeypatch) as contexts, cached(pipe, 0.0):
        ours, stats = guided_latents(pipe, "wan", guidance, steps=STEPS, batch_size=2, **_call("wan"))
    assert torch.equal(ours, expected)
    assert stats.computed["slg:1"] == 2 * STEPS
    assert contexts == {"cond": {2}, "uncond": {2}, "cond, guidekit slg:1 of rows 0,1": {2}}
    assert "cache_context" not in vars(pipe.transformer)  # the pipeline's own again
    cfg, _ = guided_latents(pipe, "wan", CFG(5.0), steps=STEPS, batch_size=2, **_call("wan"))
    assert (cfg - expected).abs().max().item() > 1e-3  # what reusing the prompt's tail would give


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_the_pipelines_own_forwards_keep_their_contexts(family: str) -> None:
    pipe = pipeline(family)
    with cached(pipe, 1e9):  # every call after a context's first reuses its tail
        native = final_latents(pipe, family, steps=STEPS, batch_size=2, **_call(family))
        ours, _ = guided_latents(pipe, family, CFG(5.0), steps=STEPS, batch_size=2, **_call(family))
    assert torch.equal(ours, native)
    plain = final_latents(pipe, family, steps=STEPS, batch_size=2, **_call(family))
    assert not torch.equal(plain, native)  # the cache skipped blocks


@pytest.mark.parametrize(("family", "contexts"), [
    ("flux", {"cond": {2}, "uncond": {2}, "uncond, guidekit rows 0": {1}}),
    ("wan", {"cond": {2}, "uncond": {2}, "uncond, guidekit rows 0": {1}}),
    ("ltx", {"cond_uncond": {4}, "cond_uncond, guidekit rows 0,2,3": {3}}),  # one call per step, [uncond; cond]
])
def test_rows_that_change_from_step_to_step_get_a_context_each(family: str, contexts: dict[str, set[int]],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = pipeline(family)
    expected, _ = guided_latents(pipe, family, Alternating(5.0), steps=STEPS, batch_size=2, **_call(family))
    with contexts_seen(pipe, monkeypatch) as rows:
        with cached(pipe, 0.0):
            ours, stats = guided_latents(pipe, family, Alternating(5.0), steps=STEPS, batch_size=2, **_call(family))
        with cached(pipe, 1e9):  # every call after a context's first reuses its tail
            reused, _ = guided_latents(pipe, family, Alternating(5.0), steps=STEPS, batch_size=2, **_call(family))
    assert torch.equal(ours, expected)
    assert stats.uncond_rows_per_sample == [STEPS, STEPS // 2]
    assert rows == contexts
    assert reused.shape == expected.shape and bool(torch.isfinite(reused).all())
