"""Measure the embedded default model and write its model card (guidekit/app/default_model/README.md) and its
held-out images (held_out.npz).

    python scripts/model_card.py [--model DIR] [--per-class 50] [--steps 20]

The held-out images are the test split under one fixed colouring (generator seed 1), saved in ADM's batch layout
(``arr_0`` uint8 NHWC, ``arr_1`` labels) so that ``guidekit reference --from default`` needs no scikit-learn; the
file is rewritten only when its images differ.

Measured with the model's own DDIM scheduler at ``--steps`` steps, for CFG weights 1 and 3:
* class accuracy of ``--per-class`` samples per class, by a logistic-regression classifier trained on the training
  split (``guidekit.app.digits.DigitClassifier``); its accuracy on the held-out real images is the reference;
* FID (``guidekit.evaluation``: FID Inception, TF-legacy) of as many samples as held-out images (360) against the
  held-out images; the floor is one colouring of 360 training images against them;
* mean HSV saturation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from guidekit.app.digits import DigitClassifier, coloured_digits
from guidekit.bridge.class_pipeline import ClassConditionalPipeline
from guidekit.evaluation import InceptionFeatures, frechet_distance, gaussian_statistics, saturation
from guidekit.evaluation.reference import DEFAULT_HELD_OUT

DEFAULT = Path(__file__).resolve().parents[1] / "guidekit" / "app" / "default_model"


def held_out_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out split under its fixed colouring: uint8 images ``(N, 3, 8, 8)`` and labels ``(N,)``."""
    return coloured_digits("test", torch.Generator().manual_seed(1))


def write_held_out(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Save ``images`` and ``labels`` at ``path`` in ADM's batch layout unless the file already holds them (so an
    unchanged file keeps its bytes)."""
    arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy(), "arr_1": labels.numpy()}
    if path.is_file():
        with np.load(path) as stored:
            if set(stored.files) == set(arrays) and all(np.array_equal(stored[k], v) for k, v in arrays.items()):
                return
    np.savez_compressed(path, **arrays)


def sample(pipe: ClassConditionalPipeline, labels: list[int], w: float, steps: int) -> torch.Tensor:
    out = []
    for start in range(0, len(labels), 100):
        chunk = labels[start:start + 100]
        gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=w, generator=gens, output_type="pt").images
        out.append((images * 255).round().to(torch.uint8))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = ClassConditionalPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier()
    test_images, test_labels = held_out_images()
    write_held_out(args.model / DEFAULT_HELD_OUT.name, test_images, test_labels)
    train_images, _ = coloured_digits("train", torch.Generator().manual_seed(2))
    inception = InceptionFeatures()
    test_stats = gaussian_statistics(inception(test_images).features.numpy())
    floor = frechet_distance(*gaussian_statistics(inception(train_images[: len(test_images)]).features.numpy()),
                             *test_stats)
    rows = []
    labels = [c for c in range(10) for _ in range(args.per_class)]
    for w in (1.0, 3.0):
        images = sample(pipe, labels, w, args.steps)
        fid_images = sample(pipe, test_labels.tolist(), w, args.steps)
        fid = frechet_distance(*gaussian_statistics(inception(fid_images).features.numpy()), *test_stats)
        rows.append({"w": w, "accuracy": classifier.accuracy(images, np.array(labels)), "fid": fid,
                     "saturation": float(np.mean(saturation(images)))})
    reference = {"accuracy": classifier.accuracy(test_images, test_labels), "fid_floor": floor,
                 "saturation": float(np.mean(saturation(test_images)))}
    training = json.loads((args.model / "training.json").read_text())
    (args.model / "card.json").write_text(json.dumps({"samples": rows, "held_out": reference,
                                                      "steps": args.steps, "per_class": args.per_class}, indent=1))
    table = "\n".join(f"| {r['w']:g} | {r['accuracy']:.3f} | {r['fid']:.1f} | {r['saturation']:.3f} |" for r in rows)
    card = f"""# guidekit's embedded default model

A class-conditional pixel-space diffusion model of coloured handwritten digits, small enough to ship inside the
package ({sum(f.stat().st_size for f in args.model.rglob('*.safetensors')) / 2**20:.1f} MiB of safetensors). It is the
default model of `guidekit demo`, which lets you see what guidance methods do without downloading anything.

* **Data**: the shapes are scikit-learn's bundled copy of the UCI handwritten digits: 1797 images, 8 x 8 pixels,
  classes 0-9, 80% for training in a fixed split. The colours are procedural: each image gets a random bright
  foreground colour and a dark background, drawn anew at every training step (`guidekit/app/digits.py`). The class
  is the digit, not its colour, and the oversaturation that strong guidance causes shows in the colours.
* **Model**: diffusers `UNet2DModel`, 8 x 8 x 3, two resolutions (32 and 64 channels), one ResNet block each,
  {training['parameters']:,} parameters, 11 class embeddings (10 digits and the null class). The pipeline is
  `guidekit.bridge.class_pipeline.ClassConditionalPipeline`.
* **Training** (`python scripts/train_default_model.py`):
  * epsilon prediction on DDPM's cosine schedule (1000 steps), label dropout 0.1, EMA 0.999;
  * AdamW at learning rate {training['settings']['lr']} with warm-up and cosine decay, batch
    {training['settings']['batch']}, {training['settings']['steps']} steps;
  * {training['seconds'] / 60:.1f} min on {training['machine']} ({training['threads']} threads), torch
    {training['torch']}, {training['date']};
  * final loss {training['final_loss_mean_last_500']:.4f} (mean of the last 500 steps).
* **Sampling**: DDIM with `"leading"` spacing and no clipping (the saved scheduler). The cosine schedule's last
  timestep has `alphas_cumprod` near 0, where DDIM's x0 estimate divides by nearly 0: `"trailing"` spacing
  starts there and gives noise unless `clip_sample=True`, and clipping would hide the oversaturation of strong
  guidance. guidekit's samplers (EDM Heun, PCG, CFG++) start where DDIM starts under the saved `"leading"` spacing;
  at 20 steps PCG(gamma=5) and CFG++(0.6) reach class accuracy 1.0 and 0.99 on 100 samples.

## Measured (`python scripts/model_card.py`, DDIM {args.steps} steps)

| CFG weight w | class accuracy ({10 * args.per_class} samples) | FID vs held-out ({len(test_images)} images) \
| mean saturation |
|---|---|---|---|
{table}

Reference points on the held-out real images:
* **classifier accuracy {reference['accuracy']:.3f}:** the classifier is scikit-learn logistic regression on
  per-image normalised luminance, trained on three colourings of the training split.
* **FID floor {reference['fid_floor']:.1f}:** one colouring of {len(test_images)} training images against them.
* **saturation {reference['saturation']:.3f}.**

FID is computed on 8 x 8 images resized to 299 for the Inception network, with few images. It ranks models of this
data; it does not compare with FIDs of other datasets.
"""
    (args.model / "README.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
