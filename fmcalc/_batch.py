from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._conventions import interpolate
from ._misc import checked, concrete, in_unit_interval


NULL_LABEL = -1
"""The class label of an example that has none: an unconditional example, or one
whose label was dropped for classifier-free guidance. Class labels are integers in
`[0, num_classes)`; every other negative label is an error."""


def _labels(cond, batch_shape: tuple[int, ...]):
    """`cond`, with a leading batch axis checked on every array and integer labels
    checked to be class labels or `NULL_LABEL`."""

    def check(leaf):
        if not eqx.is_array_like(leaf):
            return leaf
        shape = jnp.shape(leaf)
        if shape[: len(batch_shape)] != batch_shape:
            raise ValueError(
                f"`cond` must have the batch shape {batch_shape} of `x0` as its "
                f"leading axes (one condition per example); got shape {shape}."
            )
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.integer):
            return leaf
        message = (
            "Labels in `cond` must be class labels in [0, num_classes) or "
            f"fmcalc.NULL_LABEL = {NULL_LABEL} (no label)"
        )
        values = concrete(leaf)
        if values is None:
            return checked(leaf, leaf < NULL_LABEL, message + ".")
        if (values < NULL_LABEL).any():
            raise ValueError(f"{message}; got {values[values < NULL_LABEL][:5]}.")
        return leaf

    return jax.tree.map(check, cond)


class Batch(eqx.Module):
    """The random inputs of one training step (or, unbatched, of one example).

    The noisy input is derived, `x = x_s = (1 - s) x0 + s eps`, so a residual's
    conditional velocity `eps - x0` is consistent with it by construction.

    **Arguments:**

    - `x0`: data, shape `(*batch, dim)`, float32 or float64.
    - `eps`: noise, same shape.
    - `s`: source times, shape `(*batch,)`, in `[0, 1]`.
    - `t`: target times, same shape.
    - `u`: optional intermediate times (compositional rules), same shape.
    - `cond`: optional conditioning, passed to every network and teacher call; any
      pytree with a leading batch axis. Integer arrays are class labels, in
      `[0, num_classes)` or [`fmcalc.NULL_LABEL`][] for none.

    Times outside `[0, 1]` and labels below `NULL_LABEL` are refused: at once for
    concrete values, and with `eqx.error_if` when the program runs for traced ones
    (a batch built under `jax.jit`, as in `fmcalc.train.fit`). Setting the
    environment variable `EQX_ON_ERROR=nan` (equinox's switch) before the program
    is traced turns those run-time checks into NaNs, which `fit` skips.
    """

    # Shapes are checked in `__check_init__`, which names what is wrong.
    x0: Array
    eps: Array
    s: Array
    t: Array
    u: Array | None = None
    cond: Any = None

    def __init__(self, x0, eps, s, t, u=None, cond=None):
        self.x0 = x0
        self.eps = eps
        self.s = in_unit_interval("s", s, s)
        self.t = in_unit_interval("t", t, t)
        self.u = None if u is None else in_unit_interval("u", u, u)
        self.cond = None if cond is None else _labels(cond, jnp.shape(x0)[:-1])

    def __check_init__(self):
        x0, eps = self.x0, self.eps
        if jnp.ndim(x0) < 1:
            raise ValueError(
                f"`x0` must have a trailing data axis; got shape {x0.shape}."
            )
        if jnp.shape(x0) != jnp.shape(eps):
            raise ValueError(
                f"`x0` and `eps` must have the same shape; got {jnp.shape(x0)} and "
                f"{jnp.shape(eps)}."
            )
        for name, a in (("x0", x0), ("eps", eps)):
            dtype = jnp.result_type(a)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"`{name}` must be a floating array; got {dtype}.")
            if jnp.finfo(dtype).bits < 32:
                raise TypeError(
                    f"`{name}` is {dtype}, which resolves times near 1 only to "
                    f"{float(jnp.finfo(dtype).eps):.0e}: pass float32 or float64 data "
                    "(lower precision belongs inside the model)."
                )
        batch_shape = jnp.shape(x0)[:-1]
        if 0 in jnp.shape(x0):
            raise ValueError(
                f"A batch needs at least one example with a non-empty data axis; got "
                f"`x0` of shape {jnp.shape(x0)}."
            )
        times = {"s": self.s, "t": self.t, "u": self.u}
        for name, a in times.items():
            if a is not None and jnp.shape(a) != batch_shape:
                raise ValueError(
                    f"Times `{name}` must have the batch shape {batch_shape} of `x0` "
                    f"(one time per example); got shape {jnp.shape(a)}."
                )

    @property
    def x(self) -> Float[Array, "*batch dim"]:
        """The noisy input `x_s = (1 - s) x0 + s eps`."""
        return interpolate(self.x0, self.eps, self.s)
