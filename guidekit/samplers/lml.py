"""Levenberg-Marquardt-Langevin (LML) schedulers (Wang et al., ICCV 2025, arXiv 2505.24222).

Sources. The paper's method (Sec. 3): the diffusion Hessian is approximated by a low-rank term built
from the sampler's own update direction and damped by ``lambda I``, as in Levenberg-Marquardt, and the
update direction is preconditioned by the inverse of that damped matrix. The paper's equations could
not be read from this environment (only its abstract was reachable), so the formula below is the one
the official code implements, read from github.com/zituitui/LML-diffusion-sampler at commit
``e19cbdc9ca3dbad40ac2d12ebc5d801ae5194f71`` (2025-09-02):

* ``scheduler/scheduling_ddim_lm.py``, ``DDIMLMScheduler.step`` (block "5.2 LM corection");
* ``scheduler/scheduling_dpmsolver_multistep_lm.py``, ``lm_correct`` and the first-, second- and
  third-order update functions;
* ``scheduler/scheduling_flow_match_euler_discrete_lm.py``, ``lm_correct`` and ``step``.

The correction, per sample over all non-batch dimensions, with ``u`` the base solver's update
direction and ``u_prev`` the previous step's (uncorrected) ``u``::

    ubar = kappa u_prev + (1 - kappa) u                (u_prev = u at the first step)
    g    = u - ubar <u, ubar> / (lambda + ||ubar||^2)   (= lambda (lambda I + ubar ubar^T)^-1 u)
    u'   = g ||u|| / ||g||                             (the step keeps the length of u)

(the equality is Sherman-Morrison: the inverse of the damped rank-one "Hessian" costs two dot products).

What ``u`` is, per base solver (the official code):

* DDIM: the noise prediction ``eps`` in the "direction pointing to x_t" term only,
  ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps'`` (``x0`` keeps the uncorrected
  ``eps``; the ``eta`` noise is added as usual);
* DPM-Solver multistep (``dpmsolver++`` and ``dpmsolver``, orders 1-3): the whole increment
  ``u = x_t - c x_s`` with ``c = sigma_t / sigma_s`` (``dpmsolver++``) or ``alpha_t / alpha_s``
  (``dpmsolver``); the SDE variants are not corrected there, and are refused here;
* flow-matching Euler: the velocity, in the deterministic and the stochastic update.

Settings (official README): ``lambda = 1e-3`` for SD-1.5/SD-2 on MS-COCO ("we always choose"), ``1e-2``
for FLUX, ``5e-3`` CelebA-HQ DDIM, ``6e-3`` T2I-CompBench; CIFAR-10 ``8e-4 .. 1e-3`` at 5-15 NFE down to
``5e-5`` at 100 NFE. ``kappa`` is ``0.0`` in every scheduler and script (no README command sets it).
The constructors' own ``lamb`` default is ``1.0`` and the scripts' ``--lamb`` default ``5.0`` or ``1.0``;
here ``lml_lambda`` defaults to the README value for the base solver's main use (``1e-3`` DDIM and
DPM-Solver, ``1e-2`` flow Euler) and ``lml_kappa`` to ``0.0``.

With ``kappa = 0`` the correction is the identity: ``ubar = u``, so ``g = lambda u / (lambda + ||u||^2)``
is a positive multiple of ``u`` and the renormalisation restores ``u``. LML with ``kappa = 0`` is its
base sampler to rounding, whatever ``lambda``. It is likewise the identity at the first step, and for
any ``kappa`` when a sample is one-dimensional. For ``kappa > 0`` it removes part of the component of
``u`` along ``ubar`` and rescales: small ``lambda`` (``lambda << ||ubar||^2``) removes almost all of it;
large ``lambda`` leaves ``u`` unchanged (``lambda -> inf`` is the base sampler).

Differences from the official code:

* ``g`` is evaluated in float64 in the span of ``u`` and ``delta = u_prev - u``: ``ubar = u + kappa delta``
  and ``g ∝ (lambda + kappa <delta, ubar>) u - kappa <u, ubar> delta``, the same vector up to the
  positive factor ``lambda + ||ubar||^2``, which the renormalisation removes. With ``kappa = 0`` or at
  the first step it is ``lambda u`` exactly, whatever ``||u||^2 / lambda``. The official direct form
  ``u - ubar <u, ubar> / (lambda + ||ubar||^2)`` cancels catastrophically when ``lambda << ||ubar||^2``:
  in float32 at ``kappa = 0`` its result is rounding noise rescaled to ``||u||`` rather than ``u``
  (``benchmarks/lml_effect.py``; standard normal ``u``, cosine to ``u`` over 8 draws: 0.82-0.96 for an
  SD-1.5-sized latent at ``lambda = 1e-3``, about 0 for SDXL-sized latents, 0 or 0.83 for FLUX-sized
  float32 velocities at ``lambda = 1e-2``, NaN in bfloat16).
* The previous direction is forgotten in ``set_timesteps``; the official schedulers keep it across
  pipeline calls (set only in ``__init__``), so a second call's first step mixed in the last step of
  the first call.
* Not implemented: the official ``lm`` on/off flag (use the base scheduler), and DDIM's ``freeze``
  (skip the correction while ``t >= 1000 (1 - freeze)``; its default 0 never skips).

Against the project's REFERENCE (section LML): the formula, ``u`` per solver and the settings agree.
Its "identity up to rounding" at ``kappa = 0`` holds here to the last bit in float32, but not for the
official float32 code at the official ``lambda`` (above). The paper's equation numbers are not cited
because its text was not reachable.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from guidekit.guidance.base import per_sample_dot, per_sample_norm
from guidekit.validation import check_number

__all__ = ["DDIMLMScheduler", "DPMSolverMultistepLMScheduler", "FlowMatchEulerLMScheduler", "lml_correction"]

_Init = TypeVar("_Init", bound=Callable[..., None])


def _check_parameters(lam: object, kappa: object, *, names: tuple[str, str] = ("lam", "kappa")) -> tuple[float, float]:
    """``(lambda, kappa)`` as floats, or a ``ValueError`` naming the parameter, its value and the range."""
    return (check_number(names[0], lam, low=0.0, low_open=True),
            check_number(names[1], kappa, low=0.0, high=1.0))


def lml_correction(u: torch.Tensor, u_prev: torch.Tensor | None, lam: float, kappa: float) -> torch.Tensor:
    """The LML direction ``u'``: ``lambda (lambda I + ubar ubar^T)^-1 u`` rescaled to ``||u||``.

    ``ubar = kappa u_prev + (1 - kappa) u`` (``u_prev = None``: ``ubar = u``), per sample over all
    non-batch dimensions (official code, see the module docstring; paper Sec. 3). Evaluated in float64
    in the span of ``u`` and ``u_prev - u``, which keeps ``kappa = 0`` and the first step the identity to
    rounding; returned in ``u``'s dtype. A zero ``u`` is returned unchanged.

    Args:
        u: ``(B, ...)`` update direction of the base solver at this step.
        u_prev: the previous step's uncorrected ``u`` (same shape), or ``None`` at the first step.
        lam: damping ``lambda > 0``; larger is closer to the identity.
        kappa: weight of ``u_prev`` in ``ubar``, in ``[0, 1]``; ``0`` is the identity.
    """
    lam, kappa = _check_parameters(lam, kappa)
    if u.ndim < 1:
        raise ValueError(f"u of shape {tuple(u.shape)} is not accepted; expected a batch dimension first")
    if u_prev is not None and u_prev.shape != u.shape:
        raise ValueError(f"u_prev of shape {tuple(u_prev.shape)} is not accepted; expected u's shape "
                         f"{tuple(u.shape)}")
    x = u.reshape(len(u), -1).to(torch.float64)
    delta = torch.zeros_like(x) if u_prev is None else u_prev.reshape(x.shape).to(x.device, torch.float64) - x
    ubar = x + kappa * delta
    g = (lam + kappa * per_sample_dot(delta, ubar)) * x - kappa * per_sample_dot(x, ubar) * delta
    g_norm = per_sample_norm(g).clamp_min(torch.finfo(torch.float64).tiny)
    return (g * (per_sample_norm(x) / g_norm)).reshape(u.shape).to(u.dtype)


def _with_base_signature(base: type) -> Callable[[_Init], _Init]:
    """Give an ``__init__(self, *args, <keyword-only LML parameters>, **kwargs)`` the signature of
    ``base.__init__`` followed by its own keyword-only parameters: diffusers' ``register_to_config`` and
    ``from_config`` read the signature to know which configuration keys the class takes."""

    def decorate(init: _Init) -> _Init:
        own = [p for p in inspect.signature(init).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        inherited = list(inspect.signature(base.__init__).parameters.values())
        params = sorted([*inherited, *own], key=lambda p: p.kind)  # stable: keeps the base's order
        init.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return init

    return decorate


class _LMLState:
    """The previous step's uncorrected direction, forgotten at every ``set_timesteps``."""

    _lml_prev: torch.Tensor | None = None

    def _lml(self, u: torch.Tensor) -> torch.Tensor:
        """The corrected direction for this step; remembers ``u`` for the next one."""
        config = self.config  # type: ignore[attr-defined]
        corrected = lml_correction(u, self._lml_prev, config.lml_lambda, config.lml_kappa)
        self._lml_prev = u
        return corrected

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        """The base class's ``set_timesteps``; also starts a new sampling loop for the LML state."""
        self._lml_prev = None
        super().set_timesteps(*args, **kwargs)  # type: ignore[misc]


def _finish(out: BaseOutput, prev_sample: torch.Tensor, return_dict: bool) -> BaseOutput | tuple:
    """The base class's output with ``prev_sample`` replaced, as a dataclass or the base's tuple."""
    out.prev_sample = prev_sample
    return out if return_dict else out.to_tuple()


class DDIMLMScheduler(_LMLState, DDIMScheduler):
    """DDIM with the LML correction of the noise in its direction term.

    Takes every :class:`~diffusers.DDIMScheduler` argument, plus:

    Args:
        lml_lambda: damping ``lambda > 0`` (official README: 1e-3 for SD-1.5/SD-2, 5e-3 CelebA-HQ DDIM).
        lml_kappa: weight of the previous step's noise in ``ubar``, in ``[0, 1]``; ``0`` (official default)
            makes this scheduler DDIM to rounding.
    """

    @register_to_config
    @_with_base_signature(DDIMScheduler)
    def __init__(self, *args: Any, lml_lambda: float = 1e-3, lml_kappa: float = 0.0, **kwargs: Any) -> None:
        _check_parameters(lml_lambda, lml_kappa, names=("lml_lambda", "lml_kappa"))
        super().__init__(*args, **kwargs)

    def _epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                 clipped_x0: torch.Tensor | None) -> torch.Tensor:
        """The noise DDIM puts in its direction term (diffusers' conversion of the model output)."""
        beta_prod_t = 1 - alpha_prod_t
        if clipped_x0 is not None:
            return (sample - alpha_prod_t**0.5 * clipped_x0) / beta_prod_t**0.5
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "sample":
            return (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
        return alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample  # v_prediction

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> BaseOutput | tuple:
        """DDIM's step with ``eps`` replaced by its LML direction in ``sqrt(1 - abar_prev - std^2) eps``."""
        out = super().step(model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                           generator=generator, variance_noise=variance_noise, return_dict=True)
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        std_dev_t = eta * self._get_variance(timestep, prev_timestep) ** 0.5
        eps = self._epsilon(model_output, sample, alpha_prod_t,
                            out.pred_original_sample if use_clipped_model_output else None)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5
        prev_sample = out.prev_sample + direction * (self._lml(eps) - eps)
        return _finish(out, prev_sample, return_dict)


class DPMSolverMultistepLMScheduler(_LMLState, DPMSolverMultistepScheduler):
    """Multistep DPM-Solver (``dpmsolver++`` or ``dpmsolver``, orders 1-3) with the LML correction of the
    whole increment ``x_t - c x_s``.

    Takes every :class:`~diffusers.DPMSolverMultistepScheduler` argument except the SDE algorithm types,
    plus:

    Args:
        lml_lambda: damping ``lambda > 0`` (official README: 1e-3 for SD-1.5/SD-2 on MS-COCO, CIFAR-10
            8e-4 .. 1e-3 at 5-15 NFE).
        lml_kappa: weight of the previous increment in ``ubar``, in ``[0, 1]``; ``0`` (official default)
            makes this scheduler DPM-Solver to rounding.
    """

    _ALGORITHMS = ("dpmsolver++", "dpmsolver")

    @register_to_config
    @_with_base_signature(DPMSolverMultistepScheduler)
    def __init__(self, *args: Any, lml_lambda: float = 1e-3, lml_kappa: float = 0.0, **kwargs: Any) -> None:
        _check_parameters(lml_lambda, lml_kappa, names=("lml_lambda", "lml_kappa"))
        super().__init__(*args, **kwargs)
        if self.config.algorithm_type not in self._ALGORITHMS:
            raise ValueError(f"algorithm_type={self.config.algorithm_type!r} is not accepted by {type(self).__name__}; "
                             f"expected one of {', '.join(self._ALGORITHMS)} (the official LML code corrects only "
                             "the deterministic updates)")

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> BaseOutput | tuple:
        """DPM-Solver's step ``x_t = c x_s + u`` with the increment ``u`` replaced by its LML direction."""
        out = super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                           return_dict=True)
        index = self.step_index - 1  # the base step has advanced the index
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[index + 1])
        alpha_s, sigma_s = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        carry = sigma_t / sigma_s if self.config.algorithm_type == "dpmsolver++" else alpha_t / alpha_s
        prev = out.prev_sample
        work = torch.promote_types(prev.dtype, torch.float32)  # diffusers' own working precision
        u = prev.to(work) - carry.to(device=prev.device, dtype=work) * sample.to(work)
        prev_sample = (prev.to(work) + (self._lml(u) - u)).to(prev.dtype)
        return _finish(out, prev_sample, return_dict)


class FlowMatchEulerLMScheduler(_LMLState, FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler with the LML correction of the velocity.

    Takes every :class:`~diffusers.FlowMatchEulerDiscreteScheduler` argument, plus:

    Args:
        lml_lambda: damping ``lambda > 0`` (official README: 1e-2 for FLUX).
        lml_kappa: weight of the previous step's velocity in ``ubar``, in ``[0, 1]``; ``0`` (official
            default) makes this scheduler flow Euler to rounding.
    """

    @register_to_config
    @_with_base_signature(FlowMatchEulerDiscreteScheduler)
    def __init__(self, *args: Any, lml_lambda: float = 1e-2, lml_kappa: float = 0.0, **kwargs: Any) -> None:
        _check_parameters(lml_lambda, lml_kappa, names=("lml_lambda", "lml_kappa"))
        super().__init__(*args, **kwargs)

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             *args: Any, **kwargs: Any) -> BaseOutput | tuple:
        """Flow Euler's step (deterministic or stochastic) taken with the LML velocity."""
        return super().step(self._lml(model_output), timestep, sample, *args, **kwargs)
