"""Tiny random-weight diffusers pipelines, built offline and deterministically.

The pipelines mirror the structure of real checkpoints (text encoders, tokenizers, schedulers and their
configurations) at toy sizes, so tests, benchmarks and demos can exercise the real diffusers code paths in
well under a second on a CPU without downloading anything. Tokenizers are character-level and built in
memory; every module is seeded before construction, so equal arguments give bitwise-equal pipelines.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    ChromaPipeline,
    ChromaTransformer2DModel,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
    HunyuanVideoImageToVideoPipeline,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import (
    DEFAULT_PROMPT_TEMPLATE as I2V_PROMPT_TEMPLATE,
)
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    GlmConfig,
    GlmModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    LlamaTokenizerFast,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = [
    "DEFAULT_SAMPLE_SIZE",
    "FAMILIES",
    "VIDEO_FAMILIES",
    "build_sd15_architecture_pipeline",
    "build_tiny_controlnet_pipeline",
    "build_tiny_pipeline",
    "random_picture",
    "tiny_call_kwargs",
]

FAMILIES: tuple[str, ...] = (
    "sd", "sd-v", "sdxl", "dit", "pixart", "sd3", "sana", "flux", "fluxkontext", "chroma", "qwenimage",
    "qwenimage-edit", "qwenimage-editplus", "lumina2", "hidream", "zimage", "cogview4", "wan", "wan22", "wan22-i2v",
    "hunyuanvideo", "hunyuanvideo-i2v", "ltx", "cogvideox", "cogvideox-i2v",
)

DEFAULT_SAMPLE_SIZE = 16
"""Default latent side length; every tiny autoencoder downsamples by 2, so images are 32 x 32 pixels."""

_VAE_SCALE_FACTOR = 2
_TEXT_DIM = 32
_MAX_SEQUENCE_LENGTH = 16
_HUNYUAN_LLAMA_LAYERS = 3  # the pipeline reads hidden_states[-3]: with 3 layers that is the first layer's output
#: Llama 3's pre-tokenizer split (its tokenizer.json), applied before the byte-level mapping.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_HUNYUAN_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


_GLM_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>")


_LONG_CLIP_POSITIONS = 248  # HiDream's CLIP encoders are Long-CLIP; its pipeline pads CLIP to up to 218 tokens
_HIDREAM_LLAMA_LAYERS = 2
_NUM_FRAMES = 9
#: The video families: their pipelines return ``frames``; their latents are ``(B, C, T, H, W)`` (Wan),
#: ``(B, T, C, H, W)`` (CogVideoX) or packed tokens ``(B, T * H * W, C)`` (LTX).
VIDEO_FAMILIES: tuple[str, ...] = ("wan", "wan22", "wan22-i2v", "hunyuanvideo", "hunyuanvideo-i2v", "ltx",
                                   "cogvideox", "cogvideox-i2v")
#: Pixels per latent pixel of each family whose VAE is not the two-level AutoencoderKL.
_PIXELS_PER_LATENT = {"wan": 8, "wan22": 8, "wan22-i2v": 8, "hunyuanvideo": 8, "hunyuanvideo-i2v": 8, "ltx": 4,
                      "cogvideox": 8, "cogvideox-i2v": 8, "qwenimage": 4, "lumina2": 8, "qwenimage-edit": 64,
                      "qwenimage-editplus": 64}
_CHARS = string.digits + string.ascii_letters + string.punctuation

_M = TypeVar("_M", bound=nn.Module)


def build_tiny_pipeline(
    family: str,
    *,
    seed: int = 0,
    sample_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline of ``family`` (one of :data:`FAMILIES`).

    ``sample_size`` is the latent side length (default :data:`DEFAULT_SAMPLE_SIZE`; even, and a multiple
    of 16 for "sana"). The caller's global torch RNG is left untouched.
    """
    pipe = _build(family, seed, sample_size)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_tiny_controlnet_pipeline(
    *,
    seed: int = 0,
    sample_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionControlNetPipeline:
    """Build the tiny "sd" pipeline with a tiny ControlNet derived from its UNet.

    The control image must have the pipeline's pixel size (``tiny_call_kwargs("sd")["height"]``).
    """
    base = build_tiny_pipeline("sd", seed=seed, sample_size=sample_size)
    with torch.random.fork_rng(devices=[]):
        controlnet = _init(
            seed + 100, ControlNetModel.from_unet, base.unet, conditioning_embedding_out_channels=(16, 32)
        )
    _perturb(controlnet, seed + 100)  # ControlNet's zero convolutions would otherwise make it a no-op
    pipe = StableDiffusionControlNetPipeline(
        **base.components, controlnet=controlnet, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_call_kwargs(family: str, batch_size: int = 1, *, sample_size: int | None = None) -> dict[str, Any]:
    """Return conditioning kwargs for a valid call of the tiny ``family`` pipeline with ``batch_size`` images.

    Pass the ``sample_size`` used to build the pipeline. Step count, guidance scale, generator and output
    type are left to the caller; for the families whose true CFG needs one ("flux", "fluxkontext", "qwenimage",
    "qwenimage-edit", "qwenimage-editplus", "hunyuanvideo", "hunyuanvideo-i2v") a negative prompt is included so
    ``true_cfg_scale > 1`` works. "hunyuanvideo-i2v" takes one prompt per call: its pipeline encodes the negative
    prompts with one black image, which fails for more than one. "qwenimage-editplus" takes one prompt per call too
    (its pipeline refuses more), with two reference images; "qwenimage-edit" gets one reference image per prompt.
    """
    size = _check_size(family, sample_size)
    if family == "hunyuanvideo-i2v" and batch_size != 1:
        raise ValueError(f"batch_size={batch_size} is not accepted for 'hunyuanvideo-i2v': its pipeline encodes the "
                         "negative prompts with one black image, so true CFG runs one prompt per call; expected 1")
    if family == "qwenimage-editplus" and batch_size != 1:
        raise ValueError(f"batch_size={batch_size} is not accepted for 'qwenimage-editplus': its pipeline runs one "
                         "prompt per call; expected 1")
    if family == "dit":
        return {"class_labels": [1] * batch_size}
    side = size * _PIXELS_PER_LATENT.get(family, _VAE_SCALE_FACTOR)
    kwargs: dict[str, Any] = {"prompt": ["a red cat"] * batch_size, "height": side, "width": side}
    if family in VIDEO_FAMILIES:
        kwargs["num_frames"] = _NUM_FRAMES
    if family in ("fluxkontext", "wan22-i2v"):  # the reference image, at the generated size
        kwargs["image"] = torch.rand((1, 3, side, side), generator=torch.Generator().manual_seed(1))
    if family == "cogvideox-i2v":  # one image per prompt: the pipeline encodes each row's own
        kwargs["image"] = torch.rand((batch_size, 3, side, side), generator=torch.Generator().manual_seed(1))
    if family == "hunyuanvideo-i2v":  # a PIL image, as the pipeline's Llava image processor takes it
        kwargs["image"] = random_picture(side, 1)
    if family == "qwenimage-edit":  # PIL images (the pipeline reads their size), one per prompt's image placeholder
        kwargs["image"] = [random_picture(side, 1)] * batch_size
    if family == "qwenimage-editplus":  # two reference images for the one prompt ("Picture 1", "Picture 2")
        kwargs["image"] = [random_picture(side, 1), random_picture(side, 2)]
    if family in ("pixart", "sd3", "sana", "flux", "fluxkontext", "chroma", "lumina2", "hidream", "zimage", "cogview4",
                  *VIDEO_FAMILIES):
        kwargs["max_sequence_length"] = _MAX_SEQUENCE_LENGTH
    if family == "hunyuanvideo-i2v":  # room for the negative prompt and the template's assistant header after it
        kwargs["max_sequence_length"] = 2 * _MAX_SEQUENCE_LENGTH
    if family in ("pixart", "sana"):
        kwargs["use_resolution_binning"] = False
        kwargs["clean_caption"] = False
    if family == "sana":
        kwargs["complex_human_instruction"] = None
    if family in ("flux", "fluxkontext", "qwenimage", "qwenimage-edit", "qwenimage-editplus", "hunyuanvideo",
                  "hunyuanvideo-i2v"):
        kwargs["negative_prompt"] = ["a blurry photo"] * batch_size
    if family == "fluxkontext":  # no resizing to Kontext's areas
        kwargs["max_area"], kwargs["_auto_resize"] = side * side, False
    return kwargs


def build_sd15_architecture_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture at full size (UNet 860M, VAE, CLIP ViT-L/14 text encoder) with random
    weights, built offline: for GPU benchmarks where speed and memory, not image quality, matter.

    The text encoder has CLIP-L's shape with the character-level vocabulary of the tiny pipelines.
    """
    vae = _init(seed, AutoencoderKL, in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                scaling_factor=0.18215)
    unet = _init(seed + 1, UNet2DConditionModel, sample_size=64, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                 cross_attention_dim=768, norm_num_groups=32)
    text_config = CLIPTextConfig(vocab_size=2 + 2 * len(_CHARS), hidden_size=768, intermediate_size=3072,
                                 projection_dim=768, num_hidden_layers=12, num_attention_heads=12,
                                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=_init(seed + 2, CLIPTextModel, text_config), tokenizer=_clip_tokenizer(), unet=unet,
        scheduler=_sd_scheduler("epsilon"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _check_size(family: str, sample_size: int | None) -> int:
    """Validate ``family`` and return the latent side length to use."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    size = DEFAULT_SAMPLE_SIZE if sample_size is None else sample_size
    # Sana requires pixel sizes divisible by 32; patch-2 transformers and Flux packing need even latents.
    multiple = 16 if family == "sana" else 2
    if size <= 0 or size % multiple:
        raise ValueError(f"sample_size for {family!r} must be a positive multiple of {multiple}, got {size}")
    return size


def _build(family: str, seed: int, sample_size: int | None) -> DiffusionPipeline:
    """Build a fresh float32 pipeline without disturbing the caller's global RNG."""
    size = _check_size(family, sample_size)
    with torch.random.fork_rng(devices=[]):
        return _BUILDERS[family](seed, size)


def random_picture(side: int, seed: int) -> Image.Image:
    """A seeded random RGB PIL image of ``side`` x ``side`` pixels (the image inputs of the tiny pipelines and their
    variants)."""
    pixels = torch.rand((side, side, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((pixels * 255).to(torch.uint8).numpy())


def _init(seed: int, factory: Callable[..., _M], *args: Any, **kwargs: Any) -> _M:
    """Seed the global RNG, construct a module and put it in eval mode."""
    torch.manual_seed(seed)
    return factory(*args, **kwargs).eval()


@torch.no_grad()
def _perturb(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Add seeded Gaussian noise to every parameter, so zero-initialised layers become active."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def _clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP tokenizer (every character and its word-final form, no merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _CHARS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_text_encoder(seed: int, *, projection: bool, positions: int = 77
                       ) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Two-layer CLIP text encoder matching :func:`_clip_tokenizer`, optionally with a text projection, with
    ``positions`` token positions (Long-CLIP: 248)."""
    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(_CHARS),
        hidden_size=_TEXT_DIM,
        intermediate_size=2 * _TEXT_DIM,
        projection_dim=_TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=positions,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return _init(seed, CLIPTextModelWithProjection if projection else CLIPTextModel, config)


def _t5(seed: int, d_model: int = _TEXT_DIM) -> tuple[T5Tokenizer, T5EncoderModel]:
    """Character-level unigram T5 tokenizer and a two-layer gated-GELU T5 encoder (T5 v1.1 style)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(char, -1.0) for char in _CHARS]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return tokenizer, _init(seed, T5EncoderModel, config)


def _gemma(seed: int) -> tuple[GemmaTokenizer, Gemma2Model]:
    """Character-level Gemma tokenizer (adds ``<bos>``) and a two-layer Gemma2 decoder used as encoder."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for char in _CHARS:
        vocab[char] = len(vocab)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, model_max_length=8192)
    config = Gemma2Config(
        vocab_size=len(vocab),
        hidden_size=_TEXT_DIM,
        intermediate_size=2 * _TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    return tokenizer, _init(seed, Gemma2Model, config)


def _autoencoder_kl(
    seed: int, size: int, *, latent_channels: int, scaling_factor: float, shift_factor: float | None = None
) -> AutoencoderKL:
    """Two-level AutoencoderKL (downsampling by 2); a shift factor implies no quant convs (SD3/Flux style)."""
    return _init(
        seed,
        AutoencoderKL,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=size * _VAE_SCALE_FACTOR,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )


def _unet(seed: int, size: int, cross_attention_dim: int, **extra: Any) -> UNet2DConditionModel:
    """Two-level UNet with cross-attention in the lower level (SD layout at toy width)."""
    return _init(
        seed,
        UNet2DConditionModel,
        sample_size=size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
        **extra,
    )


def _sd_scheduler(prediction_type: str) -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.5's training schedule."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def _build_sd(seed: int, size: int, prediction_type: str) -> StableDiffusionPipeline:
    """SD 1.5 ("epsilon") or SD 2.x ("v_prediction") layout with DDIM."""
    scheduler = _sd_scheduler(prediction_type)
    return StableDiffusionPipeline(
        vae=_autoencoder_kl(seed + 1, size, latent_channels=4, scaling_factor=0.18215),
        text_encoder=_clip_text_encoder(seed + 2, projection=False),
        tokenizer=_clip_tokenizer(),
        unet=_unet(seed, size, cross_attention_dim=_TEXT_DIM),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int, size: int) -> StableDiffusionXLPipeline:
    """SDXL layout: two CLIP encoders (the second projected), text-time added conditioning, Euler."""
    time_embed_dim = 8
    unet = _unet(
        seed,
        size,
        cross_attention_dim=2 * _TEXT_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + _TEXT_DIM,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
        use_karras_sigmas=False,
    )
    return StableDiffusionXLPipeline(
        vae=_autoencoder_kl(seed + 1, size, latent_channels=4, scaling_factor=0.13025),
        text_encoder=_clip_text_encoder(seed + 2, projection=False),
        text_encoder_2=_clip_text_encoder(seed + 3, projection=True),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def _build_dit(seed: int, size: int) -> DiTPipeline:
    """Class-conditional DiT (adaLN-zero, learned sigma, patch 2) with DiT's DDIM configuration."""
    transformer = _init(
        seed,
        DiTTransformer2DModel,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=size,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    # Reference DiT zero-initialises adaLN-zero modulation (diffusers does not); perturb so none is inert.
    _perturb(transformer, seed)
    scheduler = DDIMScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, clip_sample=False
    )
    vae = _autoencoder_kl(seed + 1, size, latent_channels=4, scaling_factor=0.18215)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)


def _build_pixart(seed: int, size: int) -> PixArtSigmaPipeline:
    """PixArt-Sigma layout: adaLN-single transformer with learned sigma, T5 encoder, DPM-Solver++."""
    tokenizer, text_encoder = _t5(seed + 2)
    transformer = _init(
        seed,
        PixArtTransformer2DModel,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        caption_channels=_TEXT_DIM,
        sample_size=size,
        patch_size=2,
        norm_type="ada_norm_single",
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_autoencoder_kl(seed + 1, size, latent_channels=4, scaling_factor=0.13025),
        transformer=transformer,
        scheduler=scheduler,
    )


def _build_sd3(seed: int, size: int) -> StableDiffusion3Pipeline:
    """SD3 layout: MMDiT, two projected CLIP encoders plus T5, 16-channel VAE, shifted flow matching."""
    # SD3 zero-pads the concatenated CLIP states up to the T5 width, so T5 must be at least as wide.
    tokenizer_3, text_encoder_3 = _t5(seed + 4, d_model=2 * _TEXT_DIM)
    transformer = _init(
        seed,
        SD3Transformer2DModel,
        sample_size=size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=2 * _TEXT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _TEXT_DIM,
        pos_embed_max_size=size,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_autoencoder_kl(seed + 1, size, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text_encoder(seed + 2, projection=True),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_text_encoder(seed + 3, projection=True),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_sana(seed: int, size: int) -> SanaPipeline:
    """Sana layout: linear-attention transformer, deep-compression AE, Gemma2, flow DPM-Solver++."""
    tokenizer, text_encoder = _gemma(seed + 2)
    transformer = _init(
        seed,
        SanaTransformer2DModel,
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=_TEXT_DIM,
        sample_size=size,
        patch_size=1,
    )
    vae = _init(
        seed + 1,
        AutoencoderDC,
        in_channels=3,
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(16, 32),
        decoder_block_out_channels=(16, 32),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="stride_conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _build_flux(seed: int, size: int) -> FluxPipeline:
    """FLUX.1-dev layout: guidance-embedded MMDiT on packed latents, CLIP pooled + T5, dynamic shift."""
    tokenizer_2, text_encoder_2 = _t5(seed + 3)
    transformer = _init(
        seed,
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_DIM,
        pooled_projection_dim=_TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_autoencoder_kl(seed + 1, size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_encoder(seed + 2, projection=False),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _byte_vocab(specials: tuple[str, ...]) -> dict[str, int]:
    """A byte-level vocabulary without merges: the 256 byte characters (GPT-2's mapping), then ``specials``."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for special in specials:
        vocab[special] = len(vocab)
    return vocab


def _byte_bpe(vocab: dict[str, int], prefix: tuple[str, ...], pre_tokenizer: Any = None) -> Tokenizer:
    """A byte-level BPE tokenizer over ``vocab`` without merges (a whole pre-token found in the vocabulary is one
    token), prepending the ``prefix`` specials to every text."""
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    head = " ".join(prefix)
    backend.post_processor = processors.TemplateProcessing(single=f"{head} $A", pair=f"{head} $A {head} $B",
                                                           special_tokens=[(t, vocab[t]) for t in prefix])
    return backend


def _llama_config(vocab: dict[str, int], layers: int, pad: str, **extra: Any) -> LlamaConfig:
    """A Llama 3-style decoder config of width ``_TEXT_DIM`` over ``vocab`` (bos ``<|begin_of_text|>``, eos
    ``<|eot_id|>``, padding ``pad``)."""
    return LlamaConfig(vocab_size=len(vocab), hidden_size=_TEXT_DIM, intermediate_size=2 * _TEXT_DIM,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=1024, bos_token_id=vocab["<|begin_of_text|>"],
                       eos_token_id=vocab["<|eot_id|>"], pad_token_id=vocab[pad],
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **extra)


def _qwen(seed: int, *, vision: bool = False) -> tuple[Qwen2Tokenizer, Qwen2_5_VLForConditionalGeneration]:
    """Byte-level Qwen2 tokenizer without merges (each byte a token, plus the chat and vision specials) and a
    two-layer Qwen2.5-VL with a two-block vision tower, as Qwen-Image's text encoder. With ``vision`` (the edit
    pipelines, whose prompts hold images) the vision specials are single tokens and the vocabulary also has
    ``<|video_pad|>``, whose count Qwen2-VL's processor checks."""
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    video = ("<|video_pad|>",) if vision else ()
    vocab = _byte_vocab(specials + video)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=2048)
    single = [*specials[1:], *video] if vision else ["<|im_start|>", "<|im_end|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": single})
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(vocab), "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(vocab), vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"], vision_token_id=vocab["<|image_pad|>"],
        image_token_id=vocab["<|image_pad|>"], **({"video_token_id": vocab["<|video_pad|>"]} if vision else {}),
    )
    return tokenizer, _init(seed, Qwen2_5_VLForConditionalGeneration, config)


class _ImageQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor with an image processor and a tokenizer only.

    ``Qwen2VLProcessor`` checks each of its sub-processors against its transformers base class, the video
    processor's too (even ``None``); without torchvision that class, ``VideoProcessorMixin``, is not exported and the
    check fails (``VIDEO_PROCESSOR_MAPPING`` has no ``_extra_content``), whatever is passed. The sub-processors
    checked are those the constructor names, so this one has none for video; the edit pipelines call the processor
    with text and images only.
    """

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: Qwen2Tokenizer) -> None:
        super().__init__(image_processor, tokenizer)


def _qwenimage_transformer(seed: int) -> QwenImageTransformer2DModel:
    """Qwen-Image's MMDiT on packed 2 x 2 latents of 4 channels, two layers."""
    return _init(seed, QwenImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
                 axes_dims_rope=(8, 4, 4))


def _build_qwenimage(seed: int, size: int) -> QwenImagePipeline:
    """Qwen-Image layout: Qwen2.5-VL text encoder, Wan-style VAE (4x here), an MMDiT on packed 2 x 2 latents; true
    CFG in two calls with the per-token norm rescale."""
    tokenizer, text_encoder = _qwen(seed + 3)
    vae = _init(seed + 1, AutoencoderKLQwenImage, base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=_qwenimage_transformer(seed))


def _build_qwenimage_edit(seed: int, size: int, *, plus: bool = False
                          ) -> QwenImageEditPipeline | QwenImageEditPlusPipeline:
    """Qwen-Image-Edit layout (``plus``: Qwen-Image-Edit-2509's, several reference images per prompt): Qwen-Image's
    MMDiT, its input the latent's tokens followed by each reference image's; the Qwen2.5-VL encoder sees the images
    (at most 56 x 56 pixels after its image processor, four tokens each) through :class:`_ImageQwen2VLProcessor`.
    True CFG in two calls with the per-token norm rescale.

    The pipelines resize every reference image to about 1024 x 1024 pixels whatever the requested size, so the VAE
    here downsamples 64x (six levels, no residual blocks in the encoder): a 1024-pixel image is 16 x 16 latent pixels,
    64 tokens.
    """
    tokenizer, text_encoder = _qwen(seed + 3, vision=True)
    processor = _ImageQwen2VLProcessor(
        Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}), tokenizer
    )
    vae = _init(seed + 1, AutoencoderKLQwenImage, base_dim=4, z_dim=4, dim_mult=[1] * 7, num_res_blocks=0,
                temperal_downsample=[False] * 6, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return (QwenImageEditPlusPipeline if plus else QwenImageEditPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        processor=processor, transformer=_qwenimage_transformer(seed),
    )


def _build_lumina2(seed: int, size: int) -> Lumina2Pipeline:
    """Lumina-Image 2.0 layout: a Gemma2 caption encoder, a flow DiT with refiner layers that outputs the negated
    velocity with time running from noise (0) to image (1); CFG in two calls, then the per-row norm rescale."""
    tokenizer, text_encoder = _gemma(seed + 2)
    transformer = _init(seed, Lumina2Transformer2DModel, sample_size=size, patch_size=2, in_channels=4,
                        hidden_size=16, num_layers=2, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
                        multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(300, 64, 64), cap_feat_dim=_TEXT_DIM)
    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=_autoencoder_kl(seed + 1, size, latent_channels=4, scaling_factor=0.3611,
                                               shift_factor=0.1159),
                           text_encoder=text_encoder, tokenizer=tokenizer)


def _llama(seed: int) -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    """Byte-level BPE tokenizer without merges that prepends ``<|begin_of_text|>`` (Llama 3 style; the pipeline pads
    with the eos token ``<|eot_id|>``), and a two-layer Llama decoder (eager attention: the pipeline asks for
    attention maps)."""
    vocab = _byte_vocab(("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(vocab, ("<|begin_of_text|>",)),
                                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=131072)
    config = _llama_config(vocab, _HIDREAM_LLAMA_LAYERS, "<|eot_id|>", attn_implementation="eager")
    return tokenizer, _init(seed, LlamaForCausalLM, config)


def _build_hidream(seed: int, size: int) -> HiDreamImagePipeline:
    """HiDream-I1-Full layout: two projected Long-CLIP encoders (pooled only), T5 and a Llama decoder whose per-layer
    hidden states feed the blocks, a sparse-MoE MMDiT (4 routed experts, 2 active, and a shared one) whose output is
    the negated velocity, flow UniPC with shift 3; CFG in one batched call. The pipeline rescales every request to
    the area of ``default_sample_size``, which is set to the latent side here."""
    tokenizer_3, text_encoder_3 = _t5(seed + 4)
    tokenizer_4, text_encoder_4 = _llama(seed + 5)
    transformer = _init(seed, HiDreamImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=16,
                        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                        caption_channels=[_TEXT_DIM, _TEXT_DIM], text_emb_dim=2 * _TEXT_DIM, num_routed_experts=4,
                        num_activated_experts=2, axes_dims_rope=(8, 4, 4),
                        max_resolution=(max(64, size), max(64, size)),
                        llama_layers=tuple(range(_HIDREAM_LLAMA_LAYERS)))
    clip_tokenizers = [_clip_tokenizer(), _clip_tokenizer()]
    for tokenizer in clip_tokenizers:
        tokenizer.model_max_length = _LONG_CLIP_POSITIONS
    pipe = HiDreamImagePipeline(
        scheduler=UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=3.0),
        vae=_autoencoder_kl(seed + 1, size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_encoder(seed + 2, projection=True, positions=_LONG_CLIP_POSITIONS),
        tokenizer=clip_tokenizers[0],
        text_encoder_2=_clip_text_encoder(seed + 3, projection=True, positions=_LONG_CLIP_POSITIONS),
        tokenizer_2=clip_tokenizers[1],
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        text_encoder_4=text_encoder_4, tokenizer_4=tokenizer_4,
        transformer=transformer,
    )
    pipe.default_sample_size = size
    return pipe


#: Qwen3's chat template, reduced to what ``ZImagePipeline._encode_prompt`` uses (plain messages, a generation
#: prompt, and the empty think block that Qwen3 appends when ``enable_thinking`` is false; Z-Image passes true).
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

def _qwen3(seed: int) -> tuple[Qwen2Tokenizer, Qwen3Model]:
    """Byte-level Qwen2 tokenizer without merges (each byte a token, plus Qwen3's chat specials) with Qwen3's chat
    template, and a two-layer Qwen3 decoder (Z-Image loads ``Qwen3Model``, not the LM head)."""
    vocab = _byte_vocab(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=40960)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=_TEXT_DIM,
        intermediate_size=2 * _TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=1000000.0,
        bos_token_id=None,
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    return tokenizer, _init(seed, Qwen3Model, config)


def _build_zimage(seed: int, size: int) -> ZImagePipeline:
    """Z-Image layout: a Qwen3 text encoder (second-to-last hidden state of the chat-templated prompt, padding
    removed), an S3-DiT on lists of latents (one tensor per row) whose output is the negated velocity, FlowMatchEuler
    with the static shift 3; CFG in one call on the rows ``[cond; uncond]``, ``guidance_scale`` being ``w - 1``."""
    tokenizer, text_encoder = _qwen3(seed + 2)
    transformer = _init(seed, ZImageTransformer2DModel, all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16,
                        dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                        cap_feat_dim=_TEXT_DIM, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                        axes_lens=[1024, 64, 64])
    generator = torch.Generator().manual_seed(seed + 100)  # the padding tokens start at zero: make them count
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.randn(transformer.x_pad_token.shape, generator=generator) * 0.02)
        transformer.cap_pad_token.copy_(torch.randn(transformer.cap_pad_token.shape, generator=generator) * 0.02)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=_autoencoder_kl(seed + 1, size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def _hunyuan_tokenizer(template: str, specials: tuple[str, ...], pad: str
                       ) -> tuple[LlamaTokenizerFast, dict[str, int]]:
    """Byte-level BPE tokenizer in Llama 3 style (Llama 3's pre-tokenizer split; prepends ``<|begin_of_text|>``,
    pads on the right with ``pad``) and its vocabulary.

    Besides the 256 byte tokens and the ``specials``, the vocabulary holds every pre-token of the prompt ``template``
    as one token (``ignore_merges`` lets BPE take a whole pre-token found in the vocabulary without merges), so the
    template's system/user prefix has as many tokens as with the real tokenizer (HunyuanVideo's: 95, its
    image-to-video one's: 103) and the template's ``crop_start`` cuts exactly at the user prompt. Other words fall
    back to bytes.
    """
    vocab = _byte_vocab(specials)
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    split = "(" + "|".join(map(re.escape, specials)) + ")"
    for part in re.split(split, template.replace("{}", "")):
        if part and part not in specials:
            for word, _ in pre_tokenizer.pre_tokenize_str(part):
                vocab.setdefault(word, len(vocab))
    tokenizer = LlamaTokenizerFast(tokenizer_object=_byte_bpe(vocab, ("<|begin_of_text|>",), pre_tokenizer),
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=pad,
                                   padding_side="right", model_max_length=131072)
    others = [t for t in specials if t not in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", pad)]
    tokenizer.add_special_tokens({"additional_special_tokens": others})
    return tokenizer, vocab


def _hunyuan_llama(seed: int) -> tuple[LlamaTokenizerFast, LlamaModel]:
    """HunyuanVideo's tokenizer (:func:`_hunyuan_tokenizer` on its default template, padding with
    ``<|end_of_text|>``) and a three-layer LlamaModel."""
    tokenizer, vocab = _hunyuan_tokenizer(DEFAULT_PROMPT_TEMPLATE["template"], _HUNYUAN_SPECIALS, "<|end_of_text|>")
    return tokenizer, _init(seed, LlamaModel, _llama_config(vocab, _HUNYUAN_LLAMA_LAYERS, "<|end_of_text|>"))


def _hunyuan_llava(seed: int) -> tuple[LlamaTokenizerFast, LlavaForConditionalGeneration, CLIPImageProcessorPil]:
    """HunyuanVideo image-to-video's text encoder: the tokenizer of its template (:func:`_hunyuan_tokenizer`, with
    ``<image>`` and ``<pad>`` tokens, padding with ``<pad>``), a Llava of a two-layer CLIP vision tower and a
    three-layer Llama whose config names ``<image>`` and ``<pad>`` (the pipeline expands the one ``<image>`` token to
    the template's 576 image tokens and masks the ``<pad>`` positions), and a CLIP image processor (PIL backend) to
    the tower's 24 x 24 pixels, each pixel a patch: 576 image features, as the template expects."""
    specials = (*_HUNYUAN_SPECIALS, "<pad>", "<image>")
    tokenizer, vocab = _hunyuan_tokenizer(I2V_PROMPT_TEMPLATE["template"], specials, "<pad>")
    side = int(I2V_PROMPT_TEMPLATE["image_emb_len"] ** 0.5)
    vision = CLIPVisionConfig(hidden_size=_TEXT_DIM, intermediate_size=2 * _TEXT_DIM, projection_dim=_TEXT_DIM,
                              num_hidden_layers=2, num_attention_heads=4, image_size=side, patch_size=1,
                              hidden_act="quick_gelu")
    config = LlavaConfig(vision_config=vision, text_config=_llama_config(vocab, _HUNYUAN_LLAMA_LAYERS, "<pad>"),
                         image_token_index=vocab["<image>"], pad_token_id=vocab["<pad>"])
    processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return tokenizer, _init(seed, LlavaForConditionalGeneration, config), processor


def _build_hunyuanvideo(seed: int, size: int, *, image: bool = False
                        ) -> HunyuanVideoPipeline | HunyuanVideoImageToVideoPipeline:
    """HunyuanVideo layout: a Llama text encoder (third-to-last hidden state of the templated prompt, template
    cropped), a CLIP text encoder (pooled), a guidance-distilled dual/single-stream video transformer with patches
    1 x 2 x 2, a causal 3-D VAE with 8x spatial and 4x temporal compression, flow matching with shift 7; true CFG
    (``true_cfg_scale > 1`` and a negative prompt) in two transformer calls per step. With ``image``, the
    image-to-video layout of HunyuanVideo-I2V-33ch: a Llava text encoder that also sees the image (a black one for the
    negative prompt), and a transformer without guidance embedding that takes the latent, the image's latent in the
    first frame and a first-frame mask concatenated on the channels (``image_condition_type="latent_concat"``)."""
    if image:
        tokenizer, text_encoder, processor = _hunyuan_llava(seed + 3)
    else:
        tokenizer, text_encoder = _hunyuan_llama(seed + 3)
    transformer = _init(seed, HunyuanVideoTransformer3DModel, in_channels=9 if image else 4, out_channels=4,
                        num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
                        num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, guidance_embeds=not image,
                        text_embed_dim=_TEXT_DIM, pooled_projection_dim=_TEXT_DIM, rope_axes_dim=(4, 6, 6),
                        image_condition_type="latent_concat" if image else None)
    vae = _init(seed + 1, AutoencoderKLHunyuanVideo, in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
                block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
                scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
                mid_block_add_attention=True)
    components = {"text_encoder": text_encoder, "tokenizer": tokenizer, "transformer": transformer, "vae": vae,
                  "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
                  "text_encoder_2": _clip_text_encoder(seed + 2, projection=False), "tokenizer_2": _clip_tokenizer()}
    if image:
        return HunyuanVideoImageToVideoPipeline(**components, image_processor=processor)
    return HunyuanVideoPipeline(**components)


def _glm(seed: int) -> tuple[PreTrainedTokenizerFast, GlmModel]:
    """Byte-level BPE tokenizer without merges in GLM-4 style (prepends ``[gMASK]<sop>``, pads on the left with
    ``<|endoftext|>``; CogView4 pads further on the left to a multiple of 16 and gives the encoder no attention
    mask) and a two-layer GlmModel (the pipeline reads ``hidden_states[-2]``, the first layer's output)."""
    vocab = _byte_vocab(_GLM_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(vocab, ("[gMASK]", "<sop>")),
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="left",
                                        model_max_length=128000, additional_special_tokens=list(_GLM_SPECIALS[1:]))
    config = GlmConfig(
        vocab_size=len(vocab),
        hidden_size=_TEXT_DIM,
        intermediate_size=2 * _TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        pad_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
    )
    return tokenizer, _init(seed, GlmModel, config)


def _build_cogview4(seed: int, size: int) -> CogView4Pipeline:
    """CogView4 layout: a GLM text encoder (second-to-last hidden state, left-padded to a multiple of 16 tokens),
    a 16-channel AutoencoderKL (2x here), a single-stream DiT with patches 2 x 2 and SDXL-like size conditions,
    flow matching with linear dynamic shift; CFG (``guidance_scale > 1``; the negative prompt defaults to "") in two
    transformer calls per step."""
    tokenizer, text_encoder = _glm(seed + 2)
    transformer = _init(seed, CogView4Transformer2DModel, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                        attention_head_dim=16, num_attention_heads=2, text_embed_dim=_TEXT_DIM, time_embed_dim=16,
                        condition_dim=8, sample_size=size, rope_axes_dim=(256, 256))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                max_image_seq_len=4096, time_shift_type="linear")
    pipe = CogView4Pipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_autoencoder_kl(seed + 1, size, latent_channels=16, scaling_factor=1.0),
        transformer=transformer,
        scheduler=scheduler,
    )
    return pipe


def _build_chroma(seed: int, size: int) -> ChromaPipeline:
    """Chroma layout: Flux's MMDiT without the CLIP pooled input (a distilled modulation approximator instead), T5
    only; real CFG in two calls."""
    tokenizer, text_encoder = _t5(seed + 3)
    transformer = _init(seed, ChromaTransformer2DModel, patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=_TEXT_DIM,
                        axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=32,
                        approximator_layers=1)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return ChromaPipeline(
        scheduler=scheduler,
        vae=_autoencoder_kl(seed + 1, size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _build_ltx(seed: int, size: int) -> LTXPipeline:
    """LTX-Video layout: causal video VAE (4x spatial, 4x temporal here), a video transformer on packed tokens
    ``(B, T * H * W, C)``, T5; CFG in one batched call."""
    tokenizer, text_encoder = _t5(seed + 3)
    vae = _init(seed + 1, AutoencoderKLLTXVideo, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
                decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
                upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1,
                encoder_causal=True, decoder_causal=False)
    transformer = _init(seed, LTXVideoTransformer3DModel, in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                        caption_channels=_TEXT_DIM)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer)


def _build_cogvideox(seed: int, size: int, *, image: bool = False
                     ) -> CogVideoXPipeline | CogVideoXImageToVideoPipeline:
    """CogVideoX layout: 3-D VAE (8x spatial, 4x temporal), latents ``(B, T, C, H, W)``, a video transformer with
    patches 2 x 2, T5; CFG in one batched call, DDIM. With ``image``, CogVideoX 1.5's image-to-video transformer: it
    takes the latent and the image's latent (first frame, zeros after) concatenated on the channels (dim 2), patches
    2 x 2 x 2 in time (the pipeline pads the latent frames to an even count), 3-D rotary embeddings and the "ofs"
    embedding, a one-element tensor that the pipeline passes beside the batch."""
    tokenizer, text_encoder = _t5(seed + 3)
    vae = _init(seed + 1, AutoencoderKLCogVideoX, down_block_types=("CogVideoXDownBlock3D",) * 4,
                up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    # rotary embeddings split each head's 16 dimensions 4 / 6 / 6 over frames, rows and columns
    i2v = {"attention_head_dim": 16, "in_channels": 8, "ofs_embed_dim": 2, "patch_size_t": 2, "patch_bias": False,
           "use_rotary_positional_embeddings": True} if image else {"attention_head_dim": 8, "in_channels": 4}
    transformer = _init(seed, CogVideoXTransformer3DModel, num_attention_heads=2, out_channels=4, time_embed_dim=2,
                        text_embed_dim=_TEXT_DIM, num_layers=2, sample_width=size, sample_height=size,
                        sample_frames=_NUM_FRAMES, patch_size=2, temporal_compression_ratio=4,
                        max_text_seq_length=_MAX_SEQUENCE_LENGTH, **i2v)
    cls = CogVideoXImageToVideoPipeline if image else CogVideoXPipeline
    return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                set_alpha_to_one=True, snr_shift_scale=3.0,
                                                timestep_spacing="trailing", clip_sample=False))


def _build_wan(seed: int, size: int, *, experts: int = 1, image: bool = False
               ) -> WanPipeline | WanImageToVideoPipeline:
    """Wan 2.1 layout (UMT5 text encoder, causal 3-D VAE with 8x spatial and 4x temporal compression, 3-D
    transformer with patches 1 x 2 x 2); with ``experts=2`` Wan 2.2 A14B's: a second, low-noise transformer below the
    official T2V boundary 0.875 (I2V: 0.9, and the transformers take the latent, a first-frame mask and the
    image's latent, 36 channels at full size, without an image encoder)."""
    tokenizer, t5 = _t5(seed + 3)
    umt5 = UMT5Config(**{k: v for k, v in t5.config.to_dict().items() if k in UMT5Config().to_dict()})
    transformers = [
        _init(seed + 10 * i, WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
              in_channels=36 if image else 16, out_channels=16, text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32,
              num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        for i in range(experts)
    ]
    cls = WanImageToVideoPipeline if image else WanPipeline
    return cls(
        tokenizer=tokenizer,
        text_encoder=_init(seed + 3, UMT5EncoderModel, umt5),
        vae=_init(seed + 1, AutoencoderKLWan, base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformers[0],
        transformer_2=transformers[1] if experts > 1 else None,
        boundary_ratio=(0.9 if image else 0.875) if experts > 1 else None,
    )


_BUILDERS: dict[str, Callable[[int, int], DiffusionPipeline]] = {
    "sd": lambda seed, size: _build_sd(seed, size, "epsilon"),
    "sd-v": lambda seed, size: _build_sd(seed, size, "v_prediction"),
    "sdxl": _build_sdxl,
    "dit": _build_dit,
    "pixart": _build_pixart,
    "sd3": _build_sd3,
    "sana": _build_sana,
    "flux": _build_flux,
    "fluxkontext": lambda seed, size: FluxKontextPipeline(**_build_flux(seed, size).components),
    "chroma": _build_chroma,
    "lumina2": _build_lumina2,
    "hidream": _build_hidream,
    "zimage": _build_zimage,
    "cogview4": _build_cogview4,
    "hunyuanvideo": _build_hunyuanvideo,
    "hunyuanvideo-i2v": lambda seed, size: _build_hunyuanvideo(seed, size, image=True),
    "qwenimage": _build_qwenimage,
    "qwenimage-edit": _build_qwenimage_edit,
    "qwenimage-editplus": lambda seed, size: _build_qwenimage_edit(seed, size, plus=True),
    "ltx": _build_ltx,
    "cogvideox": _build_cogvideox,
    "cogvideox-i2v": lambda seed, size: _build_cogvideox(seed, size, image=True),
    "wan": _build_wan,
    "wan22": lambda seed, size: _build_wan(seed, size, experts=2),
    "wan22-i2v": lambda seed, size: _build_wan(seed, size, experts=2, image=True),
}
