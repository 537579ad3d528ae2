"""Residuals as expression trees.

A residual is a small tree of frozen nodes: leaves (`x`, `s`, `t`, `u`, constants),
network and velocity calls, directional derivatives with a strategy, stop-gradients
and arithmetic. The tree is data, so the same object is

- printed as a formula (`str(expr)`),
- costed statically ([`fmcalc.cost.estimate`][]),
- validated ([`fmcalc.validate`][]), and
- evaluated per example by one interpreter ([`fmcalc.evaluate`][]), which computes
  every distinct network call once and takes the primal of a JVP as the prediction
  wherever the same call appears.

Two kinds of value flow through a tree: *vectors* (shaped like `x`) and *times*
(scalars). Building a tree checks that they are combined sensibly.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import equinox as eqx

from .._derivative import JVP, AbstractDerivative, FiniteDifference


Kind = Literal["vector", "time"]


def _wrap(value: Any) -> "AbstractExpr":
    if isinstance(value, AbstractExpr):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"Cannot use {value!r} (type {type(value).__name__}) in a residual; "
            "expected an expression (`x`, `s`, `t`, `u`, a network or velocity call, "
            "...) or a Python number."
        )
    return Constant(float(value))


def _precedence(expr: "AbstractExpr") -> int:
    return {Add: 1, Sub: 1, Neg: 2, Mul: 2, Div: 2}.get(type(expr), 3)


class AbstractExpr(eqx.Module):
    """A node of a residual expression tree.

    Nodes are immutable and compared structurally (`expr.key`), so two occurrences
    of `V(x, s, t)` are one network call. Arithmetic (`+`, `-`, `*`, `/`, unary `-`)
    with other nodes or Python numbers builds new nodes.
    """

    @property
    @abc.abstractmethod
    def kind(self) -> Kind:
        """`"vector"` (shaped like `x`) or `"time"` (a scalar)."""

    @property
    @abc.abstractmethod
    def children(self) -> tuple["AbstractExpr", ...]:
        """The sub-expressions this node is computed from."""

    @property
    @abc.abstractmethod
    def key(self) -> tuple:
        """A hashable structural key: equal keys compute equal values."""

    @abc.abstractmethod
    def _format(self) -> str: ...

    def __str__(self) -> str:
        return self._format()

    def __add__(self, other):
        return Add(self, _wrap(other))

    def __radd__(self, other):
        return Add(_wrap(other), self)

    def __sub__(self, other):
        return Sub(self, _wrap(other))

    def __rsub__(self, other):
        return Sub(_wrap(other), self)

    def __mul__(self, other):
        return Mul(self, _wrap(other))

    def __rmul__(self, other):
        return Mul(_wrap(other), self)

    def __truediv__(self, other):
        return Div(self, _wrap(other))

    def __neg__(self):
        return Neg(self)


# Leaves ------------------------------------------------------------------------------


class Variable(AbstractExpr):
    """A leaf: `x` (the noisy input `x_s`), or one of the times `s`, `t`, `u`.

    Use the module-level instances [`fmcalc.X`][], [`fmcalc.S`][], [`fmcalc.T`][],
    [`fmcalc.U`][].
    """

    name: Literal["x", "s", "t", "u"] = eqx.field(static=True)

    def __check_init__(self):
        if self.name not in ("x", "s", "t", "u"):
            raise ValueError(
                f"Unknown variable {self.name!r}; expected 'x' (the noisy input x_s), "
                "'s' (source time), 't' (target time) or 'u' (intermediate time)."
            )

    @property
    def kind(self) -> Kind:
        return "vector" if self.name == "x" else "time"

    @property
    def children(self):
        return ()

    @property
    def key(self):
        return ("var", self.name)

    def _format(self):
        return self.name


class Constant(AbstractExpr):
    """A scalar constant. Python numbers in expressions become constants."""

    value: float = eqx.field(static=True)

    @property
    def kind(self) -> Kind:
        return "time"

    @property
    def children(self):
        return ()

    @property
    def key(self):
        return ("const", self.value)

    def _format(self):
        return f"{self.value:g}"


X = Variable("x")
S = Variable("s")
T = Variable("t")
U = Variable("u")


def _is_zero(expr: AbstractExpr) -> bool:
    return isinstance(expr, Constant) and expr.value == 0.0


# Arithmetic --------------------------------------------------------------------------


class _Binary(AbstractExpr):
    left: AbstractExpr
    right: AbstractExpr
    symbol: ClassVar[str]

    @property
    def children(self):
        return (self.left, self.right)

    @property
    def key(self):
        return (type(self).__name__, self.left.key, self.right.key)

    @property
    def kind(self) -> Kind:
        if "vector" in (self.left.kind, self.right.kind):
            return "vector"
        return "time"

    def _format(self):
        p = _precedence(self)
        left = self.left._format()
        right = self.right._format()
        if _precedence(self.left) < p:
            left = f"({left})"
        # Right operands of `-` and `/` need parentheses at equal precedence too.
        right_strict = isinstance(self, Sub | Div)
        if _precedence(self.right) < p or (
            right_strict and _precedence(self.right) == p
        ):
            right = f"({right})"
        return f"{left} {self.symbol} {right}"


class Add(_Binary):
    """`left + right` (both vectors or both times)."""

    symbol: ClassVar[str] = "+"

    def __check_init__(self):
        _check_same_kind(self, "add")


class Sub(_Binary):
    """`left - right` (both vectors or both times)."""

    symbol: ClassVar[str] = "-"

    def __check_init__(self):
        _check_same_kind(self, "subtract")


class Mul(_Binary):
    """`left * right`: a time scales a vector; two vectors multiply elementwise."""

    symbol: ClassVar[str] = "*"


class Div(_Binary):
    """`left / right`, where `right` is a time."""

    symbol: ClassVar[str] = "/"

    def __check_init__(self):
        if self.right.kind != "time":
            raise TypeError(
                f"Can only divide by a time (scalar) expression; `{self.right}` is a "
                "vector."
            )


def _check_same_kind(node: _Binary, verb: str) -> None:
    if node.left.kind != node.right.kind:
        raise TypeError(
            f"Cannot {verb} a {node.left.kind} (`{node.left}`) and a "
            f"{node.right.kind} (`{node.right}`); scale a vector by a time with `*`."
        )


class Neg(AbstractExpr):
    """`-operand`."""

    operand: AbstractExpr

    @property
    def kind(self) -> Kind:
        return self.operand.kind

    @property
    def children(self):
        return (self.operand,)

    @property
    def key(self):
        return ("neg", self.operand.key)

    def _format(self):
        inner = self.operand._format()
        return f"-({inner})" if _precedence(self.operand) <= 2 else f"-{inner}"


class StopGradient(AbstractExpr):
    """`sg[operand]`: the value of `operand`, with no gradient flowing through it."""

    operand: AbstractExpr

    @property
    def kind(self) -> Kind:
        return self.operand.kind

    @property
    def children(self):
        return (self.operand,)

    @property
    def key(self):
        return ("sg", self.operand.key)

    def _format(self):
        return f"sg[{self.operand._format()}]"


def sg(expr: AbstractExpr) -> AbstractExpr:
    """Stop-gradient: `sg[expr]` has the value of `expr` and blocks backpropagation.

    **Arguments:**

    - `expr`: any expression.

    **Returns:** a [`fmcalc.StopGradient`][] node (or `expr` itself if it already is
    one, or holds no network call).
    """
    expr = _wrap(expr)
    if isinstance(expr, StopGradient | Variable | Constant):
        return expr
    return StopGradient(expr)


# Networks and velocity sources -------------------------------------------------------

_ROLES = ("online", "ema", "aux")


class Network(eqx.Module):
    """A network slot of a residual: a model `V(x, a, b)` supplied at evaluation.

    - `role="online"`: the model being trained (gradients flow into it unless the
      call sits under [`fmcalc.sg`][]).
    - `role="ema"`: an exponential moving average of the online parameters, passed
      as `ema=` at evaluation; never differentiated.
    - `role="aux"`: an auxiliary network (e.g. a partial flow map teacher, or
      FreeFlow's denoiser), passed as `aux=`.

    Calling `V(x, a, b)` with expressions builds a [`fmcalc.Call`][] node.

    **Arguments:**

    - `role`: one of `"online"`, `"ema"`, `"aux"`.
    - `symbol`: the name used when printing (default `"V"`, `"V_ema"`, `"V_aux"`).
    - `unconditional`: call the network without the batch's conditioning
      (`cond=None`), as classifier-free guidance needs; printed as `V(x, a, b | ∅)`.
    """

    role: str = eqx.field(static=True, default="online")
    symbol: str = eqx.field(static=True, default="")
    unconditional: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if self.role not in _ROLES:
            raise ValueError(
                f"Unknown network role {self.role!r}; expected one of {_ROLES}."
            )

    @property
    def name(self) -> str:
        if self.symbol:
            return self.symbol
        return "V" if self.role == "online" else f"V_{self.role}"

    def __call__(self, x, a, b) -> "Call":
        return Call(self, _wrap(x), _wrap(a), _wrap(b))

    def without_condition(self) -> "Network":
        """The same network called with `cond=None`."""
        return Network(self.role, self.symbol, unconditional=True)


class FlowMap(eqx.Module):
    """The flow map of a network: `F(x, a, b) = x + (b - a) V(x, a, b)`.

    Calling it builds the expression (printed as `F(x, a, b)`); it can also be the
    function differentiated by [`fmcalc.D`][].

    **Arguments:**

    - `network`: the [`fmcalc.Network`][] giving the average velocity `V`.
    - `symbol`: printed name (default `"F"`, or `"F_ema"`, `"F_aux"` by role).
    """

    network: Network = Network()
    symbol: str = eqx.field(static=True, default="")

    @property
    def name(self) -> str:
        if self.symbol:
            return self.symbol
        role = self.network.role
        return "F" if role == "online" else f"F_{role}"

    def __call__(self, x, a, b) -> "FlowMapCall":
        return FlowMapCall(self, _wrap(x), _wrap(a), _wrap(b))


def _check_point(what: str, x: AbstractExpr, a: AbstractExpr, b: AbstractExpr):
    if x.kind != "vector":
        raise TypeError(
            f"The first argument of {what} must be a vector (the point `x`); got the "
            f"time `{x}`. Arguments are ordered (x, source time, target time)."
        )
    for name, arg in (("second", a), ("third", b)):
        if arg.kind != "time":
            raise TypeError(
                f"The {name} argument of {what} must be a time; got the vector "
                f"`{arg}`. Arguments are ordered (x, source time, target time)."
            )


class Call(AbstractExpr):
    """A network forward pass `V(x, a, b)`: one forward pass per distinct call."""

    network: Network
    x: AbstractExpr
    a: AbstractExpr
    b: AbstractExpr

    def __check_init__(self):
        _check_point(f"{self.network.name}(x, a, b)", self.x, self.a, self.b)

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def children(self):
        return (self.x, self.a, self.b)

    @property
    def key(self):
        network = (self.network.role, self.network.unconditional)
        return ("call", network, self.x.key, self.a.key, self.b.key)

    def _format(self):
        bar = " | ∅" if self.network.unconditional else ""
        return f"{self.network.name}({self.x}, {self.a}, {self.b}{bar})"


class FlowMapCall(AbstractExpr):
    """`F(x, a, b)`, evaluated as `x + (b - a) V(x, a, b)`."""

    flow_map: FlowMap
    x: AbstractExpr
    a: AbstractExpr
    b: AbstractExpr

    def __check_init__(self):
        _check_point(f"{self.flow_map.name}(x, a, b)", self.x, self.a, self.b)

    @property
    def lowered(self) -> AbstractExpr:
        return self.x + (self.b - self.a) * self.flow_map.network(
            self.x, self.a, self.b
        )

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def children(self):
        return (self.lowered,)

    @property
    def key(self):
        return self.lowered.key

    def _format(self):
        return f"{self.flow_map.name}({self.x}, {self.a}, {self.b})"


class AbstractVelocity(eqx.Module):
    """A source of the instantaneous velocity `v(x, t)` used in a residual.

    Calling `v(x, t)` with expressions builds a [`fmcalc.VelocityCall`][] node (or,
    for [`fmcalc.Diagonal`][], the network call `V(x, t, t)`).

    Each source declares `network_cost`: forward passes of a network per call.
    """

    network_cost: ClassVar[int]

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    def __call__(self, x, t) -> AbstractExpr:
        x, t = _wrap(x), _wrap(t)
        if x.kind != "vector" or t.kind != "time":
            raise TypeError(
                f"A velocity is called as v(x, t) with a vector and a time; got "
                f"v({x}, {t})."
            )
        return VelocityCall(self, x, t)


class Teacher(AbstractVelocity):
    """A pre-trained velocity `v(x, t)` passed as `teacher=` at evaluation.

    Any per-example callable works, e.g. the exact `flow.velocity` of an analytic
    flow, or a frozen diffusion model. It is never differentiated with respect to
    its parameters (gradients can still flow through its input).

    **Arguments:**

    - `symbol`: printed name (default `"v"`).
    - `unconditional`: call the teacher with `cond=None`.
    """

    symbol: str = eqx.field(static=True, default="v")
    unconditional: bool = eqx.field(static=True, default=False)
    network_cost: ClassVar[int] = 1

    @property
    def name(self) -> str:
        return self.symbol

    def without_condition(self) -> "Teacher":
        """The same teacher called with `cond=None` (its unconditional velocity)."""
        return Teacher(self.symbol, unconditional=True)


class ConditionalVelocity(AbstractVelocity):
    """The conditional velocity `eps - x0`, an unbiased sample of `v(x_s, s)`.

    `E[eps - x0 | x_s] = v(x_s, s)`, so it may replace the marginal velocity only at
    the point `(x_s, s)` and only where the update stays affine in it (see
    [`fmcalc.validate`][]). Calling it anywhere else raises at construction:
    `ConditionalVelocity()(F(x, s, t), t)` would be biased.

    **Arguments:** none.
    """

    network_cost: ClassVar[int] = 0

    @property
    def name(self) -> str:
        return "v_c"

    def __call__(self, x, t) -> AbstractExpr:
        x, t = _wrap(x), _wrap(t)
        if x.key != X.key or t.key != S.key:
            raise ValueError(
                f"The conditional velocity eps - x0 was called at ({x}, {t}); it is an "
                "unbiased estimate of the marginal velocity only at (x, s), the noisy "
                "input and its own time: E[eps - x0 | x_s] = v(x_s, s). At any other "
                "point its conditional expectation is not the marginal velocity there, "
                "so the training update would be biased (this is why Lagrangian "
                "residuals, which need v(F(x, s, t), t), cannot learn "
                "marginal-from-conditional). Use a teacher or the model's own diagonal "
                "(`Diagonal(Network())`) at that point instead."
            )
        return VelocityCall(self, x, t)


class Analytic(AbstractVelocity):
    """The exact velocity of an analytic flow (e.g. `fmcalc.flows.Gaussian`),
    embedded in the residual itself.

    **Arguments:**

    - `flow`: any object with a per-example `velocity(x, t)` method.
    - `symbol`: printed name (default `"v*"`).
    """

    flow: Any
    symbol: str = eqx.field(static=True, default="v*")
    network_cost: ClassVar[int] = 0

    @property
    def name(self) -> str:
        return self.symbol


class Diagonal(AbstractVelocity):
    """The model's own velocity: the diagonal `V(x, t, t) = v(x, t)` of a network.

    Self-distillation uses it in place of a teacher. Calling `Diagonal(V)(x, t)` is
    exactly the network call `V(x, t, t)`.

    **Arguments:**

    - `network`: the [`fmcalc.Network`][] whose diagonal is used (default online).
    """

    network: Network = Network()
    network_cost: ClassVar[int] = 1

    @property
    def name(self) -> str:
        return self.network.name

    def __call__(self, x, t) -> AbstractExpr:
        x, t = _wrap(x), _wrap(t)
        return self.network(x, t, t)


class VelocityCall(AbstractExpr):
    """`v(x, t)` from a velocity source."""

    source: AbstractVelocity
    x: AbstractExpr
    t: AbstractExpr

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def children(self):
        return (self.x, self.t)

    @property
    def key(self):
        if isinstance(self.source, Analytic):
            source_key = ("analytic", id(self.source.flow))
        else:
            source_key = (type(self.source).__name__, self.unconditional)
        return ("velocity", source_key, self.x.key, self.t.key)

    @property
    def unconditional(self) -> bool:
        return bool(getattr(self.source, "unconditional", False))

    def _format(self):
        bar = " | ∅" if self.unconditional else ""
        return f"{self.source.name}({self.x}, {self.t}{bar})"


# Scalars from the batch or the training step and elementwise functions -------------

_TIME_FUNCTIONS = ("sqrt", "cos", "sin", "exp", "log", "sigmoid")


class Param(AbstractExpr):
    """A named scalar supplied at evaluation (`params={name: value}`), for
    hyperparameters that follow a curriculum (a tangent warm-up factor, a guidance
    scale): a method evaluates its schedules at the training step."""

    name: str = eqx.field(static=True)

    @property
    def kind(self) -> Kind:
        return "time"

    @property
    def children(self):
        return ()

    @property
    def key(self):
        return ("param", self.name)

    def _format(self):
        return self.name


class HasLabel(AbstractExpr):
    """`1` for an example with a class label (`cond >= 0`), `0` for an unlabelled
    or label-dropped one (`cond` negative or `None`)."""

    @property
    def kind(self) -> Kind:
        return "time"

    @property
    def children(self):
        return ()

    @property
    def key(self):
        return ("has_label",)

    def _format(self):
        return "[y ≠ ∅]"


class Indicator(AbstractExpr):
    """`1` where `low <= operand <= high`, else `0` (e.g. a guidance interval)."""

    operand: AbstractExpr
    low: float = eqx.field(static=True)
    high: float = eqx.field(static=True)

    def __check_init__(self):
        if self.operand.kind != "time":
            raise TypeError(
                f"An indicator takes a time; got the vector `{self.operand}`."
            )
        if not self.low <= self.high:
            raise ValueError(
                "Indicator interval must have low <= high; got "
                f"[{self.low}, {self.high}]."
            )

    @property
    def kind(self) -> Kind:
        return "time"

    @property
    def children(self):
        return (self.operand,)

    @property
    def key(self):
        return ("indicator", self.low, self.high, self.operand.key)

    def _format(self):
        return f"[{self.low:g} <= {self.operand} <= {self.high:g}]"


class TimeFunction(AbstractExpr):
    """An elementwise function of a time expression: one of `sqrt`, `cos`, `sin`,
    `exp`, `log`, `sigmoid`."""

    function: str = eqx.field(static=True)
    operand: AbstractExpr

    def __check_init__(self):
        if self.function not in _TIME_FUNCTIONS:
            raise ValueError(
                f"Unknown time function {self.function!r}; expected one of "
                f"{_TIME_FUNCTIONS}."
            )
        if self.operand.kind != "time":
            raise TypeError(
                f"`{self.function}` applies to times; got the vector `{self.operand}`."
            )

    @property
    def kind(self) -> Kind:
        return "time"

    @property
    def children(self):
        return (self.operand,)

    @property
    def key(self):
        return ("fn", self.function, self.operand.key)

    def _format(self):
        return f"{self.function}({self.operand})"


class Normalize(AbstractExpr):
    """`operand / (‖operand‖ + c)`: the tangent normalisation of sCM and AYF."""

    operand: AbstractExpr
    c: float = eqx.field(static=True)

    def __check_init__(self):
        if self.operand.kind != "vector":
            raise TypeError(f"Normalize takes a vector; got the time `{self.operand}`.")
        if not self.c > 0:
            raise ValueError(f"Normalize needs c > 0; got {self.c}.")

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def children(self):
        return (self.operand,)

    @property
    def key(self):
        return ("normalize", self.c, self.operand.key)

    def _format(self):
        return f"normalize[{self.operand}; {self.c:g}]"


class Clip(AbstractExpr):
    """`operand` clipped elementwise to `[low, high]` (shortcut models' magnitude
    clipping, FACM's clamp)."""

    operand: AbstractExpr
    low: float = eqx.field(static=True)
    high: float = eqx.field(static=True)

    def __check_init__(self):
        if not self.low < self.high:
            raise ValueError(f"Clip needs low < high; got [{self.low}, {self.high}].")

    @property
    def kind(self) -> Kind:
        return self.operand.kind

    @property
    def children(self):
        return (self.operand,)

    @property
    def key(self):
        return ("clip", self.low, self.high, self.operand.key)

    def _format(self):
        return f"clip[{self.operand}; {self.low:g}, {self.high:g}]"


# Derivatives -------------------------------------------------------------------------


class Derivative(AbstractExpr):
    """The directional derivative of a network or flow map at a point.

    `D(f, at=(x, a, b), along=(dx, da, db), by=strategy)` is
    `d/dh f(x + h dx, a + h da, b + h db) |_{h=0}`: for example the Eulerian
    `∂_s V + ∇_x V · v` is `D(V, at=(x, s, t), along=(v, 1, 0))` and the Lagrangian
    `∂_t F` is `D(F, at=(x, s, t), along=(0, 0, 1))`.

    - With [`fmcalc.JVP`][] the derivative of a network is one `jax.jvp`, whose
      primal is shared with every `f(at)` elsewhere in the residual; the derivative
      of a flow map is expanded by the product rule,
      `dF = dx + (db - da) V + (b - a) dV`, so that it too costs one JVP of `V`.
    - With [`fmcalc.FiniteDifference`][] it is the stencil `Σ w f(at + o h along) / h`
      of plain calls; the base point `f(at)` of the forward scheme is shared too.
    """

    function: Network | FlowMap
    at: tuple[AbstractExpr, AbstractExpr, AbstractExpr]
    along: tuple[AbstractExpr, AbstractExpr, AbstractExpr]
    strategy: AbstractDerivative

    def __check_init__(self):
        if not isinstance(self.function, Network | FlowMap):
            raise TypeError(
                "D(f, ...) differentiates a `Network` or a `FlowMap`; got "
                f"{type(self.function).__name__}."
            )
        if not isinstance(self.strategy, JVP | FiniteDifference):
            raise TypeError(
                "`by` must be a derivative strategy (fmcalc.JVP() or "
                f"fmcalc.FiniteDifference(step)); got {self.strategy!r}."
            )
        _check_point("D(f, at=...)", *self.at)
        dx, da, db = self.along
        if not (dx.kind == "vector" or _is_zero(dx)):
            raise TypeError(
                f"The tangent of x must be a vector (or 0); got the time `{dx}`."
            )
        for arg in (da, db):
            if arg.kind != "time":
                raise TypeError(f"Time tangents must be times; got the vector `{arg}`.")

    @property
    def lowered(self) -> AbstractExpr | None:
        """An equivalent expression of simpler nodes, or `None` for a JVP of a
        network (the interpreter's primitive)."""
        x, a, b = self.at
        dx, da, db = self.along
        if isinstance(self.strategy, FiniteDifference):
            if not (_is_zero(da) or _is_zero(db)):
                # At a corner (s = 1, t = 0 along (1, 1)) no step along both times
                # stays in [0, 1]; along one time at a time, one does.
                zero = _wrap(0.0)
                first = Derivative(
                    self.function, self.at, (dx, da, zero), self.strategy
                )
                second = Derivative(
                    self.function, self.at, (zero, zero, db), self.strategy
                )
                return first + second
            h = self.strategy.step
            moving = [(p, d) for p, d in ((a, da), (b, db)) if not _is_zero(d)]

            def fits(direction: float) -> AbstractExpr | int:
                # 1 where one step in `direction` keeps every time in [0, 1]: the
                # stencil is chosen at run time, per example, from these.
                both: AbstractExpr | int = 1
                for p, d in moving:
                    inside = Indicator(p + (direction * h) * d, 0.0, 1.0)
                    both = inside if isinstance(both, int) else both * inside
                return both

            terms = []
            for offset, weight in self.strategy.stencil(fits(1.0), fits(-1.0)):
                if isinstance(offset, float | int) and offset == 0:
                    point = (x, a, b)
                else:
                    c = offset * h
                    point = tuple(
                        p if _is_zero(d) else p + c * d
                        for p, d in zip((x, a, b), (dx, da, db), strict=True)
                    )
                numeric = isinstance(weight, float | int)
                scale = weight / h if numeric else weight * (1 / h)
                terms.append(scale * self.function(*point))
            out = terms[0]
            for term in terms[1:]:
                out = out + term
            return out
        if isinstance(self.function, FlowMap):
            network = self.function.network
            dV = Derivative(network, self.at, self.along, self.strategy)
            out = (db - da) * network(x, a, b) + (b - a) * dV
            return out if _is_zero(dx) else dx + out
        return None

    @property
    def kind(self) -> Kind:
        return "vector"

    @property
    def children(self):
        lowered = self.lowered
        return (lowered,) if lowered is not None else (*self.at, *self.along)

    @property
    def key(self):
        lowered = self.lowered
        if lowered is not None:
            return lowered.key
        network = self.function
        assert isinstance(network, Network)
        return (
            "jvp",
            (network.role, network.unconditional),
            tuple(e.key for e in self.at),
            tuple(e.key for e in self.along),
        )

    @property
    def primal(self) -> Call:
        """The call `f(at)` this JVP computes alongside its tangent."""
        assert isinstance(self.function, Network)
        return self.function(*self.at)

    def _format(self):
        f = self.function.name
        at = ", ".join(str(e) for e in self.at)
        along = ", ".join(str(e) for e in self.along)
        by = (
            ""
            if isinstance(self.strategy, JVP)
            else f"~{_strategy_name(self.strategy)}"
        )
        return f"D{by}[{f}]({at})·({along})"


def _strategy_name(strategy: AbstractDerivative) -> str:
    if isinstance(strategy, FiniteDifference):
        return f"fd[{strategy.scheme}, h={strategy.step:g}]"
    return type(strategy).__name__


def D(
    function: Network | FlowMap,
    *,
    at: tuple,
    along: tuple,
    by: AbstractDerivative = JVP(),
) -> Derivative:
    """Directional derivative of a network or flow map; see [`fmcalc.Derivative`][].

    **Arguments:**

    - `function`: a [`fmcalc.Network`][] (`V`) or [`fmcalc.FlowMap`][] (`F`).
    - `at`: the point `(x, a, b)`, expressions.
    - `along`: the tangent `(dx, da, db)`; numbers are allowed (`0`, `1`).
    - `by`: the strategy, [`fmcalc.JVP`][] (default) or [`fmcalc.FiniteDifference`][].

    **Returns:** the derivative as an expression (shaped like `x`).

    !!! Example

        ```python
        V = fmcalc.Network()
        v = fmcalc.ConditionalVelocity()
        x, s, t = fmcalc.X, fmcalc.S, fmcalc.T
        dV = fmcalc.D(V, at=(x, s, t), along=(v(x, s), 1, 0))  # ∂_s V + ∇_x V · v
        ```
    """
    if len(at) != 3 or len(along) != 3:
        raise ValueError(
            f"`at` and `along` must each have three entries (x, a, b); got {len(at)} "
            f"and {len(along)}."
        )
    return Derivative(
        function,
        tuple(_wrap(e) for e in at),  # pyright: ignore[reportArgumentType]
        tuple(_wrap(e) for e in along),  # pyright: ignore[reportArgumentType]
        by,
    )


def walk(expr: AbstractExpr, visit: Callable[[AbstractExpr], None]) -> None:
    """Call `visit` on every node of `expr` (lowered forms included), parents first."""
    visit(expr)
    for child in expr.children:
        walk(child, visit)
