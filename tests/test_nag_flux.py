"""NAG on Flux against the official Flux rule, written independently in the test.

The oracle follows ChenDarYen/Normalized-Attention-Guidance's first Flux release (src/transformer_flux.py,
src/attention_flux_nag.py, src/normalization.py, src/pipeline_flux_nag.py @69159ca) on diffusers 0.42.1's blocks: the
text embeddings and pooled projections are ``[prompt; NAG negative]`` (2B rows) while the image stream has B rows;
every ``AdaLayerNormZero`` / ``AdaLayerNormContinuous`` takes the first rows of the time embedding that its input
has (the official "Trunc" norms); double-stream attention tiles the image queries, keys and values and gives the
image tokens NAG's output of the two branches, the text tokens both; the image stream is tiled before the
single-stream blocks, whose attention writes NAG's output into the image tokens of both copies; the first copy is
the output. Attention is an explicit softmax here. The official release uses L2 norms and runs only at B = 1 with a
distilled guidance embedding (broadcast); the oracle repeats the guidance for B = 2, and takes ``p`` as a parameter.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from diffusers.models.transformers.transformer_flux import FluxAttention
from pipelines import forward_replaced

import guidekit
from guidekit import CFG, NAG
from guidekit.testing.tiny import build_tiny_pipeline, tiny_call_kwargs

STEPS = 3
NEGATIVE = "a blurry photo"


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, H, S, D)`` attention by an explicit softmax, returned as ``(B, S, H * D)``."""
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def _nag(pos: torch.Tensor, neg: torch.Tensor, scale: float, tau: float, alpha: float, p: int) -> torch.Tensor:
    guidance = pos * scale - neg * (scale - 1)
    ratio = torch.norm(guidance, p=p, dim=-1, keepdim=True) / torch.norm(pos, p=p, dim=-1, keepdim=True)
    guidance = guidance * torch.minimum(ratio, ratio.new_ones(1) * tau) / ratio
    return guidance * alpha + pos * (1 - alpha)


class OfficialFluxNAG:
    """The official ``NAGFluxAttnProcessor2_0`` rule (module docstring)."""

    def __init__(self, scale: float, tau: float, alpha: float, p: int, text_length: int) -> None:
        self.scale, self.tau, self.alpha, self.p, self.text_length = scale, tau, alpha, p, text_length

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,  # type: ignore[no-untyped-def]
                 image_rotary_emb=None):
        joint = encoder_hidden_states is not None
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if joint:
            assert len(hidden_states) * 2 == len(encoder_hidden_states)
            q, k, v = q.tile(2, 1, 1), k.tile(2, 1, 1), v.tile(2, 1, 1)
        rows, d = q.shape[0], attn.head_dim
        q, k, v = (t.view(rows, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        text = self.text_length
        if joint:
            eq, ek, ev = (proj(encoder_hidden_states).view(rows, -1, attn.heads, d).transpose(1, 2)
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q, k, v = torch.cat([attn.norm_added_q(eq), q], 2), torch.cat([attn.norm_added_k(ek), k], 2), \
                torch.cat([ev, v], 2)
            text = encoder_hidden_states.shape[1]
        q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        (q, qn), (k, kn), (v, vn) = q.chunk(2), k.chunk(2), v.chunk(2)
        out, out_neg = _softmax_attention(q, k, v), _softmax_attention(qn, kn, vn)
        image = _nag(out[:, text:], out_neg[:, text:], self.scale, self.tau, self.alpha, self.p)
        if joint:
            context = torch.cat([out[:, :text], out_neg[:, :text]])
            return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(context)
        out, out_neg = out.clone(), out_neg.clone()
        out[:, text:], out_neg[:, text:] = image, image
        return torch.cat([out, out_neg])


@contextlib.contextmanager
def _truncated_norms(transformer: torch.nn.Module) -> Iterator[None]:
    """The official Trunc norms: each AdaLayerNormZero / AdaLayerNormContinuous uses the first rows of its time
    embedding, as many as its input has."""
    def zero(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):  # type: ignore[no-untyped-def]
        return type(self).forward(self, x, timestep, class_labels, hidden_dtype, emb[:x.shape[0]])

    def continuous(self, x, conditioning_embedding):  # type: ignore[no-untyped-def]
        return type(self).forward(self, x, conditioning_embedding[:x.shape[0]])

    patched = [m for m in transformer.modules() if isinstance(m, (AdaLayerNormZero, AdaLayerNormContinuous))]
    for m in patched:
        m.forward = types.MethodType(zero if isinstance(m, AdaLayerNormZero) else continuous, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _official_forward(transformer, negative: tuple[torch.Tensor, torch.Tensor],  # type: ignore[no-untyped-def]
                      weights: tuple[float, float, float, int]):
    """The official ``NAGFluxTransformer2DModel.forward`` for the pipeline's conditional calls; calls without the
    prompt (true CFG's negative) run the plain transformer."""
    plain = transformer.forward
    text_neg, pooled_neg = negative

    def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,  # type: ignore[no-untyped-def]
                guidance=None, joint_attention_kwargs=None, return_dict=True):
        b = hidden_states.shape[0]
        if not torch.allclose(encoder_hidden_states, forward.prompt, atol=1e-4):  # type: ignore[attr-defined]
            return plain(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                         pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                         guidance=guidance, return_dict=return_dict)
        t = transformer
        context = torch.cat([encoder_hidden_states, text_neg.expand(b, -1, -1)])
        pooled = torch.cat([pooled_projections, pooled_neg.expand(b, -1)])
        temb = t.time_text_embed(timestep.repeat(2) * 1000, guidance.repeat(2) * 1000, pooled)
        hidden, context = t.x_embedder(hidden_states), t.context_embedder(context)
        rotary = t.pos_embed(torch.cat([txt_ids, img_ids]))
        modules = {n: m for n, m in t.named_modules() if isinstance(m, FluxAttention)}
        saved = {n: m.processor for n, m in modules.items()}
        for m in modules.values():
            m.processor = OfficialFluxNAG(*weights[:3], weights[3], context.shape[1])
        try:
            with _truncated_norms(t):
                for block in t.transformer_blocks:
                    context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                            image_rotary_emb=rotary)
                hidden = hidden.tile(2, 1, 1)
                for block in t.single_transformer_blocks:
                    context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                            image_rotary_emb=rotary)
                out = t.proj_out(t.norm_out(hidden.chunk(2)[0], temb))
        finally:
            for n, m in modules.items():
                m.processor = saved[n]
        return (out,)

    return forward


@pytest.fixture(scope="module")
def pipe():  # type: ignore[no-untyped-def]
    return build_tiny_pipeline("flux")


def _run(pipe, **kwargs: object) -> torch.Tensor:  # type: ignore[no-untyped-def]
    call = {**tiny_call_kwargs("flux", batch_size=2), "num_inference_steps": STEPS, "output_type": "latent",
            **kwargs}
    return pipe(**call, generator=torch.Generator().manual_seed(0)).images


def _official(pipe, true_cfg_scale: float, scale: float, tau: float, alpha: float, p: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    msl = tiny_call_kwargs("flux")["max_sequence_length"]
    prompt = pipe.encode_prompt(prompt=["a red cat"] * 2, prompt_2=None, device="cpu", max_sequence_length=msl)[0]
    negative = pipe.encode_prompt(prompt=NEGATIVE, prompt_2=None, device="cpu", max_sequence_length=msl)[:2]
    forward = _official_forward(pipe.transformer, negative, (scale, tau, alpha, p))
    forward.prompt = prompt  # type: ignore[attr-defined]
    with forward_replaced(pipe.transformer, forward):
        return _run(pipe, true_cfg_scale=true_cfg_scale)


@pytest.mark.parametrize(("scale", "tau", "alpha", "p"), [(5.0, 2.5, 0.25, 2), (8.0, 1.2, 0.5, 1)])
def test_nag_alone_equals_official_flux_rule(pipe, scale: float, tau: float, alpha: float, p: int) -> None:  # type: ignore[no-untyped-def]
    expected = _official(pipe, 1.0, scale, tau, alpha, p)
    with guidekit.guided(pipe, NAG(scale, negative_prompt=NEGATIVE, tau=tau, alpha=alpha, p=p)) as run:
        ours = _run(pipe, true_cfg_scale=1.0)
    assert (ours - expected).abs().max() < 1e-5
    assert run.stats.computed == {"cond": 2 * STEPS, "uncond": 0} and run.stats.model_calls == STEPS
    assert (_run(pipe, true_cfg_scale=1.0) - expected).abs().max() > 1e-3


def test_true_cfg_plus_nag_guides_the_conditional_call_only(pipe) -> None:  # type: ignore[no-untyped-def]
    """``CFG(4) + NAG`` on Flux: NAG in the conditional call, the negative prompt's call plain (the official
    release asserts there), then the pipeline's true CFG."""
    expected = _official(pipe, 4.0, 5.0, 2.5, 0.25, 1)
    with guidekit.guided(pipe, CFG(4.0) + NAG(5.0, negative_prompt=NEGATIVE, alpha=0.25)) as run:
        ours = _run(pipe, true_cfg_scale=4.0)
    assert (ours - expected).abs().max() < 1e-5
    assert run.stats.computed == {"cond": 2 * STEPS, "uncond": 2 * STEPS}
    assert (_run(pipe, true_cfg_scale=4.0) - expected).abs().max() > 1e-3
