from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._conventions import interpolate


def _concrete(a) -> np.ndarray | None:
    """The value of `a`, or `None` while it is traced (then checked at run time)."""
    try:
        return np.asarray(a)
    except jax.errors.TracerArrayConversionError:
        return None


class Batch(eqx.Module):
    """The random inputs of one training step (or, unbatched, of one example).

    The noisy input is derived, `x = x_s = (1 - s) x0 + s eps`, so a residual's
    conditional velocity `eps - x0` is consistent with it by construction.

    **Arguments:**

    - `x0`: data, shape `(*batch, dim)`.
    - `eps`: noise, same shape.
    - `s`: source times, shape `(*batch,)`, in `[0, 1]`.
    - `t`: target times, same shape.
    - `u`: optional intermediate times (compositional rules), same shape.
    - `cond`: optional conditioning (e.g. class labels), passed to every network and
      teacher call; any pytree with a leading batch axis.
    """

    # Shapes are checked in `__check_init__`, which names what is wrong.
    x0: Array
    eps: Array
    s: Array
    t: Array
    u: Array | None = None
    cond: Any = None

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
            if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
                raise TypeError(
                    f"`{name}` must be a floating array; got {jnp.result_type(a)}."
                )
        batch_shape = jnp.shape(x0)[:-1]
        times = {"s": self.s, "t": self.t, "u": self.u}
        for name, a in times.items():
            if a is None:
                continue
            if jnp.shape(a) != batch_shape:
                raise ValueError(
                    f"Times `{name}` must have the batch shape {batch_shape} of `x0` "
                    f"(one time per example); got shape {jnp.shape(a)}."
                )
            values = _concrete(a)
            if values is not None:
                bad = ~((values >= 0) & (values <= 1))
                if bad.any():
                    raise ValueError(
                        f"Times `{name}` must lie in [0, 1] (t = 0 is data, t = 1 is "
                        f"noise); got {values[bad].ravel()[:5]} among them."
                    )

    @property
    def x(self) -> Float[Array, "*batch dim"]:
        """The noisy input `x_s = (1 - s) x0 + s eps`."""
        return interpolate(self.x0, self.eps, self.s)
