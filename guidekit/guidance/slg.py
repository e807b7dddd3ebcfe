"""Skip Layer Guidance (SLG; Stability AI's SD3.5 reference sampler, and diffusers' ``StableDiffusion3Pipeline``
``skip_guidance_layers``) and Spatiotemporal Skip Guidance (STG; Hyung et al., CVPR 2025, arXiv:2411.18664, its
STG-R mode).

The perturbed prediction ``D_s`` is the conditional one with chosen transformer blocks skipped
(:class:`~guidekit.guidance.base.SkipLayers`); inside a window of the solver steps the guided prediction gains

    D = D_c + s (D_c - D_s)

so ``CFG(w) + SLG(s)`` is ``D_u + w (D_c - D_u) + s (D_c - D_s)``, the SD3 pipeline's rule. The window is the SD3
pipeline's: step ``i`` of ``N`` is inside when ``N start < i < N stop`` (both strict); outside it no skipped-layer
row is computed. The rule is linear with coefficients summing to 1, so it runs in the model's own space.

STG-R is the same rule at every step, on video transformers (the official LTX-Video and CogVideoX pipelines:
``u + w (c - u) + s (c - p)`` in one forward, ``p`` with whole blocks skipped, their residual only): ``CFG(w) +
STG(s, layers)``; a window in sigma comes from ``Interval``. Its STG-A mode (image tokens attending only to
themselves in the chosen blocks) is another perturbation and not built.
"""

from __future__ import annotations

from dataclasses import dataclass

from guidekit.guidance.base import GuidanceContext, Pass, PerturbedGuidance, SkipLayers, set_field
from guidekit.validation import check_number

#: SD3.5 Medium's recipe (diffusers' example and Stability AI's reference): blocks 7, 8 and 9.
DEFAULT_LAYERS = (7, 8, 9)


def _layers(value: object) -> tuple[int, ...]:
    layers = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(layers, (list, tuple)) or not layers
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers)
            or len(set(layers)) != len(layers)):
        raise ValueError(f"layers={value!r} is not accepted; expected a block index >= 0 or a non-empty list of "
                         "distinct ones, such as [7, 8, 9]")
    return tuple(layers)


@dataclass(frozen=True)
class SLG(PerturbedGuidance):
    """Skip Layer Guidance: ``D_c + s (D_c - D_s)`` for steps inside the window (module docstring).

    Args:
        scale: the weight ``s >= 0`` (diffusers' ``skip_layer_guidance_scale``, default 2.8).
        layers: the transformer blocks skipped in the perturbed pass (diffusers' ``skip_guidance_layers``).
        start: the window's start, a fraction of the steps in ``[0, 1]`` (``skip_layer_guidance_start``, 0.01).
        stop: the window's end, a fraction in ``[start, 1]`` (``skip_layer_guidance_stop``, 0.2).
    """

    scale: float = 2.8
    layers: tuple[int, ...] = DEFAULT_LAYERS
    start: float = 0.01
    stop: float = 0.2

    def __post_init__(self) -> None:
        set_field(self, "scale", check_number("scale", self.scale, low=0.0))
        set_field(self, "layers", _layers(self.layers))
        set_field(self, "start", check_number("start", self.start, low=0.0, high=1.0))
        set_field(self, "stop", check_number("stop", self.stop, low=self.start, high=1.0))

    @property
    def perturbed(self) -> Pass:
        """The pass of the skipped-layer conditional prediction: ``slg:`` and the blocks."""
        return Pass(f"slg:{','.join(map(str, self.layers))}", SkipLayers(self.layers))

    def inside(self, ctx: GuidanceContext) -> bool:
        """Whether the call's solver step lies in the window (strict on both ends, as the SD3 pipeline)."""
        return ctx.num_steps * self.start < ctx.step < ctx.num_steps * self.stop

    def weight(self, ctx: GuidanceContext, scale: float | None = None) -> float:
        """The weight inside the window (``scale`` if given, else the method's), 0 outside it."""
        return (self.scale if scale is None else scale) if self.inside(ctx) else 0.0


@dataclass(frozen=True)
class STG(PerturbedGuidance):
    """Spatiotemporal Skip Guidance, STG-R: ``D_c + s (D_c - D_s)`` at every step, ``D_s`` with ``layers`` skipped
    (module docstring).

    Args:
        scale: the weight ``s >= 0`` (the official LTX-Video ``stg_scale``, 1; CogVideoX's example 4; the official
            HunyuanVideo ``stg_scale`` is ``s + 1``).
        layers: the transformer blocks skipped in the perturbed pass (LTX-Video's ``stg_block_idx``, 19).
    """

    scale: float
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        set_field(self, "scale", check_number("scale", self.scale, low=0.0))
        set_field(self, "layers", _layers(self.layers))

    @property
    def perturbed(self) -> Pass:
        """The pass of the skipped-block conditional prediction, the same as SLG's for the same blocks."""
        return Pass(f"slg:{','.join(map(str, self.layers))}", SkipLayers(self.layers))
