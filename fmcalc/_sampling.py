"""Samplers: flow-map sampling (one or several jumps), its inverse, consistency
multistep sampling, and the velocity baselines (adaptive ODE solve, Euler, Heun,
DPM-Solver++(2M)); a flow map from Heun steps of a velocity; and a batched sampler
that picks among them by how a method's map is sampled.

Every per-example sampler acts on one example (batch with `jax.vmap`), runs under
`jit`, and is differentiable in the model's parameters and in the time grid: the
number of steps is static, the times are array values, and there is no Python control
flow on traced values. [`fmcalc.sample_batch`][] is the exception: a host-side loop
over chunks of a batch, returning NumPy arrays.
"""

import operator
from collections.abc import Callable
from typing import Literal, get_args

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, PRNGKeyArray

from ._conventions import flow_map_from_average_velocity, interpolate
from ._custom_types import Cond, Time, Vector
from ._method import Sampling
from ._misc import (
    call as _call,
    check_example as _check_example,
    concrete,
    time_grid as _time_grid,
)


def _jump(model, x, s, t, cond):
    """`F(x, s, t) = x + (t - s) V(x, s, t)`."""
    return flow_map_from_average_velocity(x, s, t, _call(model, x, s, t, cond=cond))


def _along(model, x, grid, cond):
    def step(x, times):
        s, t = times
        return _jump(model, x, s, t, cond), None

    x, _ = jax.lax.scan(step, x, (grid[:-1], grid[1:]))
    return x


def sample(
    model: Callable[..., Vector],
    noise: Vector,
    *,
    steps: int = 1,
    grid: Float[ArrayLike, " _"] | None = None,
    cond: Cond = None,
) -> Vector:
    """Multi-step flow-map sampling, from noise at `t = 1` to data at `t = 0`.

    Along a decreasing grid `1 = t_0 > t_1 > ... > t_K = 0`,

    `x_{i+1} = F(x_i, t_i, t_{i+1}) = x_i + (t_{i+1} - t_i) V(x_i, t_i, t_{i+1})`,

    from `x_0 = noise`; one step is `F(noise, 1, 0)`. For an exact flow map every grid
    gives the same sample (the semigroup rule); for a learned one, more steps trade
    cost for accuracy.

    **Arguments:**

    - `model`: the average velocity, called per example as
      `model(x, s, t, cond=cond)` (any fmcalc model, or an analytic flow).
    - `noise`: one example of noise `eps`, shape `(dim,)`; batch with `jax.vmap`.
    - `steps`: the number of uniform steps, `t_i = 1 - i / steps`.
    - `grid`: instead of `steps`, the times `t_0, ..., t_K`: a 1-d array strictly
      decreasing from `1` to `0` (checked, at run time when traced). Its length is
      static; its values may be traced and differentiated.
    - `cond`: conditioning passed on to every model call as `cond=` (when not
      `None`).

    **Returns:** the sample `x_K` at `t = 0`, shaped like `noise`.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    eps = jax.random.normal(jax.random.key(0), (16, 2))
    x0 = jax.vmap(lambda e: fmcalc.sample(flow, e, steps=2))(eps)
    ```
    """
    _check_example("noise", noise)
    times = _time_grid(steps, grid, "sample", noise.dtype)
    return _along(model, noise, times, cond)


def invert(
    model: Callable[..., Vector],
    x0: Vector,
    *,
    steps: int = 1,
    grid: Float[ArrayLike, " _"] | None = None,
    cond: Cond = None,
) -> Vector:
    """The inverse of [`fmcalc.sample`][]: data at `t = 0` to noise at `t = 1`.

    Along an increasing grid `0 = t_0 < t_1 < ... < t_K = 1`,
    `x_{i+1} = F(x_i, t_i, t_{i+1})`, from `x_0 = x0`. For an exact flow map,
    `invert(sample(eps)) = eps` and `sample(invert(x0)) = x0` on any grids; a learned
    map is invertible only as far as it satisfies the semigroup rule
    `F(F(x, s, t), t, s) = x`.

    **Arguments:**

    - `model`: the average velocity, called per example as
      `model(x, s, t, cond=cond)`.
    - `x0`: one data example, shape `(dim,)`; batch with `jax.vmap`.
    - `steps`: the number of uniform steps, `t_i = i / steps`.
    - `grid`: instead of `steps`, the times: a 1-d array strictly increasing from `0`
      to `1` (a sampling grid reversed, `grid[::-1]`).
    - `cond`: conditioning passed on to every model call as `cond=` (when not
      `None`).

    **Returns:** the noise `x_K` at `t = 1`, shaped like `x0`.
    """
    _check_example("x0", x0)
    times = _time_grid(steps, grid, "invert", x0.dtype)
    return _along(model, x0, times, cond)


def sample_consistency(
    model: Callable[..., Vector],
    noise: Vector,
    *,
    key: PRNGKeyArray,
    grid: Float[ArrayLike, " _"],
    cond: Cond = None,
    noise_scale: float = 1.0,
) -> Vector:
    """Consistency multistep sampling, for maps trained only to reach data (consistency
    training / distillation, which learn `F(x, s, 0)` alone).

    With `grid = (1 = t_0 > t_1 > ... > t_K = 0)`, `x_0 = noise` and for
    `i = 0, ..., K - 1`:

    - `x̂_i = F(x_i, t_i, 0)` — jump to data;
    - `x_{i+1} = (1 - t_{i+1}) x̂_i + t_{i+1} eps_{i+1}` with fresh noise
      `eps_{i+1} ~ N(0, I)` — re-noise to the next time (skipped after the last jump,
      since `t_K = 0`).

    Returns `x̂_{K-1}`. The grid has the same format as [`fmcalc.sample`][]'s, and both
    make `K = len(grid) - 1` model calls; `grid = [1, 0]` is `F(noise, 1, 0)` in both.
    Every model call jumps to `t = 0`; the last time is not visited.

    **This sampler is stochastic**: with two or more jumps the result depends on `key`.
    For an exact map every `x̂_i` is a sample of the data distribution, but the chain
    forgets part of the initial noise, so unlike [`fmcalc.sample`][] it is not a
    deterministic (or invertible) function of `noise`. In the original papers
    (Song et al. 2023), `x_{t_{i+1}} = x̂ + sqrt(σ²_{i+1} - σ²_min) z` in the EDM scale
    `x_σ = x0 + σ z`; here the noise level is the time of the linear interpolant.

    The noise `eps_i` is drawn from `jax.random.fold_in(key, i)`, so truncating the
    grid, `concatenate([grid[:k], [0]])` with the same `key`, returns the
    intermediate estimate `x̂_{k-1}`.

    **Arguments:**

    - `model`: the average velocity, called per example as
      `model(x, s, t, cond=cond)` (only ever with `t = 0`).
    - `noise`: one example of the initial noise, shape `(dim,)`.
    - `key`: the PRNG key of the re-noising. Give every example its own key (vmap
      over `jax.random.split(key, n)`); a shared key re-noises all examples with the
      same `eps_i`.
    - `grid`: a 1-d array strictly decreasing from `1` to `0`.
    - `cond`: conditioning passed on to every model call as `cond=` (when not
      `None`).
    - `noise_scale`: the standard deviation of the re-noising, the method's
      [`fmcalc.Method`][]`.noise_scale` (default 1).

    **Returns:** the last estimate `x̂_{K-1}`, shaped like `noise`.
    """
    _check_example("noise", noise)
    if grid is None:
        raise TypeError(
            "`sample_consistency` needs a `grid` of times from 1 to 0, e.g. "
            "`jnp.array([1.0, 0.5, 0.0])` for two jumps."
        )
    times = _time_grid(1, grid, "sample", noise.dtype)
    zero = jnp.zeros((), noise.dtype)
    first = _jump(model, noise, times[0], zero, cond)

    def step(x0_hat, inputs):
        i, t = inputs
        eps = noise_scale * jax.random.normal(
            jax.random.fold_in(key, i), noise.shape, noise.dtype
        )
        x = interpolate(x0_hat, eps, t)
        return _jump(model, x, t, zero, cond), None

    renoise_times = times[1:-1]
    indices = jnp.arange(1, renoise_times.shape[0] + 1)
    x0_hat, _ = jax.lax.scan(step, first, (indices, renoise_times))
    return x0_hat


class _ModelDiagonal(eqx.Module):
    """The velocity `v(x, t) = V(x, t, t)` of a model."""

    model: Callable[..., Vector]

    def __call__(self, x: Vector, t: Time, *, cond: Cond = None) -> Vector:
        return _call(self.model, x, t, t, cond=cond)


def model_velocity(model: Callable[..., Vector]) -> Callable[..., Vector]:
    """A model's own velocity, its diagonal `v(x, t) = V(x, t, t)`, as a per-example
    velocity `v(x, t, cond=None)` for [`fmcalc.sample_ode`][] and
    [`fmcalc.sample_euler`][].

    (This is the concrete callable; the expression node of a residual is
    [`fmcalc.Diagonal`][].)

    **Arguments:**

    - `model`: the average velocity, called per example as `model(x, s, t, cond=cond)`.

    **Returns:** a velocity, an `eqx.Module` holding `model` (so gradients reach the
    model's parameters through it).
    """
    return _ModelDiagonal(model)


def _ode_field(t, x, args):
    velocity, cond = args
    return _call(velocity, x, t, cond=cond)


def sample_ode(
    velocity: Callable[..., Vector],
    noise: Vector,
    *,
    t1: Time = 1.0,
    t0: Time = 0.0,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint | None = None,
    cond: Cond = None,
) -> Vector:
    """Reference sampler: an adaptive solve of the probability-flow ODE
    `dx/dt = v(x, t)` from `t1` down to `t0`.

    This is the flow map `F(noise, t1, t0)` of the velocity itself, up to the solver's
    tolerance: the yardstick for few-step samplers. Use it with an analytic flow's
    `flow.velocity`, a teacher, or a model's own diagonal
    ([`fmcalc.model_velocity`][]`(model)`).

    **Arguments:**

    - `velocity`: the velocity, called per example as `velocity(x, t)`, or
      `velocity(x, t, cond=cond)` when `cond` is given.
    - `noise`: one example at time `t1`, shape `(dim,)`; batch with `jax.vmap`.
    - `t1`: the start time (default `1`, noise).
    - `t0`: the end time (default `0`, data). `t0 > t1` integrates forwards (the
      inverse map).
    - `solver`: a diffrax solver; default `diffrax.Tsit5()`.
    - `rtol`, `atol`: tolerances of the PID step-size controller. `None` (default)
      picks by the dtype of `noise`: `1e-10` in float64 (the result then matches an
      exact flow map to ~1e-9), `1e-6` in float32.
    - `max_steps`: the most steps the solve may take (an error beyond).
    - `adjoint`: how diffrax differentiates the solve; default
      `diffrax.RecursiveCheckpointAdjoint()` (`jax.grad`). Use
      `diffrax.DirectAdjoint()` to support `jax.jvp` as well.
    - `cond`: conditioning passed on to `velocity` as `cond=` (when not `None`).

    **Returns:** `x(t0)`, shaped like `noise`.
    """
    _check_example("noise", noise)
    dtype = noise.dtype
    for name, t in (("t1", t1), ("t0", t0)):
        if jnp.ndim(t) != 0:
            raise ValueError(
                f"Time `{name}` must be a scalar (batch with jax.vmap); got shape "
                f"{jnp.shape(t)}."
            )
        value = concrete(t)
        if value is not None and not 0 <= value <= 1:
            raise ValueError(
                f"Time `{name}` must lie in [0, 1] (t = 0 is data, t = 1 is noise); "
                f"got {name}={value}."
            )
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and not tol > 0:
            raise ValueError(f"`{name}` must be positive or None; got {tol!r}.")
    # Reference accuracy in float64; float32 cannot resolve much below 1e-6.
    default = 1e-10 if dtype == jnp.float64 else 1e-6
    controller = diffrax.PIDController(
        rtol=default if rtol is None else rtol,
        atol=default if atol is None else atol,
    )
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(_ode_field),
        diffrax.Tsit5() if solver is None else solver,
        t0=jnp.asarray(t1, dtype),
        t1=jnp.asarray(t0, dtype),
        dt0=None,
        y0=noise,
        args=(velocity, cond),
        stepsize_controller=controller,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        max_steps=max_steps,
    )
    assert solution.ys is not None  # SaveAt(t1=True), the default
    return solution.ys[0]


def sample_euler(
    velocity: Callable[..., Vector],
    noise: Vector,
    *,
    steps: int = 1,
    grid: Float[ArrayLike, " _"] | None = None,
    cond: Cond = None,
) -> Vector:
    """Euler's method on the probability-flow ODE, from `t = 1` to `t = 0`: the plain
    flow-matching sampler, the baseline of few-step flow maps.

    `x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)` along `1 = t_0 > ... > t_K = 0`.
    This is [`fmcalc.sample`][] with `V(x, s, t)` replaced by `v(x, s)`; its error is
    `O(1 / K)`.

    **Arguments:**

    - `velocity`: the velocity, called per example as `velocity(x, t)`, or
      `velocity(x, t, cond=cond)` when `cond` is given (e.g. `flow.velocity`, or
      [`fmcalc.model_velocity`][]`(model)`).
    - `noise`: one example of noise, shape `(dim,)`; batch with `jax.vmap`.
    - `steps`: the number of uniform steps.
    - `grid`: instead of `steps`, the times: a 1-d array strictly decreasing from `1`
      to `0`.
    - `cond`: conditioning passed on to `velocity` as `cond=` (when not `None`).

    **Returns:** the sample at `t = 0`, shaped like `noise`.
    """
    _check_example("noise", noise)
    times = _time_grid(steps, grid, "sample", noise.dtype)

    def step(x, times):
        s, t = times
        return x + (t - s) * _call(velocity, x, s, cond=cond), None

    x, _ = jax.lax.scan(step, noise, (times[:-1], times[1:]))
    return x


def sample_heun(
    velocity: Callable[..., Vector],
    noise: Vector,
    *,
    steps: int = 1,
    grid: Float[ArrayLike, " _"] | None = None,
    cond: Cond = None,
) -> Vector:
    """Heun's method on the probability-flow ODE, from `t = 1` to `t = 0`: the
    trapezoidal predictor-corrector, second order.

    Along `1 = t_0 > ... > t_K = 0`, with `h_i = t_{i+1} - t_i`,

    `k1 = v(x_i, t_i)`, `k2 = v(x_i + h_i k1, t_{i+1})`,
    `x_{i+1} = x_i + h_i (k1 + k2) / 2`.

    Every step makes **two velocity calls, so `K` steps cost `2 K` network
    evaluations** (NFE), the last one at `t = 0`; at equal NFE compare `K` Heun steps
    with `2 K` steps of [`fmcalc.sample_euler`][]. Its error is `O(1 / K²)`. One step
    of [`fmcalc.HeunMap`][]`(velocity, K)` from `1` to `0` takes the same steps.

    **Arguments:**

    - `velocity`: the velocity, called per example as `velocity(x, t)`, or
      `velocity(x, t, cond=cond)` when `cond` is given (e.g. `flow.velocity`, or
      [`fmcalc.model_velocity`][]`(model)`).
    - `noise`: one example of noise, shape `(dim,)`; batch with `jax.vmap`.
    - `steps`: the number of uniform Heun steps (`2 * steps` velocity calls).
    - `grid`: instead of `steps`, the times: a 1-d array strictly decreasing from `1`
      to `0` (`2 * (len(grid) - 1)` velocity calls).
    - `cond`: conditioning passed on to `velocity` as `cond=` (when not `None`).

    **Returns:** the sample at `t = 0`, shaped like `noise`.
    """
    _check_example("noise", noise)
    times = _time_grid(steps, grid, "sample", noise.dtype)

    def step(x, times):
        s, t = times
        return x + (t - s) * _heun_increment(velocity, x, s, t, cond), None

    x, _ = jax.lax.scan(step, noise, (times[:-1], times[1:]))
    return x


def _heun_increment(velocity, x, s, t, cond):
    """The mean slope `(k1 + k2) / 2` of one Heun step from `s` to `t`."""
    k1 = _call(velocity, x, s, cond=cond)
    k2 = _call(velocity, x + (t - s) * k1, t, cond=cond)
    return (k1 + k2) / 2


def _log_snr(t):
    """`λ_t = log(α_t / σ_t) = log((1 - t) / t)` of the linear interpolant."""
    return jnp.log1p(-t) - jnp.log(t)


def sample_dpm2m(
    velocity: Callable[..., Vector],
    noise: Vector,
    *,
    steps: int = 1,
    grid: Float[ArrayLike, " _"] | None = None,
    cond: Cond = None,
) -> Vector:
    """DPM-Solver++(2M) on the probability-flow ODE, from `t = 1` to `t = 0`: a
    second-order multistep solver with **one velocity call per step**, so `K` steps
    cost `K` network evaluations (NFE), as many as [`fmcalc.sample_euler`][].

    Lu et al. (2022), "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2 (multistep, data prediction), written for the
    linear interpolant: the paper's `x_t = α_t x_0 + σ_t ε` is ours with `α_t = 1 - t`,
    `σ_t = t`, so `λ_t = log(α_t / σ_t) = log((1 - t) / t)` (`-∞` at noise, `+∞` at
    data), and its data prediction is `D(x, t) = x - t v(x, t)` (`= x0` for the
    conditional velocity `eps - x0`). A step from `s` to `t` with `h = λ_t - λ_s` is

    `x_t = (σ_t / σ_s) x_s - α_t (e^{-h} - 1) D_eff`, that is

    `x_t = (t / s) x_s + ((s - t) / s) D_eff`,

    which with `D_eff = D(x_s, s)` is exactly Euler's step `x_s + (t - s) v(x_s, s)`.
    The multistep correction is `D_eff = D_s + (D_s - D_prev) / (2 r)` with
    `r = h_prev / h`, `D_prev` and `h_prev` those of the previous step. The first step
    (from `s = 1`, `λ = -∞`) has no previous one, and the last step (to `t = 0`,
    `h = +∞`) is first order (the "lower order final" rule). Since the first step's
    `h` is infinite, the second step's `r` is too and its correction vanishes: the
    corrections start at the third step. **One, two and three steps are therefore
    Euler's method** (up to round-off). With more steps the error falls at second
    order, but on the uniform grid it gets there slowly: the steps next to `t = 0` and
    `t = 1` stay long in `λ`, which adds a factor of about `log K`
    (`tests/test_sampling.py` checks the order where it has set in). At equal NFE on
    a uniform grid, [`fmcalc.sample_heun`][] can be the more accurate of the two;
    `benchmarks/frontier.py` samples flow matching with both.

    **Arguments:**

    - `velocity`: the velocity, called per example as `velocity(x, t)`, or
      `velocity(x, t, cond=cond)` when `cond` is given (e.g. `flow.velocity`, or
      [`fmcalc.model_velocity`][]`(model)`).
    - `noise`: one example of noise, shape `(dim,)`; batch with `jax.vmap`.
    - `steps`: the number of uniform steps (`steps` velocity calls).
    - `grid`: instead of `steps`, the times: a 1-d array strictly decreasing from `1`
      to `0` (`len(grid) - 1` velocity calls).
    - `cond`: conditioning passed on to `velocity` as `cond=` (when not `None`).

    **Returns:** the sample at `t = 0`, shaped like `noise`.
    """
    _check_example("noise", noise)
    times = _time_grid(steps, grid, "sample", noise.dtype)
    last = times.shape[0] - 2  # the index of the last step

    def step(carry, inputs):
        x, d_prev, h_prev = carry
        i, s, t = inputs
        v = _call(velocity, x, s, cond=cond)
        d = x - s * v
        # λ is finite only strictly inside (0, 1): the middle steps. Elsewhere h is a
        # finite stand-in that no correction uses (no inf or NaN, in gradients too).
        middle = (i > 0) & (i < last)
        h = _log_snr(jnp.where(middle, t, 0.25)) - _log_snr(jnp.where(middle, s, 0.5))
        # 1 / (2 r) = h / (2 h_prev); zero for r = ∞ (the step after the first).
        weight = jnp.where(middle & (i > 1), h / (2 * h_prev), 0)
        # (t / s) x + ((s - t) / s) (d + weight (d - d_prev)), written as Euler's step
        # plus the correction, so that without a correction it is Euler's step.
        x = x + (t - s) * v + ((s - t) / s * weight) * (d - d_prev)
        return (x, d, h), None

    init = (noise, jnp.zeros_like(noise), jnp.ones((), noise.dtype))
    indices = jnp.arange(last + 1)
    (x, _, _), _ = jax.lax.scan(step, init, (indices, times[:-1], times[1:]))
    return x


class HeunMap(eqx.Module):
    """A flow map from `substeps` Heun steps of a velocity, as an average velocity
    `V(x, s, t)`: the teacher solver of consistency trajectory models (CTM) and the
    partial map of partial flow-map matching (PFMM), passed to training as `aux=`.

    With `h = (t - s) / substeps` and `r_k = s + k h`, each substep is Heun's method
    (the trapezoidal predictor-corrector) on `dx/dr = v(x, r)`,

    `k1 = v(x_k, r_k)`, `k2 = v(x_k + h k1, r_{k+1})`,
    `x_{k+1} = x_k + h (k1 + k2) / 2`,

    and the result is the mean increment `V(x, s, t) = Σ_k (k1 + k2) / 2 / substeps`,
    so that `x + (t - s) V(x, s, t)` is the last iterate: second order in `h`, exact
    for `s = t` (`V(x, t, t) = v(x, t)`).

    **Arguments:**

    - `velocity`: the velocity, called per example as `velocity(x, t)`, or
      `velocity(x, t, cond=cond)` when the map is called with `cond` (e.g.
      [`fmcalc.model_velocity`][]`(teacher)` or an analytic flow's `flow.velocity`).
    - `substeps`: the number of Heun steps from `s` to `t`, a positive integer (two
      velocity calls each).

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    heun = fmcalc.HeunMap(flow.velocity, 4)
    x0 = fmcalc.sample(heun, jnp.ones(2))  # ≈ flow.flow_map(jnp.ones(2), 1.0, 0.0)
    ```
    """

    velocity: Callable[..., Vector]
    substeps: int = eqx.field(static=True)

    def __check_init__(self):
        if isinstance(self.substeps, bool) or not (
            isinstance(self.substeps, int) and self.substeps >= 1
        ):
            raise ValueError(
                f"`HeunMap(substeps=...)` must be a positive integer; got "
                f"{self.substeps!r}."
            )

    def __call__(self, x: Vector, s: Time, t: Time, *, cond: Cond = None) -> Vector:
        dr = 1.0 / self.substeps
        average = jnp.zeros_like(x)
        for k in range(self.substeps):
            a = s + k * dr * (t - s)
            b = s + (k + 1) * dr * (t - s)
            increment = _heun_increment(self.velocity, x, a, b, cond)
            x = x + (b - a) * increment
            average = average + dr * increment
        return average


_KINDS: tuple[str, ...] = get_args(Sampling)
_Solver = Literal["euler", "heun", "dpm2m"]
_SOLVERS: tuple[str, ...] = get_args(_Solver)


@eqx.filter_jit
def _draw(model, noise, cond, keys, steps: int, kind: str, solver: str, scale=1.0):
    def one(e, c, k):
        if kind == "velocity":
            velocity = model_velocity(model)
            if solver == "heun":
                return sample_heun(velocity, e, steps=steps // 2, cond=c)
            if solver == "dpm2m":
                return sample_dpm2m(velocity, e, steps=steps, cond=c)
            return sample_euler(velocity, e, steps=steps, cond=c)
        if kind == "to-data" and steps > 1:
            grid = jnp.linspace(1.0, 0.0, steps + 1, dtype=e.dtype)
            return sample_consistency(
                model, e, key=k, grid=grid, cond=c, noise_scale=scale
            )
        return sample(model, e, steps=steps, cond=c)

    return jax.vmap(one)(noise, cond, keys)


def sample_batch(
    model: Callable[..., Vector],
    noise: Float[ArrayLike, "n dim"],
    *,
    steps: int,
    kind: Sampling,
    key: PRNGKeyArray | None = None,
    cond: Cond = None,
    chunk: int = 1000,
    solver: _Solver = "euler",
    noise_scale: float = 1.0,
) -> np.ndarray:
    """Samples of a batch of noise, drawn the way a method's map is sampled, in
    chunks: the sampler of `fmcalc sample` and of the benchmarks.

    `kind` is a method's [`fmcalc.Method.sampling`][]:

    - `"velocity"` (flow matching): an ODE solver on the model's own velocity
      `V(x, t, t)` ([`fmcalc.model_velocity`][]), chosen by `solver`, making `steps`
      velocity calls (network evaluations, NFE) per sample: `"euler"`, `steps` steps of
      [`fmcalc.sample_euler`][]; `"heun"`, `steps // 2` steps of
      [`fmcalc.sample_heun`][] (two calls each; `steps` must be even); `"dpm2m"`,
      `steps` steps of [`fmcalc.sample_dpm2m`][]. Samplers of different methods are
      thus compared at equal NFE;
    - `"to-data"` (trained to `t = 0` only): [`fmcalc.sample_consistency`][] on the
      uniform grid of `steps` jumps, re-noising between them (one jump is
      `F(noise, 1, 0)`);
    - `"two-time"`, `"from-noise"`: `steps` uniform jumps of [`fmcalc.sample`][]. A
      map trained from noise only (`s = 1`) never saw the later jumps' sources; ask
      it for one step.

    Each chunk is one jitted, vmapped call, so memory stays bounded for large
    batches; the chunks' results are gathered on the host.

    **Arguments:**

    - `model`: the average velocity, called per example as
      `model(x, s, t, cond=cond)` (any fmcalc model, or an analytic flow).
    - `noise`: the noise, shape `(n, dim)`, one row per sample (a JAX or NumPy
      array).
    - `steps`: model calls per sample, a positive integer: the jumps of a flow map, or
      the velocity calls of `solver` (for `"heun"` an even number, at least 2).
    - `kind`: how the map is sampled (above).
    - `key`: the PRNG key of consistency re-noising, split into one key per row
      (`jax.random.split(key, n)`, so a sample does not depend on the chunk size);
      needed only for `kind="to-data"` with `steps > 1`.
    - `cond`: per-row conditioning (e.g. class labels, shape `(n,)`), passed on to
      every model call as `cond=`; `None` for an unconditional model.
    - `chunk`: the most rows per call.
    - `solver`: the ODE solver of `kind="velocity"`: `"euler"` (default), `"heun"` or
      `"dpm2m"`; other kinds take only `"euler"` (the default), which they ignore.
    - `noise_scale`: the standard deviation of consistency re-noising, the
      method's `noise_scale` (default 1); `noise` itself is passed as drawn.

    **Returns:** the samples, a NumPy array shaped like `noise`.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    eps = jax.random.normal(jax.random.key(0), (5000, 2))
    x0 = fmcalc.sample_batch(flow, eps, steps=2, kind="two-time")
    # Flow matching with a second-order solver at 8 network evaluations:
    x0 = fmcalc.sample_batch(flow, eps, steps=8, kind="velocity", solver="heun")
    # A trained model: kind=method.sampling, e.g. "to-data" for consistency models.
    ```
    """
    if kind not in _KINDS:
        raise ValueError(
            f"`sample_batch(kind=...)` must be one of {_KINDS} (a method's "
            f"`Method.sampling`); got {kind!r}."
        )
    for name, value in (("steps", steps), ("chunk", chunk)):
        if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
            raise ValueError(
                f"`sample_batch({name}=...)` must be a positive integer; got {value!r}."
            )
    if solver not in _SOLVERS:
        raise ValueError(
            f"`sample_batch(solver=...)` must be one of {_SOLVERS}; got {solver!r}."
        )
    if solver != "euler" and kind != "velocity":
        raise ValueError(
            f"`sample_batch(solver={solver!r})` solves the ODE of a velocity: it needs "
            f"`kind='velocity'`; got kind={kind!r}."
        )
    if solver == "heun" and (steps < 2 or steps % 2):
        raise ValueError(
            f"`sample_batch(solver='heun')` makes two velocity calls per step, so "
            f"`steps` (the calls per sample) must be even and at least 2; got "
            f"steps={steps}."
        )
    if not (np.isfinite(noise_scale) and noise_scale > 0):
        raise ValueError(
            f"`sample_batch(noise_scale=...)` must be a positive finite float; got "
            f"{noise_scale!r}."
        )
    if jnp.ndim(noise) != 2:
        raise ValueError(
            f"`noise` must be a batch of shape (n, dim); got shape {jnp.shape(noise)}."
        )
    n = jnp.shape(noise)[0]
    leading = {jnp.shape(leaf)[:1] for leaf in jax.tree.leaves(cond)}
    if leading - {(n,)}:
        raise ValueError(
            f"`cond` must hold one row per sample (leading axis {n}); got leading "
            f"axes {sorted(leading)}."
        )
    keys = None
    if kind == "to-data" and steps > 1:
        if key is None:
            raise ValueError(
                f"Consistency sampling (`kind='to-data'`) re-noises between its "
                f"{steps} jumps: pass `key=`."
            )
        keys = jax.random.split(key, n)
    parts = []
    for start in range(0, n, chunk):
        rows = operator.itemgetter(slice(start, start + chunk))
        rows_noise, rows_cond, rows_keys = jax.tree.map(rows, (noise, cond, keys))
        drawn = _draw(
            model, rows_noise, rows_cond, rows_keys, steps, kind, solver, noise_scale
        )
        parts.append(np.asarray(drawn))
    return np.concatenate(parts)
