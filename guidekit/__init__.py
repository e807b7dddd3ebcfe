"""guidekit: better guidance and samplers than plain CFG on the diffusers pipelines you already use.

``import guidekit`` loads nothing heavy: the guidance maths (torch) come with the first method used, the pipeline
functions (diffusers) with the first of those. Once diffusers is imported (before or after guidekit), every
``DiffusionPipeline`` has a ``set_guidance`` method::

    pipe.set_guidance(guidekit.Interval(guidekit.APG(2.0), sigma_lo=0.28, sigma_hi=5.42))

``guidekit.set_guidance(pipe, g)``, ``guidekit.guided(pipe, g)`` (a context manager) and ``GuidanceStats`` come
from :mod:`guidekit.bridge`, which is imported when first used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guidekit.bridge import GuidanceStats, as_guider, guided, set_guidance
    from guidekit.guidance import (
        APG,
        CFG,
        CFGPP,
        FDG,
        MAMBOG,
        NAG,
        PAG,
        PCG,
        SEG,
        SLG,
        STG,
        TCFG,
        AdaptiveGuidance,
        AutoGuidance,
        ByExpert,
        CFGNorm,
        CFGZeroStar,
        Guidance,
        GuidanceSum,
        GuidanceSyntaxError,
        Interval,
        LinearAG,
        LinearAGFit,
        PredictionRecorder,
        Scheduled,
        fit_linear_ag,
        format_guidance,
        parse_guidance,
    )

__version__ = "0.1.0"

_BRIDGE_NAMES = ("GuidanceStats", "as_guider", "guided", "set_guidance")


def __getattr__(name: str) -> Any:
    """The exported names, imported when first used: :mod:`guidekit.guidance` (torch) for the methods,
    :mod:`guidekit.bridge` (diffusers) for the pipeline functions. So ``import guidekit`` and the command line's
    ``--help`` load neither."""
    if name in _BRIDGE_NAMES:
        return getattr(importlib.import_module("guidekit.bridge"), name)
    if name in __all__:
        return getattr(importlib.import_module("guidekit.guidance"), name)
    raise AttributeError(f"module 'guidekit' has no attribute {name!r}")


class _AfterDiffusers(importlib.abc.MetaPathFinder):
    """Imports :mod:`guidekit.bridge` (which gives pipelines ``set_guidance``) right after diffusers is imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "diffusers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module: Any) -> None:
            exec_module(module)
            importlib.import_module("guidekit.bridge")

        spec.loader.exec_module = exec_then_install  # type: ignore[method-assign]
        return spec


if "diffusers" in sys.modules:
    importlib.import_module("guidekit.bridge")
elif not any(isinstance(f, _AfterDiffusers) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterDiffusers())

__all__ = [
    "APG",
    "CFG",
    "CFGPP",
    "FDG",
    "MAMBOG",
    "NAG",
    "PAG",
    "PCG",
    "SEG",
    "SLG",
    "STG",
    "TCFG",
    "AdaptiveGuidance",
    "AutoGuidance",
    "ByExpert",
    "CFGNorm",
    "CFGZeroStar",
    "Guidance",
    "GuidanceStats",
    "GuidanceSum",
    "GuidanceSyntaxError",
    "Interval",
    "LinearAG",
    "LinearAGFit",
    "PredictionRecorder",
    "Scheduled",
    "as_guider",
    "fit_linear_ag",
    "format_guidance",
    "guided",
    "parse_guidance",
    "set_guidance",
]
