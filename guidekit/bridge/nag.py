"""NAG on a diffusers denoiser: the negative prompt's embeddings, and the attention processors that guide the rows
conditioned on the prompt (:mod:`guidekit.guidance.nag`).

Two runners, one per kind of attention; the proxy hands each forward to the pipeline call's runner with the positions
of the rows conditioned on the prompt (the conditional rows and any perturbed rows, which repeat them):

* :class:`CrossAttentionNAG` (SD, SDXL): every cross-attention module gets a :class:`NAGAttention` processor; the
  other rows (the negative prompt of CFG) go to the module's own processor unchanged. Needs a pipeline whose
  ``encode_prompt`` takes ``prompt, device, num_images_per_prompt, do_classifier_free_guidance, clip_skip``.
* :class:`JointAttentionNAG` (Flux): the official ``NAGFluxTransformer2DModel`` runs the negative prompt's text
  stream through the transformer beside the prompt's. Here the forward gets one extra "shadow" row per positive row:
  the same latents and time, the negative prompt's text and pooled embeddings. In the double-stream blocks the
  shadow's image stream is modulated with its positive row's time embedding (official: one image stream), so it
  stays equal to that row's; in every joint attention the image tokens of both get NAG's output of the two, the
  text tokens keep their own. The shadow rows are dropped from the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxTransformerBlock

from guidekit.bridge.perturb import attention_block, merge_heads, split_heads
from guidekit.guidance.base import NegativePromptAttention
from guidekit.guidance.nag import nag_attention

#: Pipeline classes (and their subclasses) whose prompt encoding NAG uses, by the kind of attention it guides.
CROSS_ATTENTION_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                             "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline",
                             "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
JOINT_ATTENTION_PIPELINES = ("FluxPipeline",)


class NAGRunner(Protocol):
    """Runs one forward of the denoiser with NAG on the rows at ``positive``."""

    def run(self, forward: Callable[[tuple, dict], Any], args: tuple, kwargs: dict, positive: torch.Tensor) -> Any:
        ...


def _joint(pipeline_class: type) -> bool | None:
    """Whether NAG runs in the pipeline's joint attention (``True``), cross-attention (``False``), or not at all."""
    names = {cls.__name__ for cls in pipeline_class.__mro__}
    if names & set(JOINT_ATTENTION_PIPELINES):
        return True
    return False if names & set(CROSS_ATTENTION_PIPELINES) else None


def check_nag(pipeline_class: type, denoiser: torch.nn.Module) -> None:
    """A ``ValueError`` naming the pipeline unless NAG runs on it (module docstring)."""
    joint = _joint(pipeline_class)
    found = (any(isinstance(m, FluxTransformerBlock) for m in denoiser.modules()) if joint
             else joint is not None and bool(cross_attention_modules(denoiser)))
    if not found:
        raise ValueError(f"guidance NAG is not accepted for {pipeline_class.__name__}; expected a pipeline whose "
                         "denoiser attends to the prompt: "
                         f"{', '.join(CROSS_ATTENTION_PIPELINES + JOINT_ATTENTION_PIPELINES)}")


@contextmanager
def nag_runner(pipe: Any, denoiser: torch.nn.Module, change: NegativePromptAttention, arguments: dict[str, Any]
               ) -> Iterator[NAGRunner]:
    """The runner of NAG for one call of ``pipe`` (its bound ``arguments``), with the negative prompt encoded by
    the pipeline and the processors installed; the denoiser gets its own processors back after."""
    device = pipe._execution_device
    joint = _joint(type(pipe))
    with torch.no_grad():
        if joint:
            lora = (arguments.get("joint_attention_kwargs") or {}).get("scale")
            text, pooled, _ = pipe.encode_prompt(prompt=change.negative_prompt, prompt_2=None, device=device,
                                                 num_images_per_prompt=1,
                                                 max_sequence_length=arguments["max_sequence_length"],
                                                 lora_scale=lora)
        else:
            negative = pipe.encode_prompt(prompt=change.negative_prompt, device=device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False, clip_skip=arguments.get("clip_skip"))[0]
    with joint_nag(denoiser, change, text, pooled) if joint else nag_processors(denoiser, change, negative) as runner:
        yield runner


def cross_attention_modules(denoiser: torch.nn.Module) -> dict[str, Attention]:
    """The denoiser's cross-attention modules by name."""
    return {name: m for name, m in denoiser.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


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
        return nag_attention(*outputs, c.scale, c.tau, c.alpha, c.p)


class CrossAttentionNAG:
    """NAG in the cross-attention layers: the processors told the positive rows around each forward."""

    def __init__(self, processors: list[NAGAttention]) -> None:
        self.processors = processors

    def run(self, forward: Callable[[tuple, dict], Any], args: tuple, kwargs: dict, positive: torch.Tensor) -> Any:
        for processor in self.processors:
            processor.positive = positive
        try:
            return forward(args, kwargs)
        finally:
            for processor in self.processors:
                processor.positive = None


@contextmanager
def nag_processors(denoiser: torch.nn.Module, change: NegativePromptAttention, negative: torch.Tensor
                   ) -> Iterator[CrossAttentionNAG]:
    """Install :class:`NAGAttention` on every cross-attention module for the block; yield their runner; put the
    modules' own processors back after."""
    modules = cross_attention_modules(denoiser)
    saved = {name: m.processor for name, m in modules.items()}
    processors = []
    try:
        for name, m in modules.items():
            processor = NAGAttention(saved[name], change, negative)
            m.processor = processor
            processors.append(processor)
        yield CrossAttentionNAG(processors)
    finally:
        for name, m in modules.items():
            m.processor = saved[name]


class _Shadows(NamedTuple):
    """A forward's positive rows, their shadow rows, each row's source of time embedding in the double-stream
    image stream, and the number of text tokens."""

    positive: torch.Tensor
    shadow: torch.Tensor
    source: torch.Tensor
    text: int


class JointAttentionNAG:
    """NAG in Flux's joint attention (module docstring): the shadow rows of one forward, its processors and hooks
    read them.

    Args:
        change: NAG's weights.
        text: the negative prompt's text embeddings ``(1, T, D)``.
        pooled: its pooled embedding ``(1, P)``.
    """

    def __init__(self, change: NegativePromptAttention, text: torch.Tensor, pooled: torch.Tensor) -> None:
        self.change = change
        self.text = text
        self.pooled = pooled
        self.shadows: _Shadows | None = None

    def run(self, forward: Callable[[tuple, dict], Any], args: tuple, kwargs: dict, positive: torch.Tensor) -> Any:
        if args:
            raise ValueError("guidance NAG is not accepted here: the transformer was called with positional "
                             "arguments; expected FluxPipeline's keyword call")
        hidden, prompt = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        if prompt.shape[1] != self.text.shape[1]:
            raise ValueError(f"encoder_hidden_states has {prompt.shape[1]} text tokens and NAG's negative prompt "
                             f"{self.text.shape[1]}; expected the pipeline call's max_sequence_length for both")
        n, k = hidden.shape[0], len(positive)
        positive = positive.to(hidden.device)
        extended = dict(kwargs)
        for name in ("hidden_states", "timestep", "guidance"):
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
                extended[name] = torch.cat([value, value[positive]])
        extended["encoder_hidden_states"] = torch.cat([prompt, self.text.to(prompt).expand(k, -1, -1)])
        pooled = kwargs["pooled_projections"]
        extended["pooled_projections"] = torch.cat([pooled, self.pooled.to(pooled).expand(k, -1)])
        source = torch.cat([torch.arange(n, device=hidden.device), positive])
        self.shadows = _Shadows(positive, torch.arange(n, n + k, device=hidden.device), source, prompt.shape[1])
        try:
            result = forward((), extended)
        finally:
            self.shadows = None
        if isinstance(result, tuple):
            return (result[0][:n], *result[1:])
        result.sample = result.sample[:n]
        return result

    def image_stream_time(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of a double-stream block's image ``norm1``: the shadow rows take their positive row's
        time embedding."""
        if self.shadows is not None:
            kwargs = {**kwargs, "emb": kwargs["emb"][self.shadows.source]}
        return args, kwargs


class JointNAGAttention:
    """A Flux joint-attention processor: diffusers' ``FluxAttnProcessor`` arithmetic, with NAG's output of each
    positive row and its shadow in the image tokens of both (module docstring); ``original`` when the forward has
    no shadow rows."""

    def __init__(self, original: Any, runner: JointAttentionNAG) -> None:
        self.original = original
        self.runner = runner

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None, **kwargs: Any) -> Any:
        shadows = self.runner.shadows
        if shadows is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 **kwargs)
        if attention_mask is not None or kwargs:
            raise ValueError("guidance NAG is not accepted with an attention mask or IP-Adapter inputs in Flux's "
                             "attention; expected FluxPipeline's plain joint attention")
        heads = (-1, attn.head_dim)
        query, key, value = (attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads)),
                             attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads)),
                             attn.to_v(hidden_states).unflatten(-1, heads))
        text = shadows.text
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, heads)), query],
                              dim=1)
            key = torch.cat([attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, heads)), key],
                            dim=1)
            value = torch.cat([attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        c = self.runner.change
        guided = nag_attention(out[shadows.positive, text:], out[shadows.shadow, text:], c.scale, c.tau, c.alpha,
                               c.p)
        out = out.clone()
        out[shadows.positive, text:] = guided
        out[shadows.shadow, text:] = guided
        if encoder_hidden_states is None:
            return out
        return attn.to_out[1](attn.to_out[0](out[:, text:].contiguous())), attn.to_add_out(out[:, :text].contiguous())


@contextmanager
def joint_nag(denoiser: torch.nn.Module, change: NegativePromptAttention, text: torch.Tensor, pooled: torch.Tensor
              ) -> Iterator[JointAttentionNAG]:
    """Install :class:`JointNAGAttention` on every Flux attention module and the time-embedding hook on every
    double-stream block's image ``norm1`` for the block; yield the runner; put everything back after."""
    runner = JointAttentionNAG(change, text, pooled)
    modules = {name: m for name, m in denoiser.named_modules() if isinstance(m, FluxAttention)}
    saved = {name: m.processor for name, m in modules.items()}
    hooks = []
    try:
        for name, m in modules.items():
            m.processor = JointNAGAttention(saved[name], runner)
        for block in denoiser.modules():
            if isinstance(block, FluxTransformerBlock):
                hooks.append(block.norm1.register_forward_pre_hook(runner.image_stream_time, with_kwargs=True))
        yield runner
    finally:
        for hook in hooks:
            hook.remove()
        for name, m in modules.items():
            m.processor = saved[name]
