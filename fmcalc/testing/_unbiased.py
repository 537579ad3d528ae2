from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._batch import Batch
from .._custom_types import Cond, Time, Vector
from .._evaluate import evaluate
from .._expr import AbstractExpr, ConditionalVelocity, Teacher
from ..flows._base import AbstractFlow
from ._precision import full_precision


class AffinePerturbation(eqx.Module):
    """A model family containing an exact flow map: `V_θ = V* + A x + b + c s + e t`.

    `θ = (A, b, c, e)`; at `θ = 0` the model is the exact average velocity `V*` of
    `flow`, so a correct loss has a zero (expected) update there. The flow's own
    arrays are held under a stop-gradient: gradients are with respect to `θ` only.

    **Arguments:**

    - `flow`: an analytic flow (its `average_velocity` is `V*`).
    - `A`, `b`, `c`, `e`: the perturbation, shapes `(dim, dim)`, `(dim,)`, `(dim,)`,
      `(dim,)`.
    """

    flow: AbstractFlow
    A: Float[Array, "dim dim"]
    b: Float[Array, " dim"]
    c: Float[Array, " dim"]
    e: Float[Array, " dim"]

    def __call__(self, x: Vector, s: Time, t: Time, *, cond: Cond = None) -> Vector:
        flow = jax.lax.stop_gradient(self.flow)
        exact = flow.average_velocity(x, s, t, cond=cond)
        return exact + self.A @ x + self.b + self.c * s + self.e * t


def perturbed(
    flow: AbstractFlow, dim: int, *, key: PRNGKeyArray | None = None, scale: float = 0.3
) -> AffinePerturbation:
    """An [`fmcalc.testing.AffinePerturbation`][] of `flow`: random `θ ~ scale·N(0, I)`
    when `key` is given, else `θ = 0` (the exact map).

    **Arguments:**

    - `flow`: the analytic flow.
    - `dim`: its dimension.
    - `key`: PRNG key for a random `θ`; `None` for `θ = 0`.
    - `scale`: standard deviation of the entries of `θ`.
    """
    shapes = [(dim, dim), (dim,), (dim,), (dim,)]
    if key is None:
        parts = [jnp.zeros(shape) for shape in shapes]
    else:
        keys = jax.random.split(key, len(shapes))
        parts = [
            scale * jax.random.normal(k, shape)
            for k, shape in zip(keys, shapes, strict=True)
        ]
    return AffinePerturbation(flow, *parts)


class UnbiasedResult(NamedTuple):
    """Outcome of [`fmcalc.testing.check_unbiased`][].

    - `statistic`: Hotelling's `T²` of the paired differences.
    - `p_value`: its p-value under "no bias" (F distribution).
    - `dof`: the number of parameter coordinates tested.
    - `n`: the number of samples.
    - `relative_bias`: `‖mean(g_cond - g_marg)‖ / ‖mean(g_marg)‖`, relative to the
      *mean* update (where [`fmcalc.testing.check_fixed_point`][]'s is relative to
      one example's). Near the exact map the mean update is small, so this ratio
      can be large while the paired test finds no shift: it is a point estimate,
      `relative_noise` its Monte Carlo scale, and `unbiased` the verdict.
    - `unbiased`: `p_value > alpha`.
    - `relative_noise`: the standard error of `mean(g_cond - g_marg)` (the root of
      its summed variances over `n`), on the scale of `relative_bias`.
    """

    statistic: float
    p_value: float
    dof: int
    n: int
    relative_bias: float
    unbiased: bool
    relative_noise: float = float("nan")

    def __str__(self) -> str:
        verdict = (
            "no shift detected"
            if self.unbiased
            else "FAIL: the conditional velocity shifts the update"
        )
        return (
            f"paired test over {self.n} rows: relative bias {self.relative_bias:.3g} "
            f"± {self.relative_noise:.2g} (Monte Carlo), T² = {self.statistic:.3g} "
            f"on {self.dof} coordinates, p = {self.p_value:.3g} -> {verdict}"
        )


def hotelling(differences: np.ndarray) -> tuple[float, float, int]:
    """One-sample Hotelling `T²` test that the rows of `differences` have mean zero.

    Coordinates that are identically zero are dropped first.

    **Returns:** `(T², p-value, number of coordinates tested)`.
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[:, np.std(d, axis=0) > 0]
    n, p = d.shape
    if p == 0:
        return 0.0, 1.0, 0
    if n <= p:
        raise ValueError(
            f"Hotelling's test needs more samples than coordinates; got n = {n} and "
            f"{p} coordinates."
        )
    mean = d.mean(axis=0)
    cov = np.cov(d, rowvar=False).reshape(p, p)
    t2 = float(n * mean @ np.linalg.lstsq(cov, mean, rcond=None)[0])
    f = (n - p) / (p * (n - 1)) * t2
    # Survival function of F(p, n - p): I_{d2 / (d2 + d1 f)}(d2 / 2, d1 / 2); in
    # float32 (no x64) it underflows to 0 below ~1e-38, far below any useful alpha.
    x = (n - p) / ((n - p) + p * f)
    p_value = float(jsp.betainc((n - p) / 2, p / 2, jnp.asarray(x)))
    return t2, p_value, p


def _flat_grads(tree: Any) -> Array:
    leaves = [leaf for leaf in jax.tree.leaves(tree) if eqx.is_inexact_array(leaf)]
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


@full_precision
def check_unbiased(
    residual: AbstractExpr,
    model: Callable,
    flow: AbstractFlow,
    *,
    key: PRNGKeyArray,
    n: int = 2000,
    alpha: float = 1e-6,
    min_gap: float = 0.0,
) -> UnbiasedResult:
    """Paired test that substituting the conditional velocity is unbiased.

    Every velocity source of `residual` that is a [`fmcalc.ConditionalVelocity`][] or a
    [`fmcalc.Teacher`][] is evaluated twice on the same `(x0, eps, s, t)`: once with
    the exact marginal velocity `flow.velocity` and once with the conditional
    velocity `eps - x0`. The per-sample semigradients `g = ∇_θ ½‖R‖²` (gradients stop
    at `sg[...]`) are paired, and Hotelling's `T²` tests `E[g_cond - g_marg] = 0`.
    Pairing removes most of the sampling noise (about 5× less variance).

    MeanFlow's residual passes (its update is affine in the velocity at `(x_s, s)`);
    a Lagrangian residual whose velocity at `F(x_s, s, t)` is replaced by `eps - x0`
    fails with `p ≈ 0` at `n = 2000`.

    **Arguments:**

    - `residual`: the residual expression.
    - `model`: the model, e.g. [`fmcalc.testing.perturbed`][]`(flow, dim, key=...)`.
      Gradients are taken with respect to its inexact arrays.
    - `flow`: the analytic flow giving data and the exact marginal velocity.
    - `key`: PRNG key (fix it: the test is then deterministic).
    - `n`: number of samples.
    - `alpha`: significance level.
    - `min_gap`: draw `|t - s| >= min_gap` (a Lagrangian bias grows with `|t - s|`).

    **Returns:** an [`fmcalc.testing.UnbiasedResult`][].
    """
    if not 0 <= min_gap < 1:
        raise ValueError(f"`min_gap` must lie in [0, 1); got {min_gap}.")
    k_data, k_noise, k_s, k_t = jax.random.split(key, 4)
    x0 = flow.sample(k_data, n)
    eps = jax.random.normal(k_noise, x0.shape, x0.dtype)
    s = jax.random.uniform(k_s, (n,), x0.dtype, minval=min_gap)
    t = jax.random.uniform(k_t, (n,), x0.dtype, maxval=s - min_gap)
    batch = Batch(x0, eps, s, t)
    substituted = jax.tree.map(
        lambda node: Teacher() if isinstance(node, ConditionalVelocity) else node,
        residual,
        is_leaf=lambda node: isinstance(node, ConditionalVelocity),
    )

    def semigradient(example: Batch, conditional: bool):
        def conditional_velocity(x, t, cond=None):
            del x, t, cond
            return example.eps - example.x0

        teacher = conditional_velocity if conditional else flow.velocity

        def loss(m):
            r = evaluate(substituted, example, model=m, teacher=teacher)
            return 0.5 * jnp.sum(r**2)

        return eqx.filter_grad(loss)(model)

    @jax.jit
    def grads(batch):
        g_cond = jax.vmap(lambda ex: semigradient(ex, True))(batch)
        g_marg = jax.vmap(lambda ex: semigradient(ex, False))(batch)
        return _flat_grads(g_cond), _flat_grads(g_marg)

    g_cond, g_marg = (np.asarray(g, np.float64) for g in grads(batch))
    t2, p_value, dof = hotelling(g_cond - g_marg)
    difference = g_cond - g_marg
    mean_marg = np.linalg.norm(g_marg.mean(axis=0))
    relative = float(np.linalg.norm(difference.mean(axis=0)) / mean_marg)
    noise = float(np.sqrt(np.sum(np.var(difference, axis=0, ddof=1)) / n) / mean_marg)
    return UnbiasedResult(t2, p_value, dof, n, relative, p_value > alpha, noise)
