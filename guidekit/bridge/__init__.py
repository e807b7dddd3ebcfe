"""Everything in guidekit that knows diffusers internals. Importing it gives every ``DiffusionPipeline`` a
``set_guidance`` method."""

from guidekit.bridge.families import FAMILIES
from guidekit.bridge.install import GuidedRun, guided, install_pipeline_method, set_guidance
from guidekit.bridge.modular import GuidekitGuider, as_guider
from guidekit.bridge.proxy import GuidanceStats
from guidekit.bridge.schedulers import SUPPORTED_SCHEDULERS

install_pipeline_method()

__all__ = ["FAMILIES", "SUPPORTED_SCHEDULERS", "GuidanceStats", "GuidedRun", "GuidekitGuider", "as_guider", "guided",
           "install_pipeline_method", "set_guidance"]
