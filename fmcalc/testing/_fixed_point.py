"""The fixed-point test of a training method: the exact flow map must not move under
its expected update."""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .._derivative import JVP, FiniteDifference
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
from ._checks import tolerance
from ._flows import KIT_STEPS, asymmetric_mixture
from ._method_checks import checkable
from ._precision import full_precision
from ._unbiased import _flat_grads, hotelling, perturbed


TRUNCATION_CONSTANT = 1000.0
"""The constant `C` of [`fmcalc.testing.check_fixed_point`][]'s allowance for
finite-difference truncation, `C h^order` relative to the residual's scale. A
forward difference's error is `h/2 · f''`, a central one's `h²/6 · f'''`; near the
data end of a narrow mixture component the map's higher derivatives reach hundreds
of times its first, so `C = 1000`. The allowance only flags a step far too large
for the flow: whether the exact map is a fixed point is decided on the residual
with the truncation taken out."""


class TermCheck(NamedTuple):
    """The fixed-point check of one term of a method.

    - `name`: the term's name.
    - `rows`: how many rows of the batch the term was evaluated on.
    - `relative_residual`: `max ‖R‖ / rms ‖A‖` over the rows, for a residual
      `R = A ± B` with `‖A‖ ≥ ‖B‖` row-wise on average, with every
      conditional velocity `eps - x0` replaced by the exact marginal velocity. Zero
      up to round-off (and finite-difference truncation) at a fixed point.
    - `truncation`: the part of `relative_residual` due to finite differences:
      the same measure of `R_fd - R_exact`, where `R_exact` takes every derivative
      exactly (a JVP); 0 for a term without finite differences; `NaN` if the model
      has no forward-mode derivative (a `custom_vjp` layer), so that the two parts
      cannot be told apart.
    - `expected_truncation`: what the spec's steps allow for it,
      `TRUNCATION_CONSTANT · h` for a forward difference and
      `TRUNCATION_CONSTANT · h²` for a central one (the largest over the term's
      differences); 0 without finite differences.
    - `conditional`: whether the term uses the conditional velocity.
    - `p_value`: for a conditional term, Hotelling's test that the per-example
      update with `eps - x0` has the same mean as with the marginal velocity
      (paired); `1.0` for a term without one.
    - `relative_bias`: `‖mean(g_cond - g_marg)‖ / mean ‖g_cond‖` (0 for a term
      without a conditional velocity): the size of the expected shift relative to
      one example's update.
    - `update`: `‖mean g_marg‖`, the norm of the expected update of the parameters
      (with the marginal velocity).
    - `declared`: the term's (or its method's) declaration of a known bias
      (`Term(biased=...)`, `Method(biased=...)`), else `None`.
    - `at_fixed_point`: the residual beyond truncation is within `rtol`, the
      truncation within `expected_truncation`, and `p_value > alpha`.
    - `passed`: `at_fixed_point`; or the term declares its bias
      (`Term(biased=...)`: a finite step, a difference along `eps - x0`), whose
      size is then reported, not failed; or the method declares a shifted fixed
      point (`Method(biased=...)`: a robust weighting) and only the paired test
      fails.
    """

    name: str
    rows: int
    relative_residual: float
    truncation: float
    expected_truncation: float
    conditional: bool
    p_value: float
    relative_bias: float
    update: float
    declared: str | None
    at_fixed_point: bool
    passed: bool

    def reasons(self, rtol: float, alpha: float) -> list[str]:
        """What keeps the term from its fixed point, in words (empty if nothing)."""
        reasons = []
        unknown = bool(np.isnan(self.truncation))
        rest = self.relative_residual - (0.0 if unknown else self.truncation)
        allowed = rtol + (self.expected_truncation if unknown else 0.0)
        if rest > allowed:
            what = "residual" if unknown else "residual beyond truncation"
            reasons.append(f"the {what} ({rest:.2g}) exceeds {allowed:.2g}")
        if not unknown and self.truncation > self.expected_truncation:
            reasons.append(
                f"the finite-difference truncation ({self.truncation:.2g}) exceeds "
                f"what the step allows ({self.expected_truncation:.2g}): the step is "
                "too large for this flow"
            )
        if self.p_value <= alpha:
            reasons.append(
                "the conditional velocity shifts the expected update "
                f"(p = {self.p_value:.2g} <= {alpha:.2g})"
            )
        return reasons


class FixedPointResult(NamedTuple):
    """Outcome of [`fmcalc.testing.check_fixed_point`][]: one
    [`fmcalc.testing.TermCheck`][] per term, whether all passed, the training step
    the method's schedules were evaluated at, and the tolerances used. `print` it
    for a verdict per term that says what failed."""

    terms: tuple[TermCheck, ...]
    passed: bool
    step: int
    rtol: float
    alpha: float

    def __str__(self) -> str:
        lines = [f"fixed point at training step {self.step} (rtol {self.rtol:.2g})"]
        for c in self.terms:
            residual = f"residual {c.relative_residual:.2g}"
            if c.expected_truncation:
                truncation = (
                    "unknown (no forward-mode derivative)"
                    if np.isnan(c.truncation)
                    else f"{c.truncation:.2g}"
                )
                residual += (
                    f" (finite-difference truncation {truncation}, allowed "
                    f"{c.expected_truncation:.2g})"
                )
            if c.conditional:
                residual += (
                    f", p = {c.p_value:.3g}, relative bias {c.relative_bias:.2g}"
                )
            reasons = "; ".join(c.reasons(self.rtol, self.alpha))
            if c.at_fixed_point:
                verdict = "pass"
            elif c.passed:
                verdict = f"pass, biased as declared ({c.declared}): {reasons}"
            else:
                verdict = f"FAIL: {reasons}"
            lines.append(
                f"{c.name:>14} ({c.rows} rows): {residual}, update {c.update:.2g} "
                f"-> {verdict}"
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


def _finite_differences(expr: AbstractExpr) -> list[FiniteDifference]:
    found = []

    def visit(node):
        if isinstance(node, Derivative) and isinstance(node.strategy, FiniteDifference):
            found.append(node.strategy)

    walk(expr, visit)
    return found


def _exact_derivatives(term: Term) -> Term:
    """`term` with every finite difference replaced by an exact JVP."""
    return jax.tree.map(
        lambda leaf: JVP() if isinstance(leaf, FiniteDifference) else leaf,
        term,
        is_leaf=lambda leaf: isinstance(leaf, FiniteDifference),
    )


def _relative(residual, scale) -> float:
    norms = np.linalg.norm(np.asarray(residual).reshape(residual.shape[0], -1), axis=1)
    scale = float(np.sqrt(np.mean(np.asarray(scale, np.float64))))
    return float(np.max(norms) / max(scale, np.finfo(np.float64).tiny))


@full_precision
def check_fixed_point(
    method: Method,
    flow: AbstractFlow | None = None,
    *,
    key: PRNGKeyArray,
    n: int = 2000,
    model: Callable | None = None,
    teacher: Callable | None = None,
    ema: Callable | None = None,
    aux: Callable | None = None,
    cond=None,
    step: int | None = None,
    rtol: float | None = None,
    alpha: float = 1e-6,
) -> FixedPointResult:
    """Check that the exact flow map of `flow` is a fixed point of `method`'s update.

    A batch of `n` data rows is drawn from `flow` and laid out by `method.batch`
    (its own time samplers and batch split). For each term:

    - with every conditional velocity `eps - x0` replaced by the exact marginal
      velocity, the residual must vanish row by row: up to `rtol` once the
      truncation of finite differences is taken out (measured against the same
      residual with exact derivatives), and that truncation within what the spec's
      steps allow (`O(h)` forward, `O(h²)` central; see `TermCheck`);
    - if the term uses `eps - x0`, the per-example parameter updates (gradients of
      the term's loss, weighting included) with `eps - x0` and with the marginal
      velocity are paired, and Hotelling's `T²` tests that their means agree
      (`p_value > alpha`). At the exact map the marginal update is zero, so this
      says the expected update is zero.

    A declared bias is measured the same way and reported, but does not fail: a
    term's (`Term(biased=...)`) whatever it shows, a method's shifted fixed point
    (`Method(biased=...)`) in the paired test only.

    Distillation terms use the exact teacher `flow.velocity`; self-distillation
    terms (EMA targets, the model's own diagonal) use the model itself; `aux`
    networks default to the flow (an exact flow map, e.g. CTM's teacher solver or
    PFMM's pre-trained map).

    **What it detects.** A wrong sign, time argument or teacher point leaves a
    relative residual of order 0.01 to 1 at any `n`. The conditional velocity where
    it biases the update (a Lagrangian target, a finite difference along it,
    MeanFlow without its stop-gradient) and a residual-dependent weighting on a
    term that uses it shift the expected update; the paired test sees a shift of
    relative size `b` (`relative_bias`) once `n` is about `(10 / b)²` or more. On
    symmetric data (a Gaussian; an equal-weight mixture of equal, isotropic
    components) a robust weighting shifts nothing at all, which is why the default
    flow is [`fmcalc.testing.asymmetric_mixture`][]: there, at the default
    `n = 2000`, pseudo-Huber, adaptive and cosine losses on a flow-matching anchor
    all fail (`tests/test_fixed_point.py` measures and asserts this, together with
    the sizes of the shifts).

    Pass `model=fmcalc.testing.perturbed(flow, dim, key=...)` (`θ ≠ 0`) to see the
    check fail: the residual and the update are then clearly nonzero.

    **Arguments:**

    - `method`: the [`fmcalc.Method`][].
    - `flow`: an analytic flow (data, exact map and exact velocity); default
      [`fmcalc.testing.asymmetric_mixture`][]`(steps=512)`, its map solved in
      [`fmcalc.testing.KIT_STEPS`][] RK4 steps.
    - `key`: PRNG key (fix it: the check is then deterministic).
    - `n`: the number of data rows.
    - `model`: the model (default `perturbed(flow, dim)`, the exact map with
      affine perturbation parameters at zero; gradients are taken with respect to
      its inexact arrays).
    - `teacher`, `ema`, `aux`: the other networks (defaults above).
    - `cond`: labels for a class-conditional flow, shape `(n,)`.
    - `step`: the training step for the method's curricula; default the end of
      every schedule (`method.settled_step`), where training spends most steps.
    - `rtol`: tolerance on the relative residual beyond truncation; default
      `max(1e-6, 10 · tolerance(dtype))`: `1e-6` in float64, `1e-3` in float32.
    - `alpha`: significance level of the paired test.

    **Returns:** a [`fmcalc.testing.FixedPointResult`][].
    """
    flow = asymmetric_mixture(steps=KIT_STEPS) if flow is None else flow
    step = checkable(method, "check_fixed_point", step)
    k_data, k_batch = jax.random.split(key)
    x0 = flow.sample(k_data, n)
    dim = x0.shape[-1]
    if rtol is None:
        rtol = max(1e-6, 10 * tolerance(x0.dtype))
    model = perturbed(flow, dim) if model is None else model
    networks = {
        "online": model,
        "ema": model if ema is None else ema,
        "aux": flow if aux is None else aux,
    }
    teacher = flow.velocity if teacher is None else teacher
    params = method.params(step)
    batch = method.batch(k_batch, x0, cond=cond)

    def residuals(term: Term, example):
        interpreter = _Interpreter(term.residual, example, networks, teacher, params)
        residual = interpreter(term.residual)
        scale = jnp.zeros((), residual.dtype)
        for part in _parts(term.residual):
            value = _Interpreter(part, example, networks, teacher, params)(part)
            scale = jnp.maximum(scale, jnp.sum(value**2))
        return residual, scale

    def gradient(term: Term, example):
        def loss(online):
            nets = {**networks, "online": online}
            return term_loss(term, example, nets, teacher, params)[0]

        return eqx.filter_grad(loss)(model)

    def measure(term: Term, marginal: Term, exact: Term | None, conditional: bool):
        """Everything the check reads of one term's rows, in one compiled program:
        the marginal residual and its scale, the residual with exact derivatives,
        and the marginal and conditional updates (which share the networks'
        evaluations with the residuals)."""

        def one(example):
            residual, scale = residuals(marginal, example)
            out = {
                "residual": residual,
                "scale": scale,
                "marginal": gradient(marginal, example),
            }
            if exact is not None:
                out["exact"] = residuals(exact, example)[0]
            if conditional:
                out["conditional"] = gradient(term, example)
            return out

        return jax.jit(jax.vmap(one))

    checks = []
    for term, rows in method.term_rows(batch):
        marginal = _marginal(term, flow)
        steps = _finite_differences(term.residual)
        expected = max(
            (TRUNCATION_CONSTANT * fd.step**fd.order for fd in steps), default=0.0
        )
        conditional = uses_conditional_velocity(term.residual)
        exact = _exact_derivatives(marginal) if steps else None
        try:
            measured = measure(term, marginal, exact, conditional)(rows)
        except TypeError:  # no forward mode through the model (custom_vjp)
            measured = measure(term, marginal, None, conditional)(rows)
            measured["exact"] = None
        residual, scale = measured["residual"], measured["scale"]
        relative = _relative(residual, scale)
        truncation = 0.0
        if steps:
            exact_residual = measured["exact"]
            truncation = (
                float("nan")
                if exact_residual is None
                else _relative(residual - exact_residual, scale)
            )
        g_marg = np.asarray(_flat_grads(measured["marginal"]), np.float64)
        p_value, bias = 1.0, 0.0
        if conditional:
            g_cond = np.asarray(_flat_grads(measured["conditional"]), np.float64)
            diff = g_cond - g_marg
            _, p_value, _ = hotelling(diff)
            size = np.mean(np.linalg.norm(g_cond, axis=1))
            bias = float(np.linalg.norm(diff.mean(axis=0)) / max(size, 1e-300))
        update = float(np.linalg.norm(g_marg.mean(axis=0)))
        declared = term.biased or method.biased
        check = TermCheck(
            term.name,
            int(rows.x0.shape[0]),
            relative,
            truncation,
            expected,
            conditional,
            float(p_value),
            bias,
            update,
            declared,
            False,
            False,
        )
        at_fixed_point = not check.reasons(rtol, alpha)
        # A term's own declaration (a finite step, a difference along eps - x0)
        # accepts any departure; a method's (a robust weighting) only the shift.
        shift_only = not check._replace(p_value=1.0).reasons(rtol, alpha)
        passed = (
            at_fixed_point or bool(term.biased) or (bool(method.biased) and shift_only)
        )
        checks.append(check._replace(at_fixed_point=at_fixed_point, passed=passed))
    checks = tuple(checks)
    return FixedPointResult(
        checks, all(c.passed for c in checks), int(step), float(rtol), float(alpha)
    )


@full_precision
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
