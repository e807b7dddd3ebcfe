"""Cost of one guidance combination (no network) per method, at a given latent shape and dtype.

    python benchmarks/combine_cost.py --device cuda --batch 8 --dtype float16

Times ``apply_guidance`` on random predictions with CUDA synchronisation, median of many calls.
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved, machine, median

import guidekit
from guidekit.guidance import apply_guidance
from guidekit.guidance.base import GuidanceContext
from guidekit.parameterization import NoiseLevel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[4, 64, 64], help="latent C H W")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(args.device).manual_seed(0)
    x, c, u = (torch.randn(args.batch, *args.shape, generator=g, device=args.device, dtype=dtype) for _ in range(3))
    ctx = GuidanceContext(x=x, level=NoiseLevel.from_sigma(2.0), model_space="eps", step=3, num_steps=30,
                          step_sigma=2.0, tau=0.5, corrector=False, rows=torch.arange(args.batch),
                          batch_size=args.batch)
    mask = torch.ones(args.batch, dtype=torch.bool)
    methods = {"CFG": guidekit.CFG(5.0), "CFG rescale 0.7": guidekit.CFG(5.0, rescale=0.7),
               "APG": guidekit.APG(5.0), "CFGZeroStar": guidekit.CFGZeroStar(5.0, zero_init_steps=0),
               "AdaptiveGuidance(CFG)": guidekit.AdaptiveGuidance(guidekit.CFG(5.0))}
    for m in methods.values():
        m.reset(args.batch)
    runs = {name: (lambda m=m: apply_guidance(m, c, u, mask, ctx)) for name, m in methods.items()}
    for run in runs.values():
        run()
    times = interleaved(runs, args.repeats, args.device)
    print(f"machine: {machine()}")
    print(f"batch {args.batch}, latents {tuple(args.shape)}, {args.dtype}\n")
    print("| method | median time per call (us) |")
    print("|---|---|")
    for name in methods:
        print(f"| {name} | {median(times[name]) * 1e6:.0f} |")


if __name__ == "__main__":
    main()
