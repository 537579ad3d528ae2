"""The matrix-product precision the kit's checks run at."""

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import jax


_P = ParamSpec("_P")
_R = TypeVar("_R")


def full_precision(check: Callable[_P, _R]) -> Callable[_P, _R]:
    """`check`, run with float32 matrix products at full precision.

    On NVIDIA GPUs JAX computes float32 matrix products in TF32 by default, with
    10 mantissa bits (round-off near 1e-3), which would swamp the float32
    tolerances of identity and fixed-point checks; `"highest"` makes them true
    float32 products, as on a CPU or TPU with this setting. Only the checks run
    so: a model trained under the default precision is checked exactly.
    """

    @functools.wraps(check)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with jax.default_matmul_precision("highest"):
            return check(*args, **kwargs)

    return run
