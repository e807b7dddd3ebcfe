"""Perturbed-Attention Guidance (PAG; Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance", 2024, arXiv:2403.17377).

The perturbed prediction ``D_p`` is the conditional one with self-attention replaced by the identity in chosen
layers (:class:`~guidekit.guidance.base.IdentitySelfAttention`, the paper's eq. 6). The guided prediction is the
paper's eq. 8:

    D = D_c + s (D_c - D_p)

and ``CFG(w) + PAG(s)`` gives eq. 9, ``D_u + w (D_c - D_u) + s (D_c - D_p)`` (:class:`GuidanceSum`). With
``adaptive_scale = a > 0`` the weight follows diffusers' PAG pipelines (``PAGMixin._get_pag_scale``):
``s(t) = max(s - a (1000 - t), 0)`` with ``t = 1000 tau`` the timestep on the 1000-step scale, and a call whose
weight is 0 computes no perturbed row. The rule is linear with coefficients summing to 1, so it is the same in every
prediction space and runs in the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from guidekit.guidance.base import GuidanceContext, IdentitySelfAttention, Pass, PerturbedGuidance, set_field
from guidekit.validation import check_number

#: The layers PAG perturbs by default: the UNet's middle block, diffusers' and the paper's SD choice.
DEFAULT_LAYERS = ("mid",)


def check_layers(value: object) -> tuple[str, ...]:
    """``value`` (a layer name or a non-empty list of them) as a tuple, or a ``ValueError`` naming ``layers``."""
    layers = (value,) if isinstance(value, str) else value
    if (not isinstance(layers, (list, tuple)) or not layers
            or not all(isinstance(v, str) and v.strip() and v == v.strip() for v in layers)):
        raise ValueError(f"layers={value!r} is not accepted; expected a layer name such as 'mid' or a non-empty "
                         "list of them")
    return tuple(layers)


@dataclass(frozen=True)
class PAG(PerturbedGuidance):
    """Perturbed-Attention Guidance: ``D_c + s (D_c - D_p)`` (module docstring).

    Args:
        scale: the PAG weight ``s >= 0`` (diffusers' ``pag_scale``; the paper uses 3 on SD 1.5 with CFG, 2-5
            alone). ``0`` computes nothing.
        layers: the denoiser's layers whose self-attention becomes the identity (diffusers'
            ``pag_applied_layers``); a name matches whole dot-separated parts of module names, ``"mid"`` is the
            UNet's ``mid_block``.
        adaptive_scale: ``a >= 0``; the weight at timestep ``t`` is ``max(scale - a (1000 - t), 0)``.
    """

    scale: float
    layers: tuple[str, ...] = DEFAULT_LAYERS
    adaptive_scale: float = 0.0

    def __post_init__(self) -> None:
        set_field(self, "scale", check_number("scale", self.scale, low=0.0))
        set_field(self, "layers", check_layers(self.layers))
        set_field(self, "adaptive_scale", check_number("adaptive_scale", self.adaptive_scale, low=0.0))

    @property
    def perturbed(self) -> Pass:
        """The pass of the perturbed conditional prediction: ``pag:`` and the layers."""
        return Pass(f"pag:{','.join(self.layers)}", IdentitySelfAttention(self.layers))

    def weight(self, ctx: GuidanceContext, scale: float | None = None) -> float:
        """The PAG weight at this call: ``scale`` if given, else the adaptive rule (module docstring)."""
        if scale is not None:
            return scale
        if self.adaptive_scale == 0.0:
            return self.scale
        return max(self.scale - self.adaptive_scale * (1000.0 - 1000.0 * ctx.tau), 0.0)
