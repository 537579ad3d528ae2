import abc

import equinox as eqx
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import Cond, Time, Vector


class AbstractFlow(eqx.Module):
    """A probability-flow ODE whose velocity, flow map and average velocity are known.

    A flow is usable wherever a model is: calling it as `flow(x, s, t, cond=None)`
    returns the exact average velocity `V(x, s, t)`, and `flow.velocity` is a teacher
    `v(x, t)`. All methods act on one example; batch with `jax.vmap`.
    """

    @abc.abstractmethod
    def velocity(self, x: Vector, t: Time, *, cond: Cond = None) -> Vector:
        """The marginal velocity `v(x, t) = E[eps - x0 | x_t = x]`."""

    @abc.abstractmethod
    def flow_map(self, x: Vector, s: Time, t: Time, *, cond: Cond = None) -> Vector:
        """The flow map `F(x, s, t)`: the solution at `t` of `dx/dτ = v(x, τ)` from
        `x` at `s`."""

    @abc.abstractmethod
    def average_velocity(
        self, x: Vector, s: Time, t: Time, *, cond: Cond = None
    ) -> Vector:
        """The average velocity `V(x, s, t) = (F(x, s, t) - x) / (t - s)`, with
        `V(x, t, t) = v(x, t)`."""

    @abc.abstractmethod
    def sample(
        self, key: PRNGKeyArray, n: int, *, cond: Cond = None
    ) -> Float[Array, "n dim"]:
        """`n` samples of the data distribution (`t = 0`)."""

    def __call__(self, x: Vector, s: Time, t: Time, *, cond: Cond = None) -> Vector:
        """The exact average velocity `V(x, s, t)`, so the flow acts as a model."""
        return self.average_velocity(x, s, t, cond=cond)

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        # IPython's and hypothesis's pretty printers: the flow's own short repr
        # rather than every field.
        printer.text(repr(self))


def format_array(value, digits: int = 3, rows: int = 6) -> str:
    """A short, readable rendering of a parameter for a flow's `repr`: rounded to
    `digits` significant digits, at most `rows` leading rows (traced values show
    their shape)."""
    try:
        array = np.asarray(value)
    except Exception:  # a tracer under `jit`: no values to show
        return f"<{getattr(value, 'dtype', '?')}{list(getattr(value, 'shape', ()))}>"
    shown = array if array.ndim == 0 or array.shape[0] <= rows else array[:rows]
    text = np.array2string(
        shown,
        precision=digits,
        separator=", ",
        max_line_width=10**6,
        formatter={"float_kind": lambda v: f"{v:.{digits}g}"},
    )
    text = " ".join(text.split())
    if shown is not array:
        text = f"{text[:-1]}, ... ({array.shape[0]} rows)]"
    return text
