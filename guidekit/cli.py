"""The ``guidekit`` command line.

``guidekit sample --model ID_OR_PATH --guidance SPEC --scheduler NAME --steps N --seed S`` loads a
diffusers pipeline (a hub id, a local directory, or ``tiny:FAMILY`` for a tiny random-weight
pipeline built offline), attaches the guidance, samples, writes PNG files and prints what it did.

``guidekit eval --config run.json`` samples at scale and computes metrics (see docs/evaluation.md).

``guidekit reference --from SOURCE --out ref.npz`` writes reference statistics for ``eval --reference``.

``guidekit demo [--model ID_OR_PATH]`` serves the Gradio demo on 127.0.0.1 (see docs/demo.md).

A user error ends in one line on stderr, ``guidekit: error: ...`` naming the parameter, and exit status 2. torch,
diffusers, transformers and guidekit's pipeline and evaluation code are imported by the subcommand that needs them,
so ``guidekit --help`` and argument errors answer without loading them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from guidekit import limits

#: ``--dtype`` names of ``sample`` and ``demo`` (torch dtypes of the same name).
DTYPE_NAMES = ("float32", "float16", "bfloat16")
#: Optional modules and the extra that installs each.
_EXTRAS = {"gradio": "demo", "matplotlib": "eval", "tqdm": "eval"}
#: Flags whose destination is not their name.
_FLAGS = {"source": "--from"}


class UsageError(Exception):
    """A user error; :func:`main` prints its message as ``guidekit: error: MESSAGE`` and returns exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``guidekit: error: MESSAGE`` without the usage block; it exits
    with status 2, as argparse does."""

    def error(self, message: str) -> NoReturn:
        _print_error(message)
        self.exit(2)


def _print_error(message: str) -> None:
    """Print ``guidekit: error: MESSAGE`` to stderr, the message's lines joined by "; "."""
    one_line = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"guidekit: error: {one_line}", file=sys.stderr)


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]``."""
    accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{limits.shorten(text)} is not accepted; expected {accepted}")
        return value

    return parse


_positive_int = _integer(1)


def _existing_file(text: str) -> str:
    """An argparse type: the path of a readable file, returned as given."""
    path = Path(text).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        reason = "it is a directory" if path.is_dir() else "no such readable file"
        raise argparse.ArgumentTypeError(f"{limits.shorten(text)} is not accepted; {reason}")
    return text


def _comma_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{limits.shorten(text)} is not accepted; expected comma-separated "
                                         "integers") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="guidekit", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    scheduler_help = "a scheduler's short name (ddim, euler, heun, dpmpp_2m, edm_heun, ...; docs/samplers.md)"
    sample = sub.add_parser("sample", help="sample images from a pipeline with a guidance method")
    sample.add_argument("--model", required=True, help="hub id, local path, or tiny:FAMILY (offline test model)")
    sample.add_argument("--guidance", default="cfg(scale=5)", help="guidance text, e.g. 'apg(scale=5)'")
    sample.add_argument("--scheduler", help=f"{scheduler_help}; default: the pipeline's own")
    sample.add_argument("--steps", type=_positive_int, default=20, help="solver steps")
    sample.add_argument("--seed", type=int, default=0,
                        help="seed of the first image, in [0, 2**63 - 1] (as in the demo); image i uses seed + i")
    sample.add_argument("--num-images", type=_positive_int, default=1)
    sample.add_argument("--prompt", default=None, help="text prompt (text-to-image pipelines)")
    sample.add_argument("--negative-prompt", default=None)
    sample.add_argument("--class-label", type=_integer(0), default=None,
                        help="class id (class-conditional pipelines)")
    sample.add_argument("--height", type=_positive_int, default=None)
    sample.add_argument("--width", type=_positive_int, default=None)
    sample.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    sample.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    sample.add_argument("--out", type=Path, default=Path("outputs"), help="output directory")
    _add_eval_parsers(sub, scheduler_help)
    _add_reference_parser(sub)
    demo = sub.add_parser("demo", help="serve the Gradio demo: guidance methods side by side (needs guidekit[demo])")
    demo.add_argument("--model", default="default",
                      help="'default' (the embedded digits model), a hub id or a local diffusers directory")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    demo.add_argument("--port", type=_integer(1, 65535), default=7860)
    demo.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    demo.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def _add_eval_parsers(sub: Any, scheduler_help: str) -> None:
    ev = sub.add_parser("eval", help="sample at scale and compute FID, precision/recall and other metrics "
                        "(resumable; run it under `accelerate launch` for several processes)")
    ev.add_argument("--config", type=_existing_file, help="JSON file with the run's settings (flags override it)")
    ev.add_argument("--model")
    ev.add_argument("--output-dir")
    ev.add_argument("--guidance", help="guidekit guidance text; leave out for the pipeline's native CFG")
    ev.add_argument("--guidance-scale", type=float, help="native CFG scale when no --guidance is given")
    ev.add_argument("--scheduler", help=scheduler_help)
    ev.add_argument("--steps", type=_positive_int)
    ev.add_argument("--seeds", help="'0-49999' (inclusive) or '0,5,9'")
    ev.add_argument("--class-labels", type=_comma_ints, help="class ids, used in turn by image position")
    ev.add_argument("--prompts-file", type=_existing_file,
                    help="text file, one prompt per line, used in turn by image position")
    ev.add_argument("--resolution", type=_positive_int)
    ev.add_argument("--batch-size", type=_positive_int)
    ev.add_argument("--dtype", help="float32, float16 or bfloat16")
    ev.add_argument("--metrics", type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
                    help="comma-separated: fid, precision, recall, density, coverage, kid, is, fd_clip, clip_score, "
                    "fd_dinov2, saturation")
    ev.add_argument("--feature-network", help="inception (default), inception:clean, clip:PATH, dinov2:PATH")
    ev.add_argument("--reference", type=_existing_file,
                    help="reference statistics (.npz, ADM layout; `guidekit reference` makes them)")
    ev.add_argument("--clip-model")
    ev.add_argument("--clip-reference", type=_existing_file)
    ev.add_argument("--dinov2-model")
    ev.add_argument("--dinov2-reference", type=_existing_file)
    ev.add_argument("--save-images", help="none, png or npz")
    ev.add_argument("--shard-size", type=_positive_int)
    ev.add_argument("--no-progress", action="store_true")
    sw = sub.add_parser("sweep", help="a grid of eval runs (methods x weights x schedulers x steps) into a table "
                        "and plots")
    sw.add_argument("--config", type=_existing_file, required=True, help="sweep JSON file (see docs/evaluation.md)")
    sw.add_argument("--no-progress", action="store_true")
    lab = sub.add_parser("lab", help="a paper's claim measured on the exact Gaussian-mixture testbed (three seed "
                         "ranges, table and plots; see docs/science.md)")
    lab.add_argument("--preset", required=True,
                     help="interval, schedules, adaptive, pcg, precision_recall, apg, or all")
    lab.add_argument("--output-dir", type=Path, required=True,
                     help="one sub-directory per preset; the embedded model's runs in cells/, shared and resumed")
    lab.add_argument("--tiny", action="store_true", help="few samples, 2 weights, few steps (seconds)")
    lab.add_argument("--testbed-only", action="store_true", help="leave out the embedded model's grids")


def lab(args: argparse.Namespace) -> dict[str, str]:
    """``guidekit lab``: run one preset or all; return where each preset's table went."""
    from guidekit.evaluation.lab import PRESETS, run_lab

    names = list(PRESETS) if args.preset == "all" else [args.preset]
    if args.preset != "all" and args.preset not in PRESETS:
        raise ValueError(f"preset={args.preset!r} is not accepted; expected all or one of {', '.join(PRESETS)}")
    for name in names:
        run_lab(name, args.output_dir, tiny=args.tiny, model=not args.testbed_only)
    return {name: str(args.output_dir / name / "results.md") for name in names}


def _add_reference_parser(sub: Any) -> None:
    ref = sub.add_parser("reference", help="write reference statistics (.npz) of real images for `guidekit eval "
                         "--reference`")
    ref.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                     help="'default' (the embedded model's 360 held-out digits), an image folder (PNG, JPEG, WebP; "
                     "recursive), or an .npz file (ADM images arr_0, or mu/sigma statistics to check and copy)")
    ref.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    ref.add_argument("--feature-network", default="inception",
                     help="inception (default, TF-legacy preprocessing), inception:clean, clip:PATH, dinov2:PATH; "
                     "use the one `guidekit eval` uses")
    ref.add_argument("--limit", type=_positive_int, help="use the first N images only (sorted path or file order)")
    ref.add_argument("--batch-size", type=_positive_int, default=64, help="images per network call")
    ref.add_argument("--no-features", action="store_true",
                     help="store mu and sigma only: enough for FID; precision/recall, density/coverage and KID need "
                     "the features")
    ref.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ref.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _check_args(args: argparse.Namespace) -> None:
    """The rules the parser does not check, before anything is imported or loaded: ``sample``'s seeds
    ``--seed`` to ``--seed + --num-images - 1`` lie in ``[0, MAX_SEED]`` (:func:`guidekit.limits.check_seed`, the
    page's rule)."""
    if args.command == "sample":
        last = args.seed + args.num_images - 1
        for seed, what in ((args.seed, ""), (last, "the last seed, seed + num-images - 1: ")):
            try:
                limits.check_seed("seeds", seed)
            except ValueError as exc:
                raise UsageError(f"argument --seed: {what}{exc}") from None


def _device(name: str | None) -> str:
    """``name`` if this machine has that torch device (``--device``), else a :class:`UsageError`; by default cuda when
    available, else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=torch.device(name))
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"argument --device: {limits.shorten(name)} is not accepted; this machine has no such "
                         f"torch device ({reason[:200]})") from None
    return name


def _check_output_dir(path: Path, parameter: str) -> None:
    """Raise a :class:`UsageError` naming ``parameter`` unless ``path`` is a writable directory or can be made one
    (its nearest existing ancestor is a writable directory); nothing is created."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir() or not os.access(part, os.W_OK | os.X_OK):
                reason = "not a directory" if not part.is_dir() else "not writable"
                raise UsageError(f"argument {parameter}: {str(path)!r} is not accepted; {str(part)!r} is {reason}")
            return


def _make_dir(path: Path, parameter: str) -> None:
    """Create the output directory ``path`` (and its parents), or raise a :class:`UsageError` naming ``parameter``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "it exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
        raise UsageError(f"argument {parameter}: {str(path)!r} is not accepted; {reason}") from None


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run ``guidekit eval``; return the result on the main process."""
    from guidekit.evaluation.config import EvalConfig
    from guidekit.evaluation.runner import run_eval

    fields = ("model", "output_dir", "guidance", "guidance_scale", "scheduler", "steps", "seeds", "class_labels",
              "prompts_file", "resolution", "batch_size", "dtype", "metrics", "feature_network", "reference",
              "clip_model", "clip_reference", "dinov2_model", "dinov2_reference", "save_images", "shard_size")
    flags = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    config = EvalConfig.from_file(args.config, **flags) if args.config else EvalConfig.from_dict(flags)
    _check_output_dir(Path(config.output_dir), "--output-dir")
    return run_eval(config, progress=not args.no_progress)


def sample(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``guidekit sample``; return the summary it prints."""
    import torch

    from guidekit.bridge.loading import load_pipeline
    from guidekit.bridge.sampling import SampleSettings, sample_guided
    from guidekit.guidance.spec import format_guidance, parse_guidance

    device = _device(args.device)
    guidance = parse_guidance(args.guidance)
    settings = SampleSettings(guidance=guidance, scheduler=args.scheduler, steps=args.steps,
                              seeds=range(args.seed, args.seed + args.num_images), prompt=args.prompt,
                              negative_prompt=args.negative_prompt, class_label=args.class_label, height=args.height,
                              width=args.width)
    _check_output_dir(args.out, "--out")
    pipe, defaults = load_pipeline(args.model, dtype=getattr(torch, args.dtype))
    pipe = pipe.to(device)
    run = _without_nan_cast_warnings(sample_guided, pipe, settings, defaults=defaults)
    _make_dir(args.out, "--out")
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


def _without_nan_cast_warnings(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with its warnings held back, then shown; if it raises, its runtime warnings are
    dropped. A guided prediction that is not finite raises after the pipeline has decoded it, and numpy's warning
    about casting NaN to uint8 would only repeat the error's one line. (``catch_warnings`` is process-wide: the
    command line samples on one thread.)"""
    error: Exception | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            error = exc
    for w in caught:
        if error is None or not issubclass(w.category, RuntimeWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if error is not None:
        raise error
    return result


def reference(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``guidekit reference``: build the statistics of ``--from`` and write them to ``--out``; return the
    summary it prints."""
    from guidekit.evaluation.features import load_feature_network
    from guidekit.evaluation.reference import reference_from_source, save_reference

    if args.out.is_dir():
        raise UsageError(f"argument --out: {str(args.out)!r} is not accepted; it is a directory, expected a file name")
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"argument --out: {str(args.out)!r} is not accepted; it exists (pass --overwrite to "
                         "replace it)")
    device = _device(args.device)
    _check_output_dir(args.out.parent, "--out")
    try:
        network = load_feature_network(args.feature_network, device=device)
    except (OSError, ValueError) as exc:
        raise UsageError(f"argument --feature-network: {exc}") from None
    try:
        statistics = reference_from_source(args.source, network, args.batch_size,
                                           keep_features=not args.no_features, limit=args.limit)
    except (OSError, ValueError) as exc:
        raise UsageError(f"argument --from: {exc}") from None
    save_reference(args.out, statistics)
    identity = statistics.identity or {}
    return {"out": str(args.out), "source": statistics.source, "dim": statistics.dim,
            "features": statistics.features is not None, "network": identity.get("name"),
            "preprocessing": identity.get("preprocessing"), "sha256": identity.get("sha256")}


def serve_demo(args: argparse.Namespace) -> None:
    """Run ``guidekit demo``: load the model, then serve until interrupted."""
    import torch

    from guidekit.app.compare import Comparer
    from guidekit.app.ui import launch

    device = _device(args.device)
    comparer = Comparer(args.model, device=device, dtype=getattr(torch, args.dtype))
    print(f"guidekit demo: {comparer.describe()} on {comparer.device}", flush=True)
    try:
        launch(comparer, host=args.host, port=args.port)
    except OSError as exc:
        raise UsageError(f"argument --port: {args.host}:{args.port} cannot be served ({exc})") from None


def _os_error(exc: OSError, args: argparse.Namespace) -> str:
    """A file-system error as a message naming the argument whose path it concerns, where one does."""
    if not isinstance(exc.filename, (str, bytes, os.PathLike)):
        return str(exc)
    message = f"{exc.strerror or exc}: {os.fsdecode(exc.filename)!r}"
    file = Path(os.fsdecode(exc.filename)).expanduser().absolute()
    for name, value in vars(args).items():
        if isinstance(value, (str, Path)) and str(value) and name != "command":
            given = Path(value).expanduser().absolute()
            if file == given or given in file.parents:
                return f"argument {_FLAGS.get(name, '--' + name.replace('_', '-'))}: {message}"
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``guidekit`` command; returns the exit status, 2 for a user error (an argument the parser
    refuses exits with 2 from the parser, as argparse does)."""
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        summary: Any = None
        if args.command == "demo":
            serve_demo(args)
        elif args.command == "sweep":
            from guidekit.evaluation.sweep import run_sweep

            summary = run_sweep(args.config, progress=not args.no_progress)
        elif args.command == "lab":
            summary = lab(args)
        elif args.command == "eval":
            result = evaluate(args)
            summary = None if result is None else result["metrics"]
        else:
            summary = sample(args) if args.command == "sample" else reference(args)
    except (UsageError, ValueError, TypeError) as exc:
        message = str(exc)
    except OSError as exc:
        message = _os_error(exc, args)
    except ModuleNotFoundError as exc:
        if exc.name not in _EXTRAS:
            raise
        message = f"{exc.name} is not installed; install it with: pip install 'guidekit[{_EXTRAS[exc.name]}]'"
    except KeyboardInterrupt:
        print("guidekit: interrupted", file=sys.stderr)
        return 130
    else:
        if summary is not None:
            print(json.dumps(summary, indent=2))
        return 0
    _print_error(message)
    return 2


if __name__ == "__main__":
    sys.exit(main())
