"""The guards of a run: what stops it (non-finite steps, divergence) and the
checks that decide whether a state may be kept."""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._convert import _as_float
from .._parallel import fetch_tree


class NonFiniteError(FloatingPointError):
    """Training stopped after too many consecutive non-finite steps.

    **Attributes:** `step` (the last step tried), `terms` (the method's terms whose
    loss was non-finite there), `rows` (for each term, the rows of that step's
    batch whose loss or gradient is non-finite) and `leaves` (the parameters and
    optimiser-state arrays that the step's update made non-finite or overflowing,
    when the loss and gradient were finite and the update was not).
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        terms: list[str],
        rows: dict,
        leaves: list[str] | None = None,
    ):
        super().__init__(message)
        self.step, self.terms, self.rows = step, terms, rows
        self.leaves = leaves or []


class DivergenceError(FloatingPointError):
    """Training stopped because the smoothed loss rose far above its minimum, or
    the optimiser kept stepping up the gradient.

    **Attributes:** `step` (the step at which it was detected), `loss` and `minimum`
    (the smoothed loss then, and the lowest it had been) and `terms` (the method's
    terms by how far their own smoothed loss had risen, the worst first; empty when
    the updates went uphill).
    """

    def __init__(
        self, message: str, *, step: int, loss: float, minimum: float, terms: list[str]
    ):
        super().__init__(message)
        self.step, self.loss, self.minimum, self.terms = step, loss, minimum, terms


class Divergence(eqx.Module):
    """When [`fmcalc.train.fit`][] stops a run as diverged.

    After every kept step the loss (and each term's loss) enters an exponential
    moving average, bias-corrected as in Adam, and the lowest value of that average
    is kept. Once `warmup` steps have been seen, a smoothed loss that stands more
    than `factor` units above its minimum stops the run with a
    [`fmcalc.train.DivergenceError`][] that names the terms that rose; the unit is
    the larger of the minimum's and the first loss's magnitudes. The state of that
    step is not saved, so the checkpoint keeps the last state whose loss was seen.
    The check also refuses a first update that points up the gradient
    (`update · gradient > 0`: a negative learning rate), and stops a run whose
    updates have pointed up the gradient for `uphill` kept steps in a row (a
    schedule that turned negative; with a positive learning rate, momentum points
    uphill for a few steps at most). Pass `divergence=None` to `fit` to turn it off.

    Some losses rise while training goes well: a self-consistency term starts near
    0 and grows as the anchor teaches the network a velocity, and SoFlow's loss
    spikes to about 2000 units at a learning rate of 1e-2 on a 2-D mixture. The
    default factor leaves such runs orders of magnitude of room; runaway parameters
    pass it within a few steps.

    **Arguments:**

    - `factor`: how far above its minimum the smoothed loss may rise, in units
      (default `1e6`).
    - `smoothing`: the weight of the past in the moving average, in `[0, 1)`; its
      horizon is `1 / (1 - smoothing)` steps (default `0.98`, 50 steps).
    - `warmup`: how many finite steps to see before checking (default 100).
    - `uphill`: how many uphill updates in a row stop the run (default 50).
    """

    factor: float = eqx.field(static=True, default=1e6, converter=_as_float)
    smoothing: float = eqx.field(static=True, default=0.98, converter=_as_float)
    warmup: int = eqx.field(static=True, default=100)
    uphill: int = eqx.field(static=True, default=50)

    def __check_init__(self):
        if not (isinstance(self.factor, float) and 0 < self.factor < math.inf):
            raise ValueError(
                f"`Divergence(factor=...)` must be a finite positive number; got "
                f"{self.factor!r}."
            )
        if not (isinstance(self.smoothing, float) and 0 <= self.smoothing < 1):
            raise ValueError(
                f"`Divergence(smoothing=...)` must lie in [0, 1); got "
                f"{self.smoothing!r}."
            )
        for name, least in (("warmup", 0), ("uphill", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"`Divergence({name}=...)` must be an integer; got {value!r}."
                )
            if value < least:
                raise ValueError(
                    f"`Divergence({name}=...)` must be >= {least}; got {value!r}."
                )


@dataclasses.dataclass
class Monitor:
    """Bias-corrected moving averages of the losses, with their first values and
    running minima; its state travels in the checkpoint, so a resumed run judges as
    the original would."""

    smoothing: float
    count: int = 0
    uphill: int = 0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    first: dict[str, float] = dataclasses.field(default_factory=dict)
    minima: dict[str, float] = dataclasses.field(default_factory=dict)

    def update(self, values: Mapping[str, float], *, uphill: bool) -> None:
        self.count += 1
        self.uphill = self.uphill + 1 if uphill else 0
        for name, value in values.items():
            self.sums[name] = (
                self.smoothing * self.sums.get(name, 0.0) + (1 - self.smoothing) * value
            )
            self.first.setdefault(name, value)
            self.minima[name] = min(self.minima.get(name, math.inf), self[name])

    def __getitem__(self, name: str) -> float:
        return self.sums[name] / (1 - self.smoothing**self.count)

    def rise(self, name: str) -> float:
        """How far the smoothed value stands above its minimum, in units of the
        larger of the minimum's and the first value's magnitudes (a loss that
        crosses zero, as a learned log-variance's can, keeps a sensible unit)."""
        unit = max(abs(self.minima[name]), abs(self.first[name]))
        return (self[name] - self.minima[name]) / unit if unit else 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "uphill": self.uphill,
            "sums": dict(self.sums),
            "first": dict(self.first),
            "minima": dict(self.minima),
        }


def finite(tree: PyTree) -> Array:
    """Whether every inexact array of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _inexact(x)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _inexact(x) -> bool:
    return eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def _bounded(x: Array) -> Array:
    """Whether `x` is finite with a representable sum of squares: parameters past
    the square root of their dtype's largest value have exploded (in float32,
    beyond about 1e19), though each is still finite."""
    return jnp.isfinite(jnp.sum(jnp.square(x)))


def soundness(model, ema, opt_state) -> PyTree:
    """Per array: whether a state may be kept (parameters bounded, the optimiser's
    state finite; its second moments may legitimately square past float32)."""
    check = lambda bounded: (
        lambda x: (  # noqa: E731
            (_bounded(x) if bounded else jnp.all(jnp.isfinite(x)))
            if _inexact(x)
            else None
        )
    )
    return (
        jax.tree.map(check(True), model),
        jax.tree.map(check(True), ema),
        jax.tree.map(check(False), opt_state),
    )


soundness_of = eqx.filter_jit(soundness)


def unsound(flags: PyTree, names: tuple[str, ...]) -> list[str]:
    """The paths of the arrays flagged unsound, prefixed by their part's name."""
    return [
        name + jax.tree_util.keystr(path)
        for name, part in zip(names, flags, strict=True)
        for path, ok in jax.tree_util.tree_leaves_with_path(fetch_tree(part))
        if not ok
    ]
