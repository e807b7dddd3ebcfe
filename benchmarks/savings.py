"""Rows computed and wall time of methods that skip unconditional rows, against CFG, in one run.

    python benchmarks/savings.py                         # tiny SDXL pipeline on this machine's CPU
    python benchmarks/savings.py --model sd15 --device cuda --steps 32

Methods: CFG(w); Interval(CFG(w)) with the SDXL interval (0.28, 5.42] of Kynkaanniemi et al.;
AdaptiveGuidance(CFG(w), 0.991); Interval(APG(w)) on the same interval. The random-weight pipelines say
nothing about image quality: this measures what each method costs.
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_arguments, interleaved, load, machine, median, output_type

import guidekit
from guidekit.bridge.schedulers import SCHEDULER_NAMES, make_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl")
    add_common_arguments(parser, steps=32, repeats=7)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), default="euler")
    parser.add_argument("--karras", action="store_true", help="Karras sigmas (the EDM schedule of the paper)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe, call = load(args.model, args.device, args.batch)
    config = {**pipe.scheduler.config, **({"use_karras_sigmas": True} if args.karras else {})}
    pipe.scheduler = make_scheduler(args.scheduler, config)
    call = {**call, "num_inference_steps": args.steps, "guidance_scale": args.scale,
            "output_type": output_type(args.model)}
    w = args.scale
    methods = {
        "CFG": guidekit.CFG(w),
        "Interval(CFG), (0.28, 5.42]": guidekit.Interval(guidekit.CFG(w), 0.28, 5.42),
        "AdaptiveGuidance(CFG, 0.991)": guidekit.AdaptiveGuidance(guidekit.CFG(w), threshold=0.991),
        "Interval(APG), (0.28, 5.42]": guidekit.Interval(guidekit.APG(w), 0.28, 5.42),
    }
    stats = {}

    def runner(name: str):
        def run() -> None:
            pipe.set_guidance(methods[name])
            try:
                pipe(**call, generator=torch.Generator(args.device).manual_seed(0))
                stats[name] = pipe.guidance_stats
            finally:
                pipe.set_guidance(None)
        return run

    runs = {name: runner(name) for name in methods}
    for run in runs.values():
        run()  # warm-up
    times = interleaved(runs, args.repeats, args.device)
    base_rows, base_time = stats["CFG"].rows, median(times["CFG"])
    print(f"machine: {machine()}")
    print(f"model {args.model}, scheduler {type(pipe.scheduler).__name__}{' (Karras sigmas)' if args.karras else ''}, "
          f"{args.steps} steps, weight {w}, batch {args.batch}\n")
    print("| method | model calls | cond rows | uncond rows | rows vs CFG | wall (ms) | speed-up vs CFG |")
    print("|---|---|---|---|---|---|---|")
    for name in methods:
        s, t = stats[name], median(times[name])
        print(f"| {name} | {s.model_calls} | {s.cond_rows} | {s.uncond_rows} | {s.rows / base_rows:.2f} | "
              f"{t * 1e3:.1f} | {base_time / t:.2f}x |")


if __name__ == "__main__":
    main()
