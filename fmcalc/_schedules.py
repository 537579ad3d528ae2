"""Curricula: hyperparameters as functions of the training step.

A schedule is called as `schedule(step)` with a Python int or a (traced) integer
array and returns a float scalar, so it runs inside a jitted training step. Values
that must stay static (a grid size such as [`fmcalc.KarrasGrid`][]'s `steps`) are
read outside `jit`, e.g. `int(schedule(step))`, and the strategy rebuilt.
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from ._convert import _as_float, _as_int, _check_int, _check_positive, _check_real


def _float_step(step) -> Array:
    step = jnp.asarray(step)
    if step.shape != ():
        raise ValueError(
            f"A schedule takes one scalar training step; got shape {step.shape}."
        )
    return step.astype(jnp.result_type(float))


class AbstractSchedule(eqx.Module):
    """A hyperparameter as a function of the training step.

    `schedule(step)` takes a scalar step (a Python int or an integer array, traced
    or not) and returns a float scalar.
    """

    @abc.abstractmethod
    def __call__(self, step: Int[ArrayLike, ""]) -> Float[Array, ""]:
        """The value at training step `step`."""

    @property
    def settled(self) -> int | None:
        """The first step from which the value no longer changes, or `None` if it
        changes forever. Checks of a method run there by default (the end of its
        curricula)."""
        return None


class Constant(AbstractSchedule):
    """The same value at every step.

    **Arguments:**

    - `value`: the value.
    """

    value: float = eqx.field(static=True, converter=_as_float)

    def __check_init__(self):
        _check_real("Constant", "value", self.value)

    @property
    def settled(self) -> int | None:
        return 0

    def __call__(self, step: Int[ArrayLike, ""]) -> Float[Array, ""]:
        return jnp.full_like(_float_step(step), self.value)


class Sigmoid(AbstractSchedule):
    """A sigmoid from `first` to `last` between steps `start` and `end`, snapped at
    the ends: AlphaFlow's `α` curriculum (Zhang et al. 2026).

    With `m = (start + end)/2` and `q = (step - m)/(end - start) ∈ [-½, ½]`,

    - `value = first` for `step < start`, `last` for `step > end`;
    - `value = first + (last - first) · sigmoid(γ q)` in between;
    - a value within `snap` of `first` or `last` is set to it exactly.

    This is AlphaFlow's code (`get_ratio`, scheduler `"sigmoid"`), which snaps values
    below `snap` to 0 and above `1 - snap` to 1; for its `first = 1`, `last = 0` the
    two agree, and here the snapping is relative to the endpoints for any `first`,
    `last`. With `γ = 25` the raw value at `start` is within `4e-6 |last - first|`
    of `first`, so the snapped curve is continuous at both ends and reaches its
    endpoint exactly well before `end` (`α = 0` exactly is MeanFlow's continuous
    objective, `α = 1` trajectory flow matching). AlphaFlow B/2 anneals over steps
    0 to 400k, XL over 600k to 1M.

    **Arguments:**

    - `start`, `end`: the steps where the transition starts and ends,
      `0 ≤ start < end`.
    - `first`, `last`: the values before and after, `first ≠ last` (default 1, 0).
    - `gamma`: the steepness, positive (default 25).
    - `snap`: the snapping distance, `0 ≤ snap < |last - first|/2` (default 0.005).
    """

    start: int = eqx.field(static=True, converter=_as_int)
    end: int = eqx.field(static=True, converter=_as_int)
    first: float = eqx.field(static=True, default=1.0, converter=_as_float)
    last: float = eqx.field(static=True, default=0.0, converter=_as_float)
    gamma: float = eqx.field(static=True, default=25.0, converter=_as_float)
    snap: float = eqx.field(static=True, default=0.005, converter=_as_float)

    def __check_init__(self):
        start = _check_int("Sigmoid", "start", self.start, 0)
        end = _check_int("Sigmoid", "end", self.end, 0)
        if not start < end:
            raise ValueError(
                f"`Sigmoid` needs start < end; got start={start!r}, end={end!r}."
            )
        first = _check_real("Sigmoid", "first", self.first)
        last = _check_real("Sigmoid", "last", self.last)
        _check_positive("Sigmoid", "gamma", self.gamma)
        snap = _check_real("Sigmoid", "snap", self.snap)
        if not 0 <= snap < abs(last - first) / 2:
            raise ValueError(
                f"`Sigmoid(snap=...)` must lie in [0, |last - first|/2) = "
                f"[0, {abs(last - first) / 2!r}) so that the two snapping windows "
                f"do not overlap; got snap={snap!r} (first={first!r}, "
                f"last={last!r})."
            )

    @property
    def settled(self) -> int | None:
        return self.end

    def __call__(self, step: Int[ArrayLike, ""]) -> Float[Array, ""]:
        step = _float_step(step)
        middle = (self.start + self.end) / 2
        progress = (step - middle) / (self.end - self.start)
        value = self.first + (self.last - self.first) * jax.nn.sigmoid(
            self.gamma * progress
        )
        value = jnp.where(step < self.start, self.first, value)
        value = jnp.where(step > self.end, self.last, value)
        value = jnp.where(jnp.abs(value - self.first) < self.snap, self.first, value)
        return jnp.where(jnp.abs(value - self.last) < self.snap, self.last, value)


class Exponential(AbstractSchedule):
    """Geometric interpolation from `first` (step 0) to `last` (step `steps` and
    after): `first · (last/first)^{min(step/steps, 1)}`.

    SoFlow's finite-difference fraction `r_k` (Solution Flow Models, 2025) decays
    this way from 0.1 to 0.002 over training on ImageNet (from 1.0 to 3.1e-4 on
    CIFAR-10): `Exponential(0.1, 0.002, total_steps)`.

    **Arguments:**

    - `first`, `last`: the values at the ends, both positive.
    - `steps`: the number of steps of the transition, `≥ 1`.
    """

    first: float = eqx.field(static=True, converter=_as_float)
    last: float = eqx.field(static=True, converter=_as_float)
    steps: int = eqx.field(static=True, converter=_as_int)

    def __check_init__(self):
        _check_positive("Exponential", "first", self.first)
        _check_positive("Exponential", "last", self.last)
        _check_int("Exponential", "steps", self.steps, 1)

    @property
    def settled(self) -> int | None:
        return self.steps

    def __call__(self, step: Int[ArrayLike, ""]) -> Float[Array, ""]:
        progress = jnp.clip(_float_step(step) / self.steps, 0.0, 1.0)
        log_ratio = math.log(self.last / self.first)
        value = self.first * jnp.exp(progress * log_ratio)
        # exp/log round-off must not move the endpoints.
        value = jnp.where(progress >= 1, self.last, value)
        return jnp.where(progress <= 0, self.first, value)


class LinearWarmup(AbstractSchedule):
    """Linear interpolation from `first` (step 0) to `last` (step `steps` and after):
    `first + (last - first) · min(step/steps, 1)`.

    The tangent warm-up of sCM (Lu & Song 2025; `r` from 0 to 1) and AYF (Sabour et
    al. 2025; from 0 to `r_max = 0.99`): `LinearWarmup(0.0, 0.99, warmup_steps)`.

    **Arguments:**

    - `first`, `last`: the values at the ends.
    - `steps`: the number of steps of the warm-up, `≥ 1`.
    """

    first: float = eqx.field(static=True, converter=_as_float)
    last: float = eqx.field(static=True, converter=_as_float)
    steps: int = eqx.field(static=True, converter=_as_int)

    def __check_init__(self):
        _check_real("LinearWarmup", "first", self.first)
        _check_real("LinearWarmup", "last", self.last)
        _check_int("LinearWarmup", "steps", self.steps, 1)

    @property
    def settled(self) -> int | None:
        return self.steps

    def __call__(self, step: Int[ArrayLike, ""]) -> Float[Array, ""]:
        progress = jnp.clip(_float_step(step) / self.steps, 0.0, 1.0)
        value = self.first + (self.last - self.first) * progress
        return jnp.where(progress >= 1, self.last, value)


class Doubling(AbstractSchedule):
    """A value that doubles every `every` steps, capped:
    `min(initial · 2^{⌊step/every⌋}, maximum)`.

    Uses: the interval annealing of flow map matching (Boffi et al. 2024: the window
    `|t - s| ≤ δ` doubling from 0.05 to 1), ECT's stages (Geng et al. 2025), and the
    discretisation of iCT (Song & Dhariwal 2024), `N(k) = min(s₀ 2^{⌊k/K'⌋}, s₁) + 1`
    with `s₀ = 10`, `s₁ = 1280`: `Doubling(10, K', 1280)`, plus one. Steps before 0
    count as step 0.

    **Arguments:**

    - `initial`: the value at step 0, positive.
    - `every`: the number of steps between doublings, `≥ 1`.
    - `maximum`: the cap, `≥ initial`, or `None` (default) for no cap.
    """

    initial: float = eqx.field(static=True, converter=_as_float)
    every: int = eqx.field(static=True, converter=_as_int)
    maximum: float | None = eqx.field(static=True, default=None, converter=_as_float)

    def __check_init__(self):
        initial = _check_positive("Doubling", "initial", self.initial)
        _check_int("Doubling", "every", self.every, 1)
        if self.maximum is not None:
            maximum = _check_real("Doubling", "maximum", self.maximum)
            if not maximum >= initial:
                raise ValueError(
                    f"`Doubling(maximum=...)` must be ≥ initial = {initial!r}; got "
                    f"{maximum!r}."
                )

    @property
    def settled(self) -> int | None:
        if self.maximum is None:
            return None
        return self.every * math.ceil(math.log2(self.maximum / self.initial))

    def __call__(self, step: Int[ArrayLike, ""]) -> Float[Array, ""]:
        initial = jnp.full_like(_float_step(step), self.initial)
        # Integer exponents: `ldexp` is exact where `exp2` is not.
        doublings = jnp.maximum(jnp.asarray(step), 0) // self.every
        value = jnp.ldexp(initial, doublings.astype(jnp.int32))
        if self.maximum is None:
            return value
        return jnp.minimum(value, self.maximum)


class Compressed(AbstractSchedule):
    """`schedule` run `factor` times faster: its value at step `k` is the value of
    `schedule` at step `⌊factor · k⌋`, so a curriculum that settles at step `n`
    settles at `⌈n / factor⌉`. [`fmcalc.Method.for_run`][] builds these to fit
    the papers' curricula into a shorter run.

    **Arguments:**

    - `schedule`: the schedule to run faster.
    - `factor`: how many times faster, `> 0`.
    """

    schedule: AbstractSchedule
    factor: float = eqx.field(static=True, converter=_as_float)

    def __check_init__(self):
        if not isinstance(self.schedule, AbstractSchedule):
            raise TypeError(
                "`Compressed(schedule=...)` must be a schedule such as "
                f"`fmcalc.schedules.LinearWarmup(0, 1, 1000)`; got {self.schedule!r}."
            )
        _check_positive("Compressed", "factor", self.factor)

    @property
    def settled(self) -> int | None:
        settled = self.schedule.settled
        return None if settled is None else math.ceil(settled / self.factor)

    def __call__(self, step: Int[ArrayLike, ""]) -> Float[Array, ""]:
        scaled = jnp.floor(jnp.asarray(step) * self.factor)
        return self.schedule(scaled.astype(jnp.result_type(int)))
