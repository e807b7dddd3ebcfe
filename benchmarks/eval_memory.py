"""Peak memory of the blockwise precision/recall against the N x N distance matrix it avoids.

Each size runs in a fresh subprocess: it draws real and fake float32 features ``(N, dim)``, warms up, resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``), runs ``precision_recall`` and reports how far the peak RSS
rose above the RSS before the call. Every size runs with ``--block-size``; the smallest size runs again with each
of ``--other-block-sizes``. The ``prdc`` package (full matrices through scikit-learn) is measured the same way up
to ``--prdc-up-to``. Linux only (reads ``/proc/self/status``). About 3 minutes on 2 CPU cores with the defaults.

    python benchmarks/eval_memory.py                       # N = 5000 and 20000, dim 2048
    python benchmarks/eval_memory.py --sizes 5000 10000 --block-size 4096 --other-block-sizes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MIB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} is missing from /proc/self/status")


def _child(n: int, dim: int, block_size: int, method: str) -> None:
    import numpy as np

    from guidekit.evaluation import precision_recall

    rng = np.random.default_rng(0)
    real = rng.standard_normal((n, dim), dtype=np.float32)
    fake = rng.standard_normal((n, dim), dtype=np.float32)
    fake += 0.05
    if method == "guidekit":
        def run() -> object:
            return precision_recall(real, fake, 3, block_size=block_size)
        precision_recall(real[:64], fake[:64], 3, block_size=block_size)  # warm up threads and allocator
    else:
        import prdc

        def run() -> object:
            return prdc.compute_prdc(real, fake, nearest_k=3)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    print(json.dumps({"growth_kib": _status_kib("VmHWM") - before, "seconds": seconds, "reset": reset,
                      "result": repr(result)}))


def _measure(n: int, dim: int, block_size: int, method: str) -> dict:
    command = [sys.executable, __file__, "--child", str(n), "--dim", str(dim), "--block-size", str(block_size),
               "--method", method]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="N = rows per set")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--other-block-sizes", type=int, nargs="*", default=[1024],
                        help="block sizes also run at the smallest N")
    parser.add_argument("--prdc-up-to", type=int, default=5000,
                        help="also measure the prdc package for N up to this (0: never)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="guidekit", choices=["guidekit", "prdc"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.dim, args.block_size, args.method)
        return

    from _common import machine

    print(f"precision_recall peak memory, k=3, float32 features of dim {args.dim}, float64 tiles (the default)")
    print(f"{machine()}\n")
    print("| N (real = fake) | block_size | features, both sets | tile buffers | peak RSS growth | time | "
          "one N x N float32 matrix | prdc package peak RSS growth |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs = [(n, args.block_size) for n in args.sizes] + [(min(args.sizes), b) for b in args.other_block_sizes]
    for n, block_size in runs:
        ours = _measure(n, args.dim, block_size, "guidekit")
        other = "not run"
        if n <= args.prdc_up_to and block_size == args.block_size:
            measured = _measure(n, args.dim, block_size, "prdc")
            other = f"{measured['growth_kib'] / 1024:.0f} MiB in {measured['seconds']:.1f} s"
        block = min(block_size, n)
        tiles = (2 * block * args.dim * 8 + block * block * 9) / MIB  # two float64 row blocks, distances, mask
        note = "" if ours["reset"] else " (peak not reset)"
        print(f"| {n} | {block_size} | {2 * n * args.dim * 4 / MIB:.0f} MiB | {tiles:.0f} MiB | "
              f"{ours['growth_kib'] / 1024:.0f} MiB{note} | {ours['seconds']:.1f} s | {n * n * 4 / MIB:.0f} MiB | "
              f"{other} |")

if __name__ == "__main__":
    main()
