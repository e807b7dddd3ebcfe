"""Samplers as diffusers schedulers: EDM's stochastic Heun, PCG's predictor-corrector, CFG++ (plus LML).

Each is a ``SchedulerMixin`` + ``ConfigMixin`` built with ``X.from_config(pipe.scheduler.config)``.
"""

from guidekit.samplers.cfgpp import CFGPPScheduler
from guidekit.samplers.edm_heun import EDMHeunScheduler
from guidekit.samplers.lml import DDIMLMScheduler, DPMSolverMultistepLMScheduler, FlowMatchEulerLMScheduler
from guidekit.samplers.pcg import PCGScheduler

__all__ = [
    "CFGPPScheduler",
    "DDIMLMScheduler",
    "DPMSolverMultistepLMScheduler",
    "EDMHeunScheduler",
    "FlowMatchEulerLMScheduler",
    "PCGScheduler",
]
