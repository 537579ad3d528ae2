"""Mixed precision: networks that compute in a 16-bit float while their parameters,
the losses and the reductions keep the data's dtype."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree


_SIXTEEN = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def _as_dtype(value: Any) -> Any:
    """Field converter: a dtype-like (`jnp.bfloat16`, `"float16"`) to `np.dtype`;
    anything else is left for `__check_init__` to name."""
    if value is None:
        return None
    try:
        return np.dtype(value)
    except TypeError:
        return value


class Precision(eqx.Module):
    """A mixed-precision policy for [`fmcalc.train.fit`][].

    The parameters (and the EMA, the optimiser's state and the gradients) keep
    their dtype, float32; every call of the online and EMA networks casts the
    parameters and the inputs `x`, `s`, `t` to `compute` and its output back to
    the data's dtype, so the residuals, the losses and every sum over the batch
    are float32.

    A JVP (MeanFlow's `∂_s V + ∇_x V · v`, LSD's `∂_t F`) is the least forgiving
    part: a tangent is a difference of nearby values, and a 16-bit float keeps 8
    (bfloat16) or 11 (float16) bits of it. With `jvp=jnp.float32` the network
    call that a JVP differentiates, its primal and its tangent, runs in float32,
    and every other call in `compute`. The JVP's primal is then not reused as the
    prediction where the same call appears (as it is otherwise): the prediction
    is a call of its own in `compute`, which costs one more forward pass (at 16
    bits) and keeps the differentiated path in low precision.

    Finite differences divide a difference of two outputs by a small step; in
    16 bits that is round-off, so `fit` refuses a method that uses one with a
    step below `sqrt(eps)` of `compute`, as it does for the data's dtype.

    float16 has 5 exponent bits: gradients below about 6e-8 flush to zero and
    activations above 65504 overflow (no loss scaling is applied). bfloat16
    keeps float32's range, and is the usual choice.

    **Arguments:**

    - `compute`: `jnp.bfloat16` (default) or `jnp.float16`.
    - `jvp`: the dtype of every JVP's network call, e.g. `jnp.float32`; `None`
      (default) for `compute`.

    !!! Example

        ```python
        policy = fmcalc.train.Precision(jnp.bfloat16, jvp=jnp.float32)
        fmcalc.train.fit(method, model, data, ..., precision=policy)
        ```
    """

    compute: Any = eqx.field(static=True, default=jnp.bfloat16, converter=_as_dtype)
    jvp: Any = eqx.field(static=True, default=None, converter=_as_dtype)

    def __check_init__(self):
        if self.compute not in _SIXTEEN:
            raise ValueError(
                "`Precision(compute=...)` must be jnp.bfloat16 or jnp.float16 (for "
                "float32, pass `precision=None`); got "
                f"{getattr(self.compute, 'name', self.compute)!r}."
            )
        if self.jvp is not None and not (
            isinstance(self.jvp, np.dtype)
            and jnp.issubdtype(self.jvp, jnp.floating)
            and self.jvp.itemsize >= self.compute.itemsize
        ):
            raise ValueError(
                "`Precision(jvp=...)` must be None or a floating dtype at least as "
                f"wide as `compute` ({self.compute.name}), e.g. jnp.float32; got "
                f"{getattr(self.jvp, 'name', self.jvp)!r}."
            )

    def __call__(self, network: Callable) -> "Cast":
        """`network` computing under this policy."""
        return Cast(network, self.compute, self.jvp or self.compute)


def _cast(tree: PyTree, dtype) -> PyTree:
    return jax.tree.map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree
    )


class Cast(eqx.Module):
    """A network whose calls compute in `dtype` (its JVPs in `jvp_dtype`) and
    return the dtype of `x`: see [`fmcalc.train.Precision`][]."""

    network: Callable
    dtype: Any = eqx.field(static=True)
    jvp_dtype: Any = eqx.field(static=True)

    def __call__(self, x: Array, s, t, *, cond=None) -> Array:
        dtype = self.dtype
        network = _cast(self.network, dtype)
        args = (jnp.asarray(a).astype(dtype) for a in (x, s, t))
        return network(*args, cond=cond).astype(jnp.result_type(x))

    @property
    def log_variance(self) -> Callable:
        """The network's learned log-variance ([`fmcalc.nn.WithLogVariance`][]),
        in `dtype`."""
        weight = _cast(self.network.log_variance, self.dtype)  # pyright: ignore
        return lambda s, t: weight(
            jnp.asarray(s).astype(self.dtype), jnp.asarray(t).astype(self.dtype)
        ).astype(jnp.result_type(s))

    def for_jvp(self) -> "Cast":
        """The same network computing in `jvp_dtype`, for the call a JVP
        differentiates."""
        return Cast(self.network, self.jvp_dtype, self.jvp_dtype)
