"""Wall time of the perturbation methods (PAG, SEG, autoguidance, SLG) against CFG and diffusers' own, per call.

    python benchmarks/perturbation.py                  # tiny SD, SDXL and SD3 on this machine's CPU, 1 torch thread

Per family, on the tiny random-weight pipeline (same pipeline, scheduler and seed for every method): guidekit's
``set_guidance(CFG(w))``, CFG plus each perturbation (PAG and SEG on the UNet's mid block; SEG with the infinite
blur and with sigma 1; autoguidance with a same-size copy of the UNet; SLG of block 1 of the 2-block SD3
transformer at every step of the window), and diffusers' native counterpart from the same components: the PAG
pipelines (``pag_applied_layers=["mid"]``) on SD and SDXL, ``skip_guidance_layers`` of the SD3 pipeline on SD3.
Runs are interleaved, the order rotating every round; the ratios are medians over rounds of the method's time over
the reference's in the same round. Rows per step and sample are guidekit's ``pipe.guidance_stats`` (rows the
network computed, per pass); for the native pipelines they are counted at the denoiser's input.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
from _common import add_common_arguments, interleaved, load, machine, median
from diffusers import DiffusionPipeline, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

import guidekit
from guidekit.bridge import GuidanceStats
from guidekit.guidance import Guidance

NATIVE_PAG = {"sd": StableDiffusionPAGPipeline, "sdxl": StableDiffusionXLPAGPipeline}
FAMILIES = (*NATIVE_PAG, "sd3")
CFG_NAME = "set_guidance(CFG)"
PAG_SCALE, SEG_SCALE, AUTOGUIDANCE_SCALE, SLG_SCALE = 3.0, 3.0, 2.0, 2.8
SLG_LAYERS = [1]


def methods(family: str, pipe: DiffusionPipeline, scale: float) -> dict[str, Guidance]:
    """guidekit's methods for ``family``, by the name in the table; CFG first (the reference)."""
    cfg = guidekit.CFG(scale)
    w = f"CFG({scale:g})"
    if family == "sd3":
        slg = guidekit.SLG(SLG_SCALE, layers=SLG_LAYERS, start=0.0, stop=1.0)
        return {CFG_NAME: cfg, f"{w} + SLG({SLG_SCALE:g}, layers={SLG_LAYERS}, start=0, stop=1)": cfg + slg}
    weak = copy.deepcopy(pipe.unet)
    return {
        CFG_NAME: cfg,
        f"{w} + PAG({PAG_SCALE:g})": cfg + guidekit.PAG(PAG_SCALE),
        f"{w} + SEG({SEG_SCALE:g}), infinite blur": cfg + guidekit.SEG(SEG_SCALE),
        f"{w} + SEG({SEG_SCALE:g}, blur_sigma=1)": cfg + guidekit.SEG(SEG_SCALE, blur_sigma=1.0),
        f"{w} + AutoGuidance(weak, {AUTOGUIDANCE_SCALE:g})": cfg + guidekit.AutoGuidance(weak, AUTOGUIDANCE_SCALE),
    }


def native(family: str, pipe: DiffusionPipeline, call: dict[str, Any]
           ) -> tuple[str, DiffusionPipeline, dict[str, Any]]:
    """diffusers' own counterpart: its name in the table, the pipeline and the call's arguments."""
    if family == "sd3":
        slg = {"skip_guidance_layers": SLG_LAYERS, "skip_layer_guidance_scale": SLG_SCALE,
               "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
        return f"native StableDiffusion3Pipeline, skip_guidance_layers={SLG_LAYERS}", pipe, {**call, **slg}
    no_checker = {"requires_safety_checker": False} if family == "sd" else {}  # the tiny SD has none
    pag = NATIVE_PAG[family](**pipe.components, pag_applied_layers=["mid"], **no_checker)
    pag.set_progress_bar_config(disable=True)
    return f"native {type(pag).__name__}, pag_scale {PAG_SCALE:g}", pag, {**call, "pag_scale": PAG_SCALE}


def guided_call(pipe: DiffusionPipeline, guidance: Guidance, call: dict[str, Any], device: str
                ) -> Callable[[], GuidanceStats]:
    """One pipeline call with ``guidance`` attached for it; returns the call's stats."""
    def run() -> GuidanceStats:
        with guidekit.guided(pipe, guidance) as guided:
            pipe(**call, generator=torch.Generator(device).manual_seed(0))
        return guided.stats

    return run


def native_call(pipe: DiffusionPipeline, call: dict[str, Any], device: str) -> Callable[[], None]:
    """One pipeline call without guidekit."""
    def run() -> None:
        pipe(**call, generator=torch.Generator(device).manual_seed(0))

    return run


def native_rows(denoiser: torch.nn.Module, run: Callable[[], None]) -> list[int]:
    """The rows of each forward of ``denoiser`` during ``run()``."""
    rows: list[int] = []

    def count(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        rows.append(len(args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))))

    hook = denoiser.register_forward_pre_hook(count, with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    add_common_arguments(parser, steps=20, repeats=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"steps {args.steps}, repeats {args.repeats}, CFG weight {args.scale:g}, batch {args.batch}, "
          "output_type latent")
    per_step = args.steps * args.batch
    for family in args.model:
        pipe, call = load(family, args.device, args.batch)
        call = {**call, "num_inference_steps": args.steps, "guidance_scale": args.scale, "output_type": "latent"}
        guidances = methods(family, pipe, args.scale)
        native_name, native_pipe, native_kwargs = native(family, pipe, call)
        runs: dict[str, Callable[[], Any]] = {name: guided_call(pipe, g, call, args.device)
                                              for name, g in guidances.items()}
        runs[native_name] = native_call(native_pipe, native_kwargs, args.device)
        denoiser = pipe.transformer if family == "sd3" else pipe.unet
        stats = {name: runs[name]() for name in guidances}  # warm-up, and the rows
        forwards = native_rows(denoiser, runs[native_name])
        times = interleaved(runs, args.repeats, args.device)

        print(f"\n{family}: {type(pipe).__name__}, {type(pipe.scheduler).__name__}, "
              f"{type(denoiser).__name__} of {sum(p.numel() for p in denoiser.parameters()):,} parameters")
        if family != "sd3":
            print("AutoGuidance's weak network: copy.deepcopy(pipe.unet), the same size as the main UNet")
        print(f"\n| method | ms per pipeline call (median) | ratio to {CFG_NAME} | ratio to native | "
              "network calls per step | rows per step per sample |")
        print("|---|---:|---:|---:|---:|---|")
        for name, ts in times.items():
            to_cfg = median([t / c for t, c in zip(ts, times[CFG_NAME], strict=True)])
            to_native = median([t / n for t, n in zip(ts, times[native_name], strict=True)])
            if name in stats:
                calls = stats[name].model_calls / args.steps
                per_pass = {p: n / per_step for p, n in stats[name].computed.items()}
                rows = f"{sum(per_pass.values()):.3g} ({', '.join(f'{p} {n:.3g}' for p, n in per_pass.items())})"
            else:
                calls, rows = len(forwards) / args.steps, f"{sum(forwards) / per_step:.3g} (at the network's input)"
            print(f"| {name} | {median(ts) * 1e3:.1f} | {to_cfg:.3f} | {to_native:.3f} | {calls:.3g} | {rows} |",
                  flush=True)


if __name__ == "__main__":
    main()
