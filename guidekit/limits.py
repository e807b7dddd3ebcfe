"""Resource limits of one request, decided here and checked before anything is allocated.

Every layer (the guidance values, the samplers, :class:`~guidekit.bridge.sampling.SampleSettings`, the demo) takes
its caps from this module, so the command line, ``guidekit eval`` and the demo refuse the same values. A refused
value raises a one-line ``ValueError`` naming the parameter, its value, what is accepted and the limit, for
example ``steps=100000 is not accepted; expected an integer in [1, 1000] (limit MAX_STEPS)``.

Large image requests are run in pipeline calls of at most :data:`MAX_BATCH` images rather than refused; the caps
here bound what one request can hold in memory or plan, whatever the model.

This module imports the standard library and :mod:`guidekit.validation` only, so ``guidekit.guidance`` stays
importable without diffusers.
"""

from __future__ import annotations

from guidekit.validation import check_int

MAX_STEPS = 1000
"""Solver steps of one pipeline call. The VP models are trained on 1000 timesteps, so more steps repeat timesteps
(diffusers' DDIM refuses them); the schedulers allocate their tables per step."""

MAX_CORRECTOR_STEPS = 100
"""PCG's Langevin corrector steps per solver step. The paper's runs use a few; each is one more denoiser call per
solver step, so 100 already makes a call 101 times the cost of DDIM, and the sampler's plan holds at most
``MAX_STEPS * (1 + MAX_CORRECTOR_STEPS)`` calls (101,000 small entries)."""

MAX_BATCH = 16
"""Images per pipeline call: a request of more images runs in calls of this many seeds, in order, and the results
are concatenated. 16 is ``guidekit eval``'s default batch size, so its calls are the same with or without the
split; the activations of one call, not the request's size, decide the peak memory."""

MAX_IMAGES_PER_REQUEST = 1000
"""Images one :func:`~guidekit.bridge.sampling.sample_guided` request (``guidekit sample --num-images``, one batch
of ``guidekit eval``) returns: they are all held in memory (about 3 GB at 1024 x 1024). ``guidekit eval`` draws
more, in shards written to disk."""

MAX_EVAL_IMAGES = 1_000_000
"""Images (seeds) of one ``guidekit eval`` run: twenty times the usual 50k. Its seed list and per-image arrays are
built in memory (tens of MB at this size); a seed text naming more is refused before the list is built."""

MAX_SEED = 2**63 - 1
"""Largest seed: seeds are stored as int64 (``guidekit eval``'s shards) and seed ``torch.Generator``."""

MAX_IMAGE_SIDE = 2048
"""Largest image height or width in pixels: twice the native 1024 of SDXL, SD3 and Flux."""

IMAGE_SIDE_MULTIPLE = 8
"""Image heights and widths are multiples of this: the autoencoders downsample by 8."""

MAX_PROMPT_CHARS = 10_000
"""Characters of one prompt or negative prompt; the text encoders read at most a few hundred tokens of it."""

MAX_PATH_CHARS = 4096
"""Characters of a path or hub id given as a value (autoguidance's weak network); Linux's PATH_MAX."""

MAX_GUIDANCE_CHARS = 100_000
"""Characters of one guidance text. A LinearAG fit written inline (``linear_ag_fit(...)``) grows with the square of
its steps; a longer fit belongs in a file (``fit='path/to/fit.json'``)."""

MAX_GUIDANCE_DEPTH = 20
"""Nesting depth of one guidance text: calls, lists, dicts and signs inside one another, counting the innermost
value (``interval(apg(scale=2))`` is 3 deep; a wrapped LinearAG with an inline fit is about 10)."""

DEMO_MAX_STEPS = 500
"""Solver steps of one demo request: the page runs one request at a time for every user, on whatever machine
serves it."""

DEMO_MAX_IMAGES = 8
"""Images per method of one demo request (one strip each)."""

DEMO_MAX_METHODS = 4
"""Methods of one demo request (the page's four boxes)."""

ECHO_CHARS = 60
"""Characters of a user's text that an error message repeats; a longer text is cut and its length given."""


def shorten(value: object) -> str:
    """``repr(value)``, cut to :data:`ECHO_CHARS` characters with its length appended when it is longer (a string's
    characters, or those of another value's ``repr``)."""
    if not isinstance(value, str):
        shown = repr(value)
        return shown if len(shown) <= ECHO_CHARS else f"{shown[:ECHO_CHARS]}... ({len(shown)} characters)"
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS]!r}... ({len(value)} characters)"


def _check(name: str, value: object, *, low: int, high: int, limit: str) -> int:
    """:func:`~guidekit.validation.check_int` on ``[low, high]``, naming the limit in the error."""
    try:
        return check_int(name, value, low=low, high=high)
    except ValueError as exc:
        raise ValueError(f"{exc} (limit {limit})") from None


def check_steps(name: str, value: object, *, high: int = MAX_STEPS, limit: str = "MAX_STEPS") -> int:
    """``value`` as an int in ``[1, high]``, else a ``ValueError`` naming ``name`` and ``limit``."""
    return _check(name, value, low=1, high=high, limit=limit)


def check_corrector_steps(name: str, value: object) -> int:
    """``value`` as an int in ``[0, MAX_CORRECTOR_STEPS]``, else a ``ValueError`` naming ``name``."""
    return _check(name, value, low=0, high=MAX_CORRECTOR_STEPS, limit="MAX_CORRECTOR_STEPS")


def check_num_images(name: str, value: object, *, high: int = MAX_IMAGES_PER_REQUEST,
                     limit: str = "MAX_IMAGES_PER_REQUEST") -> int:
    """``value`` as an int in ``[1, high]``, else a ``ValueError`` naming ``name`` and ``limit``."""
    return _check(name, value, low=1, high=high, limit=limit)


def check_seed(name: str, value: object) -> int:
    """``value`` as an int in ``[0, MAX_SEED]``, else a ``ValueError`` naming ``name``."""
    return _check(name, value, low=0, high=MAX_SEED, limit="MAX_SEED")


def check_image_side(name: str, value: object) -> int:
    """``value`` as a multiple of :data:`IMAGE_SIDE_MULTIPLE` in ``[IMAGE_SIDE_MULTIPLE, MAX_IMAGE_SIDE]``, else a
    ``ValueError`` naming ``name``."""
    side = _check(name, value, low=IMAGE_SIDE_MULTIPLE, high=MAX_IMAGE_SIDE, limit="MAX_IMAGE_SIDE")
    if side % IMAGE_SIDE_MULTIPLE:
        raise ValueError(f"{name}={value!r} is not accepted; expected a multiple of {IMAGE_SIDE_MULTIPLE} in "
                         f"[{IMAGE_SIDE_MULTIPLE}, {MAX_IMAGE_SIDE}] (limit IMAGE_SIDE_MULTIPLE)")
    return side


def check_text(name: str, value: str, *, high: int = MAX_PROMPT_CHARS, limit: str = "MAX_PROMPT_CHARS") -> str:
    """``value`` if it has at most ``high`` characters, else a ``ValueError`` naming ``name`` (the text shortened)."""
    if len(value) > high:
        raise ValueError(f"{name}={shorten(value)} is not accepted; expected at most {high} characters "
                         f"(limit {limit})")
    return value
