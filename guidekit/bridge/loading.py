"""Loading pipelines for the command line: a hub id, a local directory, or a tiny offline model."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline

from guidekit.bridge import tiny

TINY_PREFIX = "tiny:"


def load_pipeline(model: str, *, dtype: torch.dtype = torch.float32) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Load ``model`` and return it with call arguments that make a valid default call.

    ``tiny:FAMILY`` builds a tiny random-weight pipeline of that family offline
    (:data:`guidekit.bridge.tiny.FAMILIES`); anything else goes to ``DiffusionPipeline.from_pretrained``.
    """
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
