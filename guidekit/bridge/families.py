"""The diffusers pipelines guidekit supports and how each batches its denoiser call (REFERENCE 2)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How a pipeline class calls its denoiser under CFG.

    Attributes:
        denoiser: the pipeline attribute that holds the denoiser (``unet`` or ``transformer``).
        cond_first: batch order of the CFG call: ``[cond; uncond]`` (DiT) or ``[uncond; cond]``.
        scale_arg: the ``__call__`` argument that turns the unconditional branch on when ``> 1``.
        unsupported_args: ``__call__`` arguments that add denoiser calls guidekit does not handle.
        separate_calls: the pipeline makes two calls per step, conditional then unconditional, instead
            of one batched call (Flux's true CFG).
        negative_args: for separate calls, the ``__call__`` arguments of which one must be given for the
            unconditional call to happen.
        unbatched_args: denoiser arguments that never carry the batch (token positions).
        scale_offset: the pipeline's scale argument is the CFG weight minus this (Z-Image's ``guidance_scale`` is
            ``w - 1``: its rule is ``c + g (c - u)``).
        list_rows: the denoiser takes its rows as Python lists (Z-Image's latents and captions, one tensor per row)
            and returns a list; every list argument with one entry per row is cut with the rows.
        negated_output: the denoiser outputs the negative of the scheduler's prediction (Lumina2: time runs from noise
            to image); guidance runs on the negated outputs and the result is negated back.
        neutral_args: ``__call__`` arguments that must keep the given value under ``set_guidance`` (they would
            change which calls the pipeline makes).
        condition_tokens: the denoiser's input has image-condition tokens appended after the latent's, marked by a
            first ``token_positions`` coordinate other than 0 (Flux Kontext) or following the first grid of
            ``token_shapes`` (Qwen-Image-Edit); the guidance sees the latent's tokens, the others pass through from
            the conditional prediction (the pipeline drops them).
        second_dim_batched: denoiser arguments whose batch is their second dimension (HiDream's per-layer Llama
            states, ``(layers, B, L, D)``).
        per_sample_lists: denoiser arguments that are Python lists with one entry per row (Qwen-Image's
            ``img_shapes``), cut with the rows.
        token_shapes: for a denoiser of packed 2 x 2 tokens, the argument that holds each sample's list of
            ``(frames, rows, columns)`` token grids, the generated image's first (Qwen-Image's ``img_shapes``); the
            guidance context's ``grid`` is read from it.
        experts: further denoiser attributes the pipeline switches to during sampling, each with its own scale
            argument in ``expert_scale_args`` (Wan 2.2's low-noise ``transformer_2`` and ``guidance_scale_2``; a
            ``None`` argument means ``scale_arg``'s value, an absent module no expert).
        expert_scale_args: the scale argument of each expert in ``experts``.
        token_positions: for a denoiser of packed latents (each token a 2 x 2 patch), the argument that holds the
            tokens' positions, ``(N, 3)`` rows ``[0, row, column]`` (Flux's ``img_ids``); the guidance context's
            ``grid`` is read from it.
        channel_dim: the dimension of the latent's channels, along which a denoiser's input can carry more than its
            output (a condition's latent concatenated, a learned variance appended to the output): 1, or 2 for
            latents laid out ``(B, F, C, H, W)`` (CogVideoX).
    """

    denoiser: str
    cond_first: bool = False
    scale_arg: str = "guidance_scale"
    unsupported_args: tuple[str, ...] = ()
    separate_calls: bool = False
    negative_args: tuple[str, ...] = ()
    unbatched_args: tuple[str, ...] = ()
    token_positions: str | None = None
    scale_offset: float = 0.0
    list_rows: bool = False
    negated_output: bool = False
    neutral_args: tuple[tuple[str, float], ...] = ()
    condition_tokens: bool = False
    second_dim_batched: tuple[str, ...] = ()
    per_sample_lists: tuple[str, ...] = ()
    token_shapes: str | None = None
    channel_dim: int = 1
    experts: tuple[str, ...] = ()
    expert_scale_args: tuple[str, ...] = ()

    def weight(self, value: float | None) -> float | None:
        """The CFG weight ``w`` that the pipeline's scale argument ``value`` means."""
        return None if value is None else value + self.scale_offset


_UNET = Family("unet")
_TRANSFORMER = Family("transformer")
_SD3 = Family("transformer", unsupported_args=("skip_guidance_layers",))

#: Pipeline class name -> family. Entries without ``separate_calls`` call their denoiser once per step with the
#: unconditional and conditional rows batched.
FAMILIES: dict[str, Family] = {
    **dict.fromkeys((
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
        "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline",
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
        "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
        "StableDiffusionXLControlNetInpaintPipeline",
        "ClassConditionalPipeline",
    ), _UNET),
    "DiTPipeline": Family("transformer", cond_first=True),
    **dict.fromkeys(("PixArtAlphaPipeline", "PixArtSigmaPipeline", "SanaPipeline", "MixturePipeline"), _TRANSFORMER),
    **dict.fromkeys(("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                     "StableDiffusion3InpaintPipeline"), _SD3),
    # Flux's guidance_scale is a distilled embedding; true CFG is two calls per step with a negative prompt.
    **dict.fromkeys(("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
                    Family("transformer", scale_arg="true_cfg_scale", separate_calls=True,
                           negative_args=("negative_prompt", "negative_prompt_embeds"),
                           unbatched_args=("txt_ids", "img_ids"), token_positions="img_ids")),
    # Flux Kontext: Flux's true CFG with the reference image's tokens appended to the latent's.
    "FluxKontextPipeline": Family("transformer", scale_arg="true_cfg_scale", separate_calls=True,
                                  negative_args=("negative_prompt", "negative_prompt_embeds"),
                                  unbatched_args=("txt_ids", "img_ids"), token_positions="img_ids",
                                  condition_tokens=True),
    # Qwen-Image: true CFG in two calls with a negative prompt; the pipeline rescales each token of the result to
    # the conditional prediction's norm.
    **dict.fromkeys(("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
                    Family("transformer", scale_arg="true_cfg_scale", separate_calls=True,
                           negative_args=("negative_prompt", "negative_prompt_embeds"),
                           per_sample_lists=("img_shapes",), token_shapes="img_shapes")),
    # Qwen-Image-Edit (Edit-2509: several images per prompt; inpainting): Qwen-Image's, with the reference images'
    # tokens appended to the latent's; img_shapes lists the latent's grid, then each image's.
    **dict.fromkeys(("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"),
                    Family("transformer", scale_arg="true_cfg_scale", separate_calls=True,
                           negative_args=("negative_prompt", "negative_prompt_embeds"),
                           per_sample_lists=("img_shapes",), token_shapes="img_shapes", condition_tokens=True)),
    # Lumina2: two calls; the transformer outputs the negated velocity; cfg_trunc_ratio < 1 drops the unconditional
    # call in late steps (Interval does that in sigma); cfg_normalization rescales the result after CFG.
    "Lumina2Pipeline": Family("transformer", separate_calls=True, negated_output=True,
                              neutral_args=(("cfg_trunc_ratio", 1.0),)),
    # HiDream: one batched call; the transformer outputs the negated velocity (the pipeline negates before CFG).
    "HiDreamImagePipeline": Family("transformer", negated_output=True,
                                   second_dim_batched=("encoder_hidden_states_llama3",)),
    # Z-Image: one call on lists of rows [cond; uncond]; guidance_scale is w - 1; the output is the negated velocity;
    # cfg_truncation < 1 drops the unconditional rows in late steps.
    "ZImagePipeline": Family("transformer", cond_first=True, scale_offset=1.0, list_rows=True, negated_output=True,
                             neutral_args=(("cfg_truncation", 1.0),)),
    # HunyuanVideo: Flux-like true CFG (true_cfg_scale and a negative prompt; guidance_scale is distilled), video.
    # Image-to-video: the same two calls, the image's latent and a mask concatenated on the channels (dim 1).
    **dict.fromkeys(("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"),
                    Family("transformer", scale_arg="true_cfg_scale", separate_calls=True,
                           negative_args=("negative_prompt", "negative_prompt_embeds"))),
    # CogView4: real CFG in two calls (the negative prompt defaults to "").
    "CogView4Pipeline": Family("transformer", separate_calls=True),
    # Chroma: real CFG (guidance_scale) in two calls, on Flux's packed latents.
    **dict.fromkeys(("ChromaPipeline", "ChromaImg2ImgPipeline"),
                    Family("transformer", separate_calls=True, unbatched_args=("txt_ids", "img_ids"),
                           token_positions="img_ids")),
    **dict.fromkeys(("LTXPipeline", "LTXImageToVideoPipeline"), _TRANSFORMER),
    # CogVideoX's dynamic CFG changes the weight per step inside the pipeline. Image-to-video: the image's latent is
    # concatenated on the channels (dim 2), and the "ofs" embedding's one-element tensor is passed beside the batch.
    **dict.fromkeys(("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
                    Family("transformer", unsupported_args=("use_dynamic_cfg",), channel_dim=2)),
    # Wan 2.1 / 2.2: two calls per step; 2.2 switches to transformer_2 (guidance_scale_2) below its boundary.
    **dict.fromkeys(("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
                    Family("transformer", separate_calls=True, experts=("transformer_2",),
                           expert_scale_args=("guidance_scale_2",))),
}


def family_of_class(pipeline_class: type) -> Family:
    """The family of a pipeline class (or of the class it was guided from)."""
    for cls in pipeline_class.__mro__:
        if cls.__name__ in FAMILIES and not getattr(cls, "_guidekit_guided", False):
            return FAMILIES[cls.__name__]
    raise ValueError(f"pipeline={pipeline_class.__name__} is not supported by set_guidance; supported: "
                     f"{', '.join(sorted(FAMILIES))}")
