"""Cost of one guidance combination (no network) per method, at a given latent shape and dtype.

    python benchmarks/combine_cost.py --device cuda --batch 8 --dtype float16

Times ``apply_guidance`` on random predictions (with CUDA synchronisation) for every method that needs no network
pass beyond the conditional and unconditional ones (the CFG reshapings), and for CFG plus a perturbed pass (PAG,
SEG), whose perturbed predictions are random too. Each method's state comes from ``init_state`` and its pass masks
from ``needs``, once, as at one denoiser call. Each timed run is ``CALLS`` consecutive calls, and every round runs
the methods in a new random order: what one method leaves in the caches and the allocator (FDG's float64 pyramids
cost the next run about 0.6 ms on a CPU) then weighs on one call in ``CALLS``, and not always on the same method, as
a rotation of a fixed order would. Two figures: the median time per call, and the median over rounds of the run's
time over CFG's in the same round.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _common import interleaved, machine, median

import guidekit
from guidekit.guidance import apply_guidance
from guidekit.guidance.base import Guidance, GuidanceContext
from guidekit.parameterization import NoiseLevel

#: Calls of one method per timed run.
CALLS = 5


def methods() -> dict[str, Guidance]:
    """The methods timed, by the name in the table; CFG first (the reference)."""
    return {
        "CFG": guidekit.CFG(5.0),
        "CFG rescale 0.7": guidekit.CFG(5.0, rescale=0.7),
        "APG": guidekit.APG(5.0),
        "CFGZeroStar": guidekit.CFGZeroStar(5.0, zero_init_steps=0),
        "AdaptiveGuidance(CFG)": guidekit.AdaptiveGuidance(guidekit.CFG(5.0)),
        "TCFG": guidekit.TCFG(5.0),
        "MAMBOG": guidekit.MAMBOG(5.0),
        **{f"CFGNorm {v}": guidekit.CFGNorm(5.0, variant=v) for v in ("per_token", "per_sample", "per_pixel")},
        "FDG((10, 5))": guidekit.FDG((10.0, 5.0)),
        "FDG((10, 5), parallel_weights=(0.5, 0.5))": guidekit.FDG((10.0, 5.0), parallel_weights=(0.5, 0.5)),
        "CFG + PAG": guidekit.CFG(5.0) + guidekit.PAG(3.0),
        "CFG + SEG": guidekit.CFG(5.0) + guidekit.SEG(3.0),
    }


def combination(guidance: Guidance, ctx: GuidanceContext, cond: torch.Tensor, g: torch.Generator
                ) -> Callable[[], None]:
    """``CALLS`` calls of ``guidance``'s combination at ``ctx``, with one state (``init_state``), the masks of
    ``needs`` and, per pass they name, random predictions of the rows whose mask is set."""
    state = guidance.init_state(ctx.batch_size)
    masks = guidance.needs(ctx, state)
    extra = {p: torch.randn(int(m.sum()), *cond.shape[1:], generator=g, device=cond.device, dtype=cond.dtype)
             for p, m in masks.items()}

    def run() -> None:
        for _ in range(CALLS):
            apply_guidance(guidance, cond, extra, masks, ctx, state)

    return run


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
    x, cond = (torch.randn(args.batch, *args.shape, generator=g, device=args.device, dtype=dtype) for _ in range(2))
    ctx = GuidanceContext(x=x, level=NoiseLevel.from_sigma(2.0), model_space="eps", step=3, num_steps=30,
                          step_sigma=2.0, tau=0.5, corrector=False, rows=torch.arange(args.batch),
                          batch_size=args.batch)
    runs = {name: combination(m, ctx, cond, g) for name, m in methods().items()}
    for run in runs.values():  # warm-up
        run()
    times = interleaved(runs, args.repeats, args.device, shuffle=True)
    print(f"machine: {machine()}")
    print(f"batch {args.batch}, latents {tuple(args.shape)}, {args.dtype}, {args.device}, {args.repeats} rounds of "
          f"{CALLS} calls, eps model at sigma 2\n")
    print("| method | median time per call (us) | ratio to CFG (median of paired ratios) |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        ratio = median([t / c for t, c in zip(ts, times["CFG"], strict=True)])
        print(f"| {name} | {median(ts) / CALLS * 1e6:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
