"""Checks that need a CUDA device (skipped elsewhere): fp16, CPU offload, torch.compile and attention processors."""

from __future__ import annotations

import pytest
import torch
from pipelines import final_latents, guided_latents

import guidekit
from guidekit.testing.tiny import build_tiny_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fp16_cuda_cfg_is_native_bitwise() -> None:
    pipe = build_tiny_pipeline("sd", dtype=torch.float16).to("cuda")
    native = final_latents(pipe, "sd", guidance_scale=5.0)
    guided, _ = guided_latents(pipe, "sd", guidekit.CFG(5.0), guidance_scale=5.0)
    assert guided.dtype == torch.float16 and guided.device.type == "cuda"
    assert torch.equal(guided, native)
    apg, _ = guided_latents(pipe, "sd", guidekit.Interval(guidekit.APG(5.0), 0.28, 5.42), guidance_scale=5.0)
    assert torch.isfinite(apg).all()


def test_model_cpu_offload() -> None:
    pipe = build_tiny_pipeline("sd")
    native = final_latents(pipe.to("cuda"), "sd", guidance_scale=5.0).cpu()
    pipe = build_tiny_pipeline("sd")
    pipe.enable_model_cpu_offload()
    everywhere = guidekit.Interval(guidekit.CFG(5.0), 0.0, float("inf"))
    guided, stats = guided_latents(pipe, "sd", everywhere, guidance_scale=5.0)
    assert stats.uncond_rows == 4
    assert (guided.cpu() - native).abs().max().item() <= 1e-4
    _, stats = guided_latents(pipe, "sd", guidekit.Interval(guidekit.CFG(5.0), 1e4, 2e4), guidance_scale=5.0)
    assert stats.uncond_rows == 0


def test_torch_compile_inductor() -> None:
    pipe = build_tiny_pipeline("sd").to("cuda")
    pipe.unet = torch.compile(pipe.unet)
    native = final_latents(pipe, "sd", guidance_scale=5.0)  # compiled native CFG: the same kernels as guided
    guided, _ = guided_latents(pipe, "sd", guidekit.CFG(5.0), guidance_scale=5.0)
    assert (guided - native).abs().max().item() <= 1e-5
    partial, stats = guided_latents(pipe, "sd", guidekit.AdaptiveGuidance(guidekit.CFG(5.0), 0.991), guidance_scale=5.0,
                             batch_size=2)
    assert stats.uncond_rows < stats.cond_rows and torch.isfinite(partial).all()


def test_attention_processors() -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = build_tiny_pipeline("sd").to("cuda")
    for processor in (AttnProcessor(), AttnProcessor2_0()):
        pipe.unet.set_attn_processor(processor)
        native = final_latents(pipe, "sd", guidance_scale=5.0)
        guided, _ = guided_latents(pipe, "sd", guidekit.CFG(5.0), guidance_scale=5.0)
        assert torch.equal(guided, native)
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except (ModuleNotFoundError, ValueError) as exc:
        pytest.skip(f"xformers not available: {exc}")
    native = final_latents(pipe, "sd", guidance_scale=5.0)
    guided, _ = guided_latents(pipe, "sd", guidekit.CFG(5.0), guidance_scale=5.0)
    assert torch.equal(guided, native)
