"""Guidance methods: pure tensor maths on one denoiser call's predictions (no pipeline code, no diffusers)."""

from guidekit.guidance.adaptive import AdaptiveGuidance
from guidekit.guidance.apg import APG
from guidekit.guidance.autoguidance import AutoGuidance
from guidekit.guidance.base import (
    COND,
    UNCOND,
    AttentionPerturbation,
    BlurredQueries,
    BringsSampler,
    Guidance,
    GuidanceContext,
    GuidanceSum,
    IdentitySelfAttention,
    NegativePromptAttention,
    OtherDenoiser,
    Pass,
    Perturbation,
    PerturbedGuidance,
    SkipLayers,
    TwoPassGuidance,
    apply_guidance,
)
from guidekit.guidance.cfg import CFG
from guidekit.guidance.cfg_norm import CFGNorm
from guidekit.guidance.cfg_zero import CFGZeroStar
from guidekit.guidance.cfgpp import CFGPP
from guidekit.guidance.experts import ByExpert
from guidekit.guidance.fdg import FDG
from guidekit.guidance.interval import Interval
from guidekit.guidance.linear_ag import LinearAG, LinearAGFit, PredictionRecorder, fit_linear_ag
from guidekit.guidance.mambo import MAMBOG
from guidekit.guidance.nag import NAG
from guidekit.guidance.pag import PAG
from guidekit.guidance.pcg import PCG
from guidekit.guidance.schedules import SCHEDULES, Scheduled, schedule_weight
from guidekit.guidance.seg import SEG
from guidekit.guidance.slg import SLG, STG
from guidekit.guidance.spec import GuidanceSyntaxError, format_guidance, parse_guidance
from guidekit.guidance.tcfg import TCFG

__all__ = [
    "APG",
    "CFG",
    "CFGPP",
    "COND",
    "FDG",
    "MAMBOG",
    "NAG",
    "PAG",
    "PCG",
    "SCHEDULES",
    "SEG",
    "SLG",
    "STG",
    "TCFG",
    "UNCOND",
    "AdaptiveGuidance",
    "AttentionPerturbation",
    "AutoGuidance",
    "BlurredQueries",
    "BringsSampler",
    "ByExpert",
    "CFGNorm",
    "CFGZeroStar",
    "Guidance",
    "GuidanceContext",
    "GuidanceSum",
    "GuidanceSyntaxError",
    "IdentitySelfAttention",
    "Interval",
    "LinearAG",
    "LinearAGFit",
    "NegativePromptAttention",
    "OtherDenoiser",
    "Pass",
    "Perturbation",
    "PerturbedGuidance",
    "PredictionRecorder",
    "Scheduled",
    "SkipLayers",
    "TwoPassGuidance",
    "apply_guidance",
    "fit_linear_ag",
    "format_guidance",
    "parse_guidance",
    "schedule_weight",
]
