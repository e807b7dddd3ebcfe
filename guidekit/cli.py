"""The ``guidekit`` command line.

``guidekit sample --model ID_OR_PATH --guidance SPEC --scheduler NAME --steps N --seed S`` loads a
diffusers pipeline (a hub id, a local directory, or ``tiny:FAMILY`` for a tiny random-weight
pipeline built offline), attaches the guidance, samples, writes PNG files and prints what it did.

``guidekit eval --config run.json`` samples at scale and computes metrics (see docs/evaluation.md).

``guidekit demo [--model ID_OR_PATH]`` serves the Gradio demo on 127.0.0.1 (see docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from guidekit.bridge.loading import load_pipeline
from guidekit.bridge.sampling import SampleSettings, sample_guided
from guidekit.bridge.schedulers import SCHEDULER_NAMES
from guidekit.guidance.spec import format_guidance, parse_guidance

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; expected an integer >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guidekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="sample images from a pipeline with a guidance method")
    sample.add_argument("--model", required=True, help="hub id, local path, or tiny:FAMILY (offline test model)")
    sample.add_argument("--guidance", default="cfg(scale=5)", help="guidance text, e.g. 'apg(scale=5)'")
    sample.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), help="default: the pipeline's own")
    sample.add_argument("--steps", type=_positive_int, default=20, help="solver steps")
    sample.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    sample.add_argument("--num-images", type=_positive_int, default=1)
    sample.add_argument("--prompt", default=None, help="text prompt (text-to-image pipelines)")
    sample.add_argument("--negative-prompt", default=None)
    sample.add_argument("--class-label", type=int, default=None, help="class id (class-conditional pipelines)")
    sample.add_argument("--height", type=int, default=None)
    sample.add_argument("--width", type=int, default=None)
    sample.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    sample.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    sample.add_argument("--out", type=Path, default=Path("outputs"), help="output directory")
    _add_eval_parser(sub)
    demo = sub.add_parser("demo", help="serve the Gradio demo: guidance methods side by side (needs guidekit[demo])")
    demo.add_argument("--model", default="default",
                      help="'default' (the embedded digits model), a hub id or a local diffusers directory")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    demo.add_argument("--port", type=_positive_int, default=7860)
    demo.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    demo.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def _comma_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; expected comma-separated integers") from None


def _add_eval_parser(sub: Any) -> None:
    from guidekit.evaluation.config import DTYPES, METRICS, SAVE_IMAGES

    ev = sub.add_parser("eval", help="sample at scale and compute FID, precision/recall and other metrics "
                        "(resumable; run it under `accelerate launch` for several processes)")
    ev.add_argument("--config", type=Path, help="JSON file with the run's settings (flags override it)")
    ev.add_argument("--model")
    ev.add_argument("--output-dir")
    ev.add_argument("--guidance", help="guidekit guidance text; leave out for the pipeline's native CFG")
    ev.add_argument("--guidance-scale", type=float, help="native CFG scale when no --guidance is given")
    ev.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES))
    ev.add_argument("--steps", type=_positive_int)
    ev.add_argument("--seeds", help="'0-49999' (inclusive) or '0,5,9'")
    ev.add_argument("--class-labels", type=_comma_ints, help="class ids, used in turn by image position")
    ev.add_argument("--prompts-file", help="text file, one prompt per line, used in turn by image position")
    ev.add_argument("--resolution", type=int)
    ev.add_argument("--batch-size", type=_positive_int)
    ev.add_argument("--dtype", choices=DTYPES)
    ev.add_argument("--metrics", type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
                    help=f"comma-separated, from {', '.join(METRICS)}")
    ev.add_argument("--feature-network", help="inception (default), inception:clean, clip:PATH, dinov2:PATH")
    ev.add_argument("--reference", help="reference statistics (.npz, ADM layout)")
    ev.add_argument("--clip-model")
    ev.add_argument("--clip-reference")
    ev.add_argument("--dinov2-model")
    ev.add_argument("--dinov2-reference")
    ev.add_argument("--save-images", choices=SAVE_IMAGES)
    ev.add_argument("--shard-size", type=_positive_int)
    ev.add_argument("--no-progress", action="store_true")
    sw = sub.add_parser("sweep", help="a grid of eval runs (methods x weights x schedulers x steps) into a table "
                        "and plots")
    sw.add_argument("--config", type=Path, required=True, help="sweep JSON file (see docs/evaluation.md)")
    sw.add_argument("--no-progress", action="store_true")


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run ``guidekit eval``; return the result on the main process."""
    from guidekit.evaluation.config import EvalConfig
    from guidekit.evaluation.runner import run_eval

    fields = ("model", "output_dir", "guidance", "guidance_scale", "scheduler", "steps", "seeds", "class_labels",
              "prompts_file", "resolution", "batch_size", "dtype", "metrics", "feature_network", "reference",
              "clip_model", "clip_reference", "dinov2_model", "dinov2_reference", "save_images", "shard_size")
    flags = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    config = EvalConfig.from_file(args.config, **flags) if args.config else EvalConfig.from_dict(flags)
    return run_eval(config, progress=not args.no_progress)


def sample(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``guidekit sample``; return the summary it prints."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    guidance = parse_guidance(args.guidance)
    settings = SampleSettings(guidance=guidance, scheduler=args.scheduler, steps=args.steps,
                              seeds=range(args.seed, args.seed + args.num_images), prompt=args.prompt,
                              negative_prompt=args.negative_prompt, class_label=args.class_label, height=args.height,
                              width=args.width)
    pipe, defaults = load_pipeline(args.model, dtype=_DTYPES[args.dtype])
    pipe = pipe.to(device)
    run = sample_guided(pipe, settings, defaults=defaults)
    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for seed, image in zip(settings.seeds, run.images, strict=True):
        path = args.out / f"seed{seed:06d}.png"
        image.save(path)
        files.append(str(path))
    stats = run.stats
    return {
        "model": args.model, "pipeline": type(pipe).__name__, "scheduler": run.scheduler,
        "guidance": format_guidance(guidance), "steps": args.steps, "seeds": [settings.seeds[0], settings.seeds[-1]],
        "device": device, "seconds": round(run.seconds, 3), "model_calls": stats.model_calls,
        "cond_rows": stats.cond_rows, "uncond_rows": stats.uncond_rows,
        "uncond_rows_skipped": stats.uncond_rows_skipped, "files": files,
    }


def serve_demo(args: argparse.Namespace) -> None:
    """Run ``guidekit demo``: load the model, then serve until interrupted."""
    try:
        from guidekit.app.ui import launch
    except ImportError as exc:
        raise ValueError(f"the demo needs gradio ({exc}); install it with: pip install 'guidekit[demo]'") from None
    from guidekit.app.compare import Comparer

    comparer = Comparer(args.model, device=args.device, dtype=_DTYPES[args.dtype])
    print(f"guidekit demo: {comparer.describe()} on {comparer.device}", flush=True)
    launch(comparer, host=args.host, port=args.port)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``guidekit`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            serve_demo(args)
            return 0
        if args.command == "sweep":
            from guidekit.evaluation.sweep import run_sweep

            rows = run_sweep(args.config, progress=not args.no_progress)
            summary = None if rows is None else {"metrics": rows}
        else:
            summary = sample(args) if args.command == "sample" else evaluate(args)
    except (ValueError, TypeError) as exc:
        print(f"guidekit: error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary if args.command == "sample" else summary["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
