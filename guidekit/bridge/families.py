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
    """

    denoiser: str
    cond_first: bool = False
    scale_arg: str = "guidance_scale"
    unsupported_args: tuple[str, ...] = ()


_UNET = Family("unet")
_TRANSFORMER = Family("transformer")
_SD3 = Family("transformer", unsupported_args=("skip_guidance_layers",))

#: Pipeline class name -> family. Every entry calls its denoiser once per step with the
#: unconditional and conditional rows batched.
FAMILIES: dict[str, Family] = {
    **dict.fromkeys((
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
        "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline",
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
        "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
        "StableDiffusionXLControlNetInpaintPipeline",
    ), _UNET),
    "DiTPipeline": Family("transformer", cond_first=True),
    **dict.fromkeys(("PixArtAlphaPipeline", "PixArtSigmaPipeline", "SanaPipeline"), _TRANSFORMER),
    **dict.fromkeys(("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                     "StableDiffusion3InpaintPipeline"), _SD3),
}


def family_of(pipeline: object) -> Family:
    """The family of ``pipeline``'s class (or of the class it was guided from)."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in FAMILIES and not getattr(cls, "_guidekit_guided", False):
            return FAMILIES[cls.__name__]
    raise ValueError(f"pipeline={type(pipeline).__name__} is not supported by set_guidance; supported: "
                     f"{', '.join(sorted(FAMILIES))}")
