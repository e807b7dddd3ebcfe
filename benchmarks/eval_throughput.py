"""Features per second of the evaluation harness against a plain loop over the same network.

    python benchmarks/eval_throughput.py                          # CPU: 64 images of 64x64, batch 16
    python benchmarks/eval_throughput.py --device cuda --images 2048 --batch 256

The harness is ``InceptionFeatures`` (TF-legacy preprocessing, batching, float32 CPU features). The plain loop is
what a script would write: the same TorchScript network, ``torch.nn.functional.interpolate`` (bilinear) to 299 and
``(x - 128) / 128``, batch by batch. Runs are interleaved; the figure is the ratio of median features per second
(harness / plain, >= 1 means the harness is not slower).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import interleaved, machine, median

from guidekit.evaluation.features import InceptionFeatures, locate_inception


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="image side before the resize to 299")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (args.images, 3, args.size, args.size),
                                                                dtype=np.uint8))
    harness = InceptionFeatures(device=args.device, batch_size=args.batch)
    model = torch.jit.load(str(locate_inception()), map_location=args.device).eval()

    def plain() -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(images), args.batch):
                x = images[start:start + args.batch].to(args.device).float()
                x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                out.append(model((x - 128.0) / 128.0).cpu())
        return torch.cat(out)

    harness(images[: args.batch]), plain()  # warm-up
    times = interleaved({"harness": lambda: harness(images), "plain": plain}, args.repeats, args.device)
    h, p = args.images / median(times["harness"]), args.images / median(times["plain"])
    print(f"\n{args.images} images of {args.size}x{args.size}, batch {args.batch}, {args.repeats} rounds\n")
    print("| loop | features/s |\n|---|---|")
    print(f"| guidekit harness (InceptionFeatures, tf-legacy) | {h:.2f} |")
    print(f"| plain loop (F.interpolate + TorchScript) | {p:.2f} |")
    print(f"| ratio harness / plain | {h / p:.3f} |")


if __name__ == "__main__":
    main()
