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

A third figure does not depend on the machine: the work each call hands a GPU, counted by running the same call on
tensors of the ``meta`` device (shapes only, no data) under a dispatch mode. ``kernels`` are the operators that
would launch one (views and allocations aside); ``host syncs`` are the points where the host waits for the device:
a value read back (``.item()``, ``bool()``, a copy to the CPU), a boolean index (its size depends on the data), or a
CPU tensor (a mask, row positions) copied to the device. On a GPU at batch 1 the host runs ahead of the device, so
kernels cost little while each sync exposes the whole launch latency.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from _common import interleaved, machine, median
from torch.utils._python_dispatch import TorchDispatchMode

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


def _devices(args: Any) -> set[str]:
    found: set[str] = set()
    for a in args:
        if isinstance(a, torch.Tensor):
            found.add(a.device.type)
        elif isinstance(a, (list, tuple)):
            found |= _devices(a)
    return found


class DeviceWork(TorchDispatchMode):
    """Counts the kernels and host syncs of what runs on ``meta`` tensors (module docstring); a value read back from
    the device is taken as ``True`` / ``0.5`` / all-ones, so the code runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        devices = _devices(args) | _devices(kwargs.values())
        target = kwargs.get("device")
        if name == "_to_copy" and target is not None and torch.device(target).type != args[0].device.type:
            if args[0].device.type == "meta":
                self.syncs["copy to the host"] += 1
                return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if torch.device(target).type == "meta":
                self.syncs["copy to the device"] += 1
        elif "meta" in devices:
            if name == "_local_scalar_dense":
                self.syncs["value read"] += 1
                return True if args[0].dtype == torch.bool else 0.5
            if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                self.syncs["boolean index"] += 1
                self.kernels += 1
                return torch.empty_like(args[0])
            if "cpu" in devices and any(isinstance(a, torch.Tensor) and a.dim() > 0 and a.device.type == "cpu"
                                        for a in (*args, *(args[1] if name.startswith("index") else ()))):
                self.syncs["CPU tensor argument"] += 1
            if not func.is_view and name not in ("empty", "detach", "lift_fresh", "empty_strided"):
                self.kernels += 1
        return func(*args, **kwargs)


def device_work(guidance: Guidance, batch: int, shape: tuple[int, ...]) -> tuple[int, int]:
    """Kernels and host syncs of one call of ``guidance``'s combination (after one call made its state)."""
    meta = torch.device("meta")
    x, cond = torch.empty(batch, *shape, device=meta), torch.empty(batch, *shape, device=meta)
    ctx = GuidanceContext(x=x, level=NoiseLevel.from_sigma(2.0), model_space="eps", step=3, num_steps=30,
                          step_sigma=2.0, tau=0.5, corrector=False, rows=torch.arange(batch), batch_size=batch)
    state = guidance.init_state(batch)
    masks = guidance.needs(ctx, state)
    extra = {p: torch.empty(int(m.sum()), *shape, device=meta) for p, m in masks.items()}
    with DeviceWork():
        apply_guidance(guidance, cond, extra, masks, ctx, state)  # a first call makes buffers (APG's momentum)
    with DeviceWork() as work:
        apply_guidance(guidance, cond, extra, masks, ctx, state)
    return work.kernels, sum(work.syncs.values())


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
    print("| method | median time per call (us) | ratio to CFG (median of paired ratios) | kernels | host syncs |")
    print("|---|---:|---:|---:|---:|")
    for (name, ts), method in zip(times.items(), methods().values(), strict=True):
        ratio = median([t / c for t, c in zip(ts, times["CFG"], strict=True)])
        kernels, syncs = device_work(method, args.batch, tuple(args.shape))
        print(f"| {name} | {median(ts) / CALLS * 1e6:.0f} | {ratio:.2f} | {kernels} | {syncs} |")


if __name__ == "__main__":
    main()
