"""Overhead of ``set_guidance(CFG(w))`` against the pipeline's native CFG: same pipeline, scheduler, seed.

    python benchmarks/overhead.py                      # every tiny family on this machine's CPU
    python benchmarks/overhead.py --model sd15 --steps 30 --device cuda   # SD1.5 architecture, fp16, 512x512

Runs are interleaved (the order rotates every round). Two figures: the ratio of the median wall times, and the
median over rounds of guided / native within the round (less sensitive to drift of a shared machine).
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_arguments, interleaved, load, machine, median, output_type

import guidekit
from guidekit.testing.tiny import FAMILIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=[f for f in FAMILIES if f != "sd-v"])
    add_common_arguments(parser, steps=20, repeats=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"steps {args.steps}, repeats {args.repeats}, CFG weight {args.scale}, batch {args.batch}\n")
    print("| model | scheduler | native (ms) | set_guidance(CFG) (ms) | ratio of medians | median of paired ratios |")
    print("|---|---|---|---|---|---|")
    for model in args.model:
        pipe, call = load(model, args.device, args.batch)
        scale_arg = "true_cfg_scale" if model == "flux" else "guidance_scale"
        call = {**call, "num_inference_steps": args.steps, scale_arg: args.scale, "output_type": output_type(model)}
        guidance = guidekit.CFG(args.scale)

        def native(pipe=pipe, call=call) -> None:
            pipe(**call, generator=torch.Generator(args.device).manual_seed(0))

        def guided(pipe=pipe, call=call, guidance=guidance) -> None:
            pipe.set_guidance(guidance)
            try:
                pipe(**call, generator=torch.Generator(args.device).manual_seed(0))
            finally:
                pipe.set_guidance(None)

        native(), guided()  # warm-up
        times = interleaved({"native": native, "guided": guided}, args.repeats, args.device)
        n, g = median(times["native"]), median(times["guided"])
        pairs = median([b / a for a, b in zip(times["native"], times["guided"], strict=True)])
        print(f"| {model} | {type(pipe.scheduler).__name__} | {n * 1e3:.1f} | {g * 1e3:.1f} | {g / n:.3f} | "
              f"{pairs:.3f} |", flush=True)


if __name__ == "__main__":
    main()
