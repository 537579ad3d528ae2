"""The fixed-point test of a training method: the exact flow map must not move under
its expected update."""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .._evaluate import _Interpreter
from .._expr import (
    AbstractExpr,
    Add,
    Analytic,
    ConditionalVelocity,
    D,
    Derivative,
    Sub,
    _is_zero,
    walk,
)
from .._method import Method, Term, term_loss
from ..flows._base import AbstractFlow
from ._unbiased import _flat_grads, hotelling, perturbed


class TermCheck(NamedTuple):
    """The fixed-point check of one term of a method.

    - `name`: the term's name.
    - `rows`: how many rows of the batch the term was evaluated on.
    - `relative_residual`: `max ‖R‖ / rms ‖A‖` over the rows, for a residual
      `R = A ± B` with `‖A‖ ≥ ‖B‖` row-wise on average, with every
      conditional velocity `eps - x0` replaced by the exact marginal velocity. Zero
      up to round-off at a fixed point.
    - `conditional`: whether the term uses the conditional velocity.
    - `p_value`: for a conditional term, Hotelling's test that the per-example
      update with `eps - x0` has the same mean as with the marginal velocity
      (paired); `1.0` for a term without one.
    - `relative_bias`: `‖mean(g_cond - g_marg)‖ / mean ‖g_cond‖` (0 for a term
      without a conditional velocity): the size of the expected shift relative to
      one example's update.
    - `update`: `‖mean g_marg‖`, the norm of the expected update of the parameters
      (with the marginal velocity).
    - `passed`: `relative_residual <= rtol` and `p_value > alpha`.
    """

    name: str
    rows: int
    relative_residual: float
    conditional: bool
    p_value: float
    relative_bias: float
    update: float
    passed: bool


class FixedPointResult(NamedTuple):
    """Outcome of [`fmcalc.testing.check_fixed_point`][]: one
    [`fmcalc.testing.TermCheck`][] per term, and whether all passed."""

    terms: tuple[TermCheck, ...]
    passed: bool

    def __str__(self) -> str:
        lines = []
        for c in self.terms:
            verdict = "pass" if c.passed else "FAIL"
            extra = (
                f", p = {c.p_value:.3g}, relative bias {c.relative_bias:.2g}"
                if c.conditional
                else ""
            )
            lines.append(
                f"{c.name:>14} ({c.rows} rows): residual {c.relative_residual:.2g}"
                f"{extra}, update {c.update:.2g} -> {verdict}"
            )
        return "\n".join(lines)


def uses_conditional_velocity(expr: AbstractExpr) -> bool:
    """Whether `expr` contains the conditional velocity `eps - x0`."""
    found = []

    def visit(node):
        source = getattr(node, "source", None)
        if isinstance(source, ConditionalVelocity):
            found.append(node)

    walk(expr, visit)
    return bool(found)


def _parts(residual: AbstractExpr) -> list[AbstractExpr]:
    """The pieces whose sizes set the scale of a residual: the two sides of a sum or
    difference, the components of a directional derivative along several axes."""
    if isinstance(residual, Add | Sub):
        return [residual.left, residual.right]
    if isinstance(residual, Derivative):
        parts = []
        for i, along in enumerate(residual.along):
            if not _is_zero(along):
                along_one = tuple(
                    a if j == i else 0.0 for j, a in enumerate(residual.along)
                )
                parts.append(
                    D(
                        residual.function,
                        at=residual.at,
                        along=along_one,
                        by=residual.strategy,
                    )
                )
        return parts
    return [residual]


def _marginal(term: Term, flow: AbstractFlow) -> Term:
    """`term` with every conditional velocity replaced by `flow`'s exact velocity."""
    return jax.tree.map(
        lambda node: Analytic(flow) if isinstance(node, ConditionalVelocity) else node,
        term,
        is_leaf=lambda node: isinstance(node, ConditionalVelocity),
    )


def check_fixed_point(
    method: Method,
    flow: AbstractFlow,
    *,
    key: PRNGKeyArray,
    n: int = 2000,
    model: Callable | None = None,
    teacher: Callable | None = None,
    ema: Callable | None = None,
    aux: Callable | None = None,
    cond=None,
    step: int = 0,
    rtol: float = 1e-6,
    alpha: float = 1e-6,
) -> FixedPointResult:
    """Check that the exact flow map of `flow` is a fixed point of `method`'s update.

    A batch of `n` data rows is drawn from `flow` and laid out by `method.batch`
    (its own time samplers and batch split). For each term:

    - with every conditional velocity `eps - x0` replaced by the exact marginal
      velocity, the residual must vanish row by row (`relative_residual <= rtol`);
    - if the term uses `eps - x0`, the per-example parameter updates (gradients of
      the term's loss, weighting included) with `eps - x0` and with the marginal
      velocity are paired, and Hotelling's `T²` tests that their means agree
      (`p_value > alpha`). At the exact map the marginal update is zero, so this
      says the expected update is zero.

    Distillation terms use the exact teacher `flow.velocity`; self-distillation
    terms (EMA targets, the model's own diagonal) use the model itself; `aux`
    networks default to the flow (an exact flow map, e.g. CTM's teacher solver or
    PFMM's pre-trained map).

    Pass `model=fmcalc.testing.perturbed(flow, dim, key=...)` (`θ ≠ 0`) to see the
    check fail: the residual and the update are then clearly nonzero.

    **Arguments:**

    - `method`: the [`fmcalc.Method`][].
    - `flow`: an analytic flow (data, exact map and exact velocity).
    - `key`: PRNG key (fix it: the check is then deterministic).
    - `n`: the number of data rows.
    - `model`: the model (default `perturbed(flow, dim)`, the exact map with
      affine perturbation parameters at zero; gradients are taken with respect to
      its inexact arrays).
    - `teacher`, `ema`, `aux`: the other networks (defaults above).
    - `cond`: labels for a class-conditional flow, shape `(n,)`.
    - `step`: the training step, for the method's curricula.
    - `rtol`: tolerance on the relative residual.
    - `alpha`: significance level of the paired test.

    **Returns:** a [`fmcalc.testing.FixedPointResult`][].
    """
    k_data, k_batch = jax.random.split(key)
    x0 = flow.sample(k_data, n)
    dim = x0.shape[-1]
    model = perturbed(flow, dim) if model is None else model
    networks = {
        "online": model,
        "ema": model if ema is None else ema,
        "aux": flow if aux is None else aux,
    }
    teacher = flow.velocity if teacher is None else teacher
    params = method.params(step)
    batch = method.batch(k_batch, x0, cond=cond)

    def per_example(term: Term):
        def loss(online, example):
            nets = {**networks, "online": online}
            return term_loss(term, example, nets, teacher, params)[0]

        def one(example):
            interpreter = _Interpreter(
                term.residual, example, networks, teacher, params
            )
            residual = interpreter(term.residual)
            scale = jnp.zeros((), residual.dtype)
            for part in _parts(term.residual):
                value = _Interpreter(part, example, networks, teacher, params)(part)
                scale = jnp.maximum(scale, jnp.sum(value**2))
            grads = eqx.filter_grad(loss)(model, example)
            return residual, scale, grads

        return jax.jit(jax.vmap(one))

    checks = []
    for term, rows in method.term_rows(batch):
        marginal = _marginal(term, flow)
        residual, scale, g_marg = per_example(marginal)(rows)
        norms = np.linalg.norm(
            np.asarray(residual).reshape(residual.shape[0], -1), axis=1
        )
        scale = float(np.sqrt(np.mean(np.asarray(scale, np.float64))))
        relative = float(np.max(norms) / max(scale, np.finfo(np.float64).tiny))
        g_marg = np.asarray(_flat_grads(g_marg), np.float64)
        conditional = uses_conditional_velocity(term.residual)
        p_value, bias = 1.0, 0.0
        if conditional:
            _, _, g_cond = per_example(term)(rows)
            g_cond = np.asarray(_flat_grads(g_cond), np.float64)
            diff = g_cond - g_marg
            _, p_value, _ = hotelling(diff)
            size = np.mean(np.linalg.norm(g_cond, axis=1))
            bias = float(np.linalg.norm(diff.mean(axis=0)) / max(size, 1e-300))
        update = float(np.linalg.norm(g_marg.mean(axis=0)))
        passed = bool(relative <= rtol and p_value > alpha)
        checks.append(
            TermCheck(
                term.name,
                int(rows.x0.shape[0]),
                relative,
                conditional,
                float(p_value),
                bias,
                update,
                passed,
            )
        )
    checks = tuple(checks)
    return FixedPointResult(checks, all(c.passed for c in checks))


def descent_alignment(
    method: Method,
    flow: AbstractFlow,
    *,
    key: PRNGKeyArray,
    n: int = 4000,
    scale: float = 0.02,
    teacher: Callable | None = None,
    aux: Callable | None = None,
    step: int = 0,
) -> float:
    """The cosine between `method`'s expected update and the way back to the exact
    map, near it.

    The model is the exact map of `flow` plus a small random affine perturbation
    `θ` ([`fmcalc.testing.perturbed`][]; its EMA is the model itself). A fixed-point
    test cannot see the sign of an update (at the fixed point every residual is
    zero either way); this can: gradient descent moves `θ` along `-E[∇_θ loss]`,
    which points back to `θ = 0` when the cosine of `E[∇_θ loss]` with `θ` is
    positive. A flipped surrogate (e.g. sCM's tangent form with the wrong sign)
    gives a negative cosine.

    **Arguments:**

    - `method`: the [`fmcalc.Method`][].
    - `flow`: an analytic flow.
    - `key`: PRNG key (the perturbation, the data and the batch).
    - `n`: the number of data rows.
    - `scale`: the size of the perturbation (small: the linear regime).
    - `teacher`, `aux`: as in [`fmcalc.testing.check_fixed_point`][].
    - `step`: the training step, for the method's curricula.

    **Returns:** the cosine, in `[-1, 1]`.
    """
    k_model, k_data, k_batch = jax.random.split(key, 3)
    x0 = flow.sample(k_data, n)
    model = perturbed(flow, x0.shape[-1], key=k_model, scale=scale)
    teacher = flow.velocity if teacher is None else teacher
    aux = flow if aux is None else aux
    batch = method.batch(k_batch, x0)

    @jax.jit
    def mean_update(model):
        def loss(m):
            return method.loss(
                m, batch, teacher=teacher, ema=model, aux=aux, step=step
            )[0]

        return eqx.filter_grad(loss)(model)

    grads = mean_update(model)
    fields = ("A", "b", "c", "e")
    g = jnp.concatenate([getattr(grads, f).ravel() for f in fields])
    theta = jnp.concatenate([getattr(model, f).ravel() for f in fields])
    return float(g @ theta / (jnp.linalg.norm(g) * jnp.linalg.norm(theta)))
