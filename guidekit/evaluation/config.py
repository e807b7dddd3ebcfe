"""The description of an evaluation run: what to sample, how, and which metrics to compute against what.

A run is read from a JSON file (``guidekit eval --config run.json``) and/or command-line flags (flags win).
Every field that can change the numbers goes into the run's ``settings``, which are hashed: a rerun into the
same output directory must have the same settings, so finished shards are never mixed with other work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guidekit import limits
from guidekit.validation import check_int

#: Metrics ``guidekit eval`` knows, and the feature network each needs.
METRICS: dict[str, str] = {
    "fid": "features", "precision": "features", "recall": "features", "density": "features",
    "coverage": "features", "kid": "features", "is": "features", "fd_clip": "clip", "clip_score": "clip",
    "fd_dinov2": "dinov2", "saturation": "pixels",
}
DTYPES = ("float32", "float16", "bfloat16")
SAVE_IMAGES = ("none", "png", "npz")


def read_json_object(path: str | Path, name: str) -> dict[str, Any]:
    """The JSON object in ``path``; a ``ValueError`` naming ``name`` if it is missing, invalid or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{name}={str(path)!r} is not accepted; the file does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}={str(path)!r} is not accepted; it is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name}={str(path)!r} is not accepted; expected a JSON object of settings")
    return data


#: Seeds are below this: a generator's seed is a signed 64-bit integer.
SEED_LIMIT = 2**63
#: The fewest images a run accepts: FID needs a covariance, which is undefined for one image.
MIN_IMAGES = 2
#: The sample settings that a shard's ``settings_sha256`` covers: everything that changes its images and features.
SHARD_KEYS = ("model", "guidance", "guidance_scale", "scheduler", "steps", "dtype", "resolution", "class_labels",
              "prompts_sha256", "networks")
#: Splits of the Inception Score (as ADM's evaluator): a run computing ``is`` needs at least this many images.
IS_SPLITS = 10


def parse_seeds(text: str | list[int]) -> list[int]:
    """``"0-49999"`` (inclusive), ``"0,5,9"``, or a list of ints, into a list of at least two distinct seeds in
    ``[0, 2**63)``, at most :data:`~guidekit.limits.MAX_EVAL_IMAGES` of them; a one-line ``ValueError`` naming
    ``seeds`` otherwise (a reversed range such as ``"9-0"`` too). The count is checked before the list is built."""
    shown = limits.shorten(text)
    accepted = (f"a range such as '0-49999' or a list such as '0,5,9' of {MIN_IMAGES} to {limits.MAX_EVAL_IMAGES} "
                "distinct integers in [0, 2**63), ranges not reversed (limit MAX_EVAL_IMAGES)")
    if isinstance(text, list):
        if len(text) > limits.MAX_EVAL_IMAGES or any(
                isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in text):
            raise ValueError(f"seeds={shown} is not accepted; expected {accepted}")
        seeds = [int(s) for s in text]
    elif not isinstance(text, str):
        raise ValueError(f"seeds={shown} is not accepted; expected {accepted}")
    else:
        bounds = []
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            if not _is_decimal(lo) or (sep and (not _is_decimal(hi) or not int(lo) <= int(hi) < SEED_LIMIT)):
                raise ValueError(f"seeds={shown} is not accepted; expected {accepted}")
            bounds.append((int(lo), int(hi) if sep else int(lo)))
        if sum(hi - lo + 1 for lo, hi in bounds) > limits.MAX_EVAL_IMAGES:
            raise ValueError(f"seeds={shown} is not accepted; expected {accepted}")
        seeds = [seed for lo, hi in bounds for seed in range(lo, hi + 1)]
    if len(seeds) < MIN_IMAGES or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) >= SEED_LIMIT:
        raise ValueError(f"seeds={shown} is not accepted; expected {accepted}")
    return seeds


def _is_decimal(text: str) -> bool:
    """Whether ``text`` is a non-empty run of the ASCII digits 0-9 (``str.isdigit`` also takes other scripts')."""
    return text.isascii() and text.isdigit()


def check_class_labels(labels: object) -> list[int] | None:
    """``None`` for none or an empty list (every class of the model in turn), else the class ids (each >= 0) as a
    list of ints; a one-line ``ValueError`` naming ``class_labels`` otherwise."""
    if labels is None or (isinstance(labels, (list, tuple)) and not labels):
        return None
    if (not isinstance(labels, (list, tuple)) or len(labels) > limits.MAX_EVAL_IMAGES
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 for v in labels)):
        raise ValueError(f"class_labels={limits.shorten(labels)} is not accepted; expected a list of "
                         "class ids >= 0, used in turn by image position, or none (every class of the model in turn)")
    return [int(v) for v in labels]


def settings_hash(settings: dict[str, Any]) -> str:
    """The SHA-256 of the :data:`SHARD_KEYS` of a run's :meth:`EvalConfig.sample_settings`: a shard stores it, and
    a rerun accepts the shard only if its own settings give the same hash."""
    return hashlib.sha256(json.dumps({k: settings.get(k) for k in SHARD_KEYS}, sort_keys=True).encode()).hexdigest()


@dataclass
class EvalConfig:
    """One evaluation run. See docs/evaluation.md for every field."""

    model: str
    output_dir: str
    guidance: str | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    steps: int = 50
    seeds: str | list[int] = "0-49999"
    class_labels: list[int] | None = None
    prompts_file: str | None = None
    resolution: int | None = None
    batch_size: int = 16
    dtype: str = "float32"
    metrics: list[str] = field(default_factory=lambda: ["fid", "precision", "recall"])
    feature_network: str = "inception"
    reference: str | None = None
    clip_model: str | None = None
    clip_reference: str | None = None
    dinov2_model: str | None = None
    dinov2_reference: str | None = None
    save_images: str = "none"
    shard_size: int = 256
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    dc_k: int = 5

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> EvalConfig:
        """Read a JSON config; ``overrides`` (non-None values) replace its fields."""
        data = read_json_object(path, "config")
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config keys {unknown} are not accepted; known keys: {', '.join(sorted(known))}")
        missing = [k for k in ("model", "output_dir") if data.get(k) in (None, "")]
        if missing:
            raise ValueError(f"config is missing {missing}; expected at least model and output_dir")
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first bad field, its value and what is accepted."""
        for name in ("steps", "batch_size", "shard_size", "kid_subsets", "kid_subset_size", "pr_k", "dc_k"):
            check_int(name, getattr(self, name), low=1)
        count = len(parse_seeds(self.seeds))
        self.class_labels = check_class_labels(self.class_labels)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not accepted; expected one of {', '.join(DTYPES)}")
        if self.save_images not in SAVE_IMAGES:
            raise ValueError(f"save_images={self.save_images!r} is not accepted; expected one of "
                             f"{', '.join(SAVE_IMAGES)}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"metrics={self.metrics!r} is not accepted; expected a non-empty list from "
                             f"{', '.join(METRICS)}")
        if self.guidance_scale is not None and self.guidance is not None:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} is not accepted together with guidance="
                             f"{self.guidance!r}; give one: a guidekit guidance, or the pipeline's native CFG scale")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise ValueError(f"resolution={self.resolution!r} is not accepted; expected an integer >= 8")
        minimum = {"precision": ("pr_k", self.pr_k + 1), "recall": ("pr_k", self.pr_k + 1),
                   "density": ("dc_k", self.dc_k + 1), "coverage": ("dc_k", self.dc_k + 1),
                   "is": ("its splits", IS_SPLITS)}
        for metric in self.metrics:
            if metric in minimum and count < minimum[metric][1]:
                what, least = minimum[metric]
                raise ValueError(f"seeds={limits.shorten(self.seeds)} ({count} images) is not accepted with "
                                 f"metric {metric}; expected at least {least} images ({what})")
        needs = {METRICS[m] for m in self.metrics}
        if "clip" in needs and not self.clip_model:
            raise ValueError("clip_model=None is not accepted with metrics fd_clip or clip_score; expected a CLIP "
                             "model directory or hub id")
        if "clip_score" in self.metrics and not self.prompts_file:
            raise ValueError("prompts_file=None is not accepted with metric clip_score; expected a text file with "
                             "one prompt per line")
        if "dinov2" in needs and not self.dinov2_model:
            raise ValueError("dinov2_model=None is not accepted with metric fd_dinov2; expected a DINOv2 model "
                             "directory or hub id")
        reference_metrics = [m for m in self.metrics if METRICS[m] == "features" and m != "is"]
        if reference_metrics and not self.reference:
            raise ValueError(f"reference=None is not accepted with metrics {reference_metrics}; expected a "
                             "reference statistics file (.npz)")

    def prompts(self) -> list[str] | None:
        """The prompts of ``prompts_file`` (one per non-empty line), or ``None``."""
        if self.prompts_file is None:
            return None
        path = Path(self.prompts_file)
        if not path.is_file():
            raise ValueError(f"prompts_file={self.prompts_file!r} is not accepted; the file does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file={self.prompts_file!r} is not accepted; it holds no prompts")
        return prompts

    def networks(self) -> dict[str, str]:
        """The feature networks the metrics need: ``{"features": spec, "clip": model, "dinov2": model}``."""
        needs = {METRICS[m] for m in self.metrics}
        specs = {"features": self.feature_network, "clip": self.clip_model, "dinov2": self.dinov2_model}
        return {key: spec for key, spec in specs.items() if key in needs and spec}

    def sample_settings(self) -> dict[str, Any]:
        """Every field that changes the shards: the images and what is extracted from them (``networks``,
        ``saturation``). A rerun into the same output directory must repeat the former and may extract less;
        metrics, references and metric parameters may change between reruns."""
        data = {k: getattr(self, k) for k in ("model", "guidance", "guidance_scale", "scheduler", "steps",
                                              "resolution", "batch_size", "dtype", "shard_size")}
        data["class_labels"] = list(self.class_labels) if self.class_labels else None  # None: all classes in turn
        data["seeds"] = parse_seeds(self.seeds)
        data["prompts_sha256"] = None if self.prompts_file is None else hashlib.sha256(
            "\n".join(self.prompts() or []).encode()).hexdigest()
        data["networks"] = self.networks()
        data["saturation"] = "saturation" in self.metrics
        return data
