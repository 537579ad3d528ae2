"""Field converters and validators shared by the strategies' `__check_init__`.

Each converter turns Python and NumPy numbers into the Python type a static field
holds, and leaves anything else for a validator to reject with a message that
names the offending field and value.
"""

import math

import numpy as np


def _as_float(value):
    """Field converter: Python and NumPy numbers to `float`; anything else is left
    for `__check_init__` to reject with a message that names it."""
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool
    ):
        return float(value)
    return value


def _as_int(value):
    """Field converter: NumPy integers to `int`; anything else is left for
    `__check_init__`."""
    if isinstance(value, np.integer):
        return int(value)
    return value


def _check_real(owner: str, name: str, value) -> float:
    if not isinstance(value, float):
        raise TypeError(
            f"`{owner}({name}=...)` must be a Python number; got {value!r} of type "
            f"{type(value).__name__}."
        )
    if not math.isfinite(value):
        raise ValueError(f"`{owner}({name}=...)` must be finite; got {value!r}.")
    return value


def _check_positive(owner: str, name: str, value) -> float:
    value = _check_real(owner, name, value)
    if not value > 0:
        raise ValueError(f"`{owner}({name}=...)` must be positive; got {value!r}.")
    return value


def _check_int(owner: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{owner}({name}=...)` must be a Python int; got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(f"`{owner}({name}=...)` must be ≥ {minimum}; got {value!r}.")
    return value
