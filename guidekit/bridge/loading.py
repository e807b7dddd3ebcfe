"""Loading pipelines for the command line: the embedded default model, a hub id, a local directory, or a tiny
offline model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from packaging.version import Version
from transformers.utils import logging as transformers_logging

from guidekit.bridge.class_pipeline import ClassConditionalPipeline

#: The name ``from_pretrained`` takes the dtype by: ``dtype`` from diffusers 0.40 on (``torch_dtype`` then warns that
#: it is deprecated), ``torch_dtype`` before.
DTYPE_KEYWORD = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"
TINY_PREFIX = "tiny:"
DEFAULT_MODEL = "default"
#: The embedded default model (coloured 8x8 digits; see its README.md), trained by scripts/train_default_model.py.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "app" / "default_model"


def _is_class_pipeline(path: Path) -> bool:
    index = path / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == ClassConditionalPipeline.__name__


def _tiny_module() -> ModuleType:
    """:mod:`guidekit.testing.tiny`, imported with transformers' warnings off: its imports of diffusers' text-to-image
    pipelines make transformers warn that image processors the tiny pipelines never use want torchvision."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from guidekit.testing import tiny
    finally:
        transformers_logging.set_verbosity(verbosity)
    return tiny


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers' progress bars off inside the block (its "Loading pipeline components" bar), as they were after."""
    was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()


def load_pipeline(model: str, *, dtype: torch.dtype = torch.float32) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Load ``model`` and return it with call arguments that make a valid default call.

    ``default`` is the embedded default model; ``tiny:FAMILY`` builds a tiny random-weight pipeline of that family
    offline (:data:`guidekit.testing.tiny.FAMILIES`); a directory saved by a :class:`ClassConditionalPipeline` loads
    as one; a missing path (a name starting with ``.``, ``~``, ``/`` or ``\\``, or with two or more ``/``) raises at
    once; anything else goes to ``DiffusionPipeline.from_pretrained`` (a hub id or a local directory).
    """
    path = DEFAULT_MODEL_DIR if model == DEFAULT_MODEL else Path(model).expanduser()
    if model == DEFAULT_MODEL and not _is_class_pipeline(path):
        raise ValueError(f"model={model!r} is not accepted: the embedded model is missing from {path} (train it with "
                         "python scripts/train_default_model.py)")
    if _is_class_pipeline(path):
        with _quiet_loading():  # two components from a local directory: no progress bar
            pipe = ClassConditionalPipeline.from_pretrained(path, **{DTYPE_KEYWORD: dtype})
        pipe.set_progress_bar_config(disable=True)
        return pipe, {"class_labels": [3]}
    if not path.exists() and (model.startswith((".", "~", "/", "\\")) or model.count("/") > 1):
        raise ValueError(f"model={model!r} could not be loaded: no such directory (expected {DEFAULT_MODEL!r}, "
                         f"{TINY_PREFIX}FAMILY, a hub id such as 'org/name' or a local diffusers directory)")
    if model.startswith(TINY_PREFIX):
        tiny = _tiny_module()
        family = model[len(TINY_PREFIX):]
        if family not in tiny.FAMILIES:
            raise ValueError(f"model={model!r} is not accepted; tiny families: "
                             f"{', '.join(TINY_PREFIX + f for f in tiny.FAMILIES)}")
        return tiny.build_tiny_pipeline(family, dtype=dtype), tiny.tiny_call_kwargs(family)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **{DTYPE_KEYWORD: dtype})
    except (OSError, ValueError) as exc:
        raise ValueError(f"model={model!r} could not be loaded as a diffusers pipeline: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe, {}


def load_denoiser_like(path: str, denoiser: torch.nn.Module, attribute: str) -> torch.nn.Module:
    """A denoiser of ``denoiser``'s class loaded from ``path`` (a folder saved with ``save_pretrained``, a pipeline
    folder whose ``attribute`` subfolder is used, or a hub id), with its dtype and device; a ``ValueError`` naming
    ``weak`` if it does not load."""
    cls = type(denoiser)
    subfolder = attribute if (Path(path) / "model_index.json").is_file() else None
    try:
        with _quiet_loading():
            module = cls.from_pretrained(path, subfolder=subfolder, **{DTYPE_KEYWORD: denoiser.dtype})
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"weak={path!r} is not accepted; expected a saved {cls.__name__} (a folder with its "
                         f"config and weights, or a pipeline folder with a {attribute} subfolder): {first}") from None
    return module.to(denoiser.device).eval()
