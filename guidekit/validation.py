"""Input checks shared by every layer: one-line errors that name the parameter, its value and what is accepted."""

from __future__ import annotations

import math
import numbers


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float, or raise a ``ValueError`` that names the parameter and the range."""
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    accepted = f"a finite number in {lo or '(-inf'}, {hi or 'inf)'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not accepted; expected {accepted}")
    v = float(value)
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        raise ValueError(f"{name}={value!r} is not accepted; expected {accepted}")
    return v


def check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (not a bool; numpy's count) in ``[low, high]``, else a
    ``ValueError`` naming the parameter and the range."""
    accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
            or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is not accepted; expected {accepted}")
    return int(value)
