"""Validators shared across modules: values that may be concrete or traced."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def concrete(a) -> np.ndarray | None:
    """The value of `a`, or `None` while it is traced (then checked at run time)."""
    try:
        return np.asarray(a)
    except jax.errors.TracerArrayConversionError:
        return None


def checked(carrier, bad, message: str):
    """`carrier`, once the traced booleans `bad` are checked all false when the
    program runs, by `eqx.error_if` on a scalar added to it: the check's callback
    runs on one device, and an array carried through it would be gathered there
    from a batch split over several."""
    zero = jnp.zeros((), jnp.result_type(carrier))
    return carrier + eqx.error_if(zero, jnp.any(bad), message)


def in_unit_interval(name: str, t, carrier):
    """`carrier`, once the time(s) `t` are checked to lie in `[0, 1]`: at once if `t`
    is concrete (a `ValueError`), else when the traced program runs, by
    `eqx.error_if` on `carrier` (which the environment variable `EQX_ON_ERROR=nan`
    turns into NaNs)."""
    message = f"Time `{name}` must lie in [0, 1] (t = 0 is data, t = 1 is noise)"
    values = concrete(t)
    if values is None:
        return checked(carrier, ~((t >= 0) & (t <= 1)), message + ".")
    bad = ~((values >= 0) & (values <= 1))
    if bad.any():
        raise ValueError(f"{message}; got {values[bad].ravel()[:5]}.")
    return carrier


def check_precision(x) -> None:
    """Refuse floats narrower than 32 bits where a computation needs more: a
    16-bit float resolves times and probabilities only to about 1e-3."""
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        raise TypeError(
            f"`x` is {dtype}, which resolves only about "
            f"{float(jnp.finfo(dtype).eps):.0e}: analytic flows compute in float32 "
            "or float64. Cast it, e.g. `x.astype(jnp.float32)`."
        )
