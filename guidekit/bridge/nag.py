"""NAG on a diffusers denoiser: the negative prompt's embeddings, and the cross-attention processor that guides the
rows conditioned on the prompt (:mod:`guidekit.guidance.nag`).

Every cross-attention module of the denoiser gets a :class:`NAGAttention` processor for the pipeline call. The proxy
tells it, per forward, which rows are conditioned on the prompt (the conditional rows and any perturbed rows, which
repeat them); the other rows (the negative prompt of CFG) go to the module's own processor unchanged. NAG runs on
pipelines whose denoiser cross-attends to text through diffusers' ``Attention`` and whose ``encode_prompt`` takes
``prompt, device, num_images_per_prompt, do_classifier_free_guidance, clip_skip``: the SD and SDXL families.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from guidekit.bridge.perturb import attention_block, merge_heads, split_heads
from guidekit.guidance.base import NegativePromptAttention
from guidekit.guidance.nag import nag_attention

#: Pipeline classes (and their subclasses) whose prompt encoding NAG uses.
NAG_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                 "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def check_nag(pipeline_class: type, denoiser: torch.nn.Module) -> None:
    """A ``ValueError`` naming the pipeline unless NAG runs on it (module docstring)."""
    names = {cls.__name__ for cls in pipeline_class.__mro__}
    if not names & set(NAG_PIPELINES) or not cross_attention_modules(denoiser):
        raise ValueError(f"guidance NAG is not accepted for {pipeline_class.__name__}; expected a pipeline whose "
                         f"denoiser cross-attends to the prompt: {', '.join(NAG_PIPELINES)}")


def cross_attention_modules(denoiser: torch.nn.Module) -> dict[str, Attention]:
    """The denoiser's cross-attention modules by name."""
    return {name: m for name, m in denoiser.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


def encode_negative(pipe: Any, text: str, device: torch.device, clip_skip: int | None) -> torch.Tensor:
    """The negative prompt's text embeddings ``(1, T, D)``, encoded by the pipeline as it encodes its prompt."""
    with torch.no_grad():
        return pipe.encode_prompt(prompt=text, device=device, num_images_per_prompt=1,
                                  do_classifier_free_guidance=False, clip_skip=clip_skip)[0]


class NAGAttention:
    """A cross-attention processor: ``original`` on the rows that are not ``positive``, NAG on those (the
    negative prompt's ``negative`` embeddings give the keys and values of ``Z-``)."""

    def __init__(self, original: Any, change: NegativePromptAttention, negative: torch.Tensor) -> None:
        self.original = original
        self.change = change
        self.negative = negative
        #: Positions, in the current forward's batch, of the rows conditioned on the prompt (``None``: none).
        self.positive: torch.Tensor | None = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        rows = self.positive
        if rows is None or encoder_hidden_states is None or len(rows) == 0:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None or temb is not None:
            raise ValueError("guidance NAG is not accepted with a cross-attention mask or a time embedding in the "
                             "attention; expected the SD and SDXL UNets' plain cross-attention")
        guided = self._guided(attn, hidden_states[rows], encoder_hidden_states[rows])
        n = hidden_states.shape[0]
        if len(rows) == n:
            return guided
        others = torch.ones(n, dtype=torch.bool)
        others[rows] = False
        others = others.nonzero().flatten()
        kept = self.original(attn, hidden_states[others], encoder_hidden_states[others], None, None, *args, **kwargs)
        out = kept.new_empty((n, *kept.shape[1:]))
        out[others], out[rows] = kept, guided.to(kept.dtype)
        return out

    def _guided(self, attn: Attention, hidden_states: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The attention block of the positive rows with NAG's output (diffusers' ``AttnProcessor2_0`` around it)."""
        if attn.spatial_norm is not None:
            raise ValueError("layers: NAG is not accepted on an attention with a spatial norm")
        return attention_block(attn, hidden_states, None, lambda h: self._attention(attn, h, prompt))

    def _attention(self, attn: Attention, hidden_states: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """NAG's attention output of the normed tokens: ``Z+`` against the prompt and ``Z-`` against the negative
        prompt, with the same queries, combined by :func:`~guidekit.guidance.nag.nag_attention`."""
        negative = self.negative.to(prompt.dtype).expand(hidden_states.shape[0], -1, -1)
        if attn.norm_cross:
            prompt, negative = attn.norm_encoder_hidden_states(prompt), attn.norm_encoder_hidden_states(negative)
        query = split_heads(attn, attn.to_q(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        outputs = []
        for text in (prompt, negative):
            key, value = split_heads(attn, attn.to_k(text)), split_heads(attn, attn.to_v(text))
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            outputs.append(merge_heads(F.scaled_dot_product_attention(query, key, value, dropout_p=0.0,
                                                                      is_causal=False)))
        c = self.change
        return nag_attention(*outputs, c.scale, c.tau, c.alpha)


@contextmanager
def nag_processors(denoiser: torch.nn.Module, change: NegativePromptAttention, negative: torch.Tensor
                   ) -> Iterator[list[NAGAttention]]:
    """Install :class:`NAGAttention` on every cross-attention module for the block; yield the processors (set their
    ``positive`` rows around a forward); put the modules' own processors back after."""
    modules = cross_attention_modules(denoiser)
    saved = {name: m.processor for name, m in modules.items()}
    processors = []
    try:
        for name, m in modules.items():
            processor = NAGAttention(saved[name], change, negative)
            m.processor = processor
            processors.append(processor)
        yield processors
    finally:
        for name, m in modules.items():
            m.processor = saved[name]
