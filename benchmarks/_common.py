"""Shared pieces of the benchmark scripts: machine description, interleaved timing, pipelines."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline

from guidekit.testing.tiny import build_sd15_architecture_pipeline, build_tiny_pipeline, tiny_call_kwargs


def machine() -> str:
    """One line naming the date, the processor or GPU, and the software."""
    import diffusers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return (f"{datetime.date.today().isoformat()}, {device}, {platform.machine()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, {torch.get_num_threads()} torch threads")


def add_common_arguments(parser: argparse.ArgumentParser, *, steps: int, repeats: int) -> None:
    """The options every pipeline benchmark takes."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--scale", type=float, default=5.0, help="guidance weight")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, device: str, *, shuffle: bool = False
                ) -> dict[str, list[float]]:
    """Time each run ``repeats`` times, rotating their order every round so drift hits all alike.

    With ``shuffle``, each round's order is a random permutation (seeded) instead: a rotation keeps every run after
    the same one, which biases runs whose time depends on what ran just before them (caches, the allocator).
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    rng = random.Random(0)
    for r in range(repeats):
        order = rng.sample(names, len(names)) if shuffle else names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def load(model: str, device: str, batch: int = 1) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """``sd15`` (SD1.5's architecture, random weights, fp16 on a GPU) or a tiny family on ``device``."""
    if model == "sd15":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = build_sd15_architecture_pipeline(dtype=dtype).to(device)
        return pipe, {"prompt": ["a photograph of an astronaut riding a horse"] * batch, "height": 512, "width": 512}
    return build_tiny_pipeline(model).to(device), tiny_call_kwargs(model, batch)


def output_type(model: str) -> str:
    """Latents where the pipeline can return them (DiT always decodes)."""
    return "np" if model == "dit" else "latent"
