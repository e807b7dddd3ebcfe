"""Train guidekit's embedded default model: a class-conditional pixel UNet on coloured 8x8 digits.

    python scripts/train_default_model.py                 # GPU if present, else CPU; writes guidekit/app/default_model

The data is described in ``guidekit.app.digits``. Each step draws a batch of training shapes with fresh random
colours. Labels are dropped to the null class with probability 0.1 (label dropout), so classifier-free guidance
applies. The loss is the usual epsilon MSE on DDPM's cosine schedule, with an EMA of the weights. The script saves
the EMA weights with a DDIM scheduler (``"leading"`` spacing, no clipping) in diffusers format, plus
``training.json`` with the settings, time, machine and loss.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from guidekit.app.digits import NUM_CLASSES, SIZE, colourise, digit_shapes
from guidekit.bridge.class_pipeline import ClassConditionalPipeline

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "guidekit" / "app" / "default_model"


def build_unet() -> UNet2DModel:
    """The default model's architecture: 0.65M parameters, two resolutions, 11 class embeddings (10 + null)."""
    return UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=NUM_CLASSES + 1,
                       norm_num_groups=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    intensity, labels = (torch.from_numpy(a) for a in digit_shapes("train"))
    unet = build_unet().to(args.device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    abar = noise_schedule.alphas_cumprod.to(args.device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        index = torch.randint(0, len(labels), (args.batch,), generator=generator)
        x0 = colourise(intensity[index], generator).to(args.device) * 2 - 1
        y = labels[index].clone()
        y[torch.rand(args.batch, generator=generator) < args.label_dropout] = NUM_CLASSES
        t = torch.randint(0, 1000, (args.batch,), generator=generator).to(args.device)
        noise = torch.randn(x0.shape, generator=generator).to(args.device)
        a = abar[t].sqrt()[:, None, None, None]
        s = (1 - abar[t]).sqrt()[:, None, None, None]
        loss = (unet(a * x0 + s * noise, t, class_labels=y.to(args.device)).sample - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 500 == 0 or step == args.steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"step {step}: loss {recent:.4f}, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    # "leading" spacing: the cosine schedule's last timestep has alphas_cumprod ~ 0, where DDIM's x0 estimate divides
    # by ~0 and sampling from t = 999 fails without clipping (and clipping would hide the oversaturation the demo
    # is meant to show).
    scheduler = DDIMScheduler.from_config(noise_schedule.config, timestep_spacing="leading", steps_offset=1,
                                          set_alpha_to_one=False, clip_sample=False)
    ClassConditionalPipeline(ema.to("cpu"), scheduler).save_pretrained(args.out, safe_serialization=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    record = {"date": datetime.date.today().isoformat(), "machine": f"{device}, {platform.machine()}",
              "torch": torch.__version__, "threads": args.threads, "seconds": round(seconds, 1),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "parameters": sum(p.numel() for p in ema.parameters()),
              "final_loss_mean_last_500": sum(losses[-500:]) / len(losses[-500:])}
    (args.out / "training.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
