"""``guidekit eval``: sample a pipeline at scale, extract features as images are made, and compute metrics.

The work is cut into shards of ``shard_size`` consecutive seeds. Shard ``i`` goes to process
``i % num_processes`` (``accelerate launch``), and every image has its own seed, so the images, their
features and the final numbers do not depend on the number of processes. Each finished shard is written
atomically (a temporary file, then ``os.replace``). A rerun into the same output directory skips the shards
that are this run's work (their stored seeds, settings hash and array shapes match; any other file is redone),
so a crashed or killed run loses at most the shards in flight. When all shards exist, the main
process merges them in shard order and writes ``result.json``, also atomically.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guidekit import limits
from guidekit.evaluation.config import METRICS, EvalConfig, parse_seeds, settings_hash

LOG = logging.getLogger(__name__)

SHARD_DIR = "shards"
RESULT = "result.json"
SETTINGS = "settings.json"


@dataclass(frozen=True)
class Shard:
    """A unit of work: the images at ``positions`` of the run (their seeds are ``seeds``)."""

    index: int
    positions: tuple[int, ...]
    seeds: tuple[int, ...]


def plan_shards(seeds: list[int], shard_size: int) -> list[Shard]:
    """Consecutive chunks of ``shard_size`` seeds."""
    return [Shard(i // shard_size, tuple(range(i, min(i + shard_size, len(seeds)))),
                  tuple(seeds[i:i + shard_size])) for i in range(0, len(seeds), shard_size)]


def shard_path(run_dir: Path, index: int) -> Path:
    return run_dir / SHARD_DIR / f"shard-{index:06d}.npz"


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` so that readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_shard(path: Path) -> dict[str, np.ndarray] | None:
    """A finished shard's arrays, or ``None`` if it does not exist or cannot be read (it is then redone)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def accept_shard(path: Path, shard: Shard, expected_hash: str, config: EvalConfig) -> dict[str, np.ndarray] | None:
    """The shard's arrays if ``path`` holds this run's work for ``shard``: its stored seeds are the shard's seeds, its
    ``settings_sha256`` is ``expected_hash``, and it holds the per-image arrays ``config`` needs, one row per seed.
    ``None`` otherwise (the shard is then redone); a file that exists but does not match is logged."""
    record = read_shard(path)
    if record is None:
        return None
    n = len(shard.seeds)
    needed = [f"{key}_features" for key in config.networks()] + ["prompt_index", "class_label"]
    if "saturation" in config.metrics:
        needed.append("saturation")
    if "seeds" not in record or not np.array_equal(record["seeds"], np.asarray(shard.seeds, dtype=np.int64)):
        problem = "its seeds are not the shard's"
    elif "settings_sha256" not in record or str(record["settings_sha256"]) != expected_hash:
        problem = "its settings hash is not the run's"
    elif "rows" not in record or record["rows"].shape != () or any(
            key not in record or record[key].ndim < 1 or len(record[key]) != n for key in needed):
        problem = "its arrays do not have the shapes the run needs"
    else:
        return record
    LOG.warning("shard %d at %s is not this run's work (%s); redoing it", shard.index, path, problem)
    return None


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import transformers

    import guidekit

    return {"guidekit": guidekit.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def default_class_labels(pipe: Any) -> list[int] | None:
    """Every class ``0..num_classes-1`` of a class-conditional pipeline (one whose call takes ``class_labels``),
    the labels of a run that gives none; ``num_classes`` is the pipeline's own
    (:class:`~guidekit.bridge.class_pipeline.ClassConditionalPipeline`) or its transformer's ``num_embeds_ada_norm``
    (DiT). ``None`` for other pipelines; a ``ValueError`` if a class-conditional pipeline exposes neither."""
    if "class_labels" not in inspect.signature(pipe.__call__).parameters:
        return None
    count = getattr(pipe, "num_classes", None)
    if count is None:
        count = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "num_embeds_ada_norm", None)
    if count is None:
        raise ValueError(f"class_labels=None is not accepted for {type(pipe).__name__}, whose number of classes is "
                         "unknown; expected a list of class ids")
    return list(range(int(count)))


def run_class_labels(config: EvalConfig, pipe: Any) -> list[int] | None:
    """The labels a run uses in turn: ``config.class_labels`` checked against the pipeline (each below its number of
    classes; none on a pipeline without classes), or :func:`default_class_labels`. A one-line ``ValueError`` naming
    ``class_labels`` otherwise, before any image is drawn."""
    every = default_class_labels(pipe)
    labels = config.class_labels
    if not labels:
        return every
    if every is None:
        raise ValueError(f"class_labels={limits.shorten(labels)} is not accepted for {type(pipe).__name__}, "
                         "which takes no class labels; expected none")
    if max(labels) >= len(every):
        raise ValueError(f"class_labels={limits.shorten(labels)} is not accepted; expected class ids in "
                         f"[0, {len(every) - 1}] (the model has {len(every)} classes)")
    return labels


class ImageSource:
    """Makes the images of a run: the pipeline, loaded once, and the run's sample settings with per-image
    conditioning (:func:`~guidekit.bridge.sampling.sample_guided`); ``rows`` counts the network rows so far.

    ``class_labels`` are the run's labels, used in turn by position: the config's, or, for a class-conditional
    pipeline without them, every class ``0..num_classes-1``; ``None`` for pipelines without classes."""

    def __init__(self, config: EvalConfig, device: torch.device) -> None:
        from guidekit.bridge.loading import load_pipeline
        from guidekit.bridge.sampling import SampleSettings
        from guidekit.guidance.spec import parse_guidance

        self.config = config
        guidance = None if config.guidance in (None, "", "none") else parse_guidance(config.guidance)
        self.settings = SampleSettings(guidance=guidance, guidance_scale=config.guidance_scale,
                                       scheduler=config.scheduler or None, steps=config.steps, height=config.resolution,
                                       width=config.resolution, output_type="np")
        self.pipe, self.defaults = load_pipeline(config.model, dtype=getattr(torch, config.dtype))
        self.pipe = self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompts = config.prompts()
        self.class_labels = run_class_labels(config, self.pipe)
        self.rows = 0

    def prompt_index(self, position: int) -> int:
        return position % len(self.prompts) if self.prompts else -1

    def label(self, position: int) -> int | None:
        """The class label of run position ``position``, or ``None`` without labels."""
        labels = self.class_labels
        return None if labels is None else labels[position % len(labels)]

    def __call__(self, positions: list[int], seeds: list[int]) -> np.ndarray:
        """uint8 images (N, H, W, 3) of the given run positions and seeds."""
        from guidekit.bridge.sampling import sample_guided

        settings = replace(
            self.settings, seeds=tuple(seeds),
            prompt=tuple(self.prompts[self.prompt_index(p)] for p in positions) if self.prompts else None,
            class_label=None if self.class_labels is None else tuple(self.label(p) for p in positions))
        run = sample_guided(self.pipe, settings, defaults=self.defaults)
        self.rows += run.stats.cond_rows + run.stats.uncond_rows
        images = np.asarray(run.images, dtype=np.float32)
        return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)


_EXTRACTED = ("networks", "saturation")


def _check_settings(run_dir: Path, settings: dict[str, Any]) -> str:
    """Record the run's settings, or check that a rerun repeats them (it may extract less from the images). Return
    the shards' settings hash, of the recorded settings (so a rerun that extracts less accepts the shards)."""
    path = run_dir / SETTINGS
    if not path.exists():
        write_text_atomic(path, json.dumps(settings, indent=1, sort_keys=True))
        return settings_hash(settings)
    previous = json.loads(path.read_text())
    changed = sorted(k for k in set(previous) | set(settings)
                     if k not in _EXTRACTED and previous.get(k) != settings.get(k))
    if changed:
        raise ValueError(f"output_dir={str(run_dir)!r} holds a run with other settings ({', '.join(changed)}); "
                         "expected the same settings to resume, or a new output_dir")
    missing = [f"{key}: {spec}" for key, spec in settings["networks"].items()
               if previous["networks"].get(key) != spec]
    if settings["saturation"] and not previous["saturation"]:
        missing.append("saturation")
    if missing:
        raise ValueError(f"output_dir={str(run_dir)!r} holds shards without {', '.join(missing)}, which these metrics "
                         "need; expected a new output_dir (or the metrics of the first run)")
    return settings_hash(previous)


def run_eval(config: EvalConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """Run (or resume) ``config``; return the result on the main process, ``None`` on the others."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())  # without CUDA, processes meet over gloo
    run_dir = Path(config.output_dir)
    seeds = parse_seeds(config.seeds)
    shards = plan_shards(seeds, config.shard_size)
    settings = config.sample_settings()
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        expected_hash = _check_settings(run_dir, settings)
    state.wait_for_everyone()
    if not state.is_main_process:
        expected_hash = _check_settings(run_dir, settings)
    mine = [s for s in shards if s.index % state.num_processes == state.process_index
            and accept_shard(shard_path(run_dir, s.index), s, expected_hash, config) is None]
    start = time.perf_counter()
    shard_seconds = 0.0
    if mine:
        shard_seconds = _make_shards(config, run_dir, mine, state.device, progress and state.is_local_main_process,
                                     tqdm, expected_hash)
    sampling_seconds = time.perf_counter() - start
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    result = aggregate(config, run_dir, shards, expected_hash)
    result["run"] = {"num_processes": state.num_processes, "device": str(state.device),
                     "seconds_this_invocation": round(sampling_seconds, 3),
                     "seconds_making_shards": round(shard_seconds, 3), "shards_made_here": len(mine),
                     "versions": _versions(), "platform": platform.platform()}
    write_text_atomic(run_dir / RESULT, json.dumps(result, indent=1, sort_keys=True))
    return result


def _make_shards(config: EvalConfig, run_dir: Path, shards: list[Shard], device: torch.device, progress: bool,
                 tqdm: Any, expected_hash: str) -> float:
    """Make and write ``shards``; return the seconds from the first image to the last shard written (loading the
    pipeline and the feature networks aside)."""
    from guidekit.evaluation.features import load_feature_network
    from guidekit.evaluation.image_metrics import saturation

    source = ImageSource(config, device)
    networks = {key: load_feature_network(_network_spec(key, spec), device) for key, spec in config.networks().items()}
    keep_saturation = config.sample_settings()["saturation"]
    bar = tqdm(total=sum(len(s.seeds) for s in shards), disable=not progress, desc="images", unit="img")
    start = time.perf_counter()
    for shard in shards:
        arrays: dict[str, list[np.ndarray]] = {}
        images_kept = []
        rows_before = source.rows
        for b in range(0, len(shard.seeds), config.batch_size):
            positions = list(shard.positions[b:b + config.batch_size])
            images = source(positions, list(shard.seeds[b:b + config.batch_size]))
            batch = torch.from_numpy(images).permute(0, 3, 1, 2)
            for key, network in networks.items():
                out = network(batch)
                arrays.setdefault(f"{key}_features", []).append(out.features.numpy())
                if key == "features" and out.logits is not None:
                    arrays.setdefault("logits", []).append(out.logits.float().numpy())
            if keep_saturation:
                arrays.setdefault("saturation", []).append(np.asarray(saturation(images), dtype=np.float64))
            arrays.setdefault("prompt_index", []).append(np.array([source.prompt_index(p) for p in positions]))
            arrays.setdefault("class_label", []).append(np.array([-1 if (label := source.label(p)) is None else label
                                                                  for p in positions], dtype=np.int64))
            if config.save_images != "none":
                images_kept.append(images)
            bar.update(len(positions))
        record = {k: np.concatenate(v) for k, v in arrays.items()}
        record["seeds"] = np.asarray(shard.seeds, dtype=np.int64)
        record["rows"] = np.asarray(source.rows - rows_before, dtype=np.int64)
        record["settings_sha256"] = np.asarray(expected_hash)
        if images_kept:
            _save_images(config, run_dir, shard, np.concatenate(images_kept))
        write_npz_atomic(shard_path(run_dir, shard.index), **record)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _network_spec(key: str, spec: str) -> str:
    return spec if key == "features" else f"{key}:{spec}"


def _save_images(config: EvalConfig, run_dir: Path, shard: Shard, images: np.ndarray) -> None:
    from PIL import Image

    if config.save_images == "npz":  # ADM's sample-batch layout: arr_0 uint8 NHWC
        write_npz_atomic(run_dir / "images" / f"shard-{shard.index:06d}.npz", arr_0=images)
        return
    folder = run_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(shard.seeds, images, strict=True):
        path = folder / f"seed{seed:08d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)


def _load_all(config: EvalConfig, run_dir: Path, shards: list[Shard], expected_hash: str) -> dict[str, np.ndarray]:
    """The accepted shards' per-image arrays concatenated in shard order, and their total ``rows``."""
    records = []
    for shard in shards:
        record = accept_shard(shard_path(run_dir, shard.index), shard, expected_hash, config)
        if record is None:
            raise RuntimeError(f"shard {shard.index} of {str(run_dir)!r} is missing or not this run's work; rerun the "
                               "same command to finish the run")
        records.append(record)
    keys = [k for k in records[0] if k not in ("rows", "settings_sha256") and all(k in r for r in records)]
    merged = {k: np.concatenate([r[k] for r in records]) for k in keys}
    merged["rows"] = np.asarray(sum(int(r["rows"]) for r in records))
    return merged


def _class_labels_used(config: EvalConfig, labels: np.ndarray) -> dict[str, Any] | None:
    """What result.json records of the class labels: where they came from and the images of each class; ``None``
    for a pipeline without classes (every stored label is -1)."""
    if (labels < 0).all():
        return None
    classes, counts = np.unique(labels, return_counts=True)
    return {"source": "class_labels" if config.class_labels else "all classes of the model in turn",
            "images_per_class": {str(c): int(k) for c, k in zip(classes, counts, strict=True)}}


def aggregate(config: EvalConfig, run_dir: Path, shards: list[Shard], expected_hash: str) -> dict[str, Any]:
    """Merge the run's shards (those whose settings hash is ``expected_hash``) in order and compute the metrics of
    ``config``."""
    from guidekit.evaluation import metrics as m

    data = _load_all(config, run_dir, shards, expected_hash)
    n = len(data["seeds"])
    values, details = m.compute(config, data)
    return {"metrics": values, "details": details, "images": n,
            "class_labels": _class_labels_used(config, data["class_label"]),
            "nfe_per_image": float(data["rows"]) / n, "settings": config.sample_settings(),
            "metric_settings": {"metrics": config.metrics, "reference": config.reference,
                                "clip_reference": config.clip_reference, "dinov2_reference": config.dinov2_reference,
                                "kid_subsets": config.kid_subsets, "kid_subset_size": config.kid_subset_size,
                                "pr_k": config.pr_k, "dc_k": config.dc_k},
            "metric_needs": {k: METRICS[k] for k in config.metrics}}
