"""Overhead of ``set_guidance(CFG(w))`` against the pipeline's native CFG: same pipeline, scheduler, seed.

    python benchmarks/overhead.py                      # every tiny family on this machine's CPU
    python benchmarks/overhead.py --model sd15 --steps 30 --device cuda   # SD1.5 architecture, fp16, 512x512

Runs are interleaved (the order rotates every round). Two figures: the ratio of the median wall times, and the
median over rounds of guided / native within the round (less sensitive to drift of a shared machine). A control
times the native call a second time in every round: its paired ratio to the first native call would be 1 on a
steady machine, so its distance from 1 is the wall-time noise the other ratios carry (this project's 2-core VM
changes speed by a quarter every few seconds). The denoisers' forwards are clocked in every run as well: their
paired ratio, guided to native, shows whether the network itself runs slower in the guided calls (on the
smallest networks, Python work between forwards evicts them from the CPU caches).

Two figures do not depend on the network's speed. The time spent inside guidekit's denoiser proxy outside the
network's forward, per denoiser call (``GuidedDenoiser.call`` minus its forwards, clocked during the guided runs).
And everything guidekit adds to a pipeline call (attaching, the proxy, the finite check, detaching): the pipeline's
denoisers are then replaced by the output of their first call, so the network costs nothing, and native and guided
calls are timed again, interleaved; the median of the paired differences is the added time, and ``1 + added /
native median`` the ratio it implies for the real pipeline.

``--stub-network`` stubs the network for the wall-time runs too (their ratios are then not meaningful).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from _common import add_common_arguments, interleaved, load, machine, median, output_type

import guidekit
from guidekit.bridge.families import family_of_class
from guidekit.bridge.proxy import GuidedDenoiser
from guidekit.testing.tiny import FAMILIES


def timed(fn: Callable[..., object], clock: dict[str, float], key: str, counts: str | None = None
          ) -> Callable[..., object]:
    """The method ``fn``, adding the seconds of each call to ``clock[key]`` (and 1 to ``clock[counts]``)."""
    def run(self: object, *args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - start
            if counts is not None:
                clock[counts] += 1

    return run


@contextmanager
def proxy_clock() -> Iterator[dict[str, float]]:
    """Clock ``GuidedDenoiser.call`` (every denoiser call, of every expert) and the forwards it makes, for the
    block: seconds and calls."""
    clock = {"proxy": 0.0, "forward": 0.0, "calls": 0}
    call, forward = GuidedDenoiser.call, GuidedDenoiser._forward
    timed_call, timed_forward = timed(call, clock, "proxy", "calls"), timed(forward, clock, "forward")
    GuidedDenoiser.call, GuidedDenoiser._forward = timed_call, timed_forward  # type: ignore[method-assign]
    try:
        yield clock
    finally:
        GuidedDenoiser.call, GuidedDenoiser._forward = call, forward  # type: ignore[method-assign]


@contextmanager
def network_clock(pipe: object) -> Iterator[dict[str, float]]:
    """Clock the forward of the pipeline's denoisers (every expert's), native or guided, for the block: seconds."""
    clock = {"seconds": 0.0}
    family = family_of_class(type(pipe))
    classes = {type(getattr(pipe, name)) for name in (family.denoiser, *family.experts) if getattr(pipe, name, None)}
    saved = {cls: cls.forward for cls in classes}
    for cls, forward in saved.items():
        cls.forward = timed(forward, clock, "seconds")
    try:
        yield clock
    finally:
        for cls, forward in saved.items():
            cls.forward = forward


def clocked(run: Callable[[], None], net: dict[str, float], into: list[float]) -> Callable[[], None]:
    """``run``, appending to ``into`` the seconds its network forwards took (read from ``net``)."""
    def timed() -> None:
        start = net["seconds"]
        run()
        into.append(net["seconds"] - start)

    return timed


def paired(times: dict[str, list[float]], name: str) -> float:
    """The median over rounds of run ``name``'s time over the native run's in the same round."""
    return median([b / a for a, b in zip(times["native"], times[name], strict=True)])


def stub_network(pipe: object, call: dict, device: str) -> None:
    """Make the pipeline's denoisers (each expert's) return the output of their first call, whatever the inputs."""
    family = family_of_class(type(pipe))
    for name in (family.denoiser, *family.experts):
        denoiser = getattr(pipe, name, None)
        if denoiser is None:
            continue
        outputs: list[object] = []
        forward = denoiser.forward
        denoiser.forward = lambda *a, _f=forward, _o=outputs, **k: _o.append(_f(*a, **k)) or _o[-1]
        pipe(**call, generator=torch.Generator(device).manual_seed(0))  # type: ignore[operator]
        denoiser.forward = lambda *a, _o=outputs, **k: _o[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=[f for f in FAMILIES if f != "sd-v"])
    add_common_arguments(parser, steps=20, repeats=15)
    parser.add_argument("--stub-network", action="store_true", help="the denoiser returns its first output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"steps {args.steps}, repeats {args.repeats}, CFG weight {args.scale}, batch {args.batch}\n")
    print("| model | scheduler | native (ms) | set_guidance(CFG) (ms) | ratio of medians | median of paired ratios | "
          "control: native again, paired | network forwards, guided / native, paired | proxy per denoiser call (us) "
          "| added per pipeline call, network stubbed (ms) | implied ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.model:
        pipe, call = load(model, args.device, args.batch)
        family = family_of_class(type(pipe))  # the pipeline's scale argument that means weight args.scale
        call = {**call, "num_inference_steps": args.steps, family.scale_arg: args.scale - family.scale_offset,
                "output_type": output_type(model)}
        guidance = guidekit.CFG(args.scale)
        if args.stub_network:
            stub_network(pipe, call, args.device)

        def native(pipe=pipe, call=call) -> None:
            pipe(**call, generator=torch.Generator(args.device).manual_seed(0))

        def guided(pipe=pipe, call=call, guidance=guidance) -> None:
            pipe.set_guidance(guidance)
            try:
                pipe(**call, generator=torch.Generator(args.device).manual_seed(0))
            finally:
                pipe.set_guidance(None)

        native(), guided()  # warm-up
        forwards: dict[str, list[float]] = {"native": [], "guided": [], "control": []}
        with proxy_clock() as clock, network_clock(pipe) as net:
            runs = {"native": native, "guided": guided, "control": native}
            times = interleaved({name: clocked(run, net, forwards[name]) for name, run in runs.items()},
                                args.repeats, args.device)
        n, g = median(times["native"]), median(times["guided"])
        pairs, control = paired(times, "guided"), paired(times, "control")
        forward = paired(forwards, "guided") if all(forwards["native"]) else float("nan")  # none when stubbed
        per_call = (clock["proxy"] - clock["forward"]) / clock["calls"]
        if args.stub_network:  # the runs above already had the network stubbed
            stubbed = times
        else:
            stub_network(pipe, call, args.device)
            native(), guided()
            stubbed = interleaved({"native": native, "guided": guided}, args.repeats, args.device)
        added = median([b - a for a, b in zip(stubbed["native"], stubbed["guided"], strict=True)])
        print(f"| {model} | {type(pipe.scheduler).__name__} | {n * 1e3:.1f} | {g * 1e3:.1f} | {g / n:.3f} | "
              f"{pairs:.3f} | {control:.3f} | {forward:.3f} | {per_call * 1e6:.0f} | {added * 1e3:.2f} | "
              f"{1 + added / n:.3f} |", flush=True)


if __name__ == "__main__":
    main()
