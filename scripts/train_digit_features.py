"""Train the digits feature network: the classifier whose penultimate features score the embedded model.

    python scripts/train_digit_features.py      # writes guidekit/app/default_model/digit_features/

Each step draws a batch of training shapes (``guidekit.app.digits``, the default model's training split) with fresh
random colours, so the classifier reads the digit under any colouring. Adam, cross-entropy, a fixed seed. The
script saves the weights (safetensors) and ``training.json`` with the settings, time, machine and the accuracy on
five colourings of the held-out split.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from guidekit.app.digits import coloured_digits, colourise, digit_shapes
from guidekit.evaluation.digit_features import WEIGHTS, DigitNet


def held_out_accuracy(net: DigitNet, colourings: int = 5, seed: int = 1) -> float:
    """Accuracy on ``colourings`` random colourings of the held-out split."""
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    with torch.no_grad():
        for _ in range(colourings):
            images, labels = coloured_digits("test", generator)
            predicted = net.logits(net(images.float() / 255)).argmax(1)
            correct, total = correct + int((predicted == labels).sum()), total + len(labels)
    return correct / total


def train(steps: int, batch: int, lr: float, seed: int) -> DigitNet:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    intensity, labels = (torch.from_numpy(a) for a in digit_shapes("train"))
    net = DigitNet()
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(len(labels), (batch,), generator=generator)
        images = colourise(intensity[index], generator)
        loss = F.cross_entropy(net.logits(net(images)), labels[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS.parent)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    net = train(args.steps, args.batch, args.lr, args.seed)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / WEIGHTS.name))
    record = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, torch {torch.__version__}",
              "seconds": round(seconds, 1), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "parameters": sum(p.numel() for p in net.parameters()), "held_out_accuracy": held_out_accuracy(net)}
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
