"""Perturbed passes on a diffusers denoiser: the attention processors that change the network for some rows.

A guidance that asks for a perturbed pass (:class:`~guidekit.guidance.base.Pass` with a ``perturbation``) gets its
rows appended to the call's forward, ``[uncond; cond; perturbed]`` as in diffusers' PAG pipelines, and only those
rows run with the change. For an :class:`~guidekit.guidance.base.AttentionPerturbation` the matched self-attention
modules get a :class:`RowPerturbedAttention` processor for the pipeline call: it hands the other rows to the
module's own processor, unchanged, and gives the perturbed rows the changed attention:

* :class:`~guidekit.guidance.base.IdentitySelfAttention` (PAG): ``to_out(to_v(h))``, diffusers'
  ``PAGCFGIdentitySelfAttnProcessor2_0`` perturbed path;
* :class:`~guidekit.guidance.base.BlurredQueries` (SEG): scaled dot-product attention with the queries blurred over
  the token grid after the head split (and after the query norm, where the module has one), as the official SEG-SDXL
  processor does. The grid is the latent's, halved (rounding up) until it has the layer's number of tokens.

Layer patterns match whole dot-separated parts of module names (``"blocks.1"`` is not ``"blocks.10"``); ``"mid"``
stands for ``"mid_block"``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    JointAttnProcessor2_0,
    SanaLinearAttnProcessor2_0,
    XFormersAttnProcessor,
)

from guidekit.guidance.base import AttentionPerturbation, BlurredQueries, IdentitySelfAttention

#: The attention processors of plain (non-joint, softmax) attention, which the perturbed rows' attention replaces.
PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor)

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


def resolve_layers(denoiser: torch.nn.Module, layers: tuple[str, ...], *, identity: bool = False
                   ) -> dict[str, Attention]:
    """The self-attention modules the patterns ``layers`` match; a ``ValueError`` naming ``layers`` and listing the
    denoiser's attention blocks if a pattern matches none, or naming the processor of a module that is not plain
    softmax self-attention (or, for the ``identity`` change, SD3's joint text-image attention or Sana's linear
    attention, where diffusers' PAG processors define it)."""
    modules = self_attention_modules(denoiser)
    if not modules:
        raise ValueError(f"layers={list(layers)!r} is not accepted for {type(denoiser).__name__}, which has no "
                         "self-attention layer of diffusers' Attention class; expected a UNet, PixArt or DiT denoiser")
    chosen: dict[str, Attention] = {}
    for pattern in layers:
        found = {n: m for n, m in modules.items() if _matches(pattern, n)}
        if not found:
            blocks = sorted({n.rsplit(".", 3)[0] if n.count(".") >= 3 else n for n in modules})
            raise ValueError(f"layers={list(layers)!r} is not accepted; {pattern!r} matches no self-attention layer "
                             f"of {type(denoiser).__name__}, whose self-attention blocks are: {', '.join(blocks)} "
                             f"('mid' stands for 'mid_block')")
        chosen.update(found)
    for name, module in chosen.items():
        plain = getattr(module, "add_q_proj", None) is None and isinstance(module.processor, PLAIN_PROCESSORS)
        special = is_joint(module) or isinstance(module.processor, SanaLinearAttnProcessor2_0)
        if not plain and not (identity and special):
            accepted = "plain softmax self-attention (the UNets, PixArt, DiT)"
            if identity:
                accepted += ", SD3's joint attention and Sana's linear attention"
            raise ValueError(f"layers={list(layers)!r} is not accepted for {type(denoiser).__name__}: {name} runs "
                             f"{type(module.processor).__name__}; this change applies to {accepted}")
    return chosen


def is_joint(module: Attention) -> bool:
    """Whether the module is SD3's joint text-image attention (diffusers' ``JointAttnProcessor2_0``)."""
    return getattr(module, "add_q_proj", None) is not None and isinstance(module.processor, JointAttnProcessor2_0)


def takes_skip_layers(denoiser: torch.nn.Module) -> bool:
    """Whether the denoiser's forward skips blocks itself (``skip_layers``: diffusers' ``SD3Transformer2DModel``)."""
    return _forward_takes_skip_layers(type(denoiser))  # the class's forward, not a wrapper's


@functools.cache
def _forward_takes_skip_layers(cls: type) -> bool:
    """:func:`takes_skip_layers` of a class, read once (the bridge asks at every pipeline call)."""
    return "skip_layers" in inspect.signature(cls.forward).parameters


def block_list(denoiser: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The denoiser's list of transformer blocks (``transformer_blocks``; ``blocks`` in Wan), or ``None``."""
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(denoiser, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    return None


def check_skip_layers(denoiser: torch.nn.Module, layers: tuple[int, ...]) -> None:
    """Raise a ``ValueError`` naming ``layers`` unless the denoiser can skip each of those blocks: its forward takes
    ``skip_layers``, or it has a list of transformer blocks (:func:`block_list`; the blocks are then skipped by
    :func:`skipped_blocks`)."""
    name = type(denoiser).__name__
    blocks = block_list(denoiser)
    if not takes_skip_layers(denoiser) and blocks is None:
        raise ValueError(f"layers={list(layers)!r} is not accepted for {name}, which has no transformer_blocks; "
                         "expected a transformer denoiser (SD3, PixArt, DiT, Sana, Wan)")
    count = len(blocks) if blocks is not None else 0
    if max(layers) >= count:
        raise ValueError(f"layers={list(layers)!r} is not accepted; {name} has {count} transformer blocks, "
                         f"expected indices in [0, {count - 1}]")
    if not takes_skip_layers(denoiser):
        block = type(blocks[layers[0]])  # type: ignore[index]
        try:
            two_streams = TransformerBlockRegistry.get(block).return_encoder_hidden_states_index is not None
        except ValueError:  # a block class diffusers has not registered: checked when it runs
            two_streams = False
        if two_streams:
            raise ValueError(f"layers={list(layers)!r} is not accepted for {name}: its {block.__name__} returns two "
                             "streams (image and text); expected blocks that return their hidden states (PixArt, "
                             "DiT, Sana) or a denoiser that takes skip_layers (SD3)")


@contextmanager
def skipped_blocks(denoiser: torch.nn.Module, layers: tuple[int, ...]) -> Iterator[None]:
    """Inside the block, the denoiser's transformer blocks (:func:`block_list`) at ``layers`` return their input hidden
    states
    unchanged (a skipped block; the rule of SD3's ``skip_layers`` and diffusers' ``TransformerBlockSkipHook``). A block
    whose output is not one tensor shaped like its input (joint blocks return two streams) raises a ``ValueError``
    naming ``layers``."""

    def skip(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        if not isinstance(output, torch.Tensor) or output.shape != hidden.shape:
            raise ValueError(f"layers={list(layers)!r} is not accepted for {type(denoiser).__name__}: its "
                             f"{type(module).__name__} returns more than one stream; expected blocks that return "
                             "their hidden states (PixArt, DiT, Sana) or a denoiser that takes skip_layers (SD3)")
        return hidden

    blocks = block_list(denoiser)
    handles = [blocks[i].register_forward_hook(skip, with_kwargs=True) for i in layers]  # type: ignore[index]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class RowPerturbedAttention:
    """An attention processor that runs ``original`` on every row but the last ``perturbed_rows`` of the batch, and
    the attention ``perturbation`` describes on those (then the module's residual and output rescaling, as diffusers'
    PAG processors do). With ``perturbed_rows = 0`` it is ``original``. ``latent_size`` is the ``(height, width)``
    of the forward's latent, which blurred queries need for their token grid."""

    def __init__(self, original: Any, perturbation: AttentionPerturbation) -> None:
        self.original = original
        self.perturbation = perturbation
        self.perturbed_rows = 0
        self.latent_size: tuple[int, int] = (0, 0)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        k = self.perturbed_rows
        if k == 0:
            with_temb = () if temb is None else (temb,)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *with_temb, *args,
                                 **kwargs)
        n = hidden_states.shape[0] - k

        def head(value: Any) -> Any:
            return value[:n] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n + k else value

        with_temb = () if temb is None else (temb[:n],)  # some processors (Sana's) take no time embedding
        kept = self.original(attn, hidden_states[:n], head(encoder_hidden_states), head(attention_mask), *with_temb,
                             *args, **kwargs)
        if isinstance(kept, tuple):  # joint attention: image and text streams
            image, text = _joint_identity(attn, hidden_states[n:], encoder_hidden_states[n:])  # type: ignore[index]
            return torch.cat([kept[0], image]), torch.cat([kept[1], text])
        return torch.cat([kept, self._perturbed(attn, hidden_states[n:], None if temb is None else temb[n:])])

    def _perturbed(self, attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """The perturbed rows' attention block: blurred-query attention, or the identity (a token's output is its
        value)."""
        if isinstance(self.perturbation, BlurredQueries):
            return attention_block(attn, hidden_states, temb, lambda h: self._blurred_attention(attn, h))
        return attention_block(attn, hidden_states, temb, attn.to_v)

    def _blurred_attention(self, attn: Attention, hidden_states: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product self-attention with the queries blurred over the token grid (module docstring)."""
        query, key, value = (split_heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = blur_queries(query, token_grid(hidden_states.shape[1], self.latent_size),
                             self.perturbation.sigma, infinite=self.perturbation.infinite)  # type: ignore[attr-defined]
        return merge_heads(F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False))


def split_heads(attn: Attention, t: torch.Tensor) -> torch.Tensor:
    """``(B, N, heads * d)`` projections as ``(B, heads, N, d)``."""
    return t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, d)`` attention outputs as ``(B, N, heads * d)``."""
    return t.transpose(1, 2).flatten(2)


def attention_block(attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None,
                    attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A self- or cross-attention block as diffusers' ``AttnProcessor2_0`` runs it, around a changed attention:
    spatial and group norms, a 4-D input as tokens, ``attend`` (the normed tokens ``(B, N, C)`` to the attention
    output before the projection), the output projection, the input's layout, the residual and the output
    rescaling."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    hidden_states = attn.to_out[1](attn.to_out[0](attend(hidden_states)))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _joint_identity(attn: Attention, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PAG on SD3's joint attention (diffusers' ``PAGCFGJointAttnProcessor2_0`` perturbed path): the image tokens
    attend to themselves alone among the image tokens (and to every text token); the text tokens attend to all. The
    module's query and key norms apply as in ``JointAttnProcessor2_0`` (diffusers' PAG processor leaves them out)."""
    n = image.shape[1]
    query, key, value = (split_heads(attn, f(image)) for f in (attn.to_q, attn.to_k, attn.to_v))
    text_query, text_key, text_value = (split_heads(attn, f(text))
                                        for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    query, key = torch.cat([query, text_query], dim=2), torch.cat([key, text_key], dim=2)
    value = torch.cat([value, text_value], dim=2)
    size = query.shape[2]
    mask = torch.zeros((size, size), device=query.device, dtype=query.dtype)
    mask[:n, :n] = float("-inf")
    mask[:n, :n].fill_diagonal_(0)
    out = merge_heads(F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0,
                                                     is_causal=False))
    image_out, text_out = out[:, :n], out[:, n:]
    image_out = attn.to_out[1](attn.to_out[0](image_out))
    if not attn.context_pre_only:
        text_out = attn.to_add_out(text_out)
    return image_out, text_out


def token_grid(tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(height, width)`` of a layer's ``tokens`` tokens: the latent's size halved, rounding up, until the count
    matches (UNet levels; 2 x 2 patches); a ``ValueError`` if no halving does."""
    h, w = latent_size
    while h * w > tokens and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(f"layers: a layer with {tokens} tokens is not accepted for blurred queries; expected the "
                         f"{latent_size[0]} x {latent_size[1]} latent's token grid, or that grid halved")
    return h, w


def blur_queries(query: torch.Tensor, grid: tuple[int, int], sigma: float, *, infinite: bool) -> torch.Tensor:
    """Queries ``(B, heads, N, head_dim)`` blurred per channel over the ``grid`` of their ``N`` tokens: a Gaussian
    of standard deviation ``sigma`` (kernel side ``ceil(6 sigma)`` made odd, at most the grid's shorter side plus one
    if even, reflect padding), or, for the infinite blur, every query the mean query (SEG-SDXL's
    ``gaussian_blur_2d``)."""
    b, heads, n, head_dim = query.shape
    if infinite:
        return query.mean(dim=2, keepdim=True).expand_as(query)
    h, w = grid
    image = query.permute(0, 1, 3, 2).reshape(b, heads * head_dim, h, w)
    side = min(h, w)
    size = min(math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2, side - (side % 2 - 1))
    x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel1d = (pdf / pdf.sum()).to(device=query.device, dtype=query.dtype)
    kernel = torch.outer(kernel1d, kernel1d).expand(heads * head_dim, 1, size, size)
    image = F.conv2d(F.pad(image, [size // 2] * 4, mode="reflect"), kernel, groups=heads * head_dim)
    return image.reshape(b, heads, head_dim, n).permute(0, 1, 3, 2)


@contextmanager
def perturbation_processors(denoiser: torch.nn.Module, perturbation: AttentionPerturbation
                            ) -> Iterator[list[RowPerturbedAttention]]:
    """Install :class:`RowPerturbedAttention` on the modules ``perturbation`` names for the block; yield the
    processors (set their ``perturbed_rows`` around a forward); put the modules' own processors back after."""
    modules = resolve_layers(denoiser, perturbation.layers, identity=isinstance(perturbation, IdentitySelfAttention))
    saved = {name: m.processor for name, m in modules.items()}
    processors = []
    try:
        for name, m in modules.items():
            processor = RowPerturbedAttention(saved[name], perturbation)
            m.processor = processor
            processors.append(processor)
        yield processors
    finally:
        for name, m in modules.items():
            m.processor = saved[name]
