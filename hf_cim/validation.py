"""Range checks for user input, shared by the config, the noise models, the chip, the callbacks and the evaluation.

Every check raises an error that names ``owner: `field```, the value received and the range allowed (STYLE.md,
convention 5). This module imports nothing of hf_cim: it sits on the lowest floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check_number_list", "check_range"]


def check_range(
    owner: str,
    field: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise a ``ValueError`` naming ``owner.field`` unless ``value`` is a finite number in the given range.

    Args:
        owner: who checks (``"AnalogNoiseConfig"``, ``"PCMNoise"``...), first in the message.
        field: the argument or field checked.
        value: the value received.
        low, high: the bounds; ``None`` leaves that side open.
        low_inclusive, high_inclusive: whether a bound itself is allowed.

    Raises:
        TypeError: ``value`` is not an int or float (a bool is not a number here).
        ValueError: ``value`` is NaN, infinite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: `{field}` must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: `{field}` must be finite, got {value!r}")
    lo_ok = low is None or (value >= low if low_inclusive else value > low)
    hi_ok = high is None or (value <= high if high_inclusive else value < high)
    if not (lo_ok and hi_ok):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        lb = "[" if low_inclusive and low is not None else "("
        hb = "]" if high_inclusive and high is not None else ")"
        raise ValueError(f"{owner}: `{field}` must be in {lb}{lo}, {hi}{hb}, got {value!r}")


def check_number_list(
    owner: str, field: str, values: float | Sequence[float], low: float | None = None, high: float | None = None
) -> list[float]:
    """``values`` (one number or a non-empty sequence of them) as a list of floats, each checked by :func:`check_range`.

    Raises:
        ValueError: an empty sequence, or a value that is not a finite number in ``[low, high]`` (a value of the
            wrong type too: a list argument is checked as a whole).
    """
    if isinstance(values, (int, float)):
        values = [values]
    out = []
    for v in values:
        try:
            check_range(owner, field, v, low, high)
        except TypeError as err:
            raise ValueError(str(err)) from None
        out.append(float(v))
    if not out:
        raise ValueError(f"{owner}: `{field}` must not be empty")
    return out
