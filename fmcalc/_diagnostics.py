"""What a residual's gradient does, and the construction checks built on it.

Training differentiates a term's loss with respect to the online network's
parameters `θ`. Read off the expression tree, without running anything:

- which network calls receive a *parameter gradient* (the online network outside
  every `sg[...]`, directly, through a JVP or through a finite difference);
- which calls receive gradient only through their input: a frozen network (EMA,
  aux, teacher, analytic velocity) outside the stop-gradients passes the gradient
  of its output on to whatever feeds its input, but has none of its own;
- which calls pass no gradient at all (under a stop-gradient);
- the parameter update the term induces, `E[w · R · ∂θ P]`, where `P` is the part
  of the residual `R` that carries gradient (the `sg[...]` parts held fixed).

Every `Term`, `Method` and expression is checked here, so they agree on what they
refuse:

- errors: the conditional velocity `eps - x0` used where its expectation is not
  the marginal velocity ([`fmcalc.validate`][]), unless the term declares the bias;
  a term through which no parameter gradient flows at all;
- warnings, raised once when a `Method` is built: [`fmcalc.GradientPathWarning`][]
  and [`fmcalc.FixedPointShiftWarning`][], unless declared.
"""

from typing import Literal, NamedTuple

from ._derivative import FiniteDifference
from ._expr import (
    AbstractExpr,
    Add,
    Analytic,
    Call,
    ConditionalVelocity,
    Derivative,
    Div,
    FlowMap,
    Mul,
    Neg,
    StopGradient,
    Sub,
    VelocityCall,
    walk,
)
from ._validate import carries_gradient, uses_conditional
from ._warnings import (
    FixedPointShiftWarning,
    GradientPathWarning,
    warn as warn_from_user,
)


Context = Literal["direct", "input", "none"]

PARAMETER = "parameter gradient"
THROUGH_JVP = "parameter gradient, through a JVP"
THROUGH_FD = "parameter gradient, through a finite difference"
THROUGH_INPUT = "parameter gradient, only through a frozen network's input"
INPUT_ONLY = "input gradient only"
NONE_STOPPED = "none (under a stop-gradient)"
NONE_CONSTANT = "none (nothing it reads carries gradient)"


class CallRole(NamedTuple):
    """One network or velocity call of a residual and how gradient reaches it.

    - `call`: the call as printed in the residual, e.g. `V(x, s, t)`.
    - `network`: `"online"`, `"ema"`, `"aux"`, `"teacher"` or `"analytic"`.
    - `role`: one of *parameter gradient* (directly, through a JVP, through a
      finite difference, or only through a frozen network's input), *input
      gradient only* (a network without parameter gradient that passes gradient to
      what feeds it), or *none* (under a stop-gradient, or reading nothing that
      carries gradient).
    """

    call: str
    network: str
    role: str


def _inner(context: Context, online: bool) -> Context:
    """The context of a call's inputs: an online call passes its own context on; a
    frozen one turns gradient into input-only gradient."""
    if context == "none":
        return "none"
    return context if online else "input"


def call_roles(residual: AbstractExpr) -> list[CallRole]:
    """Every distinct network and velocity call of `residual` with its gradient role,
    in order of first appearance. A call met several times (once under a
    stop-gradient as a target, once outside as the prediction) gets the strongest
    of its roles."""
    seen: dict[tuple, tuple[AbstractExpr, str, set[tuple[Context, bool]]]] = {}

    def record(node: AbstractExpr, network: str, context: Context, fd: bool):
        entry = seen.setdefault(node.key, (node, network, set()))
        entry[2].add((context, fd))

    def visit(node: AbstractExpr, context: Context, fd: bool) -> None:
        if isinstance(node, StopGradient):
            visit(node.operand, "none", fd)
            return
        if isinstance(node, Derivative):
            is_fd = isinstance(node.strategy, FiniteDifference)
            if not is_fd and node.lowered is not None:  # a flow map's JVP
                visit(node.lowered, context, fd)
                return
            # A finite difference is listed as one call, not as its stencil.
            function = node.function
            network = (
                function.network.role
                if isinstance(function, FlowMap)
                else function.role  # pyright: ignore[reportAttributeAccessIssue]
            )
            record(node, network, context, is_fd)
            inner = _inner(context, network == "online")
            for child in (*node.at, *node.along):
                visit(child, inner, fd)
            return
        if isinstance(node, Call):
            record(node, node.network.role, context, fd)
            inner = _inner(context, node.network.role == "online")
            for child in node.children:
                visit(child, inner, fd)
            return
        if isinstance(node, VelocityCall) and not isinstance(
            node.source, ConditionalVelocity
        ):
            network = "analytic" if isinstance(node.source, Analytic) else "teacher"
            record(node, network, context, fd)
            for child in node.children:
                visit(child, _inner(context, False), fd)
            return
        for child in node.children:
            visit(child, context, fd)

    visit(residual, "direct", False)
    roles = []
    for node, network, contexts in seen.values():
        roles.append(CallRole(str(node), network, _role(node, network, contexts)))
    return roles


def _role(node: AbstractExpr, network: str, contexts: set) -> str:
    live = {c for c in contexts if c[0] != "none"}
    if network != "online":
        if live and any(carries_gradient(c) for c in node.children):
            return INPUT_ONLY
        return NONE_STOPPED if contexts - live else NONE_CONSTANT
    if not live:
        return NONE_STOPPED
    direct = {fd for context, fd in live if context == "direct"}
    if not direct:
        return THROUGH_INPUT
    if isinstance(node, Derivative):
        return (
            THROUGH_FD if isinstance(node.strategy, FiniteDifference) else THROUGH_JVP
        )
    return PARAMETER if False in direct else THROUGH_FD


def gradient_path(residual: AbstractExpr) -> Literal["direct", "input", "none"]:
    """How the online parameters reach `residual`: `"direct"` if some online call
    outside the stop-gradients feeds the residual other than through a frozen
    network's input, `"input"` if every path runs through one, `"none"` if no
    gradient flows at all."""
    roles = [r.role for r in call_roles(residual) if r.network == "online"]
    if any(r in (PARAMETER, THROUGH_JVP, THROUGH_FD) for r in roles):
        return "direct"
    if THROUGH_INPUT in roles:
        return "input"
    return "none"


def is_semigradient(residual: AbstractExpr) -> bool:
    """Whether some `sg[...]` in `residual` blocks a gradient that would otherwise
    reach the online parameters (so training follows a semigradient)."""
    blocked = []

    def visit(node):
        if isinstance(node, StopGradient) and carries_gradient(node.operand):
            blocked.append(node)

    walk(residual, visit)
    return bool(blocked)


def live_part(expr: AbstractExpr) -> AbstractExpr | None:
    """The part of `expr` that carries gradient: the `sg[...]` summands dropped,
    factors without gradient kept as they are. `∂θ expr = ∂θ live_part(expr)`."""
    if not carries_gradient(expr):
        return None
    if isinstance(expr, Add | Sub):
        left, right = live_part(expr.left), live_part(expr.right)
        if left is None:
            assert right is not None
            return right if isinstance(expr, Add) else Neg(right)
        if right is None:
            return left
        return type(expr)(left, right)
    if isinstance(expr, Neg):
        operand = live_part(expr.operand)
        assert operand is not None
        return Neg(operand)
    if isinstance(expr, Mul):
        if not carries_gradient(expr.left):
            right = live_part(expr.right)
            assert right is not None
            return Mul(expr.left, right)
        if not carries_gradient(expr.right):
            left = live_part(expr.left)
            assert left is not None
            return Mul(left, expr.right)
    if isinstance(expr, Div) and not carries_gradient(expr.right):
        left = live_part(expr.left)
        assert left is not None
        return Div(left, expr.right)
    return expr


# ------------------------------------------------------------------- the checks


class Finding(NamedTuple):
    """A problem found in a term: its warning class, the message, and the
    declaration that accepts it (`None` if undeclared)."""

    category: type[Warning]
    message: str
    declared: str | None


def findings(
    residual: AbstractExpr,
    loss,
    *,
    name: str,
    biased: str | None = None,
    input_gradient: str | None = None,
) -> list[Finding]:
    """The warnings a term with this residual and loss deserves, each with the
    declaration that accepts it, if any."""
    found = []
    if gradient_path(residual) == "input":
        frozen = sorted(
            {
                r.call
                for r in call_roles(residual)
                if r.role == INPUT_ONLY and r.network != "online"
            }
        )
        found.append(
            Finding(
                GradientPathWarning,
                f"Term {name!r}: the online network reaches the loss only through "
                f"the input of {', '.join(f'`{c}`' for c in frozen)}, "
                + (
                    "which has no parameter gradient of its own"
                    if len(frozen) == 1
                    else "which have no parameter gradient of their own"
                )
                + ", so the update is an input gradient of a frozen network, "
                "not a step towards the target. The exact map can "
                "be a fixed point of such a loss and still never be found by "
                "training. If a stop-gradient is on the wrong side, move it onto "
                "the target; if it is intended, declare it with "
                "`Term(..., input_gradient='why')`.",
                input_gradient,
            )
        )
    if loss.depends_on_residual and uses_conditional(residual):
        found.append(
            Finding(
                FixedPointShiftWarning,
                f"Term {name!r}: its loss {loss} weighs each example by its residual, "
                "and its target uses the conditional velocity eps - x0; the loss "
                "then estimates a robust location of eps - x0 given x_s, not its "
                "mean, so the exact map is no longer a fixed point on non-Gaussian "
                "data (see `fmcalc.Adaptive`). Use `fmcalc.SquaredError()` (or a "
                "weight of the times alone), or declare the shift with "
                "`Method(..., biased='why')`.",
                biased,
            )
        )
    return found


def warn(found: list[Finding]) -> None:
    """Raise each undeclared finding as a warning, attributed to the first caller
    outside fmcalc, equinox, the type checkers' wrappers and the standard library (a
    `Method` is built through equinox's and dataclasses' machinery)."""
    for finding in found:
        if not finding.declared:
            warn_from_user(finding.message, finding.category)
