"""Validators shared across modules: values that may be concrete or traced."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


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


def call(fn, *args, cond):
    """Call a model or velocity, passing `cond=` only when there is one, so plain
    `lambda x, t: ...` velocities work unconditionally."""
    return fn(*args) if cond is None else fn(*args, cond=cond)


def check_example(name: str, x) -> None:
    if jnp.ndim(x) != 1:
        raise ValueError(
            f"`{name}` must be one example of shape (dim,) (batch with jax.vmap); got "
            f"shape {jnp.shape(x)}."
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating array; got dtype {jnp.result_type(x)}."
        )


def time_grid(
    steps, grid, direction: Literal["sample", "invert"], dtype
) -> Float[Array, " n"]:
    """The validated time grid: uniform with `steps` steps, or `grid`.

    `direction="sample"` is strictly decreasing from 1 to 0, `"invert"` strictly
    increasing from 0 to 1. A concrete grid is checked now (`ValueError`); a traced one
    at run time (`eqx.error_if`).
    """
    start, end = (1, 0) if direction == "sample" else (0, 1)
    order = "decreasing" if direction == "sample" else "increasing"
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise TypeError(f"`steps` must be a Python int; got {steps!r}.")
    if grid is None:
        if steps < 1:
            raise ValueError(f"`steps` must be at least 1; got steps={steps}.")
        return jnp.linspace(start, end, steps + 1, dtype=dtype)
    if steps != 1:
        raise ValueError(
            f"Pass either `steps` or `grid`, not both; got steps={steps} and a grid "
            "(its length sets the number of steps)."
        )
    grid = jnp.asarray(grid)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(
            f"`grid` must be a 1-d array of at least 2 times; got shape {grid.shape}."
        )
    if not jnp.issubdtype(grid.dtype, jnp.floating):
        raise TypeError(f"`grid` must be a floating array; got dtype {grid.dtype}.")
    # Checked in the working dtype: distinct float64 times may round to one float32.
    grid = grid.astype(dtype)
    ascending = direction == "invert"
    values = concrete(grid)
    if values is None:
        diffs = jnp.diff(grid) if ascending else -jnp.diff(grid)
        bad = (
            (grid[0] != start)
            | (grid[-1] != end)
            | jnp.any(diffs <= 0)
            | ~jnp.all((grid >= 0) & (grid <= 1))
        )
        grid = eqx.error_if(
            grid,
            bad,
            f"`grid` must be strictly {order} from {start} to {end}.",
        )
    else:
        outside = ~((values >= 0) & (values <= 1))
        if outside.any():
            raise ValueError(
                f"`grid` times must lie in [0, 1] (t = 0 is data, t = 1 is noise); got "
                f"{values[outside][:5]} among them."
            )
        if values[0] != start or values[-1] != end:
            raise ValueError(
                f"`grid` must run from t = {start} to t = {end} when used to "
                f"{direction}; got grid[0] = {values[0]} and grid[-1] = {values[-1]}."
            )
        diffs = np.diff(values) if ascending else -np.diff(values)
        if np.any(diffs <= 0):
            i = int(np.argmax(diffs <= 0))
            raise ValueError(
                f"`grid` must be strictly {order}; got grid[{i}] = {values[i]} and "
                f"grid[{i + 1}] = {values[i + 1]}."
            )
    return grid
