"""Perturbed passes on a diffusers denoiser: the attention processors that change the network for some rows.

A guidance that asks for a perturbed pass (:class:`~guidekit.guidance.base.Pass` with a ``perturbation``) gets its
rows appended to the call's forward, ``[uncond; cond; perturbed]`` as in diffusers' PAG pipelines, and only those
rows run with the change. For :class:`~guidekit.guidance.base.IdentitySelfAttention` the matched self-attention
modules get a :class:`RowPerturbedAttention` processor for the pipeline call: it hands the other rows to the
module's own processor, unchanged, and gives the perturbed rows ``to_out(to_v(h))``, diffusers'
``PAGCFGIdentitySelfAttnProcessor2_0`` perturbed path.

Layer patterns match whole dot-separated parts of module names (``"blocks.1"`` is not ``"blocks.10"``); ``"mid"``
stands for ``"mid_block"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

from guidekit.guidance.base import IdentitySelfAttention, Perturbation

#: Short names of layer patterns.
ALIASES = {"mid": "mid_block"}


def self_attention_modules(denoiser: torch.nn.Module) -> dict[str, Attention]:
    """The denoiser's self-attention modules by name (diffusers ``Attention`` that is not cross-attention)."""
    return {name: m for name, m in denoiser.named_modules()
            if isinstance(m, Attention) and not m.is_cross_attention}


def _matches(pattern: str, name: str) -> bool:
    want = ALIASES.get(pattern, pattern).split(".")
    parts = name.split(".")
    return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def resolve_layers(denoiser: torch.nn.Module, layers: tuple[str, ...]) -> dict[str, Attention]:
    """The self-attention modules the patterns ``layers`` match; a ``ValueError`` naming ``layers`` and listing the
    denoiser's attention blocks if a pattern matches none."""
    modules = self_attention_modules(denoiser)
    chosen: dict[str, Attention] = {}
    for pattern in layers:
        found = {n: m for n, m in modules.items() if _matches(pattern, n)}
        if not found:
            blocks = sorted({n.rsplit(".", 3)[0] if n.count(".") >= 3 else n for n in modules})
            raise ValueError(f"layers={list(layers)!r} is not accepted; {pattern!r} matches no self-attention layer "
                             f"of {type(denoiser).__name__}, whose self-attention blocks are: {', '.join(blocks)} "
                             f"('mid' stands for 'mid_block')")
        chosen.update(found)
    return chosen


def check_skip_layers(denoiser: torch.nn.Module, layers: tuple[int, ...]) -> None:
    """Raise a ``ValueError`` naming ``layers`` unless the denoiser's forward takes ``skip_layers`` (diffusers'
    ``SD3Transformer2DModel``) and has each block."""
    name = type(denoiser).__name__
    if "skip_layers" not in inspect.signature(type(denoiser).forward).parameters:  # the class's, not a wrapper
        raise ValueError(f"layers={list(layers)!r} is not accepted for {name}, whose forward takes no skip_layers; "
                         "expected a denoiser that can skip blocks (SD3's SD3Transformer2DModel)")
    count = len(getattr(denoiser, "transformer_blocks", ()))
    if max(layers) >= count:
        raise ValueError(f"layers={list(layers)!r} is not accepted; {name} has {count} transformer blocks, "
                         f"expected indices in [0, {count - 1}]")


class RowPerturbedAttention:
    """An attention processor that runs ``original`` on every row but the last ``perturbed_rows`` of the batch, and
    identity self-attention on those (``to_out(to_v(group_norm(h)))``, then the module's residual and output
    rescaling, as diffusers' PAG processors do). With ``perturbed_rows = 0`` it is ``original``."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.perturbed_rows = 0

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        k = self.perturbed_rows
        if k == 0:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        n = hidden_states.shape[0] - k

        def head(value: Any) -> Any:
            return value[:n] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n + k else value

        kept = self.original(attn, hidden_states[:n], head(encoder_hidden_states), head(attention_mask), head(temb),
                             *args, **kwargs)
        return torch.cat([kept, _identity_attention(attn, hidden_states[n:], None if temb is None else temb[n:])])


def _identity_attention(attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """diffusers' ``PAGCFGIdentitySelfAttnProcessor2_0`` on its perturbed rows: the attention output is the value."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    hidden_states = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


@contextmanager
def perturbation_processors(denoiser: torch.nn.Module, perturbation: Perturbation
                            ) -> Iterator[list[RowPerturbedAttention]]:
    """Install :class:`RowPerturbedAttention` on the modules ``perturbation`` names for the block; yield the
    processors (set their ``perturbed_rows`` around a forward); put the modules' own processors back after."""
    if not isinstance(perturbation, IdentitySelfAttention):
        raise ValueError(f"perturbation={perturbation!r} is not accepted; this bridge applies "
                         f"{IdentitySelfAttention.kind}")
    modules = resolve_layers(denoiser, perturbation.layers)
    saved = {name: m.processor for name, m in modules.items()}
    processors = []
    try:
        for name, m in modules.items():
            processor = RowPerturbedAttention(saved[name])
            m.processor = processor
            processors.append(processor)
        yield processors
    finally:
        for name, m in modules.items():
            m.processor = saved[name]
