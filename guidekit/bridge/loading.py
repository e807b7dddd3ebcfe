"""Loading pipelines for the command line: the embedded default model, a hub id, a local directory, or a tiny
offline model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from guidekit.bridge.class_pipeline import ClassConditionalPipeline
from guidekit.testing import tiny

TINY_PREFIX = "tiny:"
DEFAULT_MODEL = "default"
#: The embedded default model (coloured 8x8 digits; see its README.md), trained by scripts/train_default_model.py.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "app" / "default_model"


def _is_class_pipeline(path: Path) -> bool:
    index = path / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == ClassConditionalPipeline.__name__


def load_pipeline(model: str, *, dtype: torch.dtype = torch.float32) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Load ``model`` and return it with call arguments that make a valid default call.

    ``default`` is the embedded default model; ``tiny:FAMILY`` builds a tiny random-weight pipeline of that family
    offline (:data:`guidekit.testing.tiny.FAMILIES`); a directory saved by a :class:`ClassConditionalPipeline` loads
    as one; anything else goes to ``DiffusionPipeline.from_pretrained``.
    """
    path = DEFAULT_MODEL_DIR if model == DEFAULT_MODEL else Path(model).expanduser()
    if model == DEFAULT_MODEL and not _is_class_pipeline(path):
        raise ValueError(f"model={model!r} is not accepted: the embedded model is missing from {path} (train it with "
                         "python scripts/train_default_model.py)")
    if _is_class_pipeline(path):
        pipe = ClassConditionalPipeline.from_pretrained(path, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe, {"class_labels": [3]}
    if model.startswith(TINY_PREFIX):
        family = model[len(TINY_PREFIX):]
        if family not in tiny.FAMILIES:
            raise ValueError(f"model={model!r} is not accepted; tiny families: "
                             f"{', '.join(TINY_PREFIX + f for f in tiny.FAMILIES)}")
        return tiny.build_tiny_pipeline(family, dtype=dtype), tiny.tiny_call_kwargs(family)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model={model!r} could not be loaded as a diffusers pipeline: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe, {}
