"""guidekit: better guidance and samplers than plain CFG on the diffusers pipelines you already use.

``import guidekit`` gives every diffusers ``DiffusionPipeline`` a ``set_guidance`` method::

    pipe.set_guidance(guidekit.Interval(guidekit.APG(2.0), sigma_lo=0.28, sigma_hi=5.42))
"""

from guidekit.bridge import GuidanceStats, install_pipeline_method, set_guidance
from guidekit.guidance import (
    APG,
    CFG,
    CFGPP,
    PCG,
    AdaptiveGuidance,
    CFGZeroStar,
    Guidance,
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

install_pipeline_method()

__all__ = [
    "APG",
    "CFG",
    "CFGPP",
    "PCG",
    "AdaptiveGuidance",
    "CFGZeroStar",
    "Guidance",
    "GuidanceStats",
    "GuidanceSyntaxError",
    "Interval",
    "LinearAG",
    "LinearAGFit",
    "PredictionRecorder",
    "Scheduled",
    "fit_linear_ag",
    "format_guidance",
    "parse_guidance",
    "set_guidance",
]
