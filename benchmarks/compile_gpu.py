"""torch.compile stalls of guidance methods on SDXL's architecture with random weights, in one process.

Device command (one call on an H200 or H100, from the repo root, ``carry: [".whl"]``, ``timeout_s`` 600; diffusers
0.42.1 travels as the wheel in ``.whl/``, the machine has torch, transformers and guidekit's own needs; the table
is printed last, the log and the JSON come back in $OUT even if the run is cut off):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit; PYTHONUNBUFFERED=1 timeout 580 python3 benchmarks/compile_gpu.py --budget-s 420 2>&1 | tee $OUT/compile_gpu.log

CPU dry run (seconds; every code path on the tiny SDXL pipeline, dynamo with the eager backend):

    PYTHONPATH=. python benchmarks/compile_gpu.py --device cpu --dtype float32 --backend eager --tiny --steps 2

What runs: ``pipe.unet = torch.compile(pipe.unet)`` (``--backend``, default inductor; ``--mode``; ``--dynamic``),
then, for each ``--batch`` size, these calls of the pipeline, each made twice (first call, warm call):
native CFG (no ``set_guidance``; left out with ``--guided-first``); ``CFG(w)``; ``Interval(CFG(w), sigma_lo=0.28, sigma_hi=5.42)``;
``AdaptiveGuidance(CFG(w), threshold=0.991)``; ``AdaptiveGuidance(CFG(w), threshold=1e-6)`` (switches every
sample whose two predictions have a positive cosine, so the UNet batch falls from 2B to B within the call
even where 0.991 is never reached on random weights); native CFG again after ``set_guidance(None)``.
The pipeline's own ``guidance_scale`` is ``w`` (> 1, so it batches the unconditional rows).

For each call: wall seconds (CUDA synchronised on both sides); seconds spent in dynamo compilation
(``compilation_time_metrics["_compile.compile_inner"]``, backend included); from ``torch._dynamo.utils.counters``
the frames dynamo converted (each a compile or a recompile; the failed ones run eagerly), the FX graphs handed to
the backend, the graph-break/skip records and the FX-graph cache's hits and misses (every section's difference
is in the JSON too); the cache entries of ``UNet2DConditionModel.forward`` after the call (one per compiled
variant); the new recompile reasons (dynamo's guard failures), the causes of graph breaks (dynamo's
``graph_breaks`` log, kept off stderr) and dynamo/inductor warnings (a recompile limit hit); the batch sizes the
UNet saw; guidekit's row counts (``pipe.guidance_stats``); peak GPU memory; whether the latents are finite.

Pipeline: SDXL base 1.0's UNet (2.6B parameters) and VAE configurations written out below, Euler with
SDXL's scheduler configuration, fp16, 1024 x 1024, ``output_type="latent"`` (no VAE decode). There are no
text encoders: the call passes random ``prompt_embeds`` [B, 77, 2048] and ``pooled_prompt_embeds`` [B, 1280]
(SDXL's shapes), and the unconditional rows are the zeros SDXL uses for an empty negative prompt
(``force_zeros_for_empty_prompt``); add_time_ids are the pipeline's own. ``--tiny`` swaps in
``build_tiny_pipeline("sdxl")`` with embeddings of its widths.

By default the inductor/Triton caches (and dynamo's automatic-dynamic profile) go to a fresh temporary
folder, so every run measures cold compiles; ``--keep-cache`` uses the default folder. Results go to
``$OUT/compile_gpu.json`` when OUT is set, else to ``--json`` if given; the file is rewritten after every call,
so a run cut off still leaves its calls so far. ``--budget-s`` skips the calls that would start after that many
seconds from the start (a call already running, with its compile, is not interrupted).
"""  # noqa: E501

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._logging
from _common import machine, sync
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

import guidekit
from guidekit.testing.tiny import build_tiny_pipeline

#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers' UNet2DConditionModel arguments).
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": (5, 10, 20),
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "class_embed_type": None,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "num_class_embeds": None,
    "upcast_attention": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": 2816,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

#: stabilityai/stable-diffusion-xl-base-1.0, vae/config.json.
SDXL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

#: stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

TEXT_TOKENS = 77  # CLIP's prompt length
TIME_IDS = 6  # original size, crop corner, target size


def build_sdxl_architecture(device: str, dtype: torch.dtype, seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL base 1.0's UNet and VAE with random weights, made on ``device``; no text encoders or tokenizers."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET).eval()
        vae = AutoencoderKL(**SDXL_VAE).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def embeddings(unet_config: Any, batch: int, device: str, dtype: torch.dtype, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """Random text conditioning of the shapes the UNet expects (SDXL: [B, 77, 2048] and [B, 1280])."""
    pooled = unet_config.projection_class_embeddings_input_dim - TIME_IDS * unet_config.addition_time_embed_dim
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(batch, TEXT_TOKENS, unet_config.cross_attention_dim, generator=g)
        .to(device, dtype),
        "pooled_prompt_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
    }


class Clock:
    """Seconds since the start, and progress lines with a timestamp, flushed at once."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        now = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[{now} +{self.elapsed():6.1f}s] {message}", flush=True)


class BatchRecorder:
    """Stands in for the compiled UNet's ``forward`` (outside the compiled region) and counts its batch sizes.

    guidekit saves and restores an instance ``forward`` around each guided call, so this sees every call.
    """

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward
        self.sizes: Counter[int] = Counter()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sample = args[0] if args else kwargs["sample"]
        self.sizes[int(sample.shape[0])] += 1
        return self.forward(*args, **kwargs)


def guard_failures() -> dict[Any, list[str]]:
    """dynamo's record of guard-failure (recompile) reasons per code object, wherever this torch keeps it."""
    for module in ("torch._dynamo.guards", "torch._dynamo.utils"):
        table = getattr(sys.modules.get(module), "guard_failures", None)
        if table is not None:
            return table
    return {}


class LogTap(logging.Handler):
    """Keeps, for the call in progress, dynamo's and inductor's warnings (a recompile limit hit, say) and the
    graph breaks that dynamo logs (its ``graph_breaks`` artifact, which holds the cause the counters lack)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.warnings: list[str] = []
        self.breaks: list[str] = []

    def attach(self, log_breaks: bool) -> None:
        for name in ("torch._dynamo", "torch._inductor"):
            logging.getLogger(name).addHandler(self)
        if not log_breaks:
            return
        torch._logging.set_logs(graph_breaks=True)
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if name.endswith(".__graph_breaks") and isinstance(logger, logging.Logger):
                logger.propagate = False  # to this tap only, not to stderr
                logger.addHandler(self)

    def clear(self) -> None:
        self.warnings.clear()
        self.breaks.clear()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a record that does not format is not worth failing the run for
            message = str(record.msg)
        if record.name.endswith(".__graph_breaks"):
            self.breaks.append(summarize_break(message))
        elif record.levelno >= logging.WARNING:
            self.warnings.append(message[:400])


def summarize_break(message: str) -> str:
    """``file:line: reason | detail`` from one of dynamo's multi-line graph-break messages."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "?"
    where = lines[0].rsplit(" at ", 1)[-1].rsplit("/", 1)[-1]
    for i, line in enumerate(lines):
        if line.startswith("Graph Break Reason:"):
            reason = line.removeprefix("Graph Break Reason:").strip()
            detail = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{where}: {reason} | {detail}"[:400]
    return lines[0][:400]


def compile_snapshot(code: Any) -> dict[str, Any]:
    """Cumulative dynamo/inductor counters now; per-call figures are differences of two snapshots."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        entries: int | None = len(_debug_get_cache_entry_list(code))
    except Exception:  # private API: absent or changed in this torch
        entries = None
    return {
        "compile_s": sum(compilation_time_metrics.get("_compile.compile_inner", [])),
        "counters": {section: Counter(table) for section, table in counters.items()},
        "unet_cache_entries": entries,
        "reasons": {code: len(rs) for code, rs in guard_failures().items()},
    }


def compile_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What one call added: compile seconds, frames converted (and failed), graphs, cache use, reasons.

    ``frames`` counts dynamo's conversions (a compile or a recompile of one code object: the UNet's forward, or,
    after a graph break, the frames below it); ``frames_failed`` those that raised, which then run eagerly
    (a skipped frame, a recompile limit hit); ``graphs`` the FX graphs handed to the backend; ``breaks`` the
    ``unimplemented`` and ``graph_break`` records, that is graph breaks and skipped frames.
    """
    delta: dict[str, dict[str, int]] = {}
    for section, table in after["counters"].items():
        d = table - before["counters"].get(section, Counter())
        if d:
            delta[section] = {str(k)[:600]: v for k, v in d.most_common(40)}

    def total(section: str, key: str | None = None) -> int:
        table = delta.get(section, {})
        return table.get(key, 0) if key else sum(table.values())

    new = [r for code, rs in guard_failures().items() for r in rs[before["reasons"].get(code, 0):]]
    breaks = {**delta.get("graph_break", {}), **delta.get("unimplemented", {})}
    return {
        "compile_s": round(after["compile_s"] - before["compile_s"], 3),
        "frames": total("frames", "total"),
        "frames_failed": total("frames", "total") - total("frames", "ok"),
        "graphs": total("stats", "unique_graphs"),
        "breaks": sum(breaks.values()),
        "resumes": total("resumes"),
        "fxgraph_cache_miss": total("inductor", "fxgraph_cache_miss"),
        "fxgraph_cache_hit": total("inductor", "fxgraph_cache_hit"),
        "unet_cache_entries": after["unet_cache_entries"],
        "break_reasons": breaks,
        "recompile_reasons_count": len(new),
        "recompile_reasons": [r[:400] for r in new[:200]],
        "counters": delta,
    }


def first_lines(texts: list[str] | dict[str, int], limit: int) -> list[str]:
    """The distinct first lines of ``texts`` (weighted by the dict's counts), most frequent first."""
    counts: Counter[str] = Counter()
    for text, n in (texts.items() if isinstance(texts, dict) else ((t, 1) for t in texts)):
        counts[text.strip().splitlines()[0][:240] if text.strip() else "?"] += n
    return [f"{n} x {line}" for line, n in counts.most_common(limit)]


STATS_FIELDS = ("model_calls", "cond_rows", "uncond_rows", "uncond_rows_skipped")


def methods(w: float, guided_first: bool) -> list[tuple[str, Any]]:
    """(label, guidance) in the order they run; ``None`` is the pipeline's native CFG."""
    first = [] if guided_first else [("native CFG", None)]
    return [
        *first,
        (f"CFG({w:g})", guidekit.CFG(w)),
        (f"Interval(CFG({w:g}), 0.28, 5.42)", guidekit.Interval(guidekit.CFG(w), sigma_lo=0.28, sigma_hi=5.42)),
        (f"AdaptiveGuidance(CFG({w:g}), 0.991)", guidekit.AdaptiveGuidance(guidekit.CFG(w), threshold=0.991)),
        (f"AdaptiveGuidance(CFG({w:g}), 1e-6)", guidekit.AdaptiveGuidance(guidekit.CFG(w), threshold=1e-6)),
        ("native CFG after set_guidance(None)", None),
    ]


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager for a CPU dry run)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: none given)")
    parser.add_argument("--dynamic", choices=("auto", "true", "false"), default="auto",
                        help="torch.compile(dynamic=...): auto is None, dynamo's automatic dynamic shapes")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--scale", type=float, default=5.0, help="guidance weight w, also the pipeline's scale")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes, run in this order")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the UNet's)")
    parser.add_argument("--guided-first", action="store_true",
                        help="leave out the first native CFG call, so the first compile is a guided call's")
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL pipeline instead of SDXL's sizes")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip calls that would start later than this many seconds after the start")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use the default inductor cache folder instead of a fresh one (warm compiles)")
    parser.add_argument("--recompile-limit", type=int, default=None,
                        help="torch._dynamo.config.recompile_limit (default: torch's own, 8)")
    parser.add_argument("--no-break-log", action="store_true",
                        help="do not capture dynamo's graph-break log (the causes of graph breaks)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="where to write results when OUT is not set")
    args = parser.parse_args()
    clock = Clock()
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    dtype = getattr(torch, args.dtype)
    if args.threads is not None or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    cache_dir = None
    if not args.keep_cache:
        cache_dir = tempfile.mkdtemp(prefix="compile_gpu_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        os.environ.pop("TRITON_CACHE_DIR", None)
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    if args.recompile_limit is not None:
        setattr(torch._dynamo.config, limit_name, args.recompile_limit)
    out = os.environ.get("OUT")
    json_path = Path(out) / "compile_gpu.json" if out else args.json

    import diffusers
    import transformers

    cuda = args.device.startswith("cuda")
    result: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "device": torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "diffusers_path": str(Path(diffusers.__file__).parent),
        "transformers": transformers.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "inductor_cache_dir": cache_dir or "default",
        "recompile_limit": getattr(torch._dynamo.config, limit_name),
        "calls": [],
        "skipped": [],
        "complete": False,
    }
    print(f"machine: {result['machine']}", flush=True)
    clock.log(f"building the {'tiny SDXL' if args.tiny else 'SDXL-architecture'} pipeline "
              f"({args.dtype}, {args.device})")
    if args.tiny:
        pipe = build_tiny_pipeline("sdxl").to(device=args.device, dtype=dtype)
    else:
        pipe = build_sdxl_architecture(args.device, dtype)
    unet = pipe.unet
    side = args.size or unet.config.sample_size * pipe.vae_scale_factor
    result["pipeline"] = {
        "kind": "tiny SDXL (guidekit.testing.tiny)" if args.tiny else
                "SDXL base 1.0 UNet + VAE configs, random weights, no text encoders",
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "height": side, "width": side, "steps": args.steps, "scheduler": type(pipe.scheduler).__name__,
    }
    pipe.scheduler.set_timesteps(args.steps)
    result["pipeline"]["sigmas"] = [round(float(s), 4) for s in pipe.scheduler.sigmas[:-1]]
    result["build_s"] = round(clock.elapsed(), 1)
    clock.log(f"built: UNet {result['pipeline']['unet_parameters'] / 1e9:.3f}B parameters, {side}x{side}, "
              f"{args.steps} steps, step sigmas {result['pipeline']['sigmas']}")

    dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
    pipe.unet = torch.compile(pipe.unet, backend=args.backend, mode=args.mode, dynamic=dynamic)
    recorder = BatchRecorder(pipe.unet.forward)
    pipe.unet.forward = recorder
    unet_forward_code = type(unet).forward.__code__
    clock.log(f"pipe.unet = torch.compile(pipe.unet, backend={args.backend!r}, mode={args.mode!r}, "
              f"dynamic={dynamic!r}); budget {args.budget_s:.0f} s")

    tap = LogTap()
    tap.attach(log_breaks=not args.no_break_log)
    compiled: dict[tuple[int, str], torch.Tensor] = {}
    for batch in batches:
        conditioning = embeddings(unet.config, batch, args.device, dtype)
        for label, guidance in methods(args.scale, args.guided_first):
            for attempt in ("first", "warm"):
                case: dict[str, Any] = {"batch": batch, "method": label, "call": attempt}
                if clock.elapsed() > args.budget_s:
                    result["skipped"].append(case)
                    clock.log(f"skip   B={batch} {label} ({attempt}): budget of {args.budget_s:.0f} s spent")
                    continue
                clock.log(f"start  B={batch} {label} ({attempt})")
                outcome, latents = timed_call(pipe, guidance, recorder, tap, unet_forward_code, {
                    **conditioning, "height": side, "width": side, "num_inference_steps": args.steps,
                    "guidance_scale": args.scale, "output_type": "latent"}, args.device)
                case.update(outcome)
                if attempt == "first" and latents is not None:
                    compiled[(batch, label)] = latents
                result["calls"].append(case)
                write_json(json_path, result)
                clock.log(f"done   B={batch} {label} ({attempt}): {case['wall_s']:.2f} s, compile "
                          f"{case['compile_s']:.1f} s, frames {case['frames']} ({case['frames_failed']} failed), "
                          f"graphs {case['graphs']}, breaks {case['breaks']}, UNet cache entries "
                          f"{case['unet_cache_entries']}, UNet batches {case['unet_batches']}, recompile reasons "
                          f"{case['recompile_reasons_count']}"
                          + "".join(f"\n        reason {line}" for line in first_lines(case["recompile_reasons"], 3))
                          + "".join(f"\n        break {line}" for line in first_lines(case["break_reasons"], 3))
                          + "".join(f"\n        graph break {line}" for line in first_lines(case["graph_breaks"], 3))
                          + "".join(f"\n        warning {line}" for line in first_lines(case["warnings"], 3))
                          + (f"\n        ERROR {case['error']}" if case["error"] else ""))

    # The compiled graph against the uncompiled UNet: same calls, same seeds (fp16 rounding differs, nothing more).
    pipe.unet = unet
    result["eager_check"] = []
    for batch in batches:
        conditioning = embeddings(unet.config, batch, args.device, dtype)
        for label, guidance in methods(args.scale, args.guided_first):
            if (batch, label) not in compiled or clock.elapsed() > args.budget_s + 60:
                continue
            pipe.set_guidance(guidance)
            sync(args.device)
            start = time.perf_counter()
            eager = pipe(**conditioning, height=side, width=side, num_inference_steps=args.steps,
                         guidance_scale=args.scale, output_type="latent",
                         generator=torch.Generator(args.device).manual_seed(0)).images
            sync(args.device)
            wall = time.perf_counter() - start
            pipe.set_guidance(None)
            ref = compiled[(batch, label)]
            check = {"batch": batch, "method": label, "max_abs_diff": float((eager.float() - ref.float()).abs().max()),
                     "eager_max_abs": float(eager.float().abs().max()), "eager_wall_s": round(wall, 3)}
            result["eager_check"].append(check)
            clock.log(f"eager check B={batch} {label}: max |compiled - eager| {check['max_abs_diff']:.3g} "
                      f"(latents up to {check['eager_max_abs']:.3g})")
            write_json(json_path, result)

    result["complete"] = not result["skipped"]
    result["total_s"] = round(clock.elapsed(), 1)
    write_json(json_path, result)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    report(result, json_path)


def timed_call(pipe: StableDiffusionXLPipeline, guidance: Any, recorder: BatchRecorder, tap: LogTap,
               code: Any, call: dict[str, Any], device: str) -> tuple[dict[str, Any], torch.Tensor | None]:
    """One pipeline call under ``guidance`` (``None``: native CFG): wall time, compile work, rows, memory; and
    the final latents (``None`` if the call failed)."""
    cuda = device.startswith("cuda")
    pipe.set_guidance(guidance)
    recorder.sizes.clear()
    tap.clear()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = compile_snapshot(code)
    error, finite, images = None, None, None
    sync(device)
    start = time.perf_counter()
    try:
        images = pipe(**call, generator=torch.Generator(device).manual_seed(0)).images
        sync(device)
        wall = time.perf_counter() - start
        finite = bool(torch.isfinite(images).all())
    except Exception as exc:  # a failed compile: keep the log and go on with the next call
        wall, error = time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
        sys.stderr.flush()
    stats = pipe.guidance_stats if guidance is not None else None
    pipe.set_guidance(None)
    return {
        "wall_s": round(wall, 3),
        **compile_diff(before, compile_snapshot(code)),
        "unet_batches": dict(sorted(recorder.sizes.items())),
        **{f: getattr(stats, f, None) for f in STATS_FIELDS},
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "latents_finite": finite,
        "warnings": list(tap.warnings[:50]),
        "graph_breaks": list(tap.breaks[:100]),
        "graph_breaks_count": len(tap.breaks),
        "error": error,
    }, images


def report(result: dict[str, Any], json_path: Path | None) -> None:
    """The human table (markdown) and the reasons behind each call's compiles."""
    args, pipeline = result["args"], result["pipeline"]
    print(f"\nmachine: {result['machine']}")
    print(f"{pipeline['kind']}, {pipeline['width']}x{pipeline['height']}, {args['dtype']}, {args['steps']} steps "
          f"({pipeline['scheduler']}), w = {args['scale']:g}, torch.compile backend {args['backend']}, mode "
          f"{args['mode']}, dynamic {args['dynamic']}, inductor cache {'default' if args['keep_cache'] else 'fresh'}; "
          f"build {result['build_s']} s, total {result['total_s']} s\n")
    print("| B | method | call | wall (s) | compile (s) | frames (failed) | graphs | breaks | UNet entries | "
          "UNet batches | model calls | cond | uncond | skipped | peak (GiB) | finite |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in result["calls"]:
        cells = [c["batch"], c["method"], c["call"], f"{c['wall_s']:.2f}", f"{c['compile_s']:.1f}",
                 f"{c['frames']} ({c['frames_failed']})", c["graphs"], c["breaks"], c["unet_cache_entries"],
                 " ".join(f"{k}x{v}" for k, v in c["unet_batches"].items()) or "–",
                 *("–" if c[f] is None else c[f] for f in STATS_FIELDS),
                 "–" if c["peak_gib"] is None else f"{c['peak_gib']:.1f}", c["latents_finite"]]
        print("| " + " | ".join(str(x) for x in cells) + " |" + (f" ERROR {c['error'][:200]}" if c["error"] else ""))
    for s in result["skipped"]:
        print(f"skipped (budget): B={s['batch']} {s['method']} ({s['call']})")
    print("\nWhat each call compiled (most frequent first lines, at most 5 of each kind):")
    for c in result["calls"]:
        lines = ([f"recompile reason: {x}" for x in first_lines(c["recompile_reasons"], 5)]
                 + [f"break: {x}" for x in first_lines(c["break_reasons"], 5)]
                 + [f"graph break: {x}" for x in first_lines(c["graph_breaks"], 5)]
                 + [f"warning: {x}" for x in first_lines(c["warnings"], 5)])
        if lines:
            print(f"  B={c['batch']} {c['method']} ({c['call']}), {c['recompile_reasons_count']} reasons:")
            for line in lines:
                print(f"    {line}")
    if json_path is not None:
        print(f"\nJSON: {json_path}")


if __name__ == "__main__":
    main()
