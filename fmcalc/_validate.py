"""Static checks of residuals that are well-formed but silently wrong.

The conditional velocity `eps - x0` can replace the marginal velocity `v(x_s, s)`
without biasing training only if the per-example update direction (the
*semigradient* `2 R ∇_θ R`, where `∇_θ` stops at every `sg[...]`) is affine in it:
then its expectation given `x_s` is the update with the marginal velocity
(Geng et al. 2025; Boffi et al. 2025; see DESIGN.md, "Marginal-from-conditional
learning"). That needs

1. the conditional velocity evaluated at `(x_s, s)` only (enforced when it is called);
2. the residual `R` affine in it: no products of it with itself, no network,
   teacher or finite difference evaluated at a point that depends on it (a JVP's
   *tangent* may depend on it: a JVP is linear in its tangent);
3. `∇_θ R` independent of it: wherever it is not under a stop-gradient, it may only
   be added, not multiplied with or fed through anything that depends on θ.
"""

from ._derivative import FiniteDifference
from ._expr import (
    AbstractExpr,
    Add,
    Call,
    Clip,
    ConditionalVelocity,
    Constant,
    Derivative,
    Div,
    FlowMapCall,
    HasLabel,
    Indicator,
    Mul,
    Neg,
    Normalize,
    Param,
    StopGradient,
    Sub,
    TimeFunction,
    Variable,
    VelocityCall,
    walk,
)


_WHY = (
    " The conditional velocity eps - x0 equals the marginal velocity v(x_s, s) only "
    "in expectation given x_s, so it may enter the update only affinely."
)


def uses_conditional(expr: AbstractExpr) -> bool:
    found = []

    def visit(node):
        if isinstance(node, VelocityCall) and isinstance(
            node.source, ConditionalVelocity
        ):
            found.append(node)

    walk(expr, visit)
    return bool(found)


def carries_gradient(expr: AbstractExpr) -> bool:
    """Whether gradients with respect to the online network flow out of `expr`."""
    if isinstance(expr, StopGradient):
        return False
    if isinstance(expr, Call) and expr.network.role == "online":
        return True
    if isinstance(expr, Derivative) and expr.lowered is None:
        if expr.function.role == "online":  # pyright: ignore[reportAttributeAccessIssue]
            return True
    return any(carries_gradient(c) for c in expr.children)


def differentiated(expr: AbstractExpr) -> set[tuple]:
    """Keys of the network calls, velocity calls and derivatives in `expr` that
    gradients with respect to the online network flow through: reachable from the
    root outside every `sg[...]` and depending on the online network."""
    keys: set[tuple] = set()

    def mark(node: AbstractExpr) -> None:
        if isinstance(node, StopGradient):
            return
        if isinstance(node, Call | VelocityCall | Derivative) and carries_gradient(
            node
        ):
            keys.add(node.key)
        for child in node.children:
            mark(child)

    mark(expr)
    return keys


def _degree(expr: AbstractExpr) -> int:
    """Polynomial degree of `expr` in the conditional velocity (raises if it is
    evaluated inside a network call)."""
    if isinstance(expr, VelocityCall):
        if isinstance(expr.source, ConditionalVelocity):
            return 1
        if any(_degree(c) for c in expr.children):
            raise ValueError(
                f"`{expr}` evaluates a velocity at a point that depends on the "
                "conditional velocity: the result is not affine in it, so the update "
                "is biased." + _WHY
            )
        return 0
    if isinstance(
        expr, Variable | Constant | Param | HasLabel | Indicator | TimeFunction
    ):
        return 0
    if isinstance(expr, Normalize | Clip):
        if _degree(expr.operand):
            raise ValueError(
                f"`{expr}` applies a non-linear function to an expression of the "
                "conditional velocity, so the update is biased." + _WHY
            )
        return 0
    if isinstance(expr, Call):
        if any(_degree(c) for c in expr.children):
            raise ValueError(
                f"`{expr}` evaluates a network at a point that depends on the "
                "conditional velocity: a network is non-linear in its input, so the "
                "update is biased." + _WHY
            )
        return 0
    if isinstance(expr, Derivative) and expr.lowered is None:
        if any(_degree(c) for c in expr.at):
            raise ValueError(
                f"`{expr}` differentiates at a point that depends on the conditional "
                "velocity, which is non-linear in it." + _WHY
            )
        return max(_degree(c) for c in expr.along)
    if isinstance(expr, Mul):
        return _degree(expr.left) + _degree(expr.right)
    if isinstance(expr, Div):
        if _degree(expr.right):
            raise ValueError(f"`{expr}` divides by the conditional velocity." + _WHY)
        return _degree(expr.left)
    if isinstance(expr, Add | Sub | Neg | StopGradient | FlowMapCall | Derivative):
        return max(_degree(c) for c in expr.children)
    raise TypeError(f"Unknown node {type(expr).__name__}.")


def _check_gradient_path(expr: AbstractExpr) -> None:
    """Outside stop-gradients, the conditional velocity may only be added."""
    if isinstance(expr, StopGradient):
        return
    if isinstance(expr, Mul):
        for a, b in ((expr.left, expr.right), (expr.right, expr.left)):
            if _degree(a) and carries_gradient(b):
                raise ValueError(
                    f"In `{expr}` the conditional velocity multiplies a term that "
                    "carries gradient, so the gradient of the residual depends on it "
                    "and the update 2 R ∇R is quadratic in it: biased. Put the "
                    "product inside sg[...]." + _WHY
                )
    if isinstance(expr, Derivative) and expr.lowered is None:
        if carries_gradient(expr) and any(_degree(c) for c in expr.along):
            raise ValueError(
                f"`{expr}` takes its tangent from the conditional velocity and is not "
                "under a stop-gradient: backpropagating through the JVP makes ∇R "
                "depend on it, and 2 R ∇R is quadratic in it: biased. Wrap the "
                "derivative (or the whole target) in sg[...]." + _WHY
            )
    for child in expr.children:
        _check_gradient_path(child)


def _check_finite_differences(expr: AbstractExpr) -> None:
    def visit(node):
        if (
            isinstance(node, Derivative)
            and isinstance(node.strategy, FiniteDifference)
            and any(uses_conditional(d) for d in node.along)
        ):
            raise ValueError(
                f"`{node}` is a finite difference along the conditional velocity: it "
                "evaluates the network at x + h (eps - x0), which is non-linear in "
                "eps - x0, so the update is biased at O(h). Use `fmcalc.JVP()` "
                "(linear in its tangent), or a teacher / the model's diagonal "
                "velocity as the tangent." + _WHY
            )

    walk(expr, visit)


def check_residual(residual: AbstractExpr, *, biased: str | None = None) -> None:
    """The checks every residual passes, whether it is validated on its own, held by
    a [`fmcalc.Term`][] or by a [`fmcalc.Method`][]: raise a `ValueError` (or a
    `TypeError` for a residual that is not a vector expression) that says what is
    wrong.

    - Some parameter gradient of the online network must reach the residual.
    - Unless `biased` says why the bias is accepted, the conditional velocity
      `eps - x0` must keep the update unbiased (see [`fmcalc.validate`][]).
    """
    if not isinstance(residual, AbstractExpr):
        raise TypeError(
            f"Expected a residual expression; got {type(residual).__name__}."
        )
    if residual.kind != "vector":
        raise TypeError(
            f"A residual must be a vector shaped like x; `{residual}` is a time."
        )
    if not biased and uses_conditional(residual):
        _check_finite_differences(residual)
        if _degree(residual) > 1:
            raise ValueError(
                f"The residual `{residual}` is non-linear in the conditional velocity "
                "(it multiplies it with itself), so the update is biased." + _WHY
            )
        _check_gradient_path(residual)
    if not carries_gradient(residual):
        raise ValueError(
            f"No gradient reaches the online network through the residual "
            f"`{residual}`: every online call sits under a stop-gradient (or there is "
            "none), so training would never change the model. Put `sg[...]` on the "
            "target only, e.g. `V(x, s, t) - sg[target]`."
        )


def validate(residual: AbstractExpr) -> AbstractExpr:
    """Check a residual statically; raise a `ValueError` that explains what is wrong.

    - The online network must receive some parameter gradient through it (a
      residual whose every online call sits under a stop-gradient trains nothing).
    - The conditional velocity `eps - x0` (if used) must keep the update unbiased:
      evaluated only at `(x_s, s)`, entering the residual affinely (a JVP tangent
      is fine, a finite difference or a network input is not), and not multiplied
      into anything that carries gradient outside a stop-gradient. A residual with
      a [`fmcalc.Teacher`][] or an analytic velocity needs none of this.

    [`fmcalc.Term`][] and [`fmcalc.Method`][] run the same checks at construction
    (a term that declares `biased=` skips the second); [`fmcalc.explain`][] lists
    the warnings a method would raise on top.

    **Arguments:**

    - `residual`: the expression to check.

    **Returns:** `residual`, unchanged, so the call can be chained.
    """
    check_residual(residual)
    return residual
