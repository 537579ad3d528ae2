"""Residuals of the identities every exact flow map satisfies.

Each check takes plain per-example callables, so it applies to an analytic flow and
to a trained network alike, evaluates them over a batch with `jax.vmap`, and returns
the largest absolute residual as a Python float (NaN if any entry is NaN).

The checks jit their work with `eqx.filter_jit`: pass `eqx.Module`s or their methods
(`flow.flow_map`, `model`) and every call with the same shapes reuses one
compilation; a fresh `lambda` is traced anew on each call.
"""

from collections.abc import Callable, Sequence
from typing import TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._custom_types import Time, Vector
from .._derivative import JVP, AbstractDerivative, FiniteDifference
from ._precision import full_precision


FlowMap: TypeAlias = Callable[[Vector, Time, Time], Vector]
"""`F(x, s, t)`, per example."""
AverageVelocity: TypeAlias = Callable[[Vector, Time, Time], Vector]
"""`V(x, s, t)`, per example."""
Velocity: TypeAlias = Callable[[Vector, Time], Vector]
"""`v(x, t)`, per example."""
Batch: TypeAlias = Float[ArrayLike, "n dim"]
Times: TypeAlias = Float[ArrayLike, " n"]

_TOLERANCES = {jnp.dtype(jnp.float64): 1e-10, jnp.dtype(jnp.float32): 1e-4}


def tolerance(dtype) -> float:
    """The absolute tolerance for every residual check in `dtype`.

    `1e-10` for float64 and `1e-4` for float32. These hold for the exact Gaussian
    flow with `|x| ~ O(5)` and covariance eigenvalues `λ_min >= 1e-3`, evaluated at
    points on the flow (`x_s = (1 - s) x0 + s eps` for source time `s`) at all times in
    `[0, 1]`, edges included; measured residuals there stay below `1e-13` (float64)
    and `2e-5` (float32). Smaller `λ_min`, or points far off the flow near `s = 0`,
    amplify round-off by up to `1/√λ_min`; scale the tolerance for such cases.

    **Arguments:**

    - `dtype`: float64 or float32, as anything `jnp.dtype` accepts.

    **Returns:** the tolerance, a Python float.

    **Example:**

    ```python
    assert fmcalc.testing.tolerance(jnp.float32) == 1e-4
    ```
    """
    key = jnp.dtype(dtype)
    if key not in _TOLERANCES:
        raise ValueError(
            f"No tolerance policy for dtype {key.name}; expected float64 or float32."
        )
    return _TOLERANCES[key]


def _batch(x, **times) -> tuple[Array, ...]:
    """Validate a batch and cast the times to `x`'s dtype, so that the residual is
    measured in the precision of `x` rather than promoted to float64."""
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(
            "`x` must be a non-empty batch of shape (n, dim); got shape "
            f"{x.shape}. Stack examples along a leading axis."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`x` must be a floating array; got dtype {x.dtype}.")
    out = [x]
    for name, t in times.items():
        t = jnp.asarray(t)
        if t.shape != x.shape[:1]:
            raise ValueError(
                f"Time `{name}` must have shape ({x.shape[0]},), one time per row of "
                f"`x`; got shape {t.shape}. Use `jnp.full(n, value)` for a shared time."
            )
        out.append(t.astype(x.dtype))
    return tuple(out)


@eqx.filter_jit
def _max_abs_residual(residual, callables, *batch):
    per_example = jax.vmap(lambda *args: residual(*callables, *args))(*batch)
    return jax.tree.map(lambda r: jnp.max(jnp.abs(r)), per_example)


def _evaluate(residual, callables: tuple, *batch):
    return jax.tree.map(float, _max_abs_residual(residual, callables, *batch))


def _semigroup(flow_map, x, s, u, t):
    return flow_map(flow_map(x, s, u), u, t) - flow_map(x, s, t)


def _inverse(flow_map, x, s, t):
    return flow_map(flow_map(x, s, t), t, s) - x


def _boundary(flow_map, x, t):
    return flow_map(x, t, t) - x


def _diagonal(average_velocity, velocity, x, t):
    return average_velocity(x, t, t) - velocity(x, t)


def _parameterisation(flow_map, average_velocity, x, s, t):
    return flow_map(x, s, t) - x - (t - s) * average_velocity(x, s, t)


def _lagrangian(flow_map, velocity, derivative, x, s, t):
    along = (jnp.zeros_like(x), jnp.zeros_like(s), jnp.ones_like(t))
    f, df_dt = derivative(flow_map, (x, s, t), along)
    return df_dt - velocity(f, t)


def _eulerian(flow_map, velocity, derivative, x, s, t):
    along = (velocity(x, s), jnp.ones_like(s), jnp.zeros_like(t))
    _, df = derivative(flow_map, (x, s, t), along)
    return df


def _all(flow_map, average_velocity, velocity, derivative, x, s, u, t):
    return {
        "semigroup": _semigroup(flow_map, x, s, u, t),
        "inverse": _inverse(flow_map, x, s, t),
        "boundary": _boundary(flow_map, x, t),
        "diagonal": _diagonal(average_velocity, velocity, x, t),
        "parameterisation": _parameterisation(flow_map, average_velocity, x, s, t),
        "lagrangian": _lagrangian(flow_map, velocity, derivative, x, s, t),
        "eulerian": _eulerian(flow_map, velocity, derivative, x, s, t),
    }


@full_precision
def semigroup_residual(
    flow_map: FlowMap, x: Batch, s: Times, u: Times, t: Times
) -> float:
    """The compositional (semigroup) residual
    `max |F(F(x, s, u), u, t) - F(x, s, t)|`.

    Jumping `s -> u -> t` must land where jumping `s -> t` does, for any `u` (not only
    one between `s` and `t`).

    **Arguments:**

    - `flow_map`: the per-example flow map `F(x, s, t)`.
    - `x`: a batch of points, shape `(n, dim)`; meaningful residuals come from points
      on the flow at time `s`, e.g. `x_s = (1 - s) x0 + s eps`.
    - `s`, `u`, `t`: source, intermediate and target times, each of shape `(n,)`,
      cast to the dtype of `x`.

    **Returns:** the largest absolute residual over the batch and dimensions, a
    Python float.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    x = jnp.ones((8, 2))
    s, u, t = jnp.full(8, 0.9), jnp.full(8, 0.5), jnp.full(8, 0.1)
    residual = fmcalc.testing.semigroup_residual(flow.flow_map, x, s, u, t)
    assert residual <= fmcalc.testing.tolerance(x.dtype)
    ```
    """
    return _evaluate(_semigroup, (flow_map,), *_batch(x, s=s, u=u, t=t))


@full_precision
def inverse_residual(flow_map: FlowMap, x: Batch, s: Times, t: Times) -> float:
    """The inverse residual `max |F(F(x, s, t), t, s) - x|`.

    Going `s -> t` and back must return to the start. This holds for a map that swaps
    its time arguments too, so pair it with another check.

    **Arguments:**

    - `flow_map`: the per-example flow map `F(x, s, t)`.
    - `x`: a batch of points, shape `(n, dim)`.
    - `s`, `t`: source and target times, each of shape `(n,)`, cast to the dtype of
      `x`.

    **Returns:** the largest absolute residual, a Python float.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    x = jnp.ones((8, 2))
    residual = fmcalc.testing.inverse_residual(
        flow.flow_map, x, jnp.full(8, 0.9), jnp.full(8, 0.1)
    )
    assert residual <= fmcalc.testing.tolerance(x.dtype)
    ```
    """
    return _evaluate(_inverse, (flow_map,), *_batch(x, s=s, t=t))


@full_precision
def boundary_residual(flow_map: FlowMap, x: Batch, t: Times) -> float:
    """The boundary residual `max |F(x, t, t) - x|`.

    A jump of length zero must not move the point. A map `F = x + (t - s) V`
    satisfies it by construction, whatever `V` is.

    **Arguments:**

    - `flow_map`: the per-example flow map `F(x, s, t)`.
    - `x`: a batch of points, shape `(n, dim)`.
    - `t`: times, shape `(n,)`, cast to the dtype of `x`.

    **Returns:** the largest absolute residual, a Python float.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    x = jnp.ones((8, 2))
    residual = fmcalc.testing.boundary_residual(flow.flow_map, x, jnp.full(8, 0.5))
    assert residual <= fmcalc.testing.tolerance(x.dtype)
    ```
    """
    return _evaluate(_boundary, (flow_map,), *_batch(x, t=t))


@full_precision
def diagonal_residual(
    average_velocity: AverageVelocity, velocity: Velocity, x: Batch, t: Times
) -> float:
    """The diagonal residual `max |V(x, t, t) - v(x, t)|`.

    The average velocity over a jump of length zero is the instantaneous velocity.

    **Arguments:**

    - `average_velocity`: the per-example average velocity `V(x, s, t)` (a model).
    - `velocity`: the per-example marginal velocity `v(x, t)` (a teacher or an
      analytic flow).
    - `x`: a batch of points, shape `(n, dim)`.
    - `t`: times, shape `(n,)`, cast to the dtype of `x`.

    **Returns:** the largest absolute residual, a Python float.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    x = jnp.ones((8, 2))
    residual = fmcalc.testing.diagonal_residual(
        flow.average_velocity, flow.velocity, x, jnp.full(8, 0.5)
    )
    assert residual <= fmcalc.testing.tolerance(x.dtype)
    ```
    """
    return _evaluate(_diagonal, (average_velocity, velocity), *_batch(x, t=t))


@full_precision
def parameterisation_residual(
    flow_map: FlowMap,
    average_velocity: AverageVelocity,
    x: Batch,
    s: Times,
    t: Times,
) -> float:
    """The parameterisation residual `max |F(x, s, t) - x - (t - s) V(x, s, t)|`.

    Checks that a flow map and an average velocity describe the same jumps (and that
    the time convention of `V` matches that of `F`).

    **Arguments:**

    - `flow_map`: the per-example flow map `F(x, s, t)`.
    - `average_velocity`: the per-example average velocity `V(x, s, t)`.
    - `x`: a batch of points, shape `(n, dim)`.
    - `s`, `t`: source and target times, each of shape `(n,)`, cast to the dtype of
      `x`.

    **Returns:** the largest absolute residual, a Python float.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    x = jnp.ones((8, 2))
    residual = fmcalc.testing.parameterisation_residual(
        flow.flow_map, flow.average_velocity, x, jnp.full(8, 0.9), jnp.full(8, 0.1)
    )
    assert residual <= fmcalc.testing.tolerance(x.dtype)
    ```
    """
    return _evaluate(
        _parameterisation, (flow_map, average_velocity), *_batch(x, s=s, t=t)
    )


@full_precision
def lagrangian_residual(
    flow_map: FlowMap,
    velocity: Velocity,
    x: Batch,
    s: Times,
    t: Times,
    *,
    derivative: AbstractDerivative = JVP(),  # noqa: B008 (modules are immutable)
) -> float:
    """The Lagrangian residual `max |∂_t F(x, s, t) - v(F(x, s, t), t)|`.

    The end point of a jump moves with the flow as the target time `t` moves.
    `∂_t F` is the directional derivative of `F` at `(x, s, t)` along the tangent
    `(0, 0, 1)`, computed by `derivative`; its primal is the `F` fed to `v`.

    **Arguments:**

    - `flow_map`: the per-example flow map `F(x, s, t)`.
    - `velocity`: the per-example marginal velocity `v(x, t)`.
    - `x`: a batch of points, shape `(n, dim)`.
    - `s`, `t`: source and target times, each of shape `(n,)`, cast to the dtype of
      `x`.
    - `derivative`: how to take the derivative: `JVP()` (exact, the default) or
      `FiniteDifference(step, scheme)`, whose truncation error `O(stepᵒʳᵈᵉʳ)` is part
      of the residual.

    **Returns:** the largest absolute residual, a Python float.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    x = jnp.ones((8, 2))
    residual = fmcalc.testing.lagrangian_residual(
        flow.flow_map, flow.velocity, x, jnp.full(8, 0.9), jnp.full(8, 0.1)
    )
    assert residual <= fmcalc.testing.tolerance(x.dtype)
    ```
    """
    return _evaluate(
        _lagrangian, (flow_map, velocity, derivative), *_batch(x, s=s, t=t)
    )


@full_precision
def eulerian_residual(
    flow_map: FlowMap,
    velocity: Velocity,
    x: Batch,
    s: Times,
    t: Times,
    *,
    derivative: AbstractDerivative = JVP(),  # noqa: B008 (modules are immutable)
) -> float:
    """The Eulerian residual `max |∂_s F(x, s, t) + ∇_x F(x, s, t) · v(x, s)|`.

    Sliding the start point along the flow (`x -> x + h v(x, s)`, `s -> s + h`) leaves
    the end point unchanged. The left-hand side is one directional derivative of `F`
    at `(x, s, t)` along the tangent `(v(x, s), 1, 0)`, computed by `derivative`.

    **Arguments:**

    - `flow_map`: the per-example flow map `F(x, s, t)`.
    - `velocity`: the per-example marginal velocity `v(x, t)`.
    - `x`: a batch of points, shape `(n, dim)`.
    - `s`, `t`: source and target times, each of shape `(n,)`, cast to the dtype of
      `x`.
    - `derivative`: `JVP()` (exact, the default) or `FiniteDifference(step, scheme)`.

    **Returns:** the largest absolute residual, a Python float.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    x = jnp.ones((8, 2))
    residual = fmcalc.testing.eulerian_residual(
        flow.flow_map, flow.velocity, x, jnp.full(8, 0.9), jnp.full(8, 0.1)
    )
    assert residual <= fmcalc.testing.tolerance(x.dtype)
    ```
    """
    return _evaluate(_eulerian, (flow_map, velocity, derivative), *_batch(x, s=s, t=t))


@full_precision
def derivative_convergence(
    fn: Callable[..., Array],
    primals: tuple,
    tangents: tuple,
    *,
    scheme: str,
    steps: Sequence[float] | Float[ArrayLike, " k"],
) -> tuple[float, Float[np.ndarray, " k"]]:
    """The convergence order of a finite difference, measured against `jax.jvp`.

    For each step `h`, the error is
    `e(h) = max |FiniteDifference(h, scheme)(fn, primals, tangents) - JVP()(...)|`
    over the output's entries, and the order is the slope of the least-squares line
    through `(log h, log e(h))`: about 1 for `"forward"` and 2 for `"central"` when
    the steps are small enough for truncation to dominate and large enough for
    round-off (`~eps / h`) not to (in float64, `h` in `[1e-4, 1e-1]` for `O(1)`
    functions).

    **Arguments:**

    - `fn`: the function to differentiate, called as `fn(*primals)`.
    - `primals`: the point, one entry per argument of `fn`.
    - `tangents`: the direction, matching `primals` entry by entry (scalars
      broadcast).
    - `scheme`: `"forward"` or `"central"`.
    - `steps`: at least two distinct positive steps.

    **Returns:** `(slope, errors)`: the fitted order, a Python float, and the errors
    `e(h)`, a numpy array aligned with `steps`.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    slope, errors = fmcalc.testing.derivative_convergence(
        flow.flow_map,
        (jnp.ones(2), jnp.array(0.8), jnp.array(0.3)),
        (jnp.zeros(2), 0.0, 1.0),
        scheme="central",
        steps=np.logspace(-4, -1, 7),
    )
    assert abs(slope - 2) < 0.3
    ```
    """
    steps = np.asarray(steps, dtype=np.float64)
    if steps.ndim != 1 or len(np.unique(steps)) < 2 or np.any(steps <= 0):
        raise ValueError(
            f"`steps` must hold at least two distinct positive steps; got {steps}."
        )
    _, exact = JVP()(fn, primals, tangents)

    def error(step: float) -> float:
        _, approx = FiniteDifference(step, scheme)(fn, primals, tangents)
        return float(jnp.max(jnp.abs(approx - exact)))

    errors = np.array([error(float(h)) for h in steps])
    if not np.all(np.isfinite(errors) & (errors > 0)):
        raise ValueError(
            f"Cannot fit a convergence order to the errors {errors}: each must be "
            "finite and positive. A zero error means the finite difference is "
            "exact at this point, e.g. where `fn` is affine along the tangent."
        )
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return float(slope), errors


@full_precision
def all_residuals(
    flow_map: FlowMap,
    average_velocity: AverageVelocity,
    velocity: Velocity,
    x: Batch,
    s: Times,
    u: Times,
    t: Times,
    *,
    derivative: AbstractDerivative = JVP(),  # noqa: B008 (modules are immutable)
) -> dict[str, float]:
    """Every identity's residual at once, from one compiled program.

    - `"semigroup"`: `max |F(F(x, s, u), u, t) - F(x, s, t)|`
    - `"inverse"`: `max |F(F(x, s, t), t, s) - x|`
    - `"boundary"`: `max |F(x, t, t) - x|`
    - `"diagonal"`: `max |V(x, t, t) - v(x, t)|`
    - `"parameterisation"`: `max |F(x, s, t) - x - (t - s) V(x, s, t)|`
    - `"lagrangian"`: `max |∂_t F(x, s, t) - v(F(x, s, t), t)|`
    - `"eulerian"`: `max |∂_s F(x, s, t) + ∇_x F(x, s, t) · v(x, s)|`

    Each entry equals the corresponding single check (for example
    [`fmcalc.testing.semigroup_residual`][]); computing them together compiles once
    per shape and dtype instead of once per identity, which is what a property test
    over many dimensions pays for.

    **Arguments:**

    - `flow_map`: the per-example flow map `F(x, s, t)`.
    - `average_velocity`: the per-example average velocity `V(x, s, t)`.
    - `velocity`: the per-example marginal velocity `v(x, t)`.
    - `x`: a batch of points on the flow at the source times, shape `(n, dim)`.
    - `s`, `u`, `t`: source, intermediate and target times, each of shape `(n,)`,
      cast to the dtype of `x`.
    - `derivative`: the strategy for `∂_t F` and the Eulerian derivative, `JVP()` by
      default.

    **Returns:** a dict from the identity's name to its largest absolute residual, a
    Python float.

    **Example:**

    ```python
    flow = fmcalc.flows.Gaussian(jnp.zeros(2), jnp.eye(2))
    x = jnp.ones((8, 2))
    s, u, t = jnp.full(8, 0.9), jnp.full(8, 0.5), jnp.full(8, 0.1)
    found = fmcalc.testing.all_residuals(
        flow.flow_map, flow.average_velocity, flow.velocity, x, s, u, t
    )
    assert max(found.values()) <= fmcalc.testing.tolerance(x.dtype)
    ```
    """
    callables = (flow_map, average_velocity, velocity, derivative)
    return _evaluate(_all, callables, *_batch(x, s=s, u=u, t=t))
