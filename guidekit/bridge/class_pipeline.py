"""A class-conditional pixel-space diffusion pipeline for ``UNet2DModel`` with class embeddings.

diffusers has no pipeline for a class-conditional UNet in pixel space (``DDPMPipeline`` is unconditional, DiT
works in a VAE latent space), so guidekit's embedded default model comes with this one. It batches
``[uncond; cond]`` rows in one call under CFG, as SD's pipeline does, so ``set_guidance`` runs on it unchanged.
Class id ``num_classes`` (the UNet's last class embedding) is the null class the model was trained with
through label dropout.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from guidekit.validation import check_int

OUTPUT_TYPES = ("pil", "np", "pt")


def check_call(class_labels: object, num_classes: int, num_inference_steps: object) -> torch.Tensor:
    """The class ids as a long tensor ``(N,)``; a ``ValueError`` for ids outside ``[0, num_classes]`` or a step
    count below 1. Id ``num_classes`` is the null class."""
    labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels,
                             dtype=torch.long).reshape(-1)
    if bool(((labels < 0) | (labels > num_classes)).any()):
        raise ValueError(f"class_labels={labels.tolist()} are not accepted; expected ids in "
                         f"[0, {num_classes}] ({num_classes} = unconditional)")
    check_int("num_inference_steps", num_inference_steps, low=1)
    return labels


def denoise_with_cfg(pipe: DiffusionPipeline, model: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor,
                     null_label: int, guidance_scale: float,
                     generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """SD's sampling loop over ``pipe.scheduler``'s timesteps (already set) for a class-conditional ``model``.

    Under CFG (``guidance_scale > 1``) each call holds ``[uncond; cond]`` rows, the unconditional ones labelled
    ``null_label``, and the pipeline combines them as ``u + w (c - u)``. ``step`` gets the generator (one, or one per
    image, as diffusers' pipelines pass it) when it takes one, so stochastic samplers draw their noise from the
    images' seeds.
    """
    do_cfg = guidance_scale > 1
    model_labels = torch.cat([torch.full_like(labels, null_label), labels]) if do_cfg else labels
    accepts_generator = "generator" in inspect.signature(pipe.scheduler.step).parameters
    step_kwargs = {"generator": generator} if accepts_generator else {}
    for t in pipe.progress_bar(pipe.scheduler.timesteps):
        model_input = torch.cat([latents, latents]) if do_cfg else latents
        model_input = pipe.scheduler.scale_model_input(model_input, t)
        pred = model(model_input, t, class_labels=model_labels).sample
        if do_cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        latents = pipe.scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return latents


class ClassConditionalPipeline(DiffusionPipeline):
    """Sample images of given classes from a class-conditional ``UNet2DModel`` trained with a null class."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: object) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        """Real classes; id ``num_classes`` is the null class."""
        return int(self.unet.config.num_class_embeds) - 1

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | int, num_inference_steps: int = 20, guidance_scale: float = 1.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Draw one image per entry of ``class_labels``.

        Args:
            class_labels: class ids in ``[0, num_classes]`` (``num_classes`` = unconditional).
            num_inference_steps: solver steps, ``>= 1``.
            guidance_scale: CFG weight ``w`` (``1`` = none); the unconditional rows run when ``> 1``.
            generator: one generator, or one per image (per-image seeds).
            latents: initial noise ``(N, C, H, W)`` at unit scale.
            output_type: ``"pil"``, ``"np"`` (float NHWC in [0, 1]) or ``"pt"`` (float NCHW in [0, 1]).
        """
        labels = check_call(class_labels, self.num_classes, num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not accepted; expected one of {', '.join(OUTPUT_TYPES)}")
        unet, device = self.unet, self.unet.device
        size = unet.config.sample_size
        shape = (len(labels), unet.config.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
        # init_noise_sigma depends on the timesteps (Euler, Heun: the first sigma), so set them first, as diffusers'
        # pipelines do; before set_timesteps it is the training table's last sigma (cosine schedule: about 6e3).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents.to(device, unet.dtype) * self.scheduler.init_noise_sigma
        latents = denoise_with_cfg(self, unet, latents, labels.to(device), self.num_classes, guidance_scale, generator)
        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            out = images
        else:
            out = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(np.asarray(out))
        return ImagePipelineOutput(images=out) if return_dict else (out,)
