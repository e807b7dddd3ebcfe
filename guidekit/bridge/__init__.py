"""Everything in guidekit that knows diffusers internals."""

from guidekit.bridge.families import FAMILIES
from guidekit.bridge.install import install_pipeline_method, set_guidance
from guidekit.bridge.proxy import GuidanceStats
from guidekit.bridge.schedulers import SUPPORTED_SCHEDULERS

__all__ = ["FAMILIES", "SUPPORTED_SCHEDULERS", "GuidanceStats", "install_pipeline_method", "set_guidance"]
