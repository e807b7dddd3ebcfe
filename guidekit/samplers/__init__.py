"""Samplers as diffusers schedulers: EDM's stochastic Heun and PCG's predictor-corrector (plus LML).

Each is a ``SchedulerMixin`` + ``ConfigMixin`` built with ``X.from_config(pipe.scheduler.config)``.
"""

from guidekit.samplers.edm_heun import EDMHeunScheduler
from guidekit.samplers.pcg import PCGScheduler

__all__ = ["EDMHeunScheduler", "PCGScheduler"]
