"""The 2026 pipelines beside Wan: CogView4 and HunyuanVideo (two calls per step; HunyuanVideo's true CFG needs a
negative prompt; its image-to-video pipeline runs one prompt per call, the image's latent and a mask concatenated on the
channels), Z-Image (one call on lists of rows ``[cond; uncond]``, guidance_scale ``w - 1``,
negated velocity), HiDream (one batched call, negated velocity, per-layer Llama states batched on
their second dimension), Flux Kontext (Flux's two calls with the reference image's tokens appended), Chroma
and Qwen-Image (two calls per step on packed latents; Qwen-Image rescales each
token of the guided prediction to the conditional one's norm), Qwen-Image-Edit and Edit-2509 (Qwen-Image's calls with
the reference images' tokens appended; Edit-2509 runs one prompt with two images), LTX-Video (one batched call on
packed video tokens) and CogVideoX (one batched call on ``(B, T, C, H, W)`` latents; image-to-video with the image's
latent concatenated on dim 2 and the "ofs" embedding's one-element tensor beside the batch), against the pipelines' own
results."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pipelines import FirstSampleOnly, count_rows, final_latents, forward_replaced, guided_latents, pipeline

import guidekit
from guidekit import CFG, Interval

STEPS = 3
FAMILIES = ("fluxkontext", "chroma", "qwenimage", "qwenimage-edit", "qwenimage-editplus", "lumina2", "hidream",
            "zimage", "cogview4", "hunyuanvideo", "hunyuanvideo-i2v", "ltx", "cogvideox", "cogvideox-i2v")
#: The families whose true CFG is true_cfg_scale with a negative prompt.
TRUE_CFG = ("qwenimage", "qwenimage-edit", "qwenimage-editplus", "fluxkontext", "hunyuanvideo", "hunyuanvideo-i2v")
#: The argument that turns CFG on, where it is not guidance_scale.
SCALE_ARG = dict.fromkeys(TRUE_CFG, "true_cfg_scale")
#: Prompts per call, where not 2 (HunyuanVideo image-to-video encodes its negative prompts with one black image;
#: Qwen-Image-Edit-2509's pipeline takes one prompt).
BATCH = {"hunyuanvideo-i2v": 1, "qwenimage-editplus": 1}


def _scale(family: str, value: float) -> dict[str, float]:
    """The pipeline's arguments for CFG weight ``value`` (Z-Image's guidance_scale is ``w - 1``)."""
    return {SCALE_ARG.get(family, "guidance_scale"): value - (family == "zimage")}


def _apg_flow(x: torch.Tensor, c: torch.Tensor, u: torch.Tensor, t: float, w: float) -> torch.Tensor:
    """APG without momentum or clamp (Sadat et al.'s normalized_guidance) on flow velocities at time ``t``, in x0
    space (``x0 = x - t v``), returned as a velocity; norms and projections per sample over all elements."""
    c0, u0 = x - t * c, x - t * u
    diff = c0 - u0
    shape = (-1, *[1] * (c0.ndim - 1))
    v1 = c0 / c0.flatten(1).norm(dim=1).view(shape)
    parallel = (diff * v1).flatten(1).sum(1).view(shape) * v1
    return (x - (c0 + (w - 1) * (diff - parallel))) / t


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_equals_native_and_none_restores(family: str) -> None:
    pipe, batch = pipeline(family), BATCH.get(family, 2)
    native = final_latents(pipe, family, steps=STEPS, batch_size=batch, **_scale(family, 5.0))
    guided, stats = guided_latents(pipe, family, CFG(5.0), steps=STEPS, batch_size=batch, **_scale(family, 5.0))
    assert stats.uncond_rows == stats.cond_rows == batch * STEPS
    assert (guided - native).abs().max().item() <= 1e-5
    assert torch.equal(final_latents(pipe, family, steps=STEPS, batch_size=batch, **_scale(family, 5.0)), native)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_interval_computes_no_unconditional_rows(family: str) -> None:
    pipe, batch = pipeline(family), BATCH.get(family, 2)
    conditional_only = final_latents(pipe, family, steps=STEPS, batch_size=batch, **_scale(family, 1.0))
    rows, handle = count_rows(pipe, "transformer")
    try:
        out, stats = guided_latents(pipe, family, Interval(CFG(5.0), 1e4, 2e4), steps=STEPS, batch_size=batch,
                                    **_scale(family, 5.0))
    finally:
        handle.remove()
    assert rows == [batch] * STEPS and stats.uncond_rows == 0
    assert (out - conditional_only).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["wan", "qwenimage", "qwenimage-edit", "chroma", "hidream", "zimage", "cogview4",
                                    "hunyuanvideo", "cogvideox-i2v"])
def test_partial_guidance_evaluates_only_guided_rows(family: str) -> None:
    """Sample 0 guided, sample 1 not: the unconditional call gets sample 0's row only (with its per-sample
    arguments, Qwen-Image's img_shapes and masks, cut to it; the one batched call of HiDream, Z-Image and CogVideoX
    gets three rows, HiDream's per-layer Llama states cut along their second dimension, CogVideoX's one-element
    "ofs" tensor passed whole)."""
    pipe = pipeline(family)
    cfg = final_latents(pipe, family, steps=STEPS, batch_size=2, **_scale(family, 5.0))
    conditional_only = final_latents(pipe, family, steps=STEPS, batch_size=2, **_scale(family, 1.0))
    rows, handle = count_rows(pipe, "transformer")
    try:
        out, stats = guided_latents(pipe, family, FirstSampleOnly(5.0), steps=STEPS, batch_size=2,
                                    **_scale(family, 5.0))
    finally:
        handle.remove()
    assert rows == ([3] if family in ("hidream", "zimage", "cogvideox-i2v") else [2, 1]) * STEPS
    assert stats.uncond_rows_per_sample == [STEPS, 0]
    assert (out[0] - cfg[0]).abs().max().item() <= 1e-5
    assert (out[1] - conditional_only[1]).abs().max().item() <= 1e-5


def test_lumina2_guides_the_velocity_its_transformer_negates() -> None:
    """Lumina2's transformer outputs ``-v`` (its time runs from noise to image) and the pipeline negates after CFG.
    APG in x0 space (``x0 = x - t v``) is not odd in ``v``, so guiding the raw outputs would be wrong. Oracle: the
    pipeline with its transformer's forward replaced; at each step's second call the rule runs on ``v = -raw`` of
    both calls (APG without momentum or clamp, written here) and the call returns the ``u'`` for which the pipeline's
    ``u' + w (c - u')``, negated, is the rule's ``v``."""
    pipe = pipeline("lumina2")
    w, plain = 4.0, pipe.transformer.forward
    calls: list[torch.Tensor] = []

    def forward(hidden_states, timestep, **kwargs):  # type: ignore[no-untyped-def]
        raw = plain(hidden_states=hidden_states, timestep=timestep, **kwargs)[0]
        if not calls:
            calls.append(raw)
            return (raw,)
        c, u, x, t = -calls.pop().double(), -raw.double(), hidden_states.double(), 1 - float(timestep[0])
        d = _apg_flow(x, c, u, t, w)
        return (((-d - w * -c) / (1 - w)).float(),)

    apg = guidekit.APG(w, norm_threshold=0.0, momentum=0.0)
    with forward_replaced(pipe.transformer, forward):
        expected = final_latents(pipe, "lumina2", steps=STEPS, guidance_scale=w, cfg_normalization=False)
    ours, _ = guided_latents(pipe, "lumina2", apg, steps=STEPS, guidance_scale=w, cfg_normalization=False)
    cfg = final_latents(pipe, "lumina2", steps=STEPS, guidance_scale=w, cfg_normalization=False)
    assert (ours - expected).abs().max().item() <= 1e-5 and (cfg - expected).abs().max().item() > 1e-3


def test_lumina2_cfg_truncation_is_refused_by_name() -> None:
    pipe = pipeline("lumina2")
    with guidekit.guided(pipe, CFG(4.0)), \
            pytest.raises(ValueError, match=r"^cfg_trunc_ratio=0.5 is not accepted while guidance .* expected 1.0"):
        final_latents(pipe, "lumina2", steps=2, guidance_scale=4.0, cfg_trunc_ratio=0.5)


@dataclasses.dataclass(frozen=True)
class _Recorder(CFG):
    """CFG that records what it is given: the latent it guides and its token grid."""

    seen: list = dataclasses.field(default_factory=list, compare=False)

    def combine(self, cond, uncond, ctx, state=None, scale=None):  # type: ignore[no-untyped-def]
        self.seen.append((tuple(ctx.x.shape), tuple(cond.shape), ctx.grid))
        return super().combine(cond, uncond, ctx, state, scale)


@pytest.mark.parametrize(("family", "batch", "images", "channels"),
                         [("fluxkontext", 2, 1, 64), ("qwenimage-edit", 2, 1, 16), ("qwenimage-editplus", 1, 2, 16)])
def test_reference_image_tokens_are_not_guided(family: str, batch: int, images: int, channels: int) -> None:
    """The transformer sees 64 latent tokens followed by 64 tokens per reference image (Flux Kontext, Qwen-Image-Edit;
    Edit-2509 with two images); the guidance gets the 64 latent ones and their 16 x 16 grid, and the reference
    tokens' output is the conditional one."""
    pipe = pipeline(family)
    recorder, inputs = _Recorder(4.0), []
    handle = pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: inputs.append(kw["hidden_states"].shape),
                                                        with_kwargs=True)
    try:
        guided_latents(pipe, family, recorder, steps=STEPS, batch_size=batch, true_cfg_scale=4.0)
    finally:
        handle.remove()
    assert set(inputs) == {(batch, 64 * (1 + images), channels)}
    assert recorder.seen == [((batch, 64, channels), (batch, 64, channels), (16, 16))] * STEPS


def test_hidream_guides_the_velocity_its_transformer_negates() -> None:
    """HiDream's transformer outputs ``-v`` and the pipeline negates before its CFG. Oracle: the transformer's forward
    replaced by one that runs the batch ``[u; c]``, applies APG (no momentum, no clamp, written here) to ``v = -raw``
    at flow time ``t = timesteps / 1000`` and returns ``-[d; d]``, which the pipeline negates and combines to ``d``."""
    pipe = pipeline("hidream")
    w, plain = 4.0, pipe.transformer.forward

    def forward(hidden_states, timesteps, **kwargs):  # type: ignore[no-untyped-def]
        raw = plain(hidden_states=hidden_states, timesteps=timesteps, **kwargs)[0].double()
        u, c = (-raw).chunk(2)
        d = _apg_flow(hidden_states.chunk(2)[0].double(), c, u, float(timesteps[0]) / 1000, w)
        return (-torch.cat([d, d]).float(),)

    with forward_replaced(pipe.transformer, forward):
        expected = final_latents(pipe, "hidream", steps=STEPS, guidance_scale=w, batch_size=2)
    ours, _ = guided_latents(pipe, "hidream", guidekit.APG(w, norm_threshold=0.0, momentum=0.0), steps=STEPS,
                             guidance_scale=w, batch_size=2)
    cfg = final_latents(pipe, "hidream", steps=STEPS, guidance_scale=w, batch_size=2)
    # the oracle's flow time is the float32 timestep / 1000, guidekit's the scheduler's sigma: 1e-5 relative
    assert (ours - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (cfg - expected).abs().max().item() > 1e-3


def test_zimage_guides_the_velocity_its_transformer_negates() -> None:
    """Z-Image's transformer takes and returns lists of rows ``[cond; uncond]``, outputs ``-v`` at time ``1 - t``,
    and the pipeline negates after its ``c + g (c - u)``. Oracle: the forward replaced by one that runs the rows,
    applies APG (no momentum, no clamp, written here) to ``v = -raw`` and returns ``-d`` in both halves."""
    pipe = pipeline("zimage")
    w, plain = 4.0, pipe.transformer.forward

    def forward(x, t, cap_feats, **kwargs):  # type: ignore[no-untyped-def]
        raw = torch.stack(plain(x, t, cap_feats, **kwargs)[0]).double()
        c, u = (-raw).chunk(2)
        d = _apg_flow(torch.stack(x).chunk(2)[0].double(), c, u, 1 - float(t[0]), w)
        return (list((-torch.cat([d, d])).float().unbind(0)),)

    with forward_replaced(pipe.transformer, forward):
        expected = final_latents(pipe, "zimage", steps=STEPS, batch_size=2, **_scale("zimage", w))
    ours, _ = guided_latents(pipe, "zimage", guidekit.APG(w, norm_threshold=0.0, momentum=0.0), steps=STEPS,
                             batch_size=2, **_scale("zimage", w))
    cfg = final_latents(pipe, "zimage", steps=STEPS, batch_size=2, **_scale("zimage", w))
    assert (ours - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (cfg - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", TRUE_CFG)
def test_missing_negative_prompt_names_the_argument(family: str) -> None:
    """Qwen-Image (and its edit pipelines), Kontext and HunyuanVideo make their unconditional call only with a
    negative prompt: a guidance that needs it is refused, naming the argument, before anything runs."""
    pipe = pipeline(family)
    with guidekit.guided(pipe, CFG(4.0)), \
            pytest.raises(ValueError, match=r"^negative_prompt=None is not accepted .*true_cfg_scale > 1"):
        final_latents(pipe, family, steps=2, true_cfg_scale=4.0, negative_prompt=None)


@dataclasses.dataclass(frozen=True)
class _SeesLatent(CFG):
    """CFG that records the latent each combination is given (``ctx.x``)."""

    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def combine(self, cond, uncond, ctx, state=None, scale=None):  # type: ignore[no-untyped-def]
        self.seen.append(ctx.x.clone())
        return super().combine(cond, uncond, ctx, state, scale)


def test_cogvideox_image_to_video_guides_the_noisy_latent_channels() -> None:
    """CogVideoX's image-to-video transformer takes the image's latent concatenated on dim 2 of ``(B, F, C, H, W)``:
    methods see the noisy latent's C channels, not all 2C (which made APG and CFG-Zero* fail on their shapes), and
    APG with its parallel component kept (eta 1, no clamp, no momentum) is CFG."""
    pipe = pipeline("cogvideox-i2v")
    inputs: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: inputs.append(kw["hidden_states"]),
                                                        with_kwargs=True)
    probe = _SeesLatent(5.0)
    try:
        guided_latents(pipe, "cogvideox-i2v", probe, steps=STEPS, batch_size=2, guidance_scale=5.0)
    finally:
        handle.remove()
    channels = pipe.transformer.config.out_channels
    assert len(probe.seen) == len(inputs) == STEPS
    for seen, given in zip(probe.seen, inputs, strict=True):
        assert given.shape[2] == 2 * channels and seen.shape[2] == channels
        assert torch.equal(seen, given[2:, :, :channels])  # the conditional rows' noisy latent ([uncond; cond])
    cfg, _ = guided_latents(pipe, "cogvideox-i2v", CFG(5.0), steps=STEPS, batch_size=2, guidance_scale=5.0)
    apg, _ = guided_latents(pipe, "cogvideox-i2v", guidekit.APG(5.0, eta=1.0, norm_threshold=0.0, momentum=0.0),
                            steps=STEPS, batch_size=2, guidance_scale=5.0)
    assert (apg - cfg).abs().max().item() <= 1e-5
    for method in (guidekit.APG(5.0), guidekit.CFGZeroStar(5.0), guidekit.TCFG(5.0, space="v"), guidekit.MAMBOG(5.0),
                   guidekit.AdaptiveGuidance(CFG(5.0))):
        out, _ = guided_latents(pipe, "cogvideox-i2v", method, steps=STEPS, batch_size=2, guidance_scale=5.0)
        assert torch.isfinite(out).all() and not torch.equal(out, cfg), method
    # Step 0 is at zero terminal SNR: a combination in eps space cannot be mapped back, and the error says so.
    with pytest.raises(ValueError, match=r"zero-terminal-SNR step.*space='v' or 'x0'"):
        guided_latents(pipe, "cogvideox-i2v", guidekit.TCFG(5.0), steps=STEPS, batch_size=2, guidance_scale=5.0)
